"""Data-parallel runs: 2 gloo processes under torchrun write what one process writes.

What is compared byte for byte: every image, every trajectory shard, run.json, metrics.json and every
samples.jsonl line once the fields that measure the run rather than its output are dropped
(`sample.UNDETERMINED`: latency_s, process, device, and peak_mem_gb on CUDA). Wall time differs
between any two runs, even of one process, so those fields cannot be byte-identical; everything
else is.
"""

from __future__ import annotations

import json
import time

import pytest
from helpers import assert_same_outputs, launch, without

from lbridge.commands.sample import merge_records

RUN = ["method=fora", "ratio=3", "num_prompts=5"]


@pytest.mark.slow
def test_two_gloo_processes_sample_and_eval_like_one_process_byte_for_byte_except_timing(tmp_path):
    for processes in (1, 2):
        out = f"output_root=p{processes}"
        launch(["sample", *RUN, "timing.warmup_runs=0", out], tmp_path, processes)
        result = launch(["eval", *RUN, out], tmp_path, processes)
        assert result.stdout.count("flops_speedup=") == 1  # eval ran on rank 0 alone
    single, parallel = tmp_path / "p1", tmp_path / "p2"
    for metrics in parallel.rglob("metrics.json"):  # latency_speedup comes from the timed records
        other = single / metrics.relative_to(parallel)
        one, two = json.loads(other.read_text()), json.loads(metrics.read_text())
        assert without(one, ("latency_speedup",)) == without(two, ("latency_speedup",))
        other.unlink(), metrics.unlink()
    assert_same_outputs(single, parallel)
    processes = {json.loads(line)["process"] for line in next(parallel.rglob("fora-*/samples.jsonl")).open()}
    assert len(processes) == 1  # both ranks tag their timings with rank 0's launch tag


@pytest.mark.slow
def test_two_gloo_processes_collect_the_same_trajectory_shards(tmp_path):
    for processes in (1, 2):
        launch(["collect", "num_prompts=3", f"output_root=p{processes}"], tmp_path, processes)
    assert_same_outputs(tmp_path / "p1", tmp_path / "p2")
    (manifest,) = (tmp_path / "p2").rglob("manifest.json")
    assert list(json.loads(manifest.read_text())["shards"]) == ["0", "1", "2"]


def test_merge_orders_records_by_index_and_drops_rank_shards_and_temp_files(tmp_path):
    for index in (0, 1, 2, 3):
        (tmp_path / f"{index:05d}.png").write_bytes(b"png")
    (tmp_path / "samples.rank-00000.jsonl").write_text(
        '{"file": "00002.png", "index": 2}\n{"file": "00000.png", "index": 0}\n'
    )
    # Rank 1 was killed while writing its second line; the record of index 3 is torn, so it is not done.
    (tmp_path / "samples.rank-00001.jsonl").write_text('{"file": "00001.png", "index": 1}\n{"file": "000')
    (tmp_path / ".00003.png.abc.tmp").write_bytes(b"half")
    merge_records(tmp_path, started=time.time() + 1)
    assert (tmp_path / "samples.jsonl").read_text().splitlines() == [
        json.dumps({"file": f"{i:05d}.png", "index": i}, sort_keys=True) for i in (0, 1, 2)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
        "00003.png",
        "samples.jsonl",
    ]
