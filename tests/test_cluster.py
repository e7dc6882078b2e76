"""Hydra multirun through hydra-submitit-launcher (the `cluster` extra): lbridge's Slurm launcher config
composes against the plugin's schema, the local launcher stays the default, and a sweep really runs
through submitit (its local executor: the same plugin code path as Slurm, without a cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig

from lbridge.config import CONF_DIR

SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def hydra_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("sample", list(overrides), return_hydra_config=True).hydra


def lbridge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbridge.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_local_launcher_stays_the_default():
    assert hydra_config().launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def test_submitit_slurm_launcher_composes_with_lbridge_defaults_and_the_plugin_class_imports():
    launcher = hydra_config("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu").launcher
    assert launcher._target_ == SLURM and get_class(SLURM).__name__ == "SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (1, 1, 240)
    assert launcher.partition == "gpu"


def test_a_misspelt_launcher_key_is_one_line(tmp_path):
    slurm = ["sample", "-m", "hydra/launcher=submitit_slurm"]
    result = lbridge(*slurm, "hydra.launcher.partiton=gpu", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "lbridge: error: unknown config key 'hydra.launcher.partiton' for `lbridge sample` "
        "(accepted: model, method, prompts, ratio, num_prompts, seed, output_root, schedule, runtime, "
        "timing; '+hydra.launcher.partiton=...' adds one)"
    ]
    # The plugin's schema types lbridge's yaml: a wrong type is refused too.
    result = lbridge(*slurm, "hydra.launcher.timeout_min=soon", cwd=tmp_path)
    assert result.returncode == 2 and "hydra.launcher.timeout_min=soon: Value 'soon'" in result.stderr


def test_a_sweep_value_without_minus_m_is_one_line(tmp_path):
    result = lbridge("sample", "schedule.interval=2,3,4", cwd=tmp_path)
    assert result.returncode == 2
    message = "schedule.interval=2,3,4 is a sweep: add -m to run one job per value"
    assert result.stderr.strip() == f"lbridge: error: {message}"


@pytest.mark.slow
def test_a_sweep_over_cache_intervals_runs_through_submitit(tmp_path):
    result = lbridge("sample", "-m", "hydra/launcher=submitit_local", "method=fora", "schedule.interval=2,3",
                     "num_prompts=2", "timing.warmup_runs=0", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    runs = sorted((tmp_path / "outputs" / "sample" / "tiny").iterdir())
    assert [r.name.split("-")[0] for r in runs] == ["fora", "fora", "none"]
    schedules = {json.loads(line)["schedule"] for r in runs[:2] for line in (r / "samples.jsonl").open()}
    assert len(schedules) == 2  # one per interval
    assert list((tmp_path / "outputs" / ".multirun" / ".submitit").iterdir())  # submitit ran the jobs
