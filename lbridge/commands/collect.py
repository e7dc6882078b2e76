"""`lbridge collect`: full-compute trajectories of the final block, for the calibrated methods."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lbridge.calibration.trajectories import (
    FORMAT,
    MANIFEST,
    RecordFinalBlockHook,
    read_manifest,
    save_shard,
    write_manifest,
)
from lbridge.commands.setup import build_adapter, build_method, plan
from lbridge.errors import LbridgeError
from lbridge.models.base import DTYPES, ModelAdapter
from lbridge.prompts import Prompt, load_prompts
from lbridge.runs import key_hash, model_key, reference_method
from lbridge.runtime.hooks import register, remove_all

RECORDER = "lbridge.collect"


def trajectory_dir(cfg: DictConfig, seed: int, dtype: str) -> tuple[Path, dict]:
    """Where the trajectories of (model, prompt set, seed base, dtype) live.

    The number of prompts is not part of the key: a set grows when more prompts are asked for, and
    prompt i is the same trajectory whatever the count.
    """
    key = {"model": model_key(cfg.model), "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
           "seed": int(seed), "dtype": dtype}  # fmt: skip
    return Path(cfg.output_root) / "trajectories" / cfg.model.name / key_hash(key), key


def storage_dtype(dtype: str, adapter: ModelAdapter) -> str:
    """`auto`: bfloat16 on CUDA (half the disk of float32), float32 on CPU (where bfloat16 is slow)."""
    if dtype == "auto":
        return "bfloat16" if adapter.device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise LbridgeError(f"unknown dtype '{dtype}' (accepted: auto, {', '.join(DTYPES)})")
    return dtype


def collect_trajectories(
    cfg: DictConfig, adapter: ModelAdapter, pipe, prompts: list[Prompt], seed: int, dtype: str
) -> Path:
    """Record the full-compute trajectories of `prompts` not yet in the set; return the set's root."""
    dtype = storage_dtype(dtype, adapter)
    root, key = trajectory_dir(cfg, seed, dtype)
    expect = {"hash": key_hash(key), "format": FORMAT}
    manifest = read_manifest(root, expect) if (root / MANIFEST).exists() else None
    todo = [p for p in prompts if manifest is None or str(p.index) not in manifest["shards"]]
    if not todo:
        return root
    acc = plan(pipe, adapter, build_method(reference_method()), cfg, prompts[0].text).attach()
    transformer = adapter.transformer(pipe)
    final = adapter.blocks(transformer)[-1]
    recorder = register(final, RecordFinalBlockHook(acc.runtime, final, DTYPES[dtype]), RECORDER)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LbridgeError(f"cannot create output directory {root}: {err.strerror}") from None
    manifest = manifest or {
        **expect, "model": cfg.model.name, "dtype": dtype, "key": key,
        "block": type(final).__name__, "steps": len(acc.schedule), "shards": {},
    }  # fmt: skip
    try:
        for prompt in tqdm(todo, desc="collect", unit="prompt"):
            recorder.reset()
            acc.reset()
            with torch.no_grad():
                adapter.generate(pipe, prompt.text, prompt.seed)
            shard = save_shard(root, prompt.index, recorder.tensors)
            manifest["shards"][str(prompt.index)] = {
                "file": shard,
                "prompt": prompt.text,
                "seed": prompt.seed,
            }
            write_manifest(root, manifest)
    finally:
        remove_all(transformer, [RECORDER])
        acc.remove()
    return root


def run(cfg: DictConfig) -> Path:
    adapter = build_adapter(cfg)
    storage_dtype(cfg.dtype, adapter)  # a bad dtype stops before the pipeline loads
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    root = collect_trajectories(cfg, adapter, adapter.load_pipeline(), prompts, cfg.seed, cfg.dtype)
    manifest = read_manifest(root)
    print(
        f"{root}: {len(manifest['shards'])} trajectories of {manifest['steps']} steps ({manifest['dtype']})"
    )
    return root
