"""What lbridge needs to know about a model family: how to load it, call it, and where its blocks are."""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from diffusers import DiffusionPipeline
from diffusers.models.normalization import AdaLayerNormZero
from PIL import Image

from lbridge.calibration.trajectories import stream_names
from lbridge.config import group_options, load_option
from lbridge.errors import LbridgeError
from lbridge.io import safetensors_problem

#: What `generate` returns: an image, or the frames of a video in order.
Sample = Image.Image | list[Image.Image]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; under torchrun/accelerate `cuda` is this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process in data-parallel runs
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise LbridgeError(
            f"model.device={device} is not a device (accepted: auto, cpu, cuda, cuda:N)"
        ) from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise LbridgeError(f"model.device={device}: {torch.cuda.device_count()} CUDA device(s) here")
    return resolved


def check_weight_files(root: Path) -> None:
    """A truncated or corrupt safetensors shard under a local model.path stops with the file named
    (diffusers would report it as a generic OSError, indistinguishable from missing weights)."""
    for file in sorted(root.rglob("*.safetensors")):
        if (problem := safetensors_problem(file)) is not None:
            raise LbridgeError(
                f"model.path={root}: {file.relative_to(root)} is truncated or corrupt ({problem}); "
                "download that file again"
            )


class ModelAdapter:
    """Base adapter. Subclasses name their transformer class and override what differs.

    Constructor arguments are the keys of `conf/model/<name>.yaml`.
    """

    transformer_class: ClassVar[type | None] = None

    @classmethod
    def overrides(cls, method: str) -> bool:
        """Whether the family's adapter answers `method` itself (the base's answer fits none of it:
        a step embedding to batch, a head to fit, a modulation that can be per token)."""
        return getattr(cls, method) is not getattr(ModelAdapter, method)

    def __init__(
        self,
        name: str,
        path: str | None = None,
        hub_id: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        call_kwargs: dict[str, Any] | None = None,
        metrics: list[str] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise LbridgeError(f"unknown model.dtype '{dtype}' (accepted: {', '.join(DTYPES)})")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise LbridgeError(f"model.num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        if not isinstance(guidance_scale, int | float):
            raise LbridgeError(f"model.guidance_scale={guidance_scale!r} must be a number")
        self.name, self.path, self.hub_id = name, path, hub_id
        self.dtype = DTYPES[dtype]
        self.device = resolve_device(device)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.height, self.width = height, width
        self.call_kwargs = dict(call_kwargs or {})
        self.metrics = list(metrics or ["psnr", "ssim"])  # what `lbridge eval` computes for this model

    # -- loading -----------------------------------------------------------------------------
    def load_pipeline(self) -> DiffusionPipeline:
        raise NotImplementedError

    def from_pretrained(self, pipeline_class: type[DiffusionPipeline], **kwargs: Any) -> DiffusionPipeline:
        """Load from `model.path` if set, else from the hub id; one clear line when unavailable."""
        source = self.path or self.hub_id
        if self.path is not None and not Path(self.path).exists():
            raise LbridgeError(
                f"model.path={self.path} does not exist: point model.path at the {self.name} weights"
            )
        if self.path is not None:
            check_weight_files(Path(self.path))
        try:
            pipe = pipeline_class.from_pretrained(source, dtype=self.dtype, **kwargs)
        except (OSError, ValueError) as err:  # hub errors subclass OSError
            raise LbridgeError(
                f"cannot load {self.name} weights from '{source}' (offline or not downloaded: "
                f"{type(err).__name__}); download them and set model.path=/local/dir"
            ) from None
        return pipe.to(self.device)

    # -- calling -----------------------------------------------------------------------------
    def pipeline_kwargs(self) -> dict[str, Any]:
        kwargs = {"num_inference_steps": self.num_inference_steps, **self.call_kwargs}
        if self.height is not None:
            kwargs.update(height=self.height, width=self.width)
        return kwargs

    def prompt_kwargs(self, pipe: DiffusionPipeline, prompt: str) -> dict[str, Any]:
        """The pipeline arguments that carry one prompt (class-conditional models map it to a label)."""
        return {"prompt": prompt}

    def generator(self, seed: int) -> torch.Generator:
        # CPU generators make the initial noise identical across devices for the same seed.
        return torch.Generator("cpu").manual_seed(seed)

    def generate(self, pipe: DiffusionPipeline, prompt: str, seed: int) -> Sample:
        """One sample: an image, or a video's frames (video adapters)."""
        kwargs = self.prompt_kwargs(pipe, prompt)
        return pipe(**kwargs, generator=self.generator(seed), **self.pipeline_kwargs()).images[0]

    # -- structure ---------------------------------------------------------------------------
    @staticmethod
    def transformer(pipe: DiffusionPipeline) -> torch.nn.Module:
        return pipe.transformer

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """All transformer blocks in execution order; the last one is the 'final block'."""
        raise NotImplementedError

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention and MLP submodules of a block whose outputs FORA reuses."""
        raise NotImplementedError

    def block_only_modules(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """Modules outside the blocks whose outputs only the blocks read: the text stream's embedders
        (FLUX's `context_embedder`, HunyuanVideo's token refiner). A CACHED step that runs no block
        on the current inputs does not need them (`CacheMethod.reuse_block_only_modules`). Empty:
        every module runs at every call."""
        return []

    def token_chains(self, block: torch.nn.Module) -> list[TokenChain]:
        """The stretches of the block that act on each token alone (see TokenChain)."""
        return []

    def attention_inputs(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        """Modules whose tokens only the block's attentions read (FLUX's `norm1`: its gates do not
        depend on the tokens). A method that reuses the attention outputs can run them on no tokens."""
        return []

    def reused_attention_forward(self, block: torch.nn.Module) -> Callable[..., Any] | None:
        """The block's forward at a step whose attention outputs are reused and whose token chains run
        on the refreshed tokens (ToCa's CACHED step), called as `forward(block, step, *args,
        **kwargs)` with a `ReusedAttentionStep`: the block's own arithmetic, its chains' modules
        called unhooked. It reads the step's tensors alone (Python state of the cache stays out of
        it), so regional compilation makes it one graph. None: the block's own forward runs, its
        modules' hooks doing the same work at a few microseconds of host time each
        (docs/design.md, "Speed benchmark")."""
        return None

    def full_step_forward(self, block: torch.nn.Module) -> Callable[..., Any] | None:
        """The block's forward at the FULL steps that `reused_attention_forward`'s steps read from,
        called as `forward(block, step, *args, **kwargs)` with a `FullStep`: the block's own
        arithmetic, operation for operation, its hooked modules run through `step` (unhooked).
        Returns `(outputs, attentions, exits)`: the block's outputs, its attention modules' outputs
        as they returned them (in `step.attentions` order), and each chain's exit output over every
        token, which is what those modules' hooks would keep. Compiled, a FULL block is then one
        graph, as in full compute. None: the block's own forward runs, under its modules' hooks."""
        return None

    def modulation_per_token(self, block: torch.nn.Module, arguments: dict[str, Any]) -> bool:
        """Whether this block call's AdaLN modulation differs per token (Wan2.2 TI2V's per-token
        timesteps), from its arguments by name. A block's own forward applies it to every token,
        so ToCa's token chains under the modules' hooks cannot run on the refreshed tokens alone;
        the one-forward blocks gather it. False: one modulation per sample."""
        return False

    def modulated_input(self, block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        """TeaCache's change indicator: the first block's timestep-modulated input, from the block's
        call arguments by name (all of them, or those `probe_sources` names).

        The default is the block's raw hidden input (no modulation), which works for every family;
        adapters override it with what the family's reference TeaCache measures (FLUX, HunyuanVideo:
        the modulated input; Wan: the step's modulation vectors alone)."""
        return arguments[stream_names(block)[0]]

    def probe_sources(self, transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The modules whose outputs (a tuple's first element) are, unchanged or reshaped as views of
        the same memory, the first block's arguments that `modulated_input` reads (which must give
        the same indicator for both shapes), by argument name, and which run before every one
        of `block_only_modules` in a call. TeaCache then gives its verdict before those run, and
        its CACHED calls leave them unrun (the first block checks that it got those very tensors,
        or views of their memory in the same element order).
        Empty: its verdict waits for the first block."""
        return {}

    def step_embedding(self, transformer: torch.nn.Module) -> torch.nn.Module | None:
        """The module that turns a call's timestep (its first argument) and per-sample inputs into
        the step embedding the blocks' AdaLN modulation reads; None: `modulation=batched` unavailable."""
        return None

    def embedding_timesteps(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The timestep `step_embedding` receives at each of the scheduler's `timesteps`, computed as
        the pipeline and the transformer compute it (same dtype casts: `modulation=batched` checks
        every call against it exactly)."""
        raise LbridgeError(f"model '{self.name}' does not map scheduler timesteps to its step embedding's")

    def rotary_embedding(self, transformer: torch.nn.Module) -> torch.nn.Module | None:
        """The module that computes the call's rotary position embedding; None: recomputed as the
        model does (lbridge/runtime/rotary.py)."""
        return None

    def rotary_inputs(self, call: dict[str, Any], args: tuple, kwargs: dict) -> tuple | None:
        """What fixes `rotary_embedding`'s output besides its buffers, from the transformer call's
        keyword arguments (`call`) or the rotary module's own (`args`, `kwargs`); None: unknown for
        this call (it is computed)."""
        return None

    def head(self, transformer: torch.nn.Module, hidden: torch.Tensor, arguments: dict) -> torch.Tensor:
        """The transformer's output from the final block's hidden output (`arguments`: that block's call)."""
        raise LbridgeError(f"model '{self.name}' does not define its head: use method.loss=block or normed")


def _itself(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class TokenChain:
    """A stretch of a block that acts on each token alone, from `entry` to `exit`.

    `entry` reads the block's tokens and returns tokens (or a tuple of them first, then values that
    do not depend on them: AdaLN gates); `exit`'s output goes back into the block's tokens; nothing
    between mixes tokens (norms, modulation, MLPs). A token-wise cache (ToCa) can then run the whole
    stretch on the tokens it refreshes, `exit` keeping every token's output. FLUX's double block:
    `norm2 -> modulation -> ff`.

    `attention`: parallel blocks (FLUX's and HunyuanVideo's single-stream `proj_out(cat([attn(x),
    act_mlp(proj_mlp(x))]))`, x the output of `norm`) also feed `entry`'s tokens to an attention
    whose output joins the stretch before `exit`. Once that output is reused, the stretch runs on
    the refreshed tokens with the attention's output gathered at them.
    """

    entry: torch.nn.Module
    exit: torch.nn.Module
    attention: torch.nn.Module | None = None
    #: The attention's output as the one (batch, tokens, dim) tensor the stretch reads, in `entry`'s
    #: token order; `split` is its inverse (from a tensor of any number of tokens).
    join: Callable[[Any], torch.Tensor] = _itself
    split: Callable[[torch.Tensor], Any] = _itself


class ChainStep(Protocol):
    """One token chain of a block at a CACHED step (`ReusedAttentionStep`), in the order the block
    runs it: `gather` its input tokens, `entry` on them, then `exit` on what the block made of them.
    At a FULL step (`FullStep`) `gather` returns every token and `exit` the module's output."""

    def gather(self, *parts: torch.Tensor) -> torch.Tensor:
        """The refreshed tokens of the chain's input (picked for this call before it began), given
        whole or, at a CACHED step, as parts along dim 1 (their concatenation's tokens)."""
        ...

    def entry(self, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The entry module's own forward on the gathered tokens."""
        ...

    def exit(self, tokens: torch.Tensor) -> torch.Tensor:
        """The exit module on the refreshed tokens' input, written into its kept output: every token's."""
        ...

    def attention(self) -> torch.Tensor:
        """Parallel blocks: the attention's reused output (`TokenChain.join`) at the refreshed tokens."""
        ...


@dataclass
class ReusedAttentionStep:
    """What `ModelAdapter.reused_attention_forward` computes a block from instead of its attentions."""

    # The reused outputs of the block's attention modules, as each returned it, in `attn_mlp_sites`
    # order (FLUX's double block: its one; Wan's: self- then cross-attention). Parallel blocks: none,
    # their chain gathers its attention's output (`ChainStep.attention`).
    attentions: list[Any]
    chains: list[ChainStep]  # the block's chains, in `token_chains(block)` order


@dataclass
class FullStep:
    """The forwards, unhooked, through which `ModelAdapter.full_step_forward` runs a block's modules."""

    attention_inputs: list[Callable[..., Any]]  # those of `attention_inputs(block)`, in its order
    attentions: list[Callable[..., Any]]  # the attention modules', in `attn_mlp_sites` order
    chains: list[ChainStep]  # the block's chains, in `token_chains(block)` order


def modulation_alone(norm: torch.nn.Module | None) -> bool:
    """A diffusers `AdaLayerNormZero` whose modulation comes from the `emb` it is given alone (FLUX's
    and HunyuanVideo's `norm1`, `norm1_context`), not from an embedding of the timestep of its own."""
    return type(norm) is AdaLayerNormZero and norm.emb is None


def adaln_zero_modulation(norm: AdaLayerNormZero, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Its six chunks as its forward computes them: shift, scale, gate of the attention, then of the MLP."""
    return norm.linear(norm.silu(emb)).chunk(6, dim=1)


def adaln_zero_gates(norm: AdaLayerNormZero, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`norm(x, emb=emb)`'s attention gate and MLP modulation, for no tokens (the attention reused)."""
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_zero_modulation(norm, emb)
    return gate_msa, shift_mlp, scale_mlp, gate_mlp


def dual_stream_attention(
    step: FullStep, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
    **attention_kwargs: Any,
) -> tuple[Any, tuple[tuple, tuple]]:  # fmt: skip
    """FLUX's and HunyuanVideo's double block at a FULL step up to its joint attention: `norm1` and
    `norm1_context` on the two streams, the attention on both; its output, and each stream's gates
    (as `dual_stream_gates` gives them)."""
    (norm1, norm1_context), (attend,) = step.attention_inputs, step.attentions
    norm_hidden_states, *gates = norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, *context_gates = norm1_context(encoder_hidden_states, emb=temb)
    attention = attend(
        hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states, **attention_kwargs
    )
    return attention, (gates, context_gates)


def dual_stream_gates(block: torch.nn.Module, temb: torch.Tensor) -> tuple[tuple, tuple]:
    """The double block's two streams' gates at a step whose attention is reused: no token normed."""
    return adaln_zero_gates(block.norm1, temb), adaln_zero_gates(block.norm1_context, temb)


def gated_stream(
    x: torch.Tensor, attention: torch.Tensor, gates: tuple, chain: ChainStep
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stream of FLUX's and HunyuanVideo's double blocks after the attention: its gated residual,
    then the chain (`norm2 -> modulation -> ff`) and its gated residual; the stream's output and the
    MLP's (every token's). `gates`: `adaln_zero_gates`'."""
    gate_msa, shift_mlp, scale_mlp, gate_mlp = gates
    x = x + gate_msa.unsqueeze(1) * attention
    norm_x = chain.entry(chain.gather(x))
    norm_x = norm_x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff_output = chain.exit(norm_x)
    return x + gate_mlp.unsqueeze(1) * ff_output, ff_output


def dual_stream_after_attention(
    hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, attention: tuple,
    gates: tuple[tuple, tuple], chains: list[ChainStep],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """FLUX's and HunyuanVideo's double block from its attention's output on (`attention`: the image
    and text streams' outputs, first): the image and text streams' outputs, and their `ff` outputs.
    diffusers' HunyuanVideo block multiplies `attn * gate` where FLUX has `gate * attn`: the same
    product, bit for bit."""
    (image, text), (attn_output, context_attn_output) = chains, attention[:2]
    hidden_states, ff_output = gated_stream(hidden_states, attn_output, gates[0], image)
    encoder_hidden_states, context_ff = gated_stream(
        encoder_hidden_states, context_attn_output, gates[1], text
    )
    return hidden_states, encoder_hidden_states, [ff_output, context_ff]


def dual_stream_forward(
    block: torch.nn.Module, forwards: dict[type, Callable[..., Any]]
) -> Callable[..., Any] | None:
    """FLUX's and HunyuanVideo's one-forward blocks: the forward `forwards` names for the block's class.
    None for a double block whose `norm1`s do not take their modulation from `emb` alone (as the
    reused forward computes their gates: `adaln_zero_gates`), and for blocks of other classes."""
    forward = next((run for cls, run in forwards.items() if isinstance(block, cls)), None)
    norms = [getattr(block, name) for name in ("norm1", "norm1_context") if hasattr(block, name)]
    return forward if all(modulation_alone(norm) for norm in norms) else None


def dual_stream_chains(block: torch.nn.Module) -> list[TokenChain]:
    """FLUX's and HunyuanVideo's double blocks: `norm2 -> modulation -> ff`, per stream."""
    return [TokenChain(block.norm2, block.ff), TokenChain(block.norm2_context, block.ff_context)]


def single_stream_chain(block: torch.nn.Module, **layout: Any) -> TokenChain:
    """FLUX's and HunyuanVideo's single blocks: `norm -> proj_mlp -> act_mlp -> cat with attn -> proj_out`."""
    return TokenChain(block.norm, block.proj_out, attention=block.attn, **layout)


def _import_all_adapters() -> None:
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"lbridge.models.{info.name}")


def _all_subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))]


def adapter_for(transformer: torch.nn.Module) -> type[ModelAdapter]:
    """The adapter class for a transformer instance (the most general one registered for its class)."""
    _import_all_adapters()
    for cls in _all_subclasses(ModelAdapter):
        if cls.transformer_class is not None and isinstance(transformer, cls.transformer_class):
            return cls
    raise LbridgeError(
        f"no lbridge adapter for {type(transformer).__name__} (models: {', '.join(available_models())})"
    )


def available_models() -> list[str]:
    return group_options("model")


def load_adapter(name: str, **overrides: Any) -> ModelAdapter:
    """Instantiate `conf/model/<name>.yaml`, with `overrides` replacing its values."""
    return load_option("model", name, **overrides)
