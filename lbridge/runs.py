"""Run directories keyed by the resolved config: reruns resume, different configs never mix."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lbridge.config import CONF_DIR, RuntimeConfig
from lbridge.errors import LbridgeError
from lbridge.io import append_jsonl, write_json

MANIFEST = "run.json"
#: What the code planned for a sampling run: refused on resume if this version plans otherwise.
PLAN = "plan.json"
FAILURES = "failed_jobs.jsonl"  # under output_root: sweep jobs that stopped with an error


def record_failure(cfg: DictConfig, command: str, overrides: list[str], error: str) -> None:
    """Append a failed sweep job (what it was, and why) to `<output_root>/failed_jobs.jsonl`."""
    root = Path(cfg.output_root)
    root.mkdir(parents=True, exist_ok=True)
    ratio = float(cfg.ratio) if cfg.get("ratio") is not None else None
    append_jsonl(root / FAILURES, {
        "command": command, "overrides": overrides, "error": error,
        "model": cfg.model.name, "method": cfg.method.name, "ratio": ratio,
    })  # fmt: skip


def model_key(model: DictConfig) -> dict[str, Any]:
    """The model node as part of a key: where it runs and which metrics eval computes change no output."""
    key = OmegaConf.to_container(model, resolve=True)
    key.pop("device", None)
    key.pop("metrics", None)
    return key


def sample_key(cfg: DictConfig, method: DictConfig | None = None) -> dict[str, Any]:
    """The part of the config that determines a sampling run's images (and nothing else)."""
    method = cfg.method if method is None else method
    key = {
        "model": model_key(cfg.model),
        "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
        "num_prompts": cfg.num_prompts,
        "seed": cfg.seed,
        "method": OmegaConf.to_container(method, resolve=True),
    }
    if method.name != "none":  # the reference has no ratio or schedule: one reference for all
        key["ratio"] = float(cfg.ratio)
        key["schedule"] = OmegaConf.to_container(cfg.schedule, resolve=True)
    if runtime := runtime_key(cfg):
        key["runtime"] = runtime
    return key


def runtime_key(cfg: DictConfig) -> dict[str, Any]:
    """The runtime options that differ from the defaults: compiled kernels and a batched modulation
    round differently, so their images are another run. Empty by default, so the keys (and the run
    directories) of runs made before these options existed are unchanged."""
    chosen = OmegaConf.to_container(cfg.get("runtime") or OmegaConf.create(), resolve=True)
    defaults = asdict(RuntimeConfig())
    if not chosen.get("compile", defaults["compile"]):
        chosen.pop("compile_backend", None)  # the backend of no compilation changes nothing
    return {k: v for k, v in chosen.items() if v != defaults.get(k)}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def sample_dir(cfg: DictConfig, method: DictConfig | None = None) -> Path:
    key = sample_key(cfg, method)
    name = key["method"]["name"]
    label = name if name == "none" else f"{name}-r{key['ratio']:g}"
    return Path(cfg.output_root) / "sample" / key["model"]["name"] / f"{label}-{key_hash(key)}"


def calibration_key(cfg: DictConfig) -> dict[str, Any]:
    """What a calibration artifact depends on: model, prompts, method (with calibration set), ratio, schedule.

    Not the sampling prompts' count or seeds, nor the method's `sampling_options` (how it runs the
    fitted calibration): one artifact serves every sampling run of its schedule.
    """
    key = sample_key(cfg)
    del key["num_prompts"], key["seed"]
    key.pop("runtime", None)  # how the calibrated method will run: one artifact serves eager and compiled
    target = cfg.method.get("_target_")
    for option in getattr(get_class(target), "sampling_options", ()) if target else ():
        key["method"].pop(option, None)
    return key


def calibration_dir(cfg: DictConfig) -> Path:
    key = calibration_key(cfg)
    label = f"{key['method']['name']}-r{key['ratio']:g}"
    return Path(cfg.output_root) / "calibration" / key["model"]["name"] / f"{label}-{key_hash(key)}"


def reference_method() -> DictConfig:
    """The full-compute method config every accelerated run is compared with."""
    return OmegaConf.load(CONF_DIR / "method" / "none.yaml")


def open_run(path: Path, key: dict[str, Any]) -> Path:
    """Create or reopen a run directory; refuse one whose manifest holds a different config."""
    manifest = path / MANIFEST
    if manifest.exists():
        stored = json.loads(manifest.read_text())
        if stored.get("hash") != key_hash(key):
            raise LbridgeError(
                f"{path} holds a run of another config (hash {stored.get('hash')}); not mixing"
            )
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LbridgeError(f"cannot create output directory {path}: {err.strerror}") from None
    write_json(manifest, {"hash": key_hash(key), "key": key})
    return path


def check_plan(run: Path, plan: dict[str, Any]) -> None:
    """Record a sampling run's plan (schedule, FLOPs of a FULL and a CACHED step), or refuse to resume
    one recorded under another: the config is the same (open_run checks it) but the code computes
    something else now (a method changed between versions), and resuming would mix its images."""
    path = run / PLAN
    if not path.exists():
        write_json(path, plan)
        return
    stored = json.loads(path.read_text())
    if stored != plan:
        changed = ", ".join(f"{k}={stored.get(k)} (now: {v})" for k, v in plan.items() if stored.get(k) != v)
        raise LbridgeError(
            f"{run} was sampled under another plan: {changed}; the method computes something else in "
            "this version of lbridge: delete the directory to sample it again"
        )


def command_line(command: str) -> str:
    """The `lbridge` command line of the running Hydra job (its overrides), for 'regenerate with' notes."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (tests, the Python API)
        overrides = []
    return " ".join(["lbridge", command, *overrides])
