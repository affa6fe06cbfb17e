"""``gallery.html``: each prompt's turntables side by side, one column per preset, paths relative to OUT.

Each video has a poster (its first frame, OUT/posters/<cell>.png), so the page shows every cell
before, or without, playback; under it, the cell's metrics.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import imageio.v3 as iio

from mvsdi.atomic_files import atomic_write_bytes
from mvsdi.bench.text import format_value, short_reason
from mvsdi.rundir import TURNTABLE

GALLERY = "gallery.html"
POSTERS = "posters"
_STYLE = ("body{font-family:sans-serif;margin:1em} table{border-collapse:collapse} "
          "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:center} "
          "video{width:256px;display:block} .bad{color:#a00;font-size:small} .metrics{font-size:small}")


def poster(video: Path, path: Path) -> Path | None:
    """The first frame of ``video`` as the PNG ``path``, made again only when the video is newer;
    None when the video cannot be read (the page then shows it without a poster)."""
    if path.is_file() and path.stat().st_mtime_ns >= video.stat().st_mtime_ns:
        return path
    try:
        frame = iio.imread(video, index=0)
    except Exception:  # noqa: BLE001 - a poster is a convenience; any unreadable video just goes without
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, iio.imwrite("<bytes>", frame, extension=".png"))
    return path


def _metrics_html(row: dict[str, Any], metrics: Sequence[str]) -> str:
    shown = [f"{html.escape(m)} {format_value(row['metrics'][m], 3)}" for m in metrics if m in row["metrics"]]
    return f"<div class=metrics>{' · '.join(shown)}</div>" if shown else ""


def _cell_html(row: dict[str, Any], out: Path, metrics: Sequence[str]) -> str:
    video = out / row["path"] / TURNTABLE
    label = f"s{row['seed']}"
    if row["status"] in ("ok", "diverged") and video.is_file():
        note = "" if row["status"] == "ok" else f"<div class=bad>diverged: {html.escape(short_reason(row))}</div>"
        source = html.escape(video.relative_to(out).as_posix(), quote=True)
        image = poster(video, out / POSTERS / f"{row['path']}.png")
        cover = "" if image is None else f' poster="{html.escape(image.relative_to(out).as_posix(), quote=True)}"'
        return (f'<video src="{source}"{cover} autoplay loop muted playsinline title="{label}"></video>'
                f"{_metrics_html(row, metrics)}{note}")
    return f"<div class=bad>{label}: {html.escape(row['status'])} {html.escape(short_reason(row))}</div>"


def write_gallery(rows: Sequence[dict[str, Any]], presets: Sequence[str], prompts: Sequence[str], out: Path,
                  metrics: Sequence[str] = ()) -> Path:
    """One table row per prompt, one column per preset; all seeds of a cell stacked in it, each with
    its poster and its ``metrics``."""
    out = Path(out)
    by_key = {}
    for row in rows:
        by_key.setdefault((row["prompt"], row["preset"]), []).append(row)
    head = "".join(f"<th>{html.escape(p)}</th>" for p in presets)
    body = []
    for prompt in prompts:
        cells = "".join("<td>" + "".join(_cell_html(r, out, metrics) for r in by_key.get((prompt, p), [])) + "</td>"
                        for p in presets)
        body.append(f"<tr><th>{html.escape(prompt)}</th>{cells}</tr>")
    page = (f"<!doctype html>\n<html><head><meta charset=utf-8><title>mvsdi bench</title><style>{_STYLE}</style>"
            f"</head><body>\n<h1>mvsdi bench: turntables</h1>\n<table><tr><th>prompt</th>{head}</tr>\n"
            + "\n".join(body) + "\n</table></body></html>\n")
    path = out / GALLERY
    atomic_write_bytes(path, page.encode())
    return path
