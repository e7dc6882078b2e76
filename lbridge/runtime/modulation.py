"""Step-batched AdaLN modulation: each block's modulation computed once per sample, not once per step.

A FLUX block's AdaLN modulation (`norm1.linear`, `norm1_context.linear`, the single blocks'
`norm.linear`) turns the step embedding (timestep, guidance, pooled text: one row per sample) into
the block's shifts, scales and gates. On FLUX.1-dev it is 27% of the parameters (3.2 B) in one-row
matmuls: memory-bound, a call streams 6.5 GB of bf16 weights whatever a caching method skips, and
FLOPs do not see it. HunyuanVideo's blocks have the same norms, 27% of its parameters too (3.4 B of
12.8 B). ToCa, whose CACHED steps run every block on a tenth of the tokens, pays it at every step
(docs/design.md, "ToCa across widths").

The step embedding depends on the step's timestep and on inputs fixed for the whole sample, and all
of a sample's timesteps are known when it starts (the scheduler's). So at a CFG branch's first call
in a sample, the time embedding runs once on every step's timestep, and each modulation once on all
of those embeddings: one matmul of `steps` rows, its weights read once per sample. Every call then
takes its step's row of the tables, picked by the time embedding's hook before any block runs, so the
modulations inside the blocks read no step and compile with them (`runtime.compile=true`).

Exactness: the transformer's step embedding *is* the table's row (the time-embedding module's hook
returns it), so every block sees the same embedding it feeds its modulation; what differs from the
per-step computation is only the rounding of a many-row against a one-row matmul. The table is
built from the timesteps the adapter says the pipeline passes (`ModelAdapter.embedding_timesteps`);
each call compares its real inputs with the table's on the device (no host sync), and the sample's
last call reads the comparison once: a mismatch stops the sample with an error rather than letting
it run on another step's embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

from lbridge.errors import LbridgeError
from lbridge.models.base import ModelAdapter
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, register, remove_all

MODULATIONS = ("per_step", "batched")
EMBEDDING_HOOK = "lbridge.modulation.embedding"
#: AdaLN norms whose `linear(silu(emb))` is the block's modulation of the step embedding.
ADALN_CLASSES = (AdaLayerNormZero, AdaLayerNormZeroSingle)


@dataclass
class StepTable:
    """One CFG branch's step embeddings for one sample: row s is step s's."""

    timesteps: torch.Tensor  # the scheduler's, as the sample started: a new tensor means a new sample
    inputs: tuple  # the time embedding's arguments, every step's timestep stacked in the first
    embeddings: torch.Tensor  # (steps, batch, dim): what the AdaLN modulations read
    #: The module's other outputs, per step (HunyuanVideo's returns `(temb, token_replace_emb)`,
    #: the second None unless its I2V blocks read it); None: the module returns a tensor.
    others: tuple[torch.Tensor | None, ...] | None
    mismatch: torch.Tensor  # a device flag: some call's inputs differed from the table's

    def row(self, step: int) -> torch.Tensor | tuple[torch.Tensor | None, ...]:
        """What the module returns at `step`: its output's rows for that step, in the same structure."""
        if self.others is None:
            return self.embeddings[step]
        return (self.embeddings[step], *(None if o is None else o[step] for o in self.others))


