"""Bad input and broken files: one line naming the bad value (and what is accepted), exit status 2, no
traceback, and every file that existed before left as it was. (More cases: tests/test_cli.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, files

from lbridge.calibration.trajectories import Trajectory
from lbridge.errors import LbridgeError
from lbridge.experiment import compose_config
from lbridge.runs import calibration_dir
from lbridge.tiny.assets import TINY_PIPELINE

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def lbridge(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbridge.cli", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in files(root).items()}


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbridge: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def truncated_weights(root: Path) -> None:
    shutil.copytree(TINY_PIPELINE, root / "weights")
    file = root / "weights" / WEIGHTS
    os.truncate(file, file.stat().st_size // 2)


def garbage_weights(root: Path) -> None:
    shutil.copytree(TINY_PIPELINE, root / "weights")
    (root / "weights" / WEIGHTS).write_bytes(bytes(range(256)) * 20)


CASES = {
    "unknown metric": (
        None, ["eval", "model.metrics=[psnr,nosuch]"],
        ["unknown metric 'nosuch' in model.metrics", "(accepted: psnr, ssim, digit_accuracy, clip_score"],
    ),
    "unknown prompt set": (
        None, ["sample", "prompts=nosuch"],
        ["unknown prompts 'nosuch' (accepted: coco, digits, drawbench, examples, imagenet, parti, vbench)"],
    ),
    "empty prompt file": (
        lambda root: (root / "empty.txt").write_text("\n  \n"),
        ["sample", "prompts=drawbench", "prompts.path=empty.txt"],
        ["prompts.path=empty.txt holds no prompts"],
    ),
    "truncated safetensors weights": (
        truncated_weights, ["sample", "model.path=weights"],
        [f"model.path=weights: {WEIGHTS} is truncated or corrupt", "file not fully covered"],
    ),
    "corrupt safetensors weights": (
        garbage_weights, ["sample", "model.path=weights"], [f"{WEIGHTS} is truncated or corrupt"],
    ),
    "missing weights offline": (
        None, ["sample", "model.path=/nowhere/tiny"],
        ["model.path=/nowhere/tiny does not exist: point model.path at the tiny weights"],
    ),
    "output root is a file": (
        lambda root: (root / "taken").write_text("a file, not a directory\n"),
        ["sample", "num_prompts=1", "output_root=taken/out"],
        ["cannot create output directory taken/out/", "Not a directory"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, case):
    setup, args, fragments = CASES[case]
    if setup is not None:
        setup(tmp_path)
    before = snapshot(tmp_path)
    assert_one_line(lbridge(*args, cwd=tmp_path), *fragments)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_one_line(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert_one_line(lbridge("sample", "num_prompts=1", "output_root=ro", cwd=tmp_path), "ro/sample")
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.slow
def test_calibration_artifact_of_another_ratio_schedule_or_model_is_refused(tmp_path):
    """An artifact copied into another config's directory (they are named by their key's hash)."""
    l2p = ["method=l2p", "ratio=4", "num_prompts=1"]
    assert lbridge("calibrate", *l2p, cwd=tmp_path).returncode == 0
    made = calibration_dir(compose_config("sample", l2p))
    other_model = ["model.num_inference_steps=10", *l2p]  # the tiny model at another step count
    for overrides, message in [
        (["method=l2p", "ratio=3", "num_prompts=1"], "ratio=4.0 (this run: 3.0)"),
        ([*l2p, "schedule.warmup=2"], "schedule.warmup=1 (this run: 2)"),
        (other_model, "model.num_inference_steps=20 (this run: 10)"),
    ]:
        target = tmp_path / calibration_dir(compose_config("sample", overrides))
        shutil.copytree(tmp_path / made, target)
        before = snapshot(tmp_path)
        result = lbridge("sample", *overrides, cwd=tmp_path)
        assert_one_line(result, "holds a calibration for another config", message)
        assert snapshot(tmp_path) == before and not (tmp_path / "outputs" / "sample").exists()
        shutil.rmtree(target)


@pytest.mark.slow
def test_truncated_trajectory_shard_is_recorded_again_and_nothing_else_is(tmp_path):
    assert lbridge("collect", "num_prompts=3", cwd=tmp_path).returncode == 0
    shards = sorted(tmp_path.glob("outputs/trajectories/tiny/*/prompt-*.safetensors"))
    whole = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    os.truncate(shards[1], 1000)
    with pytest.raises(LbridgeError, match="is unreadable .* run `lbridge collect` with the same config"):
        Trajectory(shards[1])
    result = lbridge("collect", "num_prompts=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{shards[1].name}: unreadable (" in result.stdout and "recording prompt 1 again" in result.stdout
    assert {p.name: p.read_bytes() for p in shards} == {name: data for name, (data, _) in whole.items()}
    for untouched in (shards[0], shards[2]):
        assert untouched.stat().st_mtime_ns == whole[untouched.name][1]


def test_calibrate_refuses_a_data_parallel_launch(tmp_path):
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = lbridge("calibrate", "method=l2p", "ratio=4", cwd=tmp_path, env=env)
    assert_one_line(result, "lbridge calibrate runs in one process")
    assert list(tmp_path.iterdir()) == []
