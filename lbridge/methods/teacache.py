"""TeaCache (Liu et al., 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model").

At every step the first block's timestep-modulated input is compared with the previous step's
(`ModelAdapter.modulated_input`; on Wan the step's modulation vectors alone, as TeaCache4Wan2.1
measures): d = mean|I_t - I_{t-1}| / mean|I_{t-1}| (relative L1). The distance is rescaled by a polynomial
(TeaCache fits it per model so that the rescaled input change tracks the change of the model
output) and accumulated; while the sum stays under `threshold` the step is CACHED, otherwise it runs
FULL and the sum restarts at 0. A CACHED step skips every block and adds the residual of the block
stack (final block output - first block input, hidden stream) of the last FULL step to the current
input, so only the embeddings, the probe's modulation and the head run. Where the modules that make
the first block's probed inputs run before the text embedders (`ModelAdapter.probe_sources`:
every family with a text stream), the verdict is taken there, and a CACHED call leaves the text
embedders unrun too (HunyuanVideo's token refiner), as a stack method's does; the first block checks
that the verdict measured the very tensors it receives (or views of their memory: Wan's `temb`).

`coefficients: fit` fits that polynomial in `lbridge calibrate` from full-compute runs of the
calibration prompts (input distance -> model-output distance, least squares); a list uses given
coefficients (highest degree first, numpy.polyval order, as the paper's code publishes them); null
uses the raw distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.hooks._helpers import TransformerBlockRegistry

from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.threshold import sample_prompts
from lbridge.calibration.trajectories import (
    bind_block_arguments,
    block_hidden_input,
    block_hidden_output,
)
from lbridge.errors import LbridgeError
from lbridge.methods.adaptive import AdaptiveMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import (
    ModelHook,
    OutputTapHook,
    ReuseOutputHook,
    SkipBlockHook,
    VerdictFirstReuseHook,
    register,
    remove_all,
)
from lbridge.runtime.schedule import Schedule

COEFFICIENT_MODES = ("fit", "null", "a list of numbers")


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous| (one host sync: the decision needs the number)."""
    return float((current - previous).abs().mean() / previous.abs().mean())


def same_elements(received: torch.Tensor, measured: torch.Tensor) -> bool:
    """The very tensor, or a view of its memory with its elements in the same order (Wan's blocks
    get `time_proj`'s output unflattened): what the block reads is what was measured."""
    if received is measured:
        return True
    return (
        received.data_ptr() == measured.data_ptr()
        and received.numel() == measured.numel()
        and received.dtype == measured.dtype
        and received.is_contiguous()
        and measured.is_contiguous()
    )


@dataclass
class _BranchState:
    step: int = -1
    previous: torch.Tensor | None = None  # the last step's indicator
    accumulated: float = 0.0
    first_input: torch.Tensor | None = None  # the first block's hidden input at the current step


