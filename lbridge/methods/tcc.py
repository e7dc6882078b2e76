"""TCC (Liang et al., 2026, "Trajectory-Consistent Calibration"): a prior added to each cached feature.

TCC keeps a training-free reuse policy (`base`: fora, taylorseer, foca, ...) and, at every CACHED
step s, adds a calibration prior c_s to the feature the base produces there. The priors are computed
offline by `lbridge calibrate` (calibration/tcc_priors.py) in step order: c_s is the mean deviation
between the full-compute feature and the calibrated cached feature at s, on a re-simulation of the
accelerated sampler in which the priors of earlier steps are already applied -- so each prior also
accounts for the trajectory shift that the earlier corrections cause. `calibration.mode=naive`
takes every prior from one uncorrected accelerated run instead, to measure what the iteration buys.

The corrected feature is the final block's output, whatever the base's site: with `site=stack` it
is exactly the cached feature; with `site=attn_mlp` it corrects the final block's result of the
per-module reuse. At sampling the cost is one add per CACHED step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lbridge.calibration.job import METADATA, CalibrationJob, read_calibration
from lbridge.calibration.trajectories import output_streams
from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.methods.base import CacheMethod, available_methods, is_calibrated, load_method, method_class
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook
from lbridge.runtime.schedule import Schedule

GRANULARITIES = ("token", "channel")
MODES = ("iterative", "naive")
TARGETS = ("local", "reference")  # what a cached feature is compared with (calibration/tcc_priors.py)
PRIORS = "priors.safetensors"

Priors = dict[tuple[str, int], tuple[torch.Tensor, ...]]


class Probe:
    """What a calibration run asks of the prior hook: the cached features, before their prior."""

    def __init__(self) -> None:
        self.on_cached = None  # callable(branch, step, streams) or None

    def clear(self) -> None:
        self.on_cached = None


class PriorHook(ModelHook):
    """On the final block, outside the base method's hooks: adds c_s to its output at CACHED steps."""

    def __init__(self, runtime: CacheRuntime, priors: Priors, probe: Probe) -> None:
        super().__init__()
        self.runtime, self.priors, self.probe = runtime, priors, probe

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime, probe = self.runtime, self.probe
        output = self.fn_ref.original_forward(*args, **kwargs)
        if runtime.is_full:
            return output
        streams = output_streams(output)
        if probe.on_cached is not None:
            probe.on_cached(runtime.branch, runtime.step, streams)
        prior = self.priors.get((runtime.branch, runtime.step))
        if prior is None:
            return output
        corrected = tuple(feature + c for feature, c in zip(streams, prior, strict=True))
        return corrected[0] if isinstance(output, torch.Tensor) else corrected


class Tcc(CacheMethod):
    name = "tcc"

    def __init__(
        self,
        base: str | CacheMethod = "fora",
        base_params: dict[str, Any] | None = None,
        granularity: str = "token",
        calibration: dict[str, Any] | None = None,
        name: str = "tcc",
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise LbridgeError(
                f"unknown method.granularity '{granularity}' (accepted: {', '.join(GRANULARITIES)})"
            )
        self.base = base if isinstance(base, CacheMethod) else _training_free(base, base_params or {})
        self.granularity = granularity
        self.calibration = dict(calibration or {})
        for key, accepted in (("mode", MODES), ("target", TARGETS)):
            value = self.calibration.get(key, accepted[0])
            if value not in accepted:
                raise LbridgeError(
                    f"unknown method.calibration.{key} '{value}' (accepted: {', '.join(accepted)})"
                )
        self.priors: Priors = {}  # shared with the installed hook: loading priors updates it in place
        self.probe = Probe()

    def install(self, transformer, adapter, runtime) -> None:
        self.base.install(transformer, adapter, runtime)
        final = adapter.blocks(transformer)[-1]
        self.add_hook(final, PriorHook(runtime, self.priors, self.probe), "prior")  # after: outermost

    def detach(self, transformer: torch.nn.Module) -> None:
        super().detach(transformer)
        self.base.detach(transformer)

    def hooks(self) -> list[ModelHook]:
        return [*super().hooks(), *self.base.hooks()]

    def reset(self) -> None:
        self.base.reset()

    def describe(self) -> dict:
        return {"name": self.name, "base": self.base.describe(), "granularity": self.granularity,
                "mode": self.calibration.get("mode", "iterative")}  # fmt: skip

    # -- calibration -------------------------------------------------------------------------
    def calibrate(self, job: CalibrationJob) -> dict[str, Any]:
        from lbridge.calibration.tcc_priors import fit_priors

        return fit_priors(self, job)

    def load_calibration(self, directory: Path, transformer: torch.nn.Module, schedule: Schedule) -> None:
        read_calibration(directory, self.name, schedule)
        device = next(transformer.parameters()).device
        flat = load_file(str(directory / PRIORS), device=str(device))
        grouped: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
        for key, tensor in flat.items():
            branch, step, index = key.rsplit("/", 2)
            grouped.setdefault((branch, int(step)), {})[int(index)] = tensor
        self.priors.clear()
        self.priors.update({k: tuple(v[i] for i in sorted(v)) for k, v in grouped.items()})

    def save_calibration(
        self, directory: Path, transformer: torch.nn.Module, metadata: dict[str, Any]
    ) -> None:
        flat = {
            f"{branch}/{step:03d}/{i}": c.detach().to("cpu").contiguous()
            for (branch, step), prior in self.priors.items()
            for i, c in enumerate(prior)
        }
        save_file(flat, str(directory / PRIORS))
        write_json(directory / METADATA, {**metadata, "priors": PRIORS})


def _training_free(name: str, params: dict[str, Any]) -> CacheMethod:
    """The base reuse policy: a method that accelerates and needs no calibration of its own."""
    accepted = [m for m in available_methods() if _is_training_free(method_class(m))]
    if name not in accepted:
        raise LbridgeError(f"unknown tcc method.base '{name}' (accepted: {', '.join(accepted)})")
    return load_method(name, **params)


def _is_training_free(cls: type[CacheMethod]) -> bool:
    return cls.accelerates and not is_calibrated(cls)
