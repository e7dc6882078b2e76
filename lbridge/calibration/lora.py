"""peft LoRA on the final transformer block: the 'bridge' that LearniBridge runs at CACHED steps.

The bridge is a copy of the final block that *shares* its parameters (no extra memory for the base
weights); peft injects the LoRA layers into the copy only. So FULL steps run the untouched original
block, and no adapter has to be switched off and on at every step. Adapters are saved one file each
in the diffusers/peft LoRA layout (keys named as in the transformer, LoRA config in the safetensors
header), loadable with `transformer.load_lora_adapter(file, prefix=None)` too.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lbridge.calibration.trajectories import Trajectory, block_hidden_output, forward_signature, stream_names
from lbridge.errors import LbridgeError
from lbridge.runtime.schedule import Schedule

SHARED = "shared"


def offset_adapter(offset: int) -> str:
    return f"offset_{offset}"


def lora_targets(block: torch.nn.Module) -> list[str]:
    """The block's attention (self and cross) and feed-forward linears, not its AdaLN modulation.

    Modulation linears (`norm*.linear`, `*_mod`) map the timestep embedding to scales and gates: the
    bridge has to correct features, not re-learn how the timestep enters.
    """
    names = []
    for name, module in block.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and not any(
            p.startswith("norm") or p.endswith("mod") for p in parts
        ):
            names.append(name)
    if not names:
        raise LbridgeError(f"{type(block).__name__} has no attention or feed-forward linear layers for LoRA")
    return names


@contextmanager
def frozen_except(module: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> Iterator[None]:
    """Only `trainable` requires grad inside the block; every flag is restored on exit.

    The bridge shares its base parameters with the pipeline's transformer: their flags are the
    user's and must come back unchanged.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    keep = {id(p) for p in trainable}
    try:
        for p in params:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


#: Instance attributes diffusers' HookRegistry sets on a hooked module: never copied into the bridge.
HOOK_ATTRIBUTES = ("forward", "_diffusers_hook")


def make_bridge(block: torch.nn.Module) -> torch.nn.Module:
    """A hook-free copy of `block` whose parameters and buffers are the block's own tensors (shared)."""
    memo: dict[int, Any] = {id(t): t for t in (*block.parameters(), *block.buffers())}
    for module in block.modules():
        for attr in HOOK_ATTRIBUTES:
            if attr in module.__dict__:
                memo[id(module.__dict__[attr])] = None
    bridge = copy.deepcopy(block, memo)
    for module in bridge.modules():
        for attr in HOOK_ATTRIBUTES:
            module.__dict__.pop(attr, None)
    return bridge


def add_lora(bridge: torch.nn.Module, name: str, rank: int, alpha: float, targets: list[str]) -> None:
    """Inject a zero-initialised LoRA adapter `name` (the bridge then equals the plain block).

    peft draws lora_A (Kaiming) from the global RNG; whatever ran before (sampling, other adapters)
    would then change the fit. A seed of the adapter's name makes calibration reproducible run to run.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    devices = sorted({p.device.index or 0 for p in bridge.parameters() if p.device.type == "cuda"})
    # frozen_except: peft would mark the shared base parameters frozen
    with torch.random.fork_rng(devices=devices), frozen_except(bridge, []):
        torch.manual_seed(zlib.crc32(name.encode()))
        inject_adapter_in_model(config, bridge, adapter_name=name)


def adapter_names(bridge: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for module in bridge.modules():
        if isinstance(module, BaseTunerLayer):
            names.update(module.lora_A.keys())
    return names


def activate(bridge: torch.nn.Module, name: str) -> None:
    set_adapter(bridge, name, inference_mode=True)


def lora_layers(bridge: torch.nn.Module, name: str | None = None) -> Iterator[tuple[str, BaseTunerLayer]]:
    """(path in the bridge, peft LoRA layer) of every layer carrying adapter `name` (any adapter: None)."""
    for path, module in bridge.named_modules():
        if isinstance(module, BaseTunerLayer) and (name is None or name in module.lora_A):
            yield path, module


def merge_sources(bridge: torch.nn.Module, name: str) -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor `merged_weights(bridge, name)` derives from (a walk of the bridge)."""
    sources = []
    for path, layer in lora_layers(bridge):
        sources.append((path, layer.get_base_layer().weight))
        if name in layer.lora_A:
            sources += [(path, layer.lora_A[name].weight), (path, layer.lora_B[name].weight)]
    return sources


def tensor_state(sources: list[tuple[str, torch.Tensor]]) -> tuple[tuple[str, int, int], ...]:
    """Changes when one of the tensors is modified in place (`_version`) or replaced (`data_ptr`)."""
    return tuple((path, t.data_ptr(), t._version) for path, t in sources)


