"""Step-batched AdaLN modulation: each block's modulation computed once per sample, not once per step.

A FLUX block's AdaLN modulation (`norm1.linear`, `norm1_context.linear`, the single blocks'
`norm.linear`) turns the step embedding (timestep, guidance, pooled text: one row per sample) into
the block's shifts, scales and gates. On FLUX.1-dev it is 27% of the parameters (3.2 B) in one-row
matmuls: memory-bound, a call streams 6.5 GB of bf16 weights whatever a caching method skips, and
FLOPs do not see it. ToCa, whose CACHED steps run every block on a tenth of the tokens, pays it at
every step (docs/design.md, "ToCa across widths").

The step embedding depends on the step's timestep and on inputs fixed for the whole sample, and all
of a sample's timesteps are known when it starts (the scheduler's). So at a CFG branch's first call
in a sample, the time embedding runs once on every step's timestep, and each modulation once on all
of those embeddings: one matmul of `steps` rows, its weights read once per sample. Every call then
takes its step's row of the tables, picked by the time embedding's hook before any block runs, so the
hooks inside the blocks read no step and compile with them (`runtime.compile=true`).

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
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, register, remove_all

MODULATIONS = ("per_step", "batched")
EMBEDDING_HOOK, MODULATION_HOOK = "lbridge.modulation.embedding", "lbridge.modulation.linear"
#: AdaLN norms whose `linear(silu(emb))` is the block's modulation of the step embedding.
ADALN_CLASSES = (AdaLayerNormZero, AdaLayerNormZeroSingle)


@dataclass
class StepTable:
    """One CFG branch's step embeddings for one sample: row s is step s's."""

    timesteps: torch.Tensor  # the scheduler's, as the sample started: a new tensor means a new sample
    inputs: tuple  # the time embedding's arguments, every step's timestep stacked in the first
    embeddings: torch.Tensor  # (steps, batch, dim)
    mismatch: torch.Tensor  # a device flag: some call's inputs differed from the table's


class StepEmbeddingHook(ModelHook):
    """On the transformer's time embedding: builds the branch's table once per sample, returns rows."""

    def __init__(self, runtime: CacheRuntime, to_embedding_timesteps: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.runtime, self.to_embedding_timesteps = runtime, to_embedding_timesteps
        self.tables: dict[str, StepTable] = {}
        #: The modulations it hands their step's row to, before any block runs (see BatchedModulationHook).
        self.modulations: list[BatchedModulationHook] = []

    def new_forward(self, module: torch.nn.Module, timestep: torch.Tensor, *rest: Any) -> torch.Tensor:
        scheduler = getattr(self.runtime.clock, "scheduler", None)
        if scheduler is None:  # single calls (cost measurement, tests) have no schedule to batch
            for modulation in self.modulations:
                modulation.row = None
            return self.fn_ref.original_forward(timestep, *rest)
        step, branch = self.runtime.step, self.runtime.branch
        table = self.tables.get(branch)
        if table is None or table.timesteps is not scheduler.timesteps:
            table = self.tables[branch] = self._build(scheduler.timesteps, timestep, rest)
        table.mismatch |= _differs(table.inputs, step, (timestep, *rest))
        if step == len(table.timesteps) - 1:
            self._check(table, branch)
        for modulation in self.modulations:
            modulation.select(table, step, branch)
        return table.embeddings[step]

    def _build(self, timesteps: torch.Tensor, timestep: torch.Tensor, rest: tuple) -> StepTable:
        steps, batch = len(timesteps), timestep.shape[0]
        stacked = self.to_embedding_timesteps(timesteps, timestep.dtype).to(timestep.device)
        every_step = stacked[:, None].expand(steps, batch).reshape(steps * batch)
        repeated = tuple(_repeat(arg, steps) for arg in rest)
        embeddings = self.fn_ref.original_forward(every_step, *repeated)
        return StepTable(
            timesteps, (every_step.view(steps, batch), *rest), embeddings.view(steps, batch, -1),
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


class BatchedModulationHook(ModelHook):
    """On an AdaLN modulation's linear: its output for every step of the sample, once; then rows.

    The step embedding's hook, which runs before any block, computes the table and picks the call's
    row (`select`); this hook, inside the block, only returns it. So it reads no step, branch or
    table: traced into a compiled block it adds a graph input (the row, the same shape at every
    step) and no guard that changes between steps, and the blocks compile with it
    (`traced_in_regions`).
    """

    traced_in_regions = True

    def __init__(self, embedding: StepEmbeddingHook, norm: torch.nn.Module) -> None:
        super().__init__()
        self.activation = norm.silu
        self.outputs: dict[str, tuple[StepTable, torch.Tensor]] = {}  # per branch: of which table
        self.row: torch.Tensor | None = None  # the call's; None: it computes per step
        embedding.modulations.append(self)

    def select(self, table: StepTable, step: int, branch: str) -> None:
        """Before the call's blocks run: its row of the branch's table (built at the sample's first call)."""
        source, output = self.outputs.get(branch, (None, None))
        if source is not table:
            output = self.fn_ref.original_forward(self.activation(table.embeddings))
            self.outputs[branch] = (table, output)
        self.row = output[step]

    def new_forward(self, module: torch.nn.Module, emb: torch.Tensor) -> torch.Tensor:
        row = self.row
        if row is None:
            return self.fn_ref.original_forward(emb)
        if emb.shape[0] != row.shape[0]:
            raise LbridgeError(
                f"modulation=batched: a modulation got {emb.shape[0]} rows, its table {row.shape[0]}"
            )
        return row

    def reset(self) -> None:
        self.outputs.clear()
        self.row = None


@dataclass
class StepBatchedModulation:
    """The hooks of `modulation=batched` on one transformer (see the module's docstring)."""

    runtime: CacheRuntime
    hooks: list[ModelHook] = field(default_factory=list)

    def attach(self, transformer: torch.nn.Module, adapter: Any) -> None:
        embedding_module = adapter.step_embedding(transformer)
        norms = [m for m in transformer.modules() if isinstance(m, ADALN_CLASSES)]
        if embedding_module is None or not norms:
            raise LbridgeError(
                f"modulation=batched is not available for model '{adapter.name}' (its adapter names no "
                f"step embedding, or its blocks have no AdaLN modulation); accepted: {MODULATIONS[0]}"
            )
        embedding = StepEmbeddingHook(self.runtime, adapter.embedding_timesteps)
        register(embedding_module, embedding, EMBEDDING_HOOK)
        self.hooks = [embedding]
        for norm in norms:
            self.hooks.append(register(norm.linear, BatchedModulationHook(embedding, norm),
                                       MODULATION_HOOK))  # fmt: skip

    def detach(self, transformer: torch.nn.Module) -> None:
        remove_all(transformer, [EMBEDDING_HOOK, MODULATION_HOOK])
        self.hooks.clear()

    def reset(self) -> None:
        for hook in self.hooks:
            hook.reset()


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