class TeaCacheProbeHook(ModelHook):
    """Outermost on the first block: measures the input change and decides FULL/CACHED for the call.

    Where the adapter names the modules that make the block's probed arguments (`probe_sources`),
    `decide_early` measures them as they come out, before the call's text embedders run."""

    def __init__(self, runtime: CacheRuntime, method: TeaCache, adapter, block: torch.nn.Module) -> None:
        super().__init__()
        self.runtime, self.method, self.adapter, self.block = runtime, method, adapter, block
        self.states: dict[str, _BranchState] = {}
        #: This call's probed arguments of the first block, kept by taps on their source modules.
        self.tapped: dict[str, torch.Tensor] = {}
        self.sources: frozenset[str] = frozenset()
        self.measured_early = False

    def decide_early(self) -> None:
        """Before a module only the blocks read: the verdict, once every probed argument is in."""
        if self.runtime.decision is None and self.sources and self.sources <= self.tapped.keys():
            self.measure(self.tapped)
            self.measured_early = True

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        arguments = bind_block_arguments(module, args, kwargs)
        if self.measured_early:
            self.check_tapped(arguments)
        else:
            self.measure(arguments)
        self.measured_early = False
        self.tapped.clear()
        self.states[self.runtime.branch].first_input = block_hidden_input(module, args, kwargs)
        return args, kwargs

    def measure(self, arguments: dict[str, Any]) -> None:
        """The indicator's change since the branch's last call, accumulated; the call's verdict."""
        runtime = self.runtime
        state = self.states.get(runtime.branch)
        if state is None or runtime.step <= state.step:  # a new sample
            state = self.states[runtime.branch] = _BranchState()
        indicator = self.adapter.modulated_input(self.block, arguments).detach()
        threshold, full = self.method.threshold_now(runtime), True
        recording = self.method.recorded_distances
        if state.previous is not None and (threshold != -math.inf or recording is not None):
            distance = relative_l1(indicator, state.previous)  # a host sync: skipped at forced steps
            if recording is not None:
                recording.append((runtime.branch, runtime.step, distance))
            if math.isinf(threshold):  # forced (FULL) or measuring a skip (CACHED): no rescaling needed
                full = threshold < 0
            else:
                state.accumulated += self.method.rescale(distance)
                full = state.accumulated >= threshold
        runtime.decide(full)
        if runtime.is_full:
            state.accumulated = 0.0
        state.previous, state.step = indicator, runtime.step

    def check_tapped(self, arguments: dict[str, Any]) -> None:
        """The early verdict skipped modules: it must have measured what the block now receives."""
        for name, tensor in self.tapped.items():
            if not same_elements(arguments[name], tensor):
                raise RuntimeError(
                    f"teacache: the first block's '{name}' is not the output of the module "
                    f"{type(self.adapter).__name__}.probe_sources names for it (nor a view of it), so "
                    "the verdict taken before the text embedders measured another tensor"
                )

    def reset(self) -> None:
        self.states.clear()
        self.tapped.clear()
        self.measured_early = False


class ResidualReuseHook(ModelHook):
    """On the final block. FULL: run it, keep output - first-block input. CACHED: input + that residual.

    At a CACHED step the blocks before this one are skipped, so its input is the first block's input.
    """

    def __init__(self, runtime: CacheRuntime, probe: TeaCacheProbeHook) -> None:
        super().__init__()
        self.runtime, self.probe = runtime, probe
        self.residuals: dict[str, torch.Tensor] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        branch = self.runtime.branch
        first_input = self.probe.states[branch].first_input
        if self.runtime.is_full:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self.residuals[branch] = block_hidden_output(module, output) - first_input
            return output
        if branch not in self.residuals:
            raise RuntimeError(f"CACHED step {self.runtime.step} on branch '{branch}' before any FULL step")
        meta = TransformerBlockRegistry.get(module.__class__)
        hidden = first_input + self.residuals[branch]
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        output = [None, None]
        output[meta.return_hidden_states_index] = hidden
        output[meta.return_encoder_hidden_states_index] = meta._get_parameter_from_args_kwargs(
            meta.encoder_hidden_states_argument_name, args, kwargs
        )
        return tuple(output)

    def reset(self) -> None:
        self.residuals.clear()


