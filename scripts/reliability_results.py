"""Run every fault and bad input of results/reliability.md through the command line; record what the
user sees (exit status, the line printed) and whether any file that existed before was changed.

    make reliability-results      # ~10 minutes on 2 shared CPU cores

Each case runs in its own scratch directory with the tiny model, offline, as a user would type it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "reliability.md"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LBRIDGE = [sys.executable, "-m", "lbridge.cli"]
TINY = ROOT / "lbridge" / "assets" / "tiny-digits"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
TIMING = ("latency_s", "process", "device")  # sample.UNDETERMINED: they time the run


def lbridge(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LBRIDGE, *args], cwd=cwd, env=env or ENV, capture_output=True, text=True)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def seen(result: subprocess.CompletedProcess) -> str:
    """What the user reads: the error line, or the last line of output; a traceback is flagged."""
    if "Traceback" in result.stderr:
        return "TRACEBACK: " + result.stderr.strip().splitlines()[-1]
    lines = (result.stderr if result.returncode else result.stdout).strip().splitlines()
    return lines[-1] if lines else ""


@dataclass
class Case:
    fault: str
    args: list[str]
    setup: Callable[[Path], None] | None = None
    env: dict | None = None


def truncate_weights(root: Path) -> None:
    shutil.copytree(TINY, root / "weights")
    os.truncate(root / "weights" / WEIGHTS, (root / "weights" / WEIGHTS).stat().st_size // 2)


def garbage_weights(root: Path) -> None:
    shutil.copytree(TINY, root / "weights")
    (root / "weights" / WEIGHTS).write_bytes(bytes(range(256)) * 20)


def copied_artifact(ratio_dir: str) -> Callable[[Path], None]:
    """A ratio-4 L2P artifact copied into the directory another config looks in."""

    def setup(root: Path) -> None:
        lbridge(["calibrate", "method=l2p", "ratio=4"], root)
        (made,) = (root / "outputs" / "calibration" / "tiny").glob("l2p-r4-*")
        shutil.copytree(made, made.parent / ratio_dir)

    return setup


def artifact_dir(*overrides: str) -> str:
    code = (
        "from lbridge.experiment import compose_config; from lbridge.runs import calibration_dir; "
        f"print(calibration_dir(compose_config('sample', {list(overrides)!r})).name)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    return result.stdout.strip()


BAD_INPUTS = [
    Case("unknown model", ["sample", "model=sdxl"]),
    Case("unknown method", ["sample", "method=magic"]),
    Case("unknown metric", ["eval", "model.metrics=[psnr,nosuch]"]),
    Case("unknown prompt set", ["sample", "prompts=nosuch"]),
    Case("unknown config key", ["sample", "nosuchkey=1"]),
    Case("a key the command needs, deleted", ["collect", "~num_prompts"]),
    Case("ratio above the maximum reachable", ["sample", "ratio=50"]),
    Case("ratio not a number / not finite", ["sample", "ratio=inf"]),
    Case("broken interpolation", ["sample", "ratio=${oops}"]),
    Case("sweep values without -m", ["sample", "schedule.interval=2,3,4"]),
    Case("CUDA device that is not there", ["sample", "model.device=cuda:7"]),
    Case("runtime.modulation=batched for a model with nothing to batch (Wan2.1)",
         ["sample", "model=wan21_1_3b", "runtime.modulation=batched"]),
    Case("empty prompt file", ["sample", "prompts=drawbench", "prompts.path=empty.txt"],
         lambda root: (root / "empty.txt").write_text("\n")),
    Case("prompt file missing", ["sample", "prompts=drawbench", "prompts.path=/nowhere.txt"]),
    Case("missing weights offline (FLUX.1-dev, no model.path)", ["sample", "model=flux", "model.device=cpu"]),
    Case("model.path that does not exist", ["sample", "model.path=/nowhere/tiny"]),
    Case("truncated safetensors shard of the model", ["sample", "model.path=weights"], truncate_weights),
    Case("corrupt safetensors shard of the model", ["sample", "model.path=weights"], garbage_weights),
    Case("output directory not writable (output_root is a file)", ["sample", "output_root=taken/out"],
         lambda root: (root / "taken").write_text("a file\n")),
    Case("output directory not writable (/proc)", ["sample", "output_root=/proc/lbridge"]),
    Case("calibration artifact for another ratio", ["sample", "method=l2p", "ratio=3"],
         copied_artifact(artifact_dir("method=l2p", "ratio=3"))),
    Case("calibration artifact for another schedule",
         ["sample", "method=l2p", "ratio=4", "schedule.warmup=2"],
         copied_artifact(artifact_dir("method=l2p", "ratio=4", "schedule.warmup=2"))),
    Case("calibration artifact for another model config",
         ["sample", "method=l2p", "ratio=4", "model.num_inference_steps=10"],
         copied_artifact(artifact_dir("method=l2p", "ratio=4", "model.num_inference_steps=10"))),
    Case("no calibration artifact", ["sample", "method=l2p", "ratio=3"]),
    Case("eval before sample", ["eval", "method=fora", "ratio=3"]),
    Case("calibrate under torchrun", ["calibrate", "method=l2p", "ratio=4"],
         env={**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}),
]  # fmt: skip


def run_bad_input(case: Case, scratch: Path) -> list[str]:
    root = Path(tempfile.mkdtemp(dir=scratch))
    if case.setup:
        case.setup(root)
    before = snapshot(root)
    result = lbridge(case.args, root, case.env)
    kept = "yes" if snapshot(root) == before else "NO"
    command = "`lbridge " + " ".join(case.args) + "`"
    return [case.fault, command, str(result.returncode), f"`` {seen(result)} ``", kept]


def deterministic(root: Path) -> dict[str, object]:
    """Every file's bytes; samples.jsonl as its records without the timing fields."""
    files = {}
    for name, data in snapshot(root).items():
        if name.endswith("samples.jsonl"):
            records = [json.loads(line) for line in data.decode().splitlines()]
            files[name] = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
        else:
            files[name] = data
    return files


