"""lbridge/bench/gemms.py: a call's matrix products, recorded as dispatched and timed alone.

Timings are never compared (they depend on the machine); what is checked is what gets timed.
"""

import torch

from lbridge.bench.gemms import Layout, Product, WeightStream, product_seconds, products_per_call


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 32)
        self.down = torch.nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_products_are_recorded_per_call_with_their_rows_and_weight_shapes_and_not_outside_a_call():
    model, weight = TwoLayers(), torch.randn(8, 8)

    def run() -> None:
        model(torch.randn(1, 5, 8))  # 5 tokens
        torch.randn(3, 8) @ weight  # between calls: not any call's
        model(torch.randn(2, 1, 8))  # 2 rows

    calls = products_per_call(model, run)
    assert [sorted((p.label(), p.op, n) for p, n in call.items()) for call in calls] == [
        [("5 x 32 x 8", "mm", 1), ("5 x 8 x 32", "addmm", 1)],
        [("2 x 32 x 8", "mm", 1), ("2 x 8 x 32", "addmm", 1)],
    ]
    up = next(p for p in calls[0] if p.op == "addmm")
    assert up.weight == Layout((8, 32), (1, 8))  # the linear's weight, transposed as F.linear passes it
    assert up.flops == 2 * 5 * 8 * 32


def test_a_product_is_timed_on_tensors_of_its_recorded_layout_hot_and_streamed():
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.addmm.default:
                seen.append((args[2].shape, args[2].stride(), args[2].data_ptr()))
            return func(*args, **(kwargs or {}))

    layer = torch.nn.Linear(8, 32)
    (product,) = products_per_call(layer, lambda: layer(torch.randn(4, 8)))[0]
    stream = WeightStream(torch.float32, torch.device("cpu"), nbytes=4 * 8 * 32 * 6)  # room for 6
    with Spy():
        hot = product_seconds(product, torch.device("cpu"), rounds=2, min_seconds=0)
    assert hot > 0 and {(shape, stride) for shape, stride, _ in seen} == {((8, 32), (1, 8))}
    assert len({pointer for *_, pointer in seen}) == 1  # hot: one weight, again and again
    seen.clear()
    with Spy():
        streamed = product_seconds(product, torch.device("cpu"), stream, rounds=2, min_seconds=0)
    assert streamed > 0 and {(shape, stride) for shape, stride, _ in seen} == {((8, 32), (1, 8))}
    pointers = [pointer for *_, pointer in seen[2:]]  # after the two calls that count the calls
    assert len(set(pointers)) == len(pointers)  # streamed: a new weight at every call


def test_streamed_weights_follow_one_another_through_the_pool_and_wrap_around_it():
    layout = Layout((4, 2), (1, 4))  # 8 values a weight
    stream = WeightStream(torch.float32, torch.device("cpu"), nbytes=4 * 20)  # 20 values: 2 fit
    first, second = stream.weights(layout, 1), stream.weights(layout, 5)
    offsets = [w.storage_offset() for w in first + second]
    assert offsets == [0, 8, 0]  # the next call goes on where the last left off; never past the pool
    assert all(w.shape == (4, 2) and w.stride() == (1, 4) for w in first + second)
    big = stream.weights(Layout((4, 4), (4, 1)), 3)  # more than half the pool: two of its own
    assert len(big) == 2 and all(w.untyped_storage().data_ptr() != stream.pool.data_ptr() for w in big)


def test_a_product_of_a_batched_matmul_counts_every_batch_in_its_rows():
    product = Product("bmm", (Layout((3, 5, 4), (20, 4, 1)), Layout((3, 4, 6), (24, 6, 1))), torch.float32)
    assert product.rows == 15 and product.label() == "15 x 4 x 6" and product.flops == 2 * 15 * 4 * 6
