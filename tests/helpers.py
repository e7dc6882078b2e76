"""Shared by the tests that run the command line in subprocesses and compare output trees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from lbridge.commands.sample import UNDETERMINED

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
