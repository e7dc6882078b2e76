"""Is the calibration LearniBridge learns low-rank? The optimal correction and its subspaces.

For a CACHED step s with last FULL step f, the optimal correction is
    delta_s = y_s - B_L(x^L_f; cond_s),
the full-compute output of the final block minus the uncalibrated block on the cached input. Stacking
every token of every cached step of one prompt gives a (tokens x width) matrix per prompt. Its
singular values say how many feature directions the correction uses (effective rank), and the
principal angles between the top-r right singular subspaces of two prompts say whether prompts
share those directions, which is what a shared LoRA trained on a few prompts relies on.
"""

from __future__ import annotations

import torch

from lbridge.calibration.lora import Pair, PairLoader
from lbridge.calibration.trajectories import block_hidden_output


@torch.no_grad()
def correction_matrix(block: torch.nn.Module, pairs: list[Pair]) -> torch.Tensor:
    """All tokens of delta_s over `pairs` (one prompt's), as a (tokens, width) float64 matrix."""
    loader = PairLoader(block)
    rows = []
    for pair in pairs:
        arguments, target = loader.batch([pair])
        uncalibrated = block_hidden_output(block, block(**arguments)).float()
        rows.append((target - uncalibrated).reshape(-1, target.shape[-1]))
    return torch.cat(rows).double()


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli, 2007): 1 for rank one, n for flat."""
    p = singular_values / singular_values.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest singular directions holding `energy` of the squared Frobenius norm."""
    cumulative = torch.cumsum(singular_values**2, 0) / (singular_values**2).sum()
    return int((cumulative < energy - 1e-12).sum()) + 1


def top_subspace(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and the top-`rank` right singular vectors (feature directions), as columns."""
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return s, vh[:rank].T


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of orthonormal `a` and `b`."""
    cosines = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return torch.arccos(cosines)


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles: 1 = same subspace, r/width = random subspaces."""
    return float((torch.cos(principal_angles(a, b)) ** 2).mean())
