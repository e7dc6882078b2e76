"""`lbridge collect`: final-block trajectories as safetensors shards plus a manifest."""

import json
import os
import subprocess
import sys

import pytest

from lbridge.calibration.trajectories import load_shard, read_manifest
from lbridge.errors import LbridgeError


def test_collect_stores_final_block_input_and_output_per_step(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lbridge.cli", "collect", "num_prompts=2"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (root,) = (tmp_path / "outputs" / "trajectories" / "tiny").iterdir()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["steps"] == 20 and sorted(manifest["shards"]) == ["0", "1"]
    tensors = load_shard(root, manifest["shards"]["0"]["file"])
    for branch in ("cond", "uncond"):
        for step in (0, 19):
            prefix = f"{branch}/{step:03d}/"
            assert tensors[prefix + "input.hidden"].shape == (1, 64, 64)  # 64 image tokens, width 64
            assert tensors[prefix + "output.encoder"].shape == (1, 8, 64)  # 8 text tokens
    with pytest.raises(LbridgeError, match="collected with model='tiny', not 'flux'"):
        read_manifest(root, {"model": "flux"})
