"""Runs killed with SIGKILL (no cleanup, no atexit) and started again end with the files of a run that
was never interrupted; nothing already written is recomputed or lost.

Images and every deterministic samples.jsonl field are compared byte for byte with an uninterrupted
run in another output_root; latency_s/process/device time the run (see tests/helpers.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ENV, assert_same_outputs, files, launch

SAMPLE = ["sample", "method=fora", "ratio=3", "num_prompts=8", "timing.warmup_runs=0"]


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_after(args: list[str], cwd: Path, run_glob: str, records: int) -> None:
    """Start `lbridge args`, SIGKILL it once the run matching `run_glob` holds `records` records."""
    proc = subprocess.Popen([sys.executable, "-m", "lbridge.cli", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list(cwd.glob(run_glob))
        if runs and lines(runs[0] / "samples.jsonl") >= records:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("killed_in", ["none", "fora"])
def test_sample_killed_mid_run_resumes_to_the_files_of_an_uninterrupted_run(tmp_path, killed_in):
    killed = tmp_path / "killed"
    kill_after([*SAMPLE, "output_root=killed"], tmp_path, f"killed/sample/tiny/{killed_in}-*", 3)
    written = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in files(killed).items()
               if name.endswith(".png")}  # fmt: skip
    assert written and len(written) < 16  # it was killed mid-run

    launch([*SAMPLE, "output_root=killed"], tmp_path, 1)
    for name, stat in written.items():  # nothing written before the kill was written again
        path = killed / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stat, name
    launch([*SAMPLE, "output_root=clean"], tmp_path, 1)
    assert_same_outputs(tmp_path / "clean", killed)


@pytest.mark.slow
def test_eval_killed_mid_run_leaves_nothing_and_reruns_to_the_same_metrics_bytes(tmp_path):
    run = ["method=fora", "ratio=3", "num_prompts=4"]
    launch(["sample", *run, "timing.warmup_runs=0"], tmp_path, 1)
    launch(["eval", *run], tmp_path, 1)
    (metrics,) = tmp_path.glob("outputs/sample/tiny/fora-*/metrics.json")
    uninterrupted = metrics.read_bytes()
    metrics.unlink()
    before = {name: p.read_bytes() for name, p in files(tmp_path / "outputs").items()}

    proc = subprocess.Popen([sys.executable, "-m", "lbridge.cli", "eval", *run], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(4)  # mid-run: loading metrics or reading images; metrics.json comes last
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    after = {name: p.read_bytes() for name, p in files(tmp_path / "outputs").items()}
    finished = {str(metrics.relative_to(tmp_path / "outputs"))}  # killed after its one atomic write
    assert after == before or after.keys() - before.keys() == finished

    launch(["eval", *run], tmp_path, 1)
    assert metrics.read_bytes() == uninterrupted