def kill_and_resume(scratch: Path, run_glob: str) -> list[str]:
    """SIGKILL `lbridge sample` once the run matching `run_glob` holds 3 records, rerun, compare."""
    args = ["sample", "method=fora", "ratio=3", "num_prompts=8", "timing.warmup_runs=0"]
    root = Path(tempfile.mkdtemp(dir=scratch))
    proc = subprocess.Popen([*LBRIDGE, *args, "output_root=killed"], cwd=root, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None:
        runs = list(root.glob(f"killed/sample/tiny/{run_glob}/samples.jsonl"))
        if runs and runs[0].read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
        time.sleep(0.01)
    pngs = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / "killed").rglob("*.png")}
    rerun = lbridge([*args, "output_root=killed"], root)
    rewritten = sum((p.stat().st_ino, p.stat().st_mtime_ns) != s for p, s in pngs.items())
    lbridge([*args, "output_root=clean"], root)
    same = deterministic(root / "killed") == deterministic(root / "clean")
    return [
        f"SIGKILL during `lbridge sample` ({run_glob.split('-')[0]} run, after 3 of 8 images), "
        "then the same command",
        "`lbridge " + " ".join(args) + "`",
        f"{proc.returncode}, then {rerun.returncode}",
        f"{len(pngs)} images survived the kill, {rewritten} of them rewritten by the rerun; "
        f"files identical to an uninterrupted run: {'yes' if same else 'NO'}",
        "yes" if rewritten == 0 else "NO",
    ]


def truncated_trajectory(scratch: Path) -> list[str]:
    """A calibration trajectory shard cut short (disk full, interrupted copy), then collect again."""
    root = Path(tempfile.mkdtemp(dir=scratch))
    args = ["collect", "num_prompts=3"]
    lbridge(args, root)
    shards = sorted(root.glob("outputs/trajectories/tiny/*/prompt-*.safetensors"))
    whole = {p.name: p.read_bytes() for p in shards}
    others = {p: p.stat().st_mtime_ns for p in shards if p != shards[1]}
    os.truncate(shards[1], 1000)
    again = lbridge(args, root)
    restored = {p.name: p.read_bytes() for p in shards} == whole
    untouched = all(p.stat().st_mtime_ns == t for p, t in others.items())
    line = next((x for x in again.stdout.splitlines() if "unreadable" in x), seen(again))
    return [
        "truncated trajectory shard (calibration data), then the same command",
        "`lbridge " + " ".join(args) + "`",
        str(again.returncode),
        f"`` {line.split('/')[-1]} ``; recorded again, byte-identical: {'yes' if restored else 'NO'}",
        "yes" if untouched else "NO",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_parallel(scratch: Path) -> list[str]:
    root = Path(tempfile.mkdtemp(dir=scratch))
    args = ["sample", "method=fora", "ratio=3", "num_prompts=5", "timing.warmup_runs=0"]
    lbridge([*args, "output_root=one"], root)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", "-m", "lbridge.cli"]  # fmt: skip
    two = subprocess.run([*torchrun, *args, "output_root=two"], cwd=root, env=ENV, capture_output=True)
    same = deterministic(root / "one") == deterministic(root / "two")
    return [
        "2 gloo processes (torchrun) vs 1 process, same config and seeds",
        "`torchrun --nproc_per_node=2 -m lbridge.cli " + " ".join(args) + "`",
        str(two.returncode),
        "merged run directory identical to the single-process one (timing fields aside): "
        + ("yes" if same else "NO"),
        "-",
    ]


def table(rows: list[list[str]]) -> str:
    head = ["fault or bad input", "command", "exit", "what the user sees", "files before untouched"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        bad = [run_bad_input(case, scratch) for case in BAD_INPUTS]
        faults = [kill_and_resume(scratch, "none-*"), kill_and_resume(scratch, "fora-*")]
        faults += [truncated_trajectory(scratch), data_parallel(scratch)]
    OUT.write_text(
        "# Reliability: faults and bad inputs, and what the user sees\n\n"
        "Regenerate: `make reliability-results` (scripts/reliability_results.py runs each case through the\n"
        "command line with the tiny model, offline, in a scratch directory; ~10 minutes on 2 shared CPU\n"
        "cores).\n"
        'Exit status 2 is lbridge\'s one-line error; "files before untouched" compares every file in the\n'
        "scratch directory, byte for byte, before and after the command.\n\n"
        "## Bad input\n\n" + table(bad) + "\n\n"
        "## Faults\n\n"
        "Timing fields of samples.jsonl (`latency_s`, `process`, `device`) measure the run, not its output,\n"
        "and are left out of the comparisons; every image and every other field is compared byte for\n"
        "byte.\n\n" + table(faults) + "\n"
    )
    print(f"wrote {OUT}")
    if any("TRACEBACK" in row[3] or row[4] == "NO" for row in bad + faults):
        sys.exit("some case showed a traceback or changed a file: see " + str(OUT))


if __name__ == "__main__":
    main()
