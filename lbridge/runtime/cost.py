"""FLOPs of a FULL and of a CACHED step, counted with torch's FlopCounterMode on the real shapes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU flash kernel that
# F.scaled_dot_product_attention dispatches to on CPU: without this, attention would count 0 here.
FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs (multiply-add = 2) of everything `fn` runs, attention included on CPU and CUDA."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one transformer call at a FULL and at a CACHED step (one CFG branch)."""

    full: int
    cached: int

    @property
    def cached_fraction(self) -> float:
        return self.cached / self.full
