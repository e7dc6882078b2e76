"""Full-compute trajectories on disk: one safetensors shard per prompt plus a JSON manifest.

A shard holds, for every step s and CFG branch b, what the final block saw and gave:
`{b}/{s:03d}/input.hidden`, `input.encoder`, `output.hidden`, `output.encoder`, and its conditioning
arguments (`cond.temb`, `cond.image_rotary_emb.0`, ...: every other tensor argument of the block's
forward, so the block can be called again offline on any input). Conditioning is stored only when it
changes from the previous step of the branch (rotary embeddings are the same at every step and would
otherwise dominate the shard); readers carry the last stored value forward.

Shards are written one prompt at a time and read memory-mapped, so memory stays bounded by one
trajectory while collecting and by one batch while training.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.runtime.context import CacheRuntime

MANIFEST = "manifest.json"
FORMAT = 2  # 2: conditioning arguments recorded (format 1 had inputs and outputs only)
CONDITION = "cond."


@functools.cache
def forward_signature(block_class: type) -> inspect.Signature:
    # Per class, once: `inspect.signature` costs far more than binding, and this runs at every call of
    # the final block (a CACHED step's hot path). The class's forward, not the instance's: a hooked
    # instance's `forward` is diffusers' wrapper.
    return inspect.signature(block_class.forward)


def bind_block_arguments(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A block call's arguments by parameter name (positional ones included)."""
    arguments = dict(forward_signature(type(block)).bind(block, *args, **kwargs).arguments)
    arguments.pop(next(iter(arguments)))  # `self`
    return arguments


def stream_names(block: torch.nn.Module) -> tuple[str, str | None]:
    """The names of a block's hidden-stream and (if it has one) encoder-stream arguments."""
    meta = TransformerBlockRegistry.get(block.__class__)
    encoder = (
        meta.encoder_hidden_states_argument_name
        if meta.return_encoder_hidden_states_index is not None
        else None
    )
    return meta.hidden_states_argument_name, encoder


