"""The command line as a user meets it: one-line errors, nothing written on bad input, resumable runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbridge.commands.sample import peak_memory_line

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def lbridge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lbridge.cli", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "model=sdxl"], "unknown model 'sdxl' (accepted: dit_xl_2, flux, hunyuan_video,"),
        (
            ["sample", "method=magic"],
            "unknown method 'magic' (accepted: fbcache, foca, fora, l2p, learnibridge, magcache, none, "
            "taylorseer, tcc, teacache, toca)",
        ),
        (["sample", "-m", "method=fora,magic"], "unknown method 'magic'"),
        (["sample", "ratio=50"], "ratio=50 is above the maximum reachable"),
        (["sample", "ratio=fast"], "ratio=fast: Value 'fast' of type 'str' could not be converted to Float"),
        (["sample", "num_prompts=many"], "num_prompts=many: Value 'many'"),
        (["sample", "num_prompts=0"], "num_prompts=0 must be >= 1"),
        (["sample", "schedule.interval=0"], "schedule.interval=0 must be >= 1"),
        (
            ["sample", "schedule.spacing=random"],
            "unknown schedule spacing 'random' (accepted: even, interval)",
        ),
        (["sample", "model.num_inference_steps=0"], "model.num_inference_steps=0 must be an integer >= 1"),
        (
            ["sample", "model.dtype=float8"],
            "unknown model.dtype 'float8' (accepted: float32, bfloat16, float16)",
        ),
        (
            ["sample", "prompts=drawbench", "prompts.path=/nowhere.txt"],
            "prompts.path=/nowhere.txt is not a file",
        ),
        (["sample", "nosuchkey=1"], "unknown config key 'nosuchkey'"),
        (["collect", "~num_prompts=5"], "~num_prompts=5: `lbridge collect` needs 'num_prompts': set it"),
        (["sample", "-m", "ratio=2,3", "~seed"], "~seed: `lbridge sample` needs 'seed'"),
        (["sample", "ratio=3", "-1"], "cannot parse override '-1': LexerNoViableAltException: -1 (overrides"),
        (
            ["sample", "runtime.modulation=fused"],
            "unknown runtime.modulation 'fused' (accepted: per_step, batched)",
        ),
        (
            ["sample", "runtime.compile=true", "runtime.compile_backend=turbo"],
            "unknown runtime.compile_backend 'turbo' (accepted: inductor, cudagraphs, eager, aot_eager",
        ),
        (["sample", "runtime.compile=maybe"], "runtime.compile=maybe: Value 'maybe' is not a valid bool"),
        (
            ["sample", "model=wan21_1_3b", "runtime.modulation=batched"],  # refused before loading weights
            "runtime.modulation=batched is not available for model 'wan21_1_3b'",
        ),
        (["eval", "runtime.modulation=fused"], "unknown runtime.modulation 'fused' (accepted: per_step"),
        (["paint"], "unknown command 'paint' (accepted: collect, calibrate, sample, eval, report, analyze, "),
        (["eval", "method=fora", "ratio=3"], "run `lbridge sample` first"),
        (["calibrate", "method=fora"], "training-free"),
        (["sample", "model=flux", "model.device=cpu"], "set model.path"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = lbridge(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_lists_commands(tmp_path):
    result = lbridge("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("collect", "calibrate", "sample", "eval", "report"):
        assert command in result.stdout


def run_dirs(root: Path) -> dict[str, Path]:
    return {p.name.split("-")[0] + ("" if p.name.startswith("none") else "-" + p.name.split("-")[1]): p
            for p in (root / "outputs" / "sample" / "tiny").iterdir()}  # fmt: skip


@pytest.mark.slow
def test_sample_eval_report_end_to_end_and_resume(tmp_path):
    result = lbridge("sample", "-m", "method=none,fora", "ratio=3", "num_prompts=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "FLOPs speedup" in result.stdout and "latency speedup" in result.stdout
    dirs = run_dirs(tmp_path)
    assert set(dirs) == {"none", "fora-r3"}
    records = [json.loads(line) for line in (dirs["fora-r3"] / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert {"prompt", "seed", "file", "latency_s", "flops", "schedule"} <= set(records[0])
    assert all((dirs["fora-r3"] / r["file"]).exists() for r in records)

    # Same config again: nothing is regenerated, the images keep their bytes.
    before = {p.name: p.read_bytes() for p in dirs["fora-r3"].glob("*.png")}
    lines_before = (dirs["fora-r3"] / "samples.jsonl").read_text()
    assert lbridge("sample", "ratio=3", "num_prompts=4", cwd=tmp_path).returncode == 0
    assert (dirs["fora-r3"] / "samples.jsonl").read_text() == lines_before
    assert {p.name: p.read_bytes() for p in dirs["fora-r3"].glob("*.png")} == before

    assert lbridge("eval", "ratio=3", "num_prompts=4", cwd=tmp_path).returncode == 0
    metrics = json.loads((dirs["fora-r3"] / "metrics.json").read_text())
    assert metrics["flops_speedup"] >= 3.0 and 0 < metrics["ssim"] < 1 and 0 <= metrics["digit_accuracy"] <= 1
    report = lbridge("report", cwd=tmp_path)
    assert report.returncode == 0 and "| fora" in report.stdout

    # A run whose method computed something else (an earlier lbridge: another cached-step cost) is
    # not resumed into: its images would be mixed with this version's.
    plan_file = dirs["fora-r3"] / "plan.json"
    plan = json.loads(plan_file.read_text())
    plan_file.write_text(json.dumps({**plan, "cached_flops": plan["cached_flops"] + 1}))
    refused = lbridge("sample", "ratio=3", "num_prompts=4", cwd=tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"was sampled under another plan: cached_flops={plan['cached_flops'] + 1} (now: " in refused.stderr
    assert (dirs["fora-r3"] / "samples.jsonl").read_text() == lines_before


def test_peak_cuda_memory_goes_from_the_records_to_eval_and_report(tmp_path):
    """CUDA runs record each generation's peak memory (torch.cuda.max_memory_allocated); CPU runs
    record none. Here the records are given the field a CUDA run writes, then evaluated."""
    assert lbridge("sample", "ratio=3", "num_prompts=2", cwd=tmp_path).returncode == 0
    dirs = run_dirs(tmp_path)
    assert "peak_mem_gb" not in (dirs["fora-r3"] / "samples.jsonl").read_text()  # CPU: not measured
    assert lbridge("eval", "ratio=3", "num_prompts=2", cwd=tmp_path).returncode == 0
    assert "peak_mem_gb" not in json.loads((dirs["fora-r3"] / "metrics.json").read_text())
    for name, peaks in (("none", [20.0, 22.0]), ("fora-r3", [24.0, 24.5])):
        records = dirs[name] / "samples.jsonl"
        lines = [json.loads(line) for line in records.read_text().splitlines()]
        cuda = [{**r, "peak_mem_gb": p} for r, p in zip(lines, peaks, strict=True)]
        records.write_text("".join(json.dumps(r) + "\n" for r in cuda))
    assert lbridge("eval", "ratio=3", "num_prompts=2", cwd=tmp_path).returncode == 0
    assert json.loads((dirs["fora-r3"] / "metrics.json").read_text())["peak_mem_gb"] == 24.25
    assert lbridge("report", "out=table", cwd=tmp_path).returncode == 0
    header = (tmp_path / "table" / "table.csv").read_text().splitlines()
    columns = next(line for line in header if not line.startswith("#")).split(",")
    assert columns[:5] == ["method", "ratio_target", "flops_speedup", "latency_speedup", "peak_mem_gb"]
    assert peak_memory_line([{"peak_mem_gb": 24.0}], [{"peak_mem_gb": 21.0}]) == (
        "peak CUDA memory 24.00 GiB per generation (method=none: 21.00 GiB, +3.00)"
    )
    assert peak_memory_line([{"latency_s": 1.0}], []) == ""  # CPU records: no line


def test_a_sweep_goes_on_past_an_unreachable_ratio_and_the_report_lists_it(tmp_path):
    swept = lbridge("sample", "-m", "method=fora", "ratio=50,2", "num_prompts=2", cwd=tmp_path)
    assert swept.returncode != 0
    job = "method=fora ratio=50 num_prompts=2"
    assert f"error: {job}: ratio=50 is above the maximum reachable" in swept.stderr
    assert "1 job(s) of the sweep failed" in swept.stderr and "Traceback" not in swept.stderr
    assert set(run_dirs(tmp_path)) == {"none", "fora-r2"}  # the job after the failed one ran
    (failure,) = [json.loads(line) for line in (tmp_path / "outputs" / "failed_jobs.jsonl").open()]
    assert failure["command"] == "sample" and failure["overrides"] == job.split()

    evaluated = lbridge("eval", "ratio=2", "num_prompts=2", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    report = lbridge("report", "name=sweep", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "outputs" / "report" / "tiny" / "sweep.md").read_text()
    (row,) = [line for line in table.splitlines() if "| fora" in line and "50.000" in line]
    assert "is above the maximum reachable" in row


@pytest.mark.slow
def test_same_seed_twice_gives_identical_png_bytes(tmp_path):
    for out in ("a", "b"):
        result = lbridge(
            "sample", "method=fora", "ratio=2", "num_prompts=2", f"output_root={out}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    a = sorted((tmp_path / "a").rglob("*.png"))
    b = sorted((tmp_path / "b").rglob("*.png"))
    assert len(a) == 4 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_hydra_flags_pass_through(tmp_path):
    result = lbridge("sample", "ratio=3", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ratio: 3" in result.stdout and "_target_: lbridge.methods.fora.Fora" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_video_model_samples_and_evaluates_from_the_command_line(tmp_path):
    # A tiny random-weight Wan2.1 pipeline: each video is stored as tiled frames (PNG) plus a video file.
    model = ["model=wan21_1_3b", "model.random_weights=true", "model.device=cpu", "model.dtype=float32",
             "model.height=32", "model.width=32", "model.num_frames=5", "model.num_inference_steps=4",
             "model.max_sequence_length=8", "method=fora", "schedule.interval=2",
             "num_prompts=2"]  # fmt: skip
    assert lbridge("sample", "timing.warmup_runs=0", *model, cwd=tmp_path).returncode == 0
    result = lbridge("eval", *model, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "outputs" / "sample" / "wan21_1_3b").glob("fora-*")
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in records] == [5, 5] and all((run / r["video"]).exists() for r in records)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["ssim"] <= 1 and metrics["psnr"] > 0