class StepEmbeddingHook(ModelHook):
    """On the transformer's time embedding: builds the branch's table once per sample, returns rows."""

    def __init__(self, runtime: CacheRuntime, to_embedding_timesteps: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.runtime, self.to_embedding_timesteps = runtime, to_embedding_timesteps
        self.tables: dict[str, StepTable] = {}
        #: The modulations it hands their step's row to, before any block runs.
        self.modulations: list[ModulationTable] = []

    def new_forward(self, module: torch.nn.Module, timestep: torch.Tensor, *rest: Any) -> torch.Tensor:
        scheduler = getattr(self.runtime.clock, "scheduler", None)
        if scheduler is None:  # single calls (cost measurement, tests) have no schedule to batch
            for modulation in self.modulations:
                modulation.clear()
            return self.fn_ref.original_forward(timestep, *rest)
        step, branch = self.runtime.step, self.runtime.branch
        table = self.tables.get(branch)
        if table is None or table.timesteps is not scheduler.timesteps:
            table = self.tables[branch] = self._build(module, scheduler.timesteps, timestep, rest)
        table.mismatch |= _differs(table.inputs, step, (timestep, *rest))
        if step == len(table.timesteps) - 1:
            self._check(table, branch)
        for modulation in self.modulations:
            modulation.select(table, step, branch)
        return table.row(step)

    def _build(
        self, module: torch.nn.Module, timesteps: torch.Tensor, timestep: torch.Tensor, rest: tuple
    ) -> StepTable:
        steps, batch = len(timesteps), timestep.shape[0]
        stacked = self.to_embedding_timesteps(timesteps, timestep.dtype).to(timestep.device)
        every_step = stacked[:, None].expand(steps, batch).reshape(steps * batch)
        repeated = tuple(_repeat(arg, steps) for arg in rest)
        # The module's own forward, not the hooks registered under this one: building the table is
        # no call of this step, and a method's output tap there (TeaCache's) must not take every
        # step's embeddings for the call's. Its children's hooks still run.
        output = type(module).forward(module, every_step, *repeated)
        embeddings, *others = output if isinstance(output, tuple) else (output,)
        return StepTable(
            timesteps, (every_step.view(steps, batch), *rest), _per_step(embeddings, steps),
            tuple(_per_step(o, steps) for o in others) if isinstance(output, tuple) else None,
            torch.zeros((), dtype=torch.bool, device=timestep.device),
        )  # fmt: skip

    def _check(self, table: StepTable, branch: str) -> None:
        if bool(table.mismatch):  # the one host sync of a sample (per branch)
            raise LbridgeError(
                f"modulation=batched: branch '{branch}' called the time embedding with other inputs "
                "than the sample's table (timesteps not as the adapter's embedding_timesteps maps the "
                "scheduler's, or per-sample inputs that changed between steps); use modulation=per_step"
            )

    def reset(self) -> None:
        self.tables.clear()
        for modulation in self.modulations:
            modulation.reset()


class BatchedModulationLinear(torch.nn.Linear):
    """An AdaLN modulation's `nn.Linear` while `modulation=batched` is attached: it returns the row
    of its table that the step embedding's hook picked before any block ran (`batched_row`; None:
    it computes per step).

    It is the module's class, swapped in and back (as `torch.nn.utils.parametrize` swaps a
    parametrized module's), not a diffusers hook: a hook replaces each module's `forward` with an
    object of its own, which dynamo (torch 2.11) traces into a compiled block with a guard on its
    identity, so every block would compile anew (the cache limit ends that with eager blocks). A
    class's forward is one function for every block, and the row a graph input: the blocks compile
    with it, once, and no graph depends on the step.
    """

    batched_row: torch.Tensor | None

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        row = self.batched_row
        if row is None:
            return super().forward(emb)
        if emb.shape[0] != row.shape[0]:
            raise LbridgeError(
                f"modulation=batched: a modulation got {emb.shape[0]} rows, its table {row.shape[0]}"
            )
        return row


class ModulationTable:
    """One AdaLN modulation's output for every step of a sample, once per CFG branch; its row per call."""

    def __init__(self, norm: torch.nn.Module) -> None:
        self.linear, self.activation = norm.linear, norm.silu
        self.outputs: dict[str, tuple[StepTable, torch.Tensor]] = {}  # per branch: of which table

    def select(self, table: StepTable, step: int, branch: str) -> None:
        """Before the call's blocks run: its row of the branch's table (built at the sample's first call)."""
        source, output = self.outputs.get(branch, (None, None))
        if source is not table:
            output = torch.nn.Linear.forward(self.linear, self.activation(table.embeddings))
            self.outputs[branch] = (table, output)
        self.linear.batched_row = output[step]

    def clear(self) -> None:
        """The call computes its modulation per step (calls outside a sample's schedule)."""
        self.linear.batched_row = None

    def reset(self) -> None:
        self.outputs.clear()
        self.clear()


@dataclass
class StepBatchedModulation:
    """`modulation=batched` on one transformer: the step embedding's hook, and each modulation's
    class swapped (see the module's docstring)."""

    runtime: CacheRuntime
    embedding: StepEmbeddingHook | None = None
    linears: list[torch.nn.Linear] = field(default_factory=list)

    def attach(self, transformer: torch.nn.Module, adapter: Any) -> None:
        embedding_module = adapter.step_embedding(transformer)
        norms = [m for m in transformer.modules() if isinstance(m, ADALN_CLASSES)]
        if embedding_module is None or not norms:
            raise unavailable(adapter.name)
        other = [type(n.linear).__name__ for n in norms if type(n.linear) is not torch.nn.Linear]
        if other:
            raise LbridgeError(
                f"modulation=batched: an AdaLN modulation is a {other[0]}, not a torch.nn.Linear (a "
                f"quantized or adapted layer); accepted: {MODULATIONS[0]}"
            )
        self.embedding = StepEmbeddingHook(self.runtime, adapter.embedding_timesteps)
        register(embedding_module, self.embedding, EMBEDDING_HOOK)
        for norm in norms:
            self.embedding.modulations.append(ModulationTable(norm))
            norm.linear.__class__ = BatchedModulationLinear
            norm.linear.batched_row = None
            self.linears.append(norm.linear)

    def detach(self, transformer: torch.nn.Module) -> None:
        remove_all(transformer, [EMBEDDING_HOOK])
        for linear in self.linears:
            linear.__class__ = torch.nn.Linear
            del linear.batched_row
        self.linears.clear()
        self.embedding = None

    def reset(self) -> None:
        if self.embedding is not None:
            self.embedding.reset()


def unavailable(model: str, key: str = "modulation") -> LbridgeError:
    """The refusal of `batched` for `model`; `key`: the option's name (`runtime.modulation` on the CLI)."""
    return LbridgeError(
        f"{key}=batched is not available for model '{model}' (its adapter names no step embedding, "
        f"or its blocks have no AdaLN modulation); accepted: {MODULATIONS[0]}"
    )


def batchable(adapter_class: type[ModelAdapter]) -> bool:
    """Whether the family has a step embedding to batch: its adapter names one (FLUX, the tiny model,
    HunyuanVideo; Wan and PixArt modulate once per call outside the blocks already)."""
    return adapter_class.overrides("step_embedding")


def check_batchable(adapter: ModelAdapter, modulation: str, key: str = "modulation") -> None:
    """Refuses `batched` for a family with no step embedding, before its weights load (`attach`
    checks the loaded transformer again: its embedding and its AdaLN norms)."""
    if modulation == "batched" and not batchable(type(adapter)):
        raise unavailable(adapter.name, key)


def check_modulation(modulation: str, key: str = "modulation") -> str:
    """`modulation` if accepted; `key`: its name in the error (`runtime.modulation` on the command line)."""
    if modulation not in MODULATIONS:
        raise LbridgeError(f"unknown {key} '{modulation}' (accepted: {', '.join(MODULATIONS)})")
    return modulation


def _repeat(arg: Any, steps: int) -> Any:
    """A per-sample argument (batch first) repeated for every step; anything else as it is."""
    if isinstance(arg, torch.Tensor) and arg.dim() >= 1:
        return arg.repeat(steps, *([1] * (arg.dim() - 1)))
    return arg


def _per_step(output: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """An output over every step's rows (step-major), as (steps, batch, ...)."""
    return None if output is None else output.view(steps, -1, *output.shape[1:])


def _differs(inputs: tuple, step: int, actual: tuple) -> torch.Tensor:
    """Whether a call's time-embedding inputs differ from the table's for `step`: tensors compared on
    their device (a flag, no host sync); anything else on the host, a difference stopping at once."""
    flags = []
    for position, (a, e) in enumerate(zip(actual, (inputs[0][step], *inputs[1:]), strict=True)):
        if a is e:  # the pipeline passed the same object (FLUX's pooled embeddings): nothing to compare
            continue
        if isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor) and a.shape == e.shape:
            flags.append((a != e).any())
        elif isinstance(a, torch.Tensor) or isinstance(e, torch.Tensor) or a != e:
            raise LbridgeError(
                f"modulation=batched: the time embedding's argument {position} changed between steps "
                "of a sample; use modulation=per_step"
            )
    return torch.stack(flags).any()
