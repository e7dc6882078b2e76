"""LearniBridge calibration: training pairs for the schedule, one LoRA fit per adapter, metadata.

Pairs are (x^L_f, conditioning of s, y_s) for every CACHED step s and its last FULL step f, from
full-compute trajectories (the paper). With `train_on=accelerated`, after the first fit the
calibration prompts are re-sampled along the *accelerated* trajectory with the fitted bridge, every
step of that trajectory is labelled by full compute, and the adapters are fitted again on both
sets of pairs (`rounds` times): the bridge then also learns the states its own errors lead to.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerState

from lbridge.calibration import lora
from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.lora import InputFn, Pair, PairLoader, stale_input, train_adapter, training_pairs
from lbridge.calibration.resimulate import accelerated_trajectories
from lbridge.runtime.schedule import Schedule

if TYPE_CHECKING:
    from lbridge.methods.learnibridge import LearniBridge

DEFAULTS = {"steps": 400, "lr": 2e-3, "batch_size": 16, "seed_train": 0, "train_on": "full", "rounds": 1}


def forecast_input(schedule: Schedule, order: int) -> InputFn:
    """The Taylor forecast of x^L at the pair's step from the FULL steps up to its source (as at sampling)."""

    def forecast(pair: Pair) -> tuple[torch.Tensor, ...]:
        fulls = [f for f in range(pair.source + 1) if schedule.is_full(f)][-(order + 1) :]
        state = TaylorSeerState(torch.float32, max_order=order)
        for f in fulls:  # the last order+1 FULL steps determine every factor up to `order`
            state.current_step = f
            state.update(
                tuple(x for x in stale_input(Pair(pair.trajectory, pair.branch, f, f)) if x is not None)
            )
        state.current_step = pair.step
        streams = state.predict()
        return streams[0], (streams[1] if len(streams) > 1 else None)

    return forecast


def fit_bridge(method: LearniBridge, job: CalibrationJob) -> dict[str, Any]:
    options = {**DEFAULTS, **{k: job.option(k, v) for k, v in DEFAULTS.items()}}
    schedule, transformer = job.schedule, job.transformer
    bridge = method.prepare_bridge(transformer, job.adapter, schedule)
    input_fn = stale_input if method.input == "stale" else forecast_input(schedule, method.forecast_order)
    loader = PairLoader(bridge, input_fn)
    pairs = training_pairs(job.trajectories, schedule)
    space = loss_space(method.loss, job)
    start = time.perf_counter()
    report = {"pairs": len(pairs), "rounds": []}
    resimulations = int(options["rounds"]) if options["train_on"] == "accelerated" else 0
    with tempfile.TemporaryDirectory(prefix="lbridge-resimulate-") as scratch:
        for round_index in range(1 + resimulations):
            if round_index > 0:  # pairs along the accelerated trajectory of the bridge fitted so far
                extra = accelerated_trajectories(job, method, Path(scratch) / str(round_index))
                pairs = pairs + training_pairs(extra, schedule)
            report["rounds"].append(_fit_adapters(method, bridge, loader, pairs, options, space, transformer))
    report["seconds"] = time.perf_counter() - start
    report["options"] = options
    report["summary"] = [
        f"round {i} {name}: {fit['pairs']} pairs, train MSE {fit['mse_before']:.3g} -> {fit['mse_after']:.3g}"
        for i, fits in enumerate(report["rounds"])
        for name, fit in fits.items()
    ]
    return report


def loss_space(loss: str, job: CalibrationJob) -> lora.LossSpace:
    """`block`: the final block's output (the paper); `normed`: after a plain layer norm; `head`: the
    transformer's output (velocity), through its AdaLN head with the step's conditioning."""
    if loss == "head":
        return partial(job.adapter.head, job.transformer)
    return lora.normed_space if loss == "normed" else lora.block_space


def _fit_adapters(
    method, bridge, loader: PairLoader, pairs: list[Pair], options: dict, space, transformer
) -> dict[str, Any]:
    by_adapter: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_adapter.setdefault(method.adapter_name(pair.offset), []).append(pair)
    fits = {}
    for name, group in sorted(by_adapter.items()):
        result = train_adapter(
            bridge, name, group, loader, steps=int(options["steps"]), lr=float(options["lr"]),
            batch_size=int(options["batch_size"]), seed=int(options["seed_train"]), space=space,
            frozen=transformer,
        )  # fmt: skip
        fits[name] = {"pairs": len(group), "mse_before": result.mse_before, "mse_after": result.mse_after,
                      "seconds": result.seconds, "loss": result.losses}  # fmt: skip
    lora.activate(bridge, sorted(by_adapter)[0])
    return fits
