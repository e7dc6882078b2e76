"""Shared by several test files: running the command line in subprocesses and comparing output trees;
what a stack method leaves unrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lbridge.commands.sample import UNDETERMINED
from lbridge.runtime.hooks import CallCounterHook, register, remove_all

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], cwd: Path, processes: int) -> subprocess.CompletedProcess:
    """`lbridge ...` in one process, or under torchrun with `processes` gloo ranks on CPU."""
    if processes == 1:
        prefix = [sys.executable, "-m", "lbridge.cli"]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                  f"--master_port={free_port()}", "-m", "lbridge.cli"]  # fmt: skip
    result = subprocess.run([*prefix, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def deterministic_lines(path: Path) -> list[str]:
    """The lines of a samples.jsonl without the fields that time the run (sample.UNDETERMINED)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [json.dumps(without(r, UNDETERMINED), sort_keys=True) for r in records]


def without(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_outputs(single: Path, parallel: Path) -> None:
    """Same file names; same bytes, samples.jsonl compared line by line without its timing fields."""
    one, two = files(single), files(parallel)
    assert set(one) == set(two)  # no rank shard, no temp file left beside the merged outputs
    for name, path in one.items():
        if name.endswith("samples.jsonl"):
            assert deterministic_lines(path) == deterministic_lines(two[name]), name
            indices = [json.loads(line)["index"] for line in two[name].read_text().splitlines()]
            assert indices == sorted(indices)
        else:
            assert path.read_bytes() == two[name].read_bytes(), name


def unread_modules_run(acc, adapter, pipe, generate: Callable[[], np.ndarray]) -> tuple[list[int], int, bool]:
    """Under an attached stack method: how often each of the adapter's `block_only_modules` really ran
    in one generation, the transformer calls that were FULL, and whether the output is bit-equal to
    the same generation with those modules computed at every call (the method's hooks on them removed)."""
    modules = adapter.block_only_modules(pipe.transformer)
    # Registered under lbridge's hooks' (inner): they count what really runs.
    acc.remove()
    counters = [register(m, CallCounterHook(), "test.count") for m in modules]
    try:
        acc.attach()
        acc.reset()
        reused = generate()
        full_calls = acc.runtime.full_calls
        runs = [c.count for c in counters]
        unread = {n for m in modules for n in m._diffusers_hook.hooks if n.endswith(".unread")}
        assert unread or not modules, "no hook of the method on the block-only modules"
        remove_all(pipe.transformer, sorted(unread))  # a wrapped method's (TCC's base) included
        acc.reset()
        computed = generate()
    finally:
        acc.remove()
        remove_all(pipe.transformer, ["test.count"])
    return runs, full_calls, bool(np.array_equal(reused, computed))
