"""A static HTML gallery: rows of clips (mp4 with sound), images and sounds, with captions and
score tables, written as ``index.html`` plus a ``media/`` folder that a browser opens directly.

    gallery = Gallery(out_dir, "SoundShapes ground truth")
    gallery.add_section("test split", "clips from the built dataset")
    gallery.add_row("test 0", [Cell("clip", video=v, audio=a, fps=8, sample_rate=16000,
                                    text=caption, scores={"exact_match": 1.0})])
    gallery.add_table("evaluator", {"clips": {...}, "shuffled pairs": {...}})
    gallery.write()   # -> out_dir/index.html

A row holds any number of cells side by side, so inputs, generated samples and references line
up (``Cell("input", ...)``, ``Cell("generated", ...)``). Media are written when the row is added;
``write`` writes the page (atomically) and can be called again as rows are added.
"""
from __future__ import annotations

import dataclasses
import html
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from videolm import media

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ccc; }
.note { color: #555; max-width: 70em; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; margin: 14px 0 22px; }
.row-title { font-weight: 600; margin-top: 18px; }
.cell { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.cell h4 { margin: 0 0 6px; font-size: 0.9em; color: #444; }
.cell video, .cell img { display: block; image-rendering: pixelated; background: #000; }
.caption { font-size: 0.9em; margin: 6px 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
"""


@dataclasses.dataclass
class Cell:
    """One entry of a row: a video (optionally with sound), an image or a sound, and its text."""
    label: str
    video: np.ndarray | None = None        # uint8 [T, H, W, 3]
    audio: np.ndarray | None = None        # float [S] in [-1, 1]
    image: np.ndarray | None = None        # uint8 [H, W, 3]
    fps: float | None = None
    sample_rate: int | None = None
    text: str | None = None                # caption shown under the media
    scores: Mapping[str, Any] | None = None  # (nested) name -> value, shown as a table

    def check(self) -> None:
        if self.video is None and self.image is None and self.audio is None:
            raise ValueError(f"gallery cell {self.label!r}: needs a video, an image or audio")
        if self.video is not None and self.image is not None:
            raise ValueError(f"gallery cell {self.label!r}: give a video or an image, not both")
        if self.video is not None and self.fps is None:
            raise ValueError(f"gallery cell {self.label!r}: a video needs fps")
        if self.audio is not None and self.sample_rate is None:
            raise ValueError(f"gallery cell {self.label!r}: audio needs sample_rate")


def flatten_scores(scores: Mapping[str, Any], prefix: str = "", sep: str = " / ") -> dict[str, Any]:
    """{'caption': {'color': 1.0}} -> {'caption / color': 1.0}."""
    flat = {}
    for key, value in scores.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_scores(value, name, sep))
        else:
            flat[name] = value
    return flat


def format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not np.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "item"


def _upscale(frames: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor so small clips stay crisp after H.264."""
    factor = max(1, min_side // max(1, min(frames.shape[-3], frames.shape[-2])))
    if factor == 1:
        return frames
    return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


class Gallery:
    """Builds ``out_dir/index.html``; media files go to ``out_dir/media``."""

    def __init__(self, out_dir: str | os.PathLike, title: str, description: str = "", *,
                 display_size: int = 192):
        self.out_dir = os.fspath(out_dir)
        self.title, self.description = title, description
        self.display_size = int(display_size)
        self._blocks: list[str] = []
        self._count = 0
        os.makedirs(os.path.join(self.out_dir, "media"), exist_ok=True)

    # -- content -------------------------------------------------------------------------------

    def add_section(self, title: str, text: str = "") -> None:
        self._blocks.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            self._blocks.append(f'<p class="note">{html.escape(text)}</p>')

    def add_text(self, text: str) -> None:
        self._blocks.append(f'<p class="note">{html.escape(text)}</p>')

    def add_row(self, title: str, cells: Sequence[Cell], text: str = "") -> list[str]:
        """Writes the cells' media and adds them side by side; returns the media paths (relative)."""
        if not cells:
            raise ValueError(f"gallery row {title!r}: needs at least one cell")
        for cell in cells:
            cell.check()
        parts, written = [], []
        for cell in cells:
            cell_html, files = self._cell(title, cell)
            parts.append(cell_html)
            written += files
        header = f'<div class="row-title">{html.escape(title)}</div>' if title else ""
        note = f'<p class="note">{html.escape(text)}</p>' if text else ""
        self._blocks.append(f'{header}{note}<div class="row">{"".join(parts)}</div>')
        return written

    def add_table(self, title: str, columns: Mapping[str, Mapping[str, Any]], text: str = "") -> None:
        """A table with one column per entry of ``columns`` ({column: (nested) {row: value}})."""
        flat = {name: flatten_scores(values) for name, values in columns.items()}
        rows = list(dict.fromkeys(key for values in flat.values() for key in values))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in flat)
        body = "".join(
            f"<tr><td>{html.escape(r)}</td>"
            + "".join(f"<td>{html.escape(format_value(flat[c].get(r)))}</td>" for c in flat) + "</tr>"
            for r in rows)
        self._blocks.append(f"<h3>{html.escape(title)}</h3>")
        if text:
            self._blocks.append(f'<p class="note">{html.escape(text)}</p>')
        self._blocks.append(f"<table><tr><th></th>{head}</tr>{body}</table>")

    # -- output --------------------------------------------------------------------------------

    def write(self) -> str:
        """Writes index.html (atomically) and returns its path."""
        page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
                f"</title><style>{_CSS}</style></head><body>\n<h1>{html.escape(self.title)}</h1>\n"
                + (f'<p class="note">{html.escape(self.description)}</p>\n' if self.description else "")
                + "\n".join(self._blocks) + "\n</body></html>\n")
        path = os.path.join(self.out_dir, "index.html")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
        return path

    def _cell(self, row_title: str, cell: Cell) -> tuple[str, list[str]]:
        self._count += 1
        stem = f"media/{self._count:04d}-{_slug(row_title)}-{_slug(cell.label)}"
        size = self.display_size
        files, body = [], ""
        if cell.video is not None:
            rel = stem + ".mp4"
            media.write_mp4(os.path.join(self.out_dir, rel), _upscale(np.asarray(cell.video), size), cell.fps,
                            audio=cell.audio, sample_rate=cell.sample_rate)
            files.append(rel)
            body = (f'<video controls loop preload="metadata" width="{size}" src="{html.escape(rel)}">'
                    f"</video>")
        elif cell.image is not None:
            rel = stem + ".png"
            media.write_png(os.path.join(self.out_dir, rel), _upscale(np.asarray(cell.image), size))
            files.append(rel)
            body = f'<img width="{size}" src="{html.escape(rel)}" alt="{html.escape(cell.label)}">'
        if cell.audio is not None and cell.video is None:
            rel = stem + ".wav"
            media.write_wav(os.path.join(self.out_dir, rel), cell.audio, cell.sample_rate)
            files.append(rel)
            body += f'<audio controls preload="metadata" src="{html.escape(rel)}"></audio>'
        if cell.text:
            body += f'<div class="caption" style="max-width:{size}px">{html.escape(cell.text)}</div>'
        if cell.scores:
            rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(format_value(v))}</td></tr>"
                           for k, v in flatten_scores(cell.scores).items())
            body += f"<table>{rows}</table>"
        return f'<div class="cell"><h4>{html.escape(cell.label)}</h4>{body}</div>', files
