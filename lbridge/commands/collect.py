"""`lbridge collect`: full-compute trajectories of the final block, for the calibrated methods."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lbridge import distributed
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
from lbridge.io import append_jsonl, read_jsonl, safetensors_problem
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


PENDING = "shards.rank-*.jsonl"  # a data-parallel rank's shard entries until rank 0 merges them


def _pending(root: Path) -> list[dict]:
    return [entry for path in sorted(root.glob(PENDING)) for entry in read_jsonl(path)]


def _readable(root: Path, manifest: dict | None) -> set[str]:
    """Prompts whose shard is whole. A truncated or corrupt one (a disk filled up, a copy cut short)
    is recorded again rather than failing every later calibration."""
    readable = set()
    for index, entry in (manifest["shards"] if manifest else {}).items():
        if (problem := safetensors_problem(root / entry["file"])) is None:
            readable.add(index)
        elif distributed.world().main:
            print(f"{root / entry['file']}: unreadable ({problem}); recording prompt {index} again")
    return readable


def collect_trajectories(
    cfg: DictConfig, adapter: ModelAdapter, pipe, prompts: list[Prompt], seed: int, dtype: str
) -> Path:
    """Record the full-compute trajectories of `prompts` not yet in the set; return the set's root.

    Under torchrun each rank records its own prompts (index % world_size == rank); a single process
    updates the manifest after every shard, ranks append entries to their own jsonl until rank 0
    merges them into the manifest after a barrier.
    """
    dtype = storage_dtype(dtype, adapter)
    root, key = trajectory_dir(cfg, seed, dtype)
    expect = {"hash": key_hash(key), "format": FORMAT}
    manifest = read_manifest(root, expect) if (root / MANIFEST).exists() else None
    stored = {str(e["index"]) for e in _pending(root)} | _readable(root, manifest)
    todo = [p for p in distributed.mine(prompts) if str(p.index) not in stored]
    if todo:
        header = {**expect, "model": cfg.model.name, "dtype": dtype, "key": key}
        _record(cfg, adapter, pipe, todo, root, header, manifest)
    distributed.barrier()  # every rank's shards are written
    if distributed.world().main and root.exists():
        _merge_pending(root, expect)
    distributed.barrier()
    return root


def _record(cfg: DictConfig, adapter: ModelAdapter, pipe, todo: list[Prompt], root: Path,
            header: dict, manifest: dict | None) -> None:  # fmt: skip
    acc = plan(pipe, adapter, build_method(reference_method()), cfg, todo[0].text).attach()
    transformer = adapter.transformer(pipe)
    final = adapter.blocks(transformer)[-1]
    recorder = register(final, RecordFinalBlockHook(acc.runtime, final, DTYPES[header["dtype"]]), RECORDER)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_all(transformer, [RECORDER])
        acc.remove()
        raise LbridgeError(f"cannot create output directory {root}: {err.strerror}") from None
    header = {**header, "block": type(final).__name__, "steps": len(acc.schedule)}
    manifest = manifest or {**header, "shards": {}}
    here = distributed.world()
    try:
        for prompt in tqdm(todo, desc="collect", unit="prompt"):
            recorder.reset()
            acc.reset()
            with torch.no_grad():
                adapter.generate(pipe, prompt.text, prompt.seed)
            entry = {"file": save_shard(root, prompt.index, recorder.tensors),
                     "prompt": prompt.text, "seed": prompt.seed}  # fmt: skip
            if here.parallel:  # the manifest is rank 0's to write
                append_jsonl(root / f"shards.rank-{here.rank:05d}.jsonl",
                             {**header, **entry, "index": prompt.index})  # fmt: skip
            else:
                manifest["shards"][str(prompt.index)] = entry
                write_manifest(root, manifest)
    finally:
        remove_all(transformer, [RECORDER])
        acc.remove()


def _merge_pending(root: Path, expect: dict) -> None:
    """Rank 0: ranks' pending shard entries into the manifest (which is written before they go)."""
    pending = _pending(root)
    if not pending:
        return
    manifest = read_manifest(root, expect) if (root / MANIFEST).exists() else None
    if manifest is None:
        header = {k: v for k, v in pending[0].items() if k not in ("index", "file", "prompt", "seed")}
        manifest = {**header, "shards": {}}
    for entry in pending:
        manifest["shards"][str(entry["index"])] = {k: entry[k] for k in ("file", "prompt", "seed")}
    manifest["shards"] = dict(sorted(manifest["shards"].items(), key=lambda item: int(item[0])))
    write_manifest(root, manifest)
    for path in root.glob(PENDING):
        path.unlink()


def run(cfg: DictConfig) -> Path:
    adapter = build_adapter(cfg)
    storage_dtype(cfg.dtype, adapter)  # a bad dtype stops before the pipeline loads
    distributed.init(adapter.device)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    root = collect_trajectories(cfg, adapter, adapter.load_pipeline(), prompts, cfg.seed, cfg.dtype)
    manifest = read_manifest(root)
    if distributed.world().main:
        count, steps = len(manifest["shards"]), manifest["steps"]
        print(f"{root}: {count} trajectories of {steps} steps ({manifest['dtype']})")
    return root