def block_hidden_input(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-stream argument of a block call."""
    meta = TransformerBlockRegistry.get(block.__class__)
    return meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)


def block_hidden_output(block: torch.nn.Module, output: Any) -> torch.Tensor:
    """The hidden stream of a block's output: what the head reads after the final block."""
    meta = TransformerBlockRegistry.get(block.__class__)
    if meta.return_encoder_hidden_states_index is None:
        return output
    return output[meta.return_hidden_states_index]


def output_streams(output: Any) -> tuple[torch.Tensor, ...]:
    """A block's output as a tuple of streams (in the block's own output order)."""
    return (output,) if isinstance(output, torch.Tensor) else tuple(output)


def recorded_output(
    trajectory: Trajectory, block: torch.nn.Module, branch: str, step: int
) -> tuple[torch.Tensor, ...]:
    """The recorded output of the final block at (branch, step), in the block's output order."""
    meta = TransformerBlockRegistry.get(block.__class__)
    hidden = trajectory.feature(branch, step, "output.hidden")
    if meta.return_encoder_hidden_states_index is None:
        return (hidden,)
    streams: list[torch.Tensor | None] = [None, None]
    streams[meta.return_hidden_states_index] = hidden
    streams[meta.return_encoder_hidden_states_index] = trajectory.feature(branch, step, "output.encoder")
    return tuple(streams)


def flatten_condition(name: str, value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """`temb` -> ('temb', t); a tuple `image_rotary_emb` -> ('image_rotary_emb.0', cos), (...1, sin)."""
    if value is None or isinstance(value, bool | int | float | str):
        return  # constants of the call (flags, token counts): nothing a step changes, nothing to store
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value):
        for i, item in enumerate(value):
            yield f"{name}.{i}", item
    elif isinstance(value, dict) and not value:
        return
    elif isinstance(value, tuple | list) and not any(isinstance(v, torch.Tensor) for v in value):
        return  # e.g. HunyuanVideo's extra positional (None, token count)
    else:
        raise LbridgeError(
            f"cannot record the final block's argument '{name}' of type {type(value).__name__} "
            "(accepted: tensors, tuples of tensors, None)"
        )


class RecordFinalBlockHook(ModelHook):
    """Records the final block's input and output streams and its conditioning at every call."""

    def __init__(self, runtime: CacheRuntime, block: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.runtime, self.block, self.dtype = runtime, block, dtype
        self.hidden_name, self.encoder_name = stream_names(block)
        self.reset()

    def _key(self, name: str) -> str:
        return f"{self.runtime.branch}/{self.runtime.step:03d}/{name}"

    def _keep_feature(self, name: str, value: torch.Tensor) -> None:
        self.tensors[self._key(name)] = value.detach().to("cpu", self.dtype).contiguous()

    def _keep_condition(self, name: str, value: torch.Tensor) -> None:
        last = self._last_condition.get((self.runtime.branch, name))
        if last is not None and last.shape == value.shape and torch.equal(last, value):
            return
        # Conditioning keeps its own dtype: it is small once deduplicated, and rotary tables lose
        # precision in bfloat16.
        stored = value.detach().to("cpu").contiguous()
        self._last_condition[(self.runtime.branch, name)] = value.detach()
        self.tensors[self._key(CONDITION + name)] = stored

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        arguments = bind_block_arguments(self.block, args, kwargs)
        self._keep_feature("input.hidden", arguments[self.hidden_name])
        if self.encoder_name is not None:
            self._keep_feature("input.encoder", arguments[self.encoder_name])
        for name, value in arguments.items():
            if name not in (self.hidden_name, self.encoder_name):
                for key, tensor in flatten_condition(name, value):
                    self._keep_condition(key, tensor)
        output = self.fn_ref.original_forward(*args, **kwargs)
        self._keep_feature("output.hidden", block_hidden_output(self.block, output))
        if self.encoder_name is not None:
            meta = TransformerBlockRegistry.get(self.block.__class__)
            self._keep_feature("output.encoder", output[meta.return_encoder_hidden_states_index])
        return output

    def reset(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._last_condition: dict[tuple[str, str], torch.Tensor] = {}


class Trajectory:
    """One prompt's recorded trajectory, read lazily from its memory-mapped shard."""

    def __init__(self, path: Path, prompt: str = "", seed: int | None = None) -> None:
        self.path, self.prompt, self.seed = path, prompt, seed
        try:
            self._file = safe_open(str(path), framework="pt")
            keys = list(self._file.keys())
        except (SafetensorError, OSError) as err:
            raise LbridgeError(
                f"trajectory shard {path} is unreadable ({err}): run `lbridge collect` with the same "
                "config again, it records unreadable shards again"
            ) from None
        self._keys = set(keys)
        self.branches = sorted({k.split("/")[0] for k in keys})
        self.steps = sorted({int(k.split("/")[1]) for k in keys})
        # For each branch and conditioning name, the steps at which a new value was stored.
        self._condition_steps: dict[str, dict[str, list[int]]] = {b: {} for b in self.branches}
        for key in sorted(keys):
            branch, step, name = key.split("/", 2)
            if name.startswith(CONDITION):
                self._condition_steps[branch].setdefault(name[len(CONDITION) :], []).append(int(step))

    def _stored(self, branch: str, step: int, name: str) -> str:
        key = f"{branch}/{step:03d}/{name}"
        if key not in self._keys:
            raise LbridgeError(f"trajectory shard {self.path} has no '{key}': collect it again")
        return key

    def feature(self, branch: str, step: int, name: str) -> torch.Tensor:
        return self._file.get_tensor(self._stored(branch, step, name))

    def shape(self, branch: str, step: int, name: str) -> tuple[int, ...]:
        """A stored tensor's shape, read from the header (no data loaded)."""
        return tuple(self._file.get_slice(self._stored(branch, step, name)).get_shape())

    def has(self, branch: str, step: int, name: str) -> bool:
        return f"{branch}/{step:03d}/{name}" in self._keys

    def condition(self, branch: str, step: int) -> dict[str, Any]:
        """The block's conditioning arguments at `step`, carried forward from its last change."""
        flat: dict[str, torch.Tensor] = {}
        for name, stored_at in self._condition_steps[branch].items():
            last = max((s for s in stored_at if s <= step), default=None)
            if last is not None:
                flat[name] = self._file.get_tensor(f"{branch}/{last:03d}/{CONDITION}{name}")
        arguments: dict[str, Any] = {}
        for name in sorted(flat):
            base, _, index = name.partition(".")
            if index:
                arguments.setdefault(base, []).append(flat[name])
            else:
                arguments[base] = flat[name]
        return {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest)


def read_manifest(root: Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a trajectory set; with `expect`, refuse a set collected for another config."""
    path = root / MANIFEST
    if not path.is_file():
        raise LbridgeError(f"no trajectories at {root}: run `lbridge collect` with the same model first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise LbridgeError(f"{path} is not valid JSON: delete {root} and collect again") from None
    for key, value in (expect or {}).items():
        if manifest.get(key) != value:
            raise LbridgeError(
                f"trajectories at {root} were collected with {key}={manifest.get(key)!r}, not {value!r}"
            )
    return manifest


def load_trajectories(
    root: Path, indices: list[int], expect: dict[str, Any] | None = None
) -> list[Trajectory]:
    """The trajectories of prompts `indices` of the set at `root` (all must have been collected)."""
    manifest = read_manifest(root, expect)
    missing = [i for i in indices if str(i) not in manifest["shards"]]
    if missing:
        raise LbridgeError(f"trajectories at {root} lack prompts {missing}: run `lbridge collect` for them")
    shards = [manifest["shards"][str(i)] for i in indices]
    return [Trajectory(root / s["file"], s["prompt"], s["seed"]) for s in shards]


def save_shard(root: Path, index: int, tensors: dict[str, torch.Tensor]) -> str:
    name = f"prompt-{index:05d}.safetensors"
    tmp = root / f".{name}.tmp"
    save_file(_unshared(tensors), str(tmp))
    tmp.replace(root / name)
    return name


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two keys on one storage (Qwen-Image hands both CFG branches the same rotary
    table): copy every tensor whose storage an earlier key already uses."""
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return result


def load_shard(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / name))
