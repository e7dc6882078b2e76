"""`lbridge collect`: full-compute trajectories of the final block, for the calibrated methods."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lbridge.calibration.trajectories import (
    MANIFEST,
    RecordFinalBlockHook,
    read_manifest,
    save_shard,
    write_manifest,
)
from lbridge.commands.setup import build_adapter, build_method, plan
from lbridge.errors import LbridgeError
from lbridge.models.base import DTYPES
from lbridge.prompts import load_prompts
from lbridge.runs import key_hash, reference_method
from lbridge.runtime.hooks import register, remove_all


def trajectory_dir(cfg: DictConfig) -> tuple[Path, dict]:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("device", None)
    key = {"model": model, "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
           "num_prompts": cfg.num_prompts, "seed": cfg.seed, "dtype": cfg.dtype}  # fmt: skip
    return Path(cfg.output_root) / "trajectories" / cfg.model.name / key_hash(key), key


def run(cfg: DictConfig) -> Path:
    if cfg.dtype not in DTYPES:
        raise LbridgeError(f"unknown dtype '{cfg.dtype}' (accepted: {', '.join(DTYPES)})")
    root, key = trajectory_dir(cfg)
    adapter = build_adapter(cfg)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    pipe = adapter.load_pipeline()
    acc = plan(pipe, adapter, build_method(reference_method()), cfg, prompts[0].text).attach()
    transformer = adapter.transformer(pipe)
    final = adapter.blocks(transformer)[-1]
    recorder = register(final, RecordFinalBlockHook(acc.runtime, final, DTYPES[cfg.dtype]), "lbridge.collect")

    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root, {"hash": key_hash(key)}) if (root / MANIFEST).exists() else {
        "hash": key_hash(key), "model": cfg.model.name, "dtype": cfg.dtype, "key": key,
        "steps": len(acc.schedule), "shards": {},
    }  # fmt: skip
    try:
        for prompt in tqdm(prompts, desc="collect", unit="prompt"):
            if str(prompt.index) in manifest["shards"]:
                continue
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
        remove_all(transformer, ["lbridge.collect"])
        acc.remove()
    print(f"{root}: {len(manifest['shards'])} trajectories of {manifest['steps']} steps ({cfg.dtype})")
    return root
