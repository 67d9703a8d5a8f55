"""Readable sample grids: per method one PNG with a row per eval prompt and a column per eval point (iteration
and compute in the header), cut from the eval sample sheets the world writes (samples/eval_<it>.png, one row per
prompt) and enlarged, so collapse to one glyph per prompt or a drift off the data is visible at a glance."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from bench.runner import store

LABEL_W, HEADER_H, PAD = 230, 54, 6


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def cut_rows(sheet: Image.Image, rows: int, cols: int, keep: int) -> list[Image.Image]:
    """The first `keep` samples of each of the sheet's `rows` prompt rows (a sheet of rows x cols tiles whose
    trailing gutter is what is left over after the even pitch)."""
    w, h = sheet.size
    py, px = h // rows, w // cols
    gy, gx = h - rows * py, w - cols * px
    return [sheet.crop((0, r * py, min(w, keep * px + gx), r * py + py + gy)) for r in range(rows)]


def sample_grid(sheets: list[tuple[Path, str]], row_labels: list[str], cols: int, path: Path, keep: int = 3,
                zoom: int = 2) -> Path | None:
    """Compose [(sheet png, column header)] into one PNG: a row per prompt (labelled), a column per sheet.
    None when no sheet exists."""
    found = [(Path(p), head) for p, head in sheets if Path(p).exists()]
    if not found:
        return None
    cut = [[t.resize((t.width * zoom, t.height * zoom), Image.NEAREST)
            for t in cut_rows(Image.open(p).convert("RGB"), len(row_labels), cols, keep)] for p, _ in found]
    tw, th = cut[0][0].size
    width = LABEL_W + len(found) * (tw + PAD) + PAD
    height = HEADER_H + len(row_labels) * (th + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(13)
    for j, (_, head) in enumerate(found):
        x = LABEL_W + j * (tw + PAD) + PAD
        draw.multiline_text((x, 4), head, fill="black", font=small, spacing=2)
        for i, tile in enumerate(cut[j]):
            canvas.paste(tile, (x, HEADER_H + i * (th + PAD) + PAD))
    for i, label in enumerate(row_labels):
        draw.text((6, HEADER_H + i * (th + PAD) + PAD + th // 2 - 8), label, fill="black", font=font)
    with store.atomic_path(Path(path)) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
