"""How `lbridge sample` stores a sample: an image as a PNG; a video as its frames tiled into one PNG.

The tiled PNG is the record's `file`, so everything that reads samples as images (PSNR/SSIM against
the reference, which then compare every frame at once) works unchanged for video. A playable copy is
written beside it: MP4 when imageio-ffmpeg is installed (diffusers' `export_to_video`), else an
animated GIF with Pillow (palette-quantised: for viewing only, never for metrics).
"""

from __future__ import annotations

import importlib.util
import io
import math
import tempfile
from pathlib import Path

from PIL import Image

from lbridge.io import atomic_write_bytes
from lbridge.models.base import Sample


def tile_frames(frames: list[Image.Image]) -> Image.Image:
    """Frames in reading order on a near-square grid (row-major); unused cells stay black."""
    columns = math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / columns)
    width, height = frames[0].size
    grid = Image.new(frames[0].mode, (columns * width, rows * height))
    for i, frame in enumerate(frames):
        grid.paste(frame, ((i % columns) * width, (i // columns) * height))
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def video_bytes(frames: list[Image.Image], fps: int) -> tuple[str, bytes]:
    """(suffix, bytes) of a playable video: MP4 if imageio-ffmpeg is installed, else an animated GIF."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        from diffusers.utils import export_to_video

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "video.mp4"
            export_to_video(frames, str(path), fps=fps)
            return ".mp4", path.read_bytes()
    buffer = io.BytesIO()
    frames[0].save(
        buffer, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0
    )
    return ".gif", buffer.getvalue()


def write_sample(run: Path, index: int, sample: Sample, fps: int = 16) -> dict:
    """Write one sample atomically; returns its record fields: `file` (+ `video`, `frames` for a video)."""
    stem = f"{index:05d}"
    if isinstance(sample, Image.Image):
        atomic_write_bytes(run / f"{stem}.png", png_bytes(sample))
        return {"file": f"{stem}.png"}
    suffix, data = video_bytes(sample, fps)
    atomic_write_bytes(run / f"{stem}{suffix}", data)
    # The PNG last: a sample counts as written once its `file` exists (see `finished`).
    atomic_write_bytes(run / f"{stem}.png", png_bytes(tile_frames(sample)))
    return {"file": f"{stem}.png", "video": f"{stem}{suffix}", "frames": len(sample)}
