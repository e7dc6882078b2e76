"""VBench quality dimensions of sampled videos: an optional extra (`pip install lbridge[video]`).

Only VBench's prompt-independent quality dimensions are run by default (they need no VBench prompt
file names, so lbridge's own video names work): subject/background consistency, motion smoothness,
dynamic degree, aesthetic and imaging quality, temporal flickering. Each is reported as
`vbench_<dimension>` (VBench's own aggregate over the videos). VBench downloads its own backbones on
first use. Without the `vbench` package the metric stops with one line saying how to install it.
This wrapper is untested here (vbench is not installed in lbridge's environment).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbridge.errors import LbridgeError

QUALITY_DIMENSIONS = (
    "subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "temporal_flickering",
)  # fmt: skip


def require_vbench() -> None:
    if importlib.util.find_spec("vbench") is None:
        raise LbridgeError("metric 'vbench' needs the vbench package: pip install 'lbridge[video]'")


class VBenchScore:
    """`update(video_paths, prompts)` collects videos; `compute()` runs VBench -> {dimension: score}."""

    kind = "video"

    def __init__(self, dimensions: Sequence[str] = QUALITY_DIMENSIONS, device: str = "cuda", **_: Any):
        require_vbench()
        unknown = sorted(set(dimensions) - set(QUALITY_DIMENSIONS))
        if unknown:
            raise LbridgeError(
                f"unknown metrics.vbench.dimensions {unknown} (accepted: {', '.join(QUALITY_DIMENSIONS)})"
            )
        self.dimensions, self.device, self.videos = list(dimensions), device, []

    @property
    def description(self) -> str:
        return f"VBench (custom_input mode) quality dimensions: {', '.join(self.dimensions)}"

    def update(self, videos: Sequence[str | Path], prompts: Sequence[str]) -> None:
        self.videos.extend(Path(v) for v in videos)

    def compute(self) -> dict[str, float]:
        import vbench

        full_info = Path(vbench.__file__).parent / "VBench_full_info.json"
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "videos"
            staged.mkdir()
            for i, video in enumerate(self.videos):  # VBench reads a whole folder: only these videos
                os.symlink(video.resolve(), staged / f"{i:05d}{video.suffix}")
            bench = vbench.VBench(self.device, str(full_info), str(Path(tmp) / "results"))
            bench.evaluate(videos_path=str(staged), name="lbridge", dimension_list=self.dimensions,
                           mode="custom_input")  # fmt: skip
            results = json.loads((Path(tmp) / "results" / "lbridge_eval_results.json").read_text())
        return {f"vbench_{dim}": float(results[dim][0]) for dim in self.dimensions}
