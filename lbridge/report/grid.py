"""Side-by-side image grids, one PNG per prompt: the full-compute reference, then each method's image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from lbridge.commands.sample import finished

CELL = 192  # px: tiny 16 px digits are enlarged (nearest) to be seen; large images are shrunk
LABEL_HEIGHT = 28


def sample_files(run: Path) -> dict[int, Path]:
    """Prompt index -> image file of a sampled run (records whose image exists)."""
    return {index: run / record["file"] for index, record in finished(run).items()}


def _cell(path: Path | None, label: str, side: int) -> Image.Image:
    cell = Image.new("RGB", (side, side + LABEL_HEIGHT), "white")
    if path is not None:
        image = Image.open(path).convert("RGB")
        scale = side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
        cell.paste(image.resize(size, resample), ((side - size[0]) // 2, 0))
    draw = ImageDraw.Draw(cell)
    for line, text in enumerate(_wrap(label if path is not None else f"{label} (missing)", side // 6)):
        draw.text((3, side + 2 + 12 * line), text, fill="black")
    return cell


def _wrap(text: str, width: int) -> list[str]:
    return [text[i : i + width] for i in range(0, len(text), width)][:2]


Layout = list[list[tuple[str, Path]]]  # grid rows of (label, run directory) cells


def chunked(cells: list[tuple[str, Path]], per_row: int = 6) -> Layout:
    return [cells[i : i + per_row] for i in range(0, len(cells), per_row)]


def image_grids(layout: Layout, out: Path, num_prompts: int, cell: int = CELL) -> list[Path]:
    """For each of the first `num_prompts` prompt indices, `out/prompt_<i>.png` laid out as `layout`
    (e.g. one row per method, one column per ratio). Returns the files written."""
    files = [[(label, sample_files(run)) for label, run in row] for row in layout]
    found = [set(f) for row in files for _, f in row]
    indices = sorted(set().union(*found))[:num_prompts]
    out.mkdir(parents=True, exist_ok=True)
    height, width = cell + LABEL_HEIGHT, max(len(row) for row in layout) * cell
    written = []
    for index in indices:
        sheet = Image.new("RGB", (width, len(layout) * height), "white")
        for r, row in enumerate(files):
            for c, (label, f) in enumerate(row):
                sheet.paste(_cell(f.get(index), label, cell), (c * cell, r * height))
        path = out / f"prompt_{index:04d}.png"
        sheet.save(path, optimize=True)
        written.append(path)
    return written