@torch.no_grad()
def merged_weights(bridge: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """Per LoRA target (path): base weight + adapter `name`'s delta (the base alone where `name` has none).

    A plain copy of the block with these weights runs one matmul per target instead of peft's two
    extra ones and a scaled add. They are new tensors: the block (whose weights the bridge shares)
    is untouched.
    """
    weights = {}
    for path, layer in lora_layers(bridge):
        base = layer.get_base_layer().weight
        if name in layer.lora_A:
            merged = base + layer.get_delta_weight(name).to(base.dtype)  # peft's scaling * B @ A
            weights[path] = torch.nn.Parameter(merged, requires_grad=False)
        else:
            weights[path] = base
    return weights


def adapter_parameters(bridge: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in bridge.named_parameters() if "lora_" in n and n.split(".")[-2] == name]


# -- training pairs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """Input of the final block at FULL step `source`, conditioning and target output at CACHED `step`."""

    trajectory: Trajectory
    branch: str
    source: int
    step: int

    @property
    def offset(self) -> int:
        return self.step - self.source


def training_pairs(trajectories: list[Trajectory], schedule: Schedule) -> list[Pair]:
    """(x^L_f, y_{f+k}) for every FULL step f and k = 1..N-1 (every CACHED step), every branch."""
    return [
        Pair(t, branch, schedule.last_full(step), step)
        for t in trajectories
        for branch in t.branches
        for step in range(len(schedule))
        if not schedule.is_full(step)
    ]


#: Supplies a pair's final-block input streams (hidden, encoder): stale x^L_f, or a forecast of it.
InputFn = Callable[[Pair], tuple[torch.Tensor, torch.Tensor | None]]


def stale_input(pair: Pair) -> tuple[torch.Tensor, torch.Tensor | None]:
    t = pair.trajectory
    encoder = (
        t.feature(pair.branch, pair.source, "input.encoder")
        if t.has(pair.branch, pair.source, "input.encoder")
        else None
    )
    return t.feature(pair.branch, pair.source, "input.hidden"), encoder


def _collate(values: list[Any], batch_dim: int) -> Any:
    """Concatenate per-call tensors along the batch; arguments shared by the batch (rotary) are taken once."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_collate([v[i] for v in values], batch_dim) for i in range(len(first)))
    if first.dim() >= 1 and first.shape[0] == batch_dim:
        return torch.cat(values)
    return first


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class PairLoader:
    """Builds bridge calls (keyword arguments) and targets for a batch of pairs, on the bridge's device."""

    def __init__(self, bridge: torch.nn.Module, input_fn: InputFn = stale_input) -> None:
        self.hidden_name, self.encoder_name = stream_names(bridge)
        parameter = next(bridge.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.input_fn = input_fn
        # Required arguments that were None at collection are not stored (e.g. Qwen-Image's
        # `encoder_hidden_states_mask`): pass None again.
        parameters = list(forward_signature(type(bridge)).parameters.values())[1:]
        self.required = [p.name for p in parameters if p.default is p.empty and p.kind in _NAMED]

    def call(self, pair: Pair) -> dict[str, Any]:
        arguments = dict.fromkeys(self.required)
        arguments.update(pair.trajectory.condition(pair.branch, pair.step))
        hidden, encoder = self.input_fn(pair)
        arguments[self.hidden_name] = hidden.to(self.dtype)
        if self.encoder_name is not None:
            arguments[self.encoder_name] = encoder.to(self.dtype)
        return arguments

    def same_shape_groups(self, pairs: list[Pair]) -> list[list[Pair]]:
        """Pairs whose calls can share a batch: same input stream shapes (hence same rotary/masks)."""
        groups: dict[tuple, list[Pair]] = {}
        for pair in pairs:
            names = ("input.hidden", "input.encoder") if self.encoder_name is not None else ("input.hidden",)
            key = tuple(pair.trajectory.shape(pair.branch, pair.source, n) for n in names)
            groups.setdefault(key, []).append(pair)
        return list(groups.values())

    def batch(self, pairs: list[Pair]) -> tuple[dict[str, Any], torch.Tensor]:
        calls = [self.call(p) for p in pairs]
        batch_dim = calls[0][self.hidden_name].shape[0]
        arguments = {k: _collate([c[k] for c in calls], batch_dim) for k in calls[0]}
        arguments = {k: _to(v, self.device) for k, v in arguments.items()}
        target = torch.cat([p.trajectory.feature(p.branch, p.step, "output.hidden") for p in pairs])
        return arguments, target.to(self.device, torch.float32)


def _to(value: Any, device: torch.device) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(v.to(device) for v in value)
    return value.to(device)


#: Maps a final-block hidden output (and the block call's arguments) to the space the loss is taken in.
LossSpace = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]


def block_space(hidden: torch.Tensor, arguments: dict[str, Any]) -> torch.Tensor:
    return hidden


def normed_space(hidden: torch.Tensor, arguments: dict[str, Any]) -> torch.Tensor:
    """Per-token layer norm without affine: DiT heads start with one, so what it removes is never seen."""
    return torch.nn.functional.layer_norm(hidden.float(), hidden.shape[-1:])


def pair_loss(
    bridge: torch.nn.Module, loader: PairLoader, pairs: list[Pair], space: LossSpace = block_space
) -> torch.Tensor:
    """MSE over `pairs`, run as one batch per sequence shape (Qwen-Image's text length varies by prompt)."""
    total = None
    for group in loader.same_shape_groups(pairs):
        arguments, target = loader.batch(group)
        output = block_hidden_output(bridge, bridge(**arguments))
        loss = torch.nn.functional.mse_loss(
            space(output, arguments).float(), space(target, arguments).float()
        )
        total = loss * len(group) if total is None else total + loss * len(group)
    return total / len(pairs)


@torch.no_grad()
def mean_loss(
    bridge: torch.nn.Module,
    loader: PairLoader,
    pairs: list[Pair],
    batch_size: int,
    space: LossSpace = block_space,
) -> float:
    """MSE over all `pairs` with the active adapter (weighted by batch size)."""
    total = 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        total += float(pair_loss(bridge, loader, chunk, space)) * len(chunk)
    return total / len(pairs)


@dataclass
class TrainResult:
    losses: list[float]
    mse_before: float
    mse_after: float
    seconds: float


def train_adapter(
    bridge: torch.nn.Module,
    name: str,
    pairs: list[Pair],
    loader: PairLoader,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    space: LossSpace = block_space,
    frozen: torch.nn.Module | None = None,
) -> TrainResult:
    """Fit adapter `name` on `pairs` with MSE in `space` (AdamW, cosine decay); other adapters stay untouched.

    `frozen`: a module the loss runs through besides the bridge (the transformer, for its head),
    kept out of the gradient.
    """
    start = time.perf_counter()
    activate(bridge, name)
    params = adapter_parameters(bridge, name)
    batch_size = min(batch_size, len(pairs))
    mse_before = mean_loss(bridge, loader, pairs, batch_size, space)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    outside = frozen_except(frozen, []) if frozen is not None else contextlib.nullcontext()
    with outside, frozen_except(bridge, params), torch.enable_grad():
        order: list[int] = []
        for _ in tqdm(range(steps), desc=f"calibrate {name}", unit="step"):
            if len(order) < batch_size:  # epochs of random permutations: every pair seen equally often
                order += torch.randperm(len(pairs), generator=generator).tolist()
            batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
            loss = pair_loss(bridge, loader, batch, space)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            decay.step()
            # Kept on the device: `.item()` here would stall the host on the GPU at every step.
            losses.append(loss.detach())
    mse_after = mean_loss(bridge, loader, pairs, batch_size, space)
    curve = torch.stack(losses).tolist() if losses else []
    return TrainResult(curve, mse_before, mse_after, time.perf_counter() - start)


# -- files -----------------------------------------------------------------------------------------
def module_path(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The qualified name of `module` inside `root` ('single_transformer_blocks.3')."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise LbridgeError(f"{type(module).__name__} is not part of {type(root).__name__}")


def save_adapter(
    bridge: torch.nn.Module, name: str, path: Path, prefix: str, rank: int, alpha: float
) -> None:
    """One adapter in the diffusers LoRA layout: `<prefix>.<module>.lora_A.weight`, config in the header."""
    state = get_peft_model_state_dict(bridge, adapter_name=name)
    tensors = {f"{prefix}.{key}": value.detach().cpu().contiguous() for key, value in state.items()}
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    config = {"r": rank, "lora_alpha": alpha, "target_modules": [f"{prefix}.{t}" for t in targets]}
    save_file(tensors, str(path), metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config)})


def load_adapter(
    bridge: torch.nn.Module, name: str, path: Path, prefix: str, rank: int, alpha: float
) -> None:
    """Load a file written by `save_adapter` into the bridge as adapter `name` (checking rank and alpha)."""
    with safe_open(str(path), framework="pt") as file:
        header = json.loads((file.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
        if (header.get("r"), header.get("lora_alpha")) != (rank, alpha):
            raise LbridgeError(
                f"{path} holds a rank {header.get('r')} / alpha {header.get('lora_alpha')} adapter, "
                f"not rank {rank} / alpha {alpha}: calibrate again with this config"
            )
        state = {key.removeprefix(prefix + "."): file.get_tensor(key) for key in file.keys()}
    if name not in adapter_names(bridge):
        add_lora(bridge, name, rank, alpha, [t.removeprefix(prefix + ".") for t in header["target_modules"]])
    result = set_peft_model_state_dict(bridge, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise LbridgeError(
            f"{path} does not fit the final block: unexpected keys {result.unexpected_keys[:3]}"
        )
