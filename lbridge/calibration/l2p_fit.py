"""L2P's fit: per CACHED step, least-squares weights on the last FULL steps' features.

For a CACHED step s with history f_1 > ... > f_m the loss is the MSE between sum_j w_j F_{f_j} and
F_s over every prompt, CFG branch and feature element of the calibration trajectories. It is a
quadratic in m (<= a handful of) unknowns, so the normal equations give its exact minimiser in
milliseconds; the paper's Adam on the same MSE can only approach that minimiser. A ridge term
pulls w towards hand-crafted weights (`init`: reuse or a Taylor forecast), which keeps the
solution sane when the history features are nearly collinear (adjacent steps often are):

    w = w0 + (G + lambda I)^-1 (b - G w0),  G = X X^T,  b = X y,  lambda = ridge * trace(G) / m
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.trajectories import Trajectory, recorded_output
from lbridge.runtime.schedule import Schedule

if TYPE_CHECKING:
    from lbridge.methods.l2p import L2P


class NormalEquations:
    """Running sums X X^T, X y and y.y (float64) of one step's least-squares problem."""

    def __init__(self, size: int) -> None:
        self.gram = torch.zeros(size, size, dtype=torch.float64)
        self.rhs = torch.zeros(size, dtype=torch.float64)
        self.energy = 0.0  # sum of y.y: relative errors are reported against it

    def add(self, history: torch.Tensor, target: torch.Tensor) -> None:
        history, target = history.double(), target.double()
        self.gram += history @ history.T
        self.rhs += history @ target
        self.energy += float(target @ target)

    def solve(self, prior: torch.Tensor, ridge: float) -> torch.Tensor:
        size = len(prior)
        damping = ridge * float(self.gram.trace()) / size
        system = self.gram + damping * torch.eye(size, dtype=torch.float64)
        return prior + torch.linalg.solve(system, self.rhs - self.gram @ prior)

    def relative_error(self, weights: torch.Tensor) -> float:
        """||sum_j w_j F_j - F_s||^2 / ||F_s||^2 over the calibration set."""
        residual = weights @ self.gram @ weights - 2 * weights @ self.rhs + self.energy
        return max(float(residual), 0.0) / max(self.energy, 1e-30)


def flat_output(trajectory: Trajectory, block: torch.nn.Module, branch: str, step: int) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in recorded_output(trajectory, block, branch, step)])


def accumulate(
    trajectories: list[Trajectory], block: torch.nn.Module, histories: dict[int, list[int]]
) -> dict[int, NormalEquations]:
    """The normal equations of every CACHED step, streaming one trajectory and branch at a time."""
    systems = {s: NormalEquations(len(fulls)) for s, fulls in histories.items()}
    for trajectory in trajectories:
        for branch in trajectory.branches:
            kept: dict[int, torch.Tensor] = {}  # FULL-step features still in some history
            for step, fulls in sorted(histories.items()):
                for f in fulls:
                    if f not in kept:
                        kept[f] = flat_output(trajectory, block, branch, f)
                history = torch.stack([kept[f] for f in fulls])
                systems[step].add(history, flat_output(trajectory, block, branch, step))
                for f in [f for f in kept if f < fulls[-1]]:
                    del kept[f]
    return systems


def fit_weights(method: L2P, job: CalibrationJob) -> dict[str, Any]:
    schedule: Schedule = job.schedule
    block = job.adapter.blocks(job.transformer)[-1]
    histories = {
        s: schedule.full_history(s, method.history) for s in range(len(schedule)) if not schedule.is_full(s)
    }
    start = time.perf_counter()
    systems = accumulate(job.trajectories, block, histories)
    weights, errors = {}, {}
    for step, system in systems.items():
        prior = torch.tensor(method.prior_weights(schedule, step), dtype=torch.float64)
        reuse = torch.zeros_like(prior)
        reuse[0] = 1.0
        w = system.solve(prior, method.ridge)
        weights[step] = tuple(float(x) for x in w)
        errors[step] = {
            "reuse": system.relative_error(reuse),
            "prior": system.relative_error(prior),
            "fit": system.relative_error(w),
        }
    seconds = time.perf_counter() - start
    method.set_weights(weights)
    mean = {k: sum(e[k] for e in errors.values()) / max(len(errors), 1) for k in ("reuse", "prior", "fit")}
    return {
        "solver": "normal equations (exact least squares), ridge towards init",
        "seconds": seconds,
        "relative_error": {str(s): e for s, e in errors.items()},
        "summary": [
            f"least squares for {len(weights)} CACHED steps in {seconds:.2f} s; mean relative feature "
            f"error on the calibration set: reuse {mean['reuse']:.4f}, {method.init} {mean['prior']:.4f}, "
            f"fitted {mean['fit']:.4f}"
        ],
    }
