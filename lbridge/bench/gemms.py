"""The matrix products a transformer call runs, each timed alone with its weights cached and streamed.

FLOPs price every product of a CACHED call at the FULL call's rate. A product of m rows still reads
its k x n weights whatever m is, and a call reads each block's weights once: when m is small (ToCa's
refreshed tokens, the text stream's few rows, a one-row modulation) that read, not the arithmetic,
sets the product's time. Timing each product of a call alone, once with its weights hot (the same
matrix again and again) and once streamed (a new one each time, views walking through a pool larger
than any last-level cache, as a call that walks every block's weights meets them), gives the bound the
products alone put on a CACHED call, with no bookkeeping, Python or elementwise work in it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch

from lbridge.bench.device import synchronised_clock
from lbridge.bench.ops import dispatched_per_call

aten = torch.ops.aten
# func -> (index of the left matrix, index of the right one) in its arguments; the right one is the
# weight of a linear layer (`F.linear` dispatches `addmm`/`mm` on its transposed weight).
PRODUCTS = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
}
# Streamed copies fill at least this much memory: beyond this CPU's 32 MB L3 and an H100's 50 MB L2.
STREAM_BYTES = 256 * 2**20


class Layout(NamedTuple):
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class Product(NamedTuple):
    """One matrix product as dispatched: its op, and the layout of each tensor it was given."""

    op: str
    layouts: tuple[Layout | None, ...]  # None: a non-tensor argument
    dtype: torch.dtype

    @property
    def left(self) -> Layout:
        return self.layouts[PRODUCTS[getattr(aten, self.op).default][0]]

    @property
    def weight(self) -> Layout:
        return self.layouts[PRODUCTS[getattr(aten, self.op).default][1]]

    @property
    def rows(self) -> int:
        return math.prod(self.left.shape[:-1])

    @property
    def flops(self) -> int:
        *_, k, n = self.weight.shape
        return 2 * self.rows * k * n

    def label(self) -> str:
        *_, k, n = self.weight.shape
        return f"{self.rows} x {k} x {n}"


def product_of(func, args: tuple) -> Product | None:
    if func not in PRODUCTS:
        return None
    layouts = tuple(Layout(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else None for a in args)
    return Product(func.overloadpacket.__name__, layouts, args[PRODUCTS[func][1]].dtype)


def products_per_call(transformer: torch.nn.Module, run: Callable[[], object]) -> list[Counter[Product]]:
    """The matrix products of each call of `transformer` during `run()`, in call order."""
    return dispatched_per_call(transformer, run, product_of)


def _tensor(layout: Layout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random tensor of exactly that shape and stride (a transposed weight stays transposed)."""
    tensor = torch.empty_strided(layout.shape, layout.stride, dtype=dtype, device=device)
    return tensor.normal_() if tensor.is_floating_point() else tensor.zero_()


class WeightStream:
    """STREAM_BYTES of random values (filled once) that streamed weights are views into, each view
    after the last one handed out, wrapping around: a view's memory comes back only after the whole
    pool has been read since, by then out of every cache."""

    def __init__(self, dtype: torch.dtype, device: torch.device, nbytes: int = STREAM_BYTES) -> None:
        self.pool = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device=device).normal_()
        self.next = 0

    def weights(self, layout: Layout, count: int) -> list[torch.Tensor]:
        """`count` weights of that layout (fewer when they would wrap around the pool); one larger
        than half the pool, already larger than any cache: two of its own."""
        span = 1 + sum((size - 1) * stride for size, stride in zip(layout.shape, layout.stride, strict=True))
        if span > self.pool.numel() // 2:
            return [_tensor(layout, self.pool.dtype, self.pool.device) for _ in range(2)]
        views = []
        for _ in range(min(count, self.pool.numel() // span)):
            if self.next + span > self.pool.numel():
                self.next = 0
            views.append(self.pool.as_strided(layout.shape, layout.stride, self.next))
            self.next += span
        return views


def product_seconds(
    product: Product,
    device: torch.device,
    stream: WeightStream | None = None,
    rounds: int = 3,
    min_seconds: float = 0.02,
) -> float:
    """Fastest time of one `product` over `rounds` rounds: its weight hot (the same at every call), or
    with `stream`, a new one at every call, out of cache (the calls walk on from round to round)."""
    func = getattr(aten, product.op).default
    weight_index = PRODUCTS[func][1]
    args = [None if layout is None else _tensor(layout, product.dtype, device) for layout in product.layouts]
    now = synchronised_clock(device.type == "cuda")
    func(*args)  # a first call (a library's setup), then one timed: how many calls fill a round
    start = now()
    func(*args)
    calls = max(1, math.ceil(min_seconds / max(now() - start, 1e-6)))
    hot = [args[weight_index]]
    weights = hot if stream is None else stream.weights(product.weight, calls * (rounds + 1))
    walked, times = 0, []
    for _ in range(rounds + 1):  # the first round a warm-up, not kept
        start = now()
        for _ in range(calls):
            args[weight_index] = weights[walked % len(weights)]
            func(*args)
            walked += 1
        times.append((now() - start) / calls)
    return min(times[1:])
