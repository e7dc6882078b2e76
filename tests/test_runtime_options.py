"""`runtime.*`: how `lbridge sample` runs the transformer, not what the method computes.

`runtime.compile=true` compiles the regions the method runs (whole blocks, or ToCa's sites) under
its hooks; `runtime.modulation=batched` computes every AdaLN modulation once per sample. Either
rounds differently, so its runs (the method's and its reference) are run directories of their own;
a calibration is shared by every runtime; the defaults leave the keys of earlier runs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import launch
from hydra import compose, initialize_config_dir
from PIL import Image

from lbridge.config import CONF_DIR
from lbridge.runs import calibration_key, sample_key

TOCA = ["sample", "model=tiny", "method=toca", "ratio=3", "num_prompts=2"]


def runs(root: Path) -> dict[str, Path]:
    """Run directories by the runtime their manifest records ('' for the defaults) and method."""
    found = {}
    for run in (root / "outputs" / "sample" / "tiny").iterdir():
        key = json.loads((run / "run.json").read_text())["key"]
        found[(json.dumps(key.get("runtime", {}), sort_keys=True), key["method"]["name"])] = run
    return found


def pixels(run: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(run.glob("*.png"))]


# The eager backend: dynamo's tracing and graphs without inductor's kernels (fast, same operations).
COMPILED = ["runtime.compile=true", "runtime.compile_backend=eager"]


@pytest.fixture(scope="module")
def eager_and_compiled(tmp_path_factory) -> tuple[Path, str]:
    """ToCa and its reference sampled eager, then compiled; the compiled command's output."""
    root = tmp_path_factory.mktemp("runtime")
    launch(TOCA, root, 1)
    return root, launch([*TOCA, *COMPILED], root, 1).stdout


def test_compiled_sampling_builds_its_graphs_at_warm_up_and_none_while_timed(eager_and_compiled):
    tmp_path, stdout = eager_and_compiled
    reports = [line for line in stdout.splitlines() if line.startswith("torch.compile:")]
    assert [r.endswith(f"({name})") for r, name in zip(reports, ["none", "toca"], strict=True)] == [True] * 2
    regions = [int(r.split()[1]) for r in reports]
    blocks = 6  # the tiny model: 2 double + 4 single blocks
    assert regions[0] == blocks and regions[1] > blocks  # ToCa compiles its sites, not the blocks
    assert all(int(r.split()[3]) > 0 for r in reports)  # new graphs: the sites are other code
    assert all("0 built during the timed generations, 0 graph breaks" in r for r in reports)
    found = runs(tmp_path)
    compiled = json.dumps({"compile": True, "compile_backend": "eager"}, sort_keys=True)
    assert set(found) == {("{}", "none"), ("{}", "toca"), (compiled, "none"), (compiled, "toca")}
    for method in ("none", "toca"):  # the same operations, replayed from graphs: the same images
        assert [p.tobytes() for p in pixels(found[("{}", method)])] == [
            p.tobytes() for p in pixels(found[(compiled, method)])
        ]


def test_the_report_tells_compiled_runs_from_eager_ones(eager_and_compiled):
    root, _ = eager_and_compiled
    for runtime in ([], COMPILED):
        launch(["eval", "model=tiny", "method=none", "num_prompts=2", *runtime], root, 1)
        launch(["eval", *TOCA[1:], *runtime], root, 1)
    launch(["report", "model=tiny", "out=table"], root, 1)
    table = pd.read_csv(root / "table" / "table.csv", comment="#", keep_default_na=False)
    assert list(table.columns[:2]) == ["method", "runtime"]
    runtimes = sorted(zip(table["method"], table["runtime"], strict=True))
    compiled = "compile=True compile_backend=eager"
    assert runtimes == [("none", ""), ("none", compiled), ("toca", ""), ("toca", compiled)]
    grids = sorted((root / "table" / "table_grid").glob("*.png"))
    assert grids  # one line per method and runtime (labels: 'toca r3', 'toca [compile=True ...] r3')


def test_batched_modulation_is_a_run_of_its_own_with_the_same_images_up_to_rounding(tmp_path):
    """Compiled too: its hooks, traced into the blocks, read no step (no graph built while timed)."""
    launch(TOCA, tmp_path, 1)
    launch([*TOCA, "runtime.modulation=batched"], tmp_path, 1)
    stdout = launch([*TOCA, "runtime.modulation=batched", *COMPILED], tmp_path, 1).stdout
    found = runs(tmp_path)
    batched = json.dumps({"modulation": "batched"}, sort_keys=True)
    compiled = {"modulation": "batched", "compile": True, "compile_backend": "eager"}
    compiled = json.dumps(compiled, sort_keys=True)
    assert set(found) == {(runtime, m) for runtime in ("{}", batched, compiled) for m in ("none", "toca")}
    for method in ("none", "toca"):
        pairs = zip(pixels(found[("{}", method)]), pixels(found[(batched, method)]), strict=True)
        for per_step, once in pairs:
            assert np.abs(per_step - once).max() <= 1  # a many-row matmul's rounding, at most one level
        assert [p.tobytes() for p in pixels(found[(batched, method)])] == [
            p.tobytes() for p in pixels(found[(compiled, method)])
        ]
    reports = [line for line in stdout.splitlines() if line.startswith("torch.compile:")]
    assert len(reports) == 2
    assert all("0 built during the timed generations, 0 graph breaks" in r for r in reports)


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("sample", ["model=tiny", "method=learnibridge", "ratio=3", *overrides])


def test_default_runtime_keeps_earlier_run_keys_and_a_calibration_serves_every_runtime():
    default = config()
    assert "runtime" not in sample_key(default)  # run directories made before runtime.* still resume
    assert sample_key(config("runtime.compile_backend=eager")) == sample_key(default)  # nothing compiled
    compiled = config("runtime.compile=true")
    assert sample_key(compiled)["runtime"] == {"compile": True}
    batched = config("runtime.modulation=batched")
    assert sample_key(batched)["runtime"] == {"modulation": "batched"}
    assert calibration_key(compiled) == calibration_key(batched) == calibration_key(default)