class TeaCache(AdaptiveMethod):
    name = "teacache"

    def __init__(
        self,
        threshold: float | None = None,
        coefficients: str | list[float] | None = "fit",
        degree: int = 4,
        calibration: dict[str, Any] | None = None,
        name: str = "teacache",
    ) -> None:
        super().__init__(threshold, calibration)
        if not (coefficients in (None, "fit") or _is_number_list(coefficients)):
            accepted = ", ".join(COEFFICIENT_MODES)
            raise LbridgeError(f"method.coefficients={coefficients!r} is not accepted ({accepted})")
        if not isinstance(degree, int) or degree < 1:
            raise LbridgeError(f"method.degree={degree!r} must be an integer >= 1")
        self.coefficients_mode = "fit" if coefficients == "fit" else "given"
        self.coefficients = None if coefficients in (None, "fit") else [float(c) for c in coefficients]
        self.degree = degree
        #: (branch, step, input distance) of every call, while `fit` records them; else None.
        self.recorded_distances: list[tuple[str, int, float]] | None = None

    def rescale(self, distance: float) -> float:
        if self.coefficients is None:
            if self.coefficients_mode == "fit":
                raise LbridgeError(
                    "teacache coefficients=fit: run `lbridge calibrate` first, or set method.coefficients"
                )
            return distance
        return float(np.polyval(self.coefficients, distance))

    def candidates(self, num_steps: int, warmup: int) -> Schedule:
        """The paper's loop always computes the last step too: no skipping into the final output."""
        base = super().candidates(num_steps, warmup).full
        return Schedule(base[:-1] + (True,))

    def install(self, transformer, adapter, runtime) -> None:
        blocks = adapter.blocks(transformer)
        for block in blocks[:-1]:
            self.add_hook(block, SkipBlockHook(runtime, block), "skip")
        probe = self.add_hook(blocks[0], TeaCacheProbeHook(runtime, self, adapter, blocks[0]), "probe")
        self.add_hook(blocks[-1], ResidualReuseHook(runtime, probe), "residual")
        sources = adapter.probe_sources(transformer)
        for name, module in sources.items():
            self.add_hook(module, OutputTapHook(probe.tapped, name), f"tap.{name}")
        if sources:  # the verdict can come before the text embedders: CACHED calls leave them unrun
            probe.sources = frozenset(sources)
            self.probe = probe
            self.reuse_block_only_modules(transformer, adapter, runtime)

    def block_only_hook(self, runtime: CacheRuntime) -> ReuseOutputHook:
        return VerdictFirstReuseHook(runtime, self.probe.decide_early)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "coefficients": self.coefficients_mode}

    # -- calibration -------------------------------------------------------------------------
    def needs_fit(self) -> bool:
        return self.coefficients_mode == "fit"

    def fit(self, job: CalibrationJob) -> dict[str, Any]:
        if self.coefficients_mode != "fit":
            return {"coefficients": self.coefficients}
        inputs, outputs = distance_pairs(self, job)
        coefficients = np.polyfit(inputs, outputs, self.degree)
        return {"coefficients": [float(c) for c in coefficients], "pairs": len(inputs)}

    def load_fitted(self, values: dict[str, Any]) -> None:
        if values.get("coefficients") is not None:
            self.coefficients = [float(c) for c in values["coefficients"]]


class _OutputDistanceHook(ModelHook):
    """On the transformer (inside lbridge's context hook): each call's output change since the last step."""

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.previous: dict[str, torch.Tensor] = {}
        self.distances: list[tuple[str, int, float]] = []

    def post_forward(self, module: torch.nn.Module, output):
        current = (output[0] if isinstance(output, tuple) else output.sample).detach()
        branch = self.runtime.branch
        if branch in self.previous and self.runtime.step > 0:
            self.distances.append((branch, self.runtime.step, relative_l1(current, self.previous[branch])))
        self.previous[branch] = current
        return output


def distance_pairs(method: TeaCache, job: CalibrationJob) -> tuple[np.ndarray, np.ndarray]:
    """(input distance, model-output distance) per (branch, step >= 1) of full-compute runs."""
    transformer = job.accelerator.transformer
    recorder = register(transformer, _OutputDistanceHook(job.accelerator.runtime), "lbridge.teacache.fit")
    inputs = method.recorded_distances = []
    try:
        # Threshold -inf: every step FULL, and the probe only records (it never rescales).
        for _ in sample_prompts(job, -math.inf):
            recorder.previous.clear()  # the next prompt's step 1 compares with its own step 0
    finally:
        method.recorded_distances = None
        remove_all(transformer, ["lbridge.teacache.fit"])
    outputs = recorder.distances
    by_call = {(b, s): d for b, s, d in outputs}
    pairs = [(d, by_call[(b, s)]) for b, s, d in inputs if (b, s) in by_call]
    if len(pairs) <= method.degree:
        raise LbridgeError(
            f"teacache: {len(pairs)} (input, output) distance pairs cannot fit a degree-{method.degree} "
            "polynomial: use more calibration prompts or steps, or a lower method.degree"
        )
    x, y = zip(*pairs, strict=True)
    return np.asarray(x), np.asarray(y)


def _is_number_list(value: Any) -> bool:
    try:
        return len(value) > 0 and all(isinstance(v, int | float) for v in value)
    except TypeError:
        return False
