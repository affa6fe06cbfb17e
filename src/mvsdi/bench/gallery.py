"""``gallery.html``: each prompt's turntables side by side, one column per preset, paths relative to OUT."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from mvsdi.bench.aggregate import short_reason
from mvsdi.rundir import TURNTABLE, atomic_write_bytes

GALLERY = "gallery.html"
_STYLE = ("body{font-family:sans-serif;margin:1em} table{border-collapse:collapse} "
          "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:center} "
          "video{width:256px;display:block} .bad{color:#a00;font-size:small}")


def _cell_html(row: dict[str, Any], out: Path) -> str:
    video = out / row["path"] / TURNTABLE
    label = f"s{row['seed']}"
    if row["status"] in ("ok", "diverged") and video.is_file():
        note = "" if row["status"] == "ok" else f"<div class=bad>diverged: {html.escape(short_reason(row))}</div>"
        source = html.escape(video.relative_to(out).as_posix(), quote=True)
        return f'<video src="{source}" autoplay loop muted playsinline title="{label}"></video>{note}'
    return f"<div class=bad>{label}: {html.escape(row['status'])} {html.escape(short_reason(row))}</div>"


def write_gallery(rows: Sequence[dict[str, Any]], presets: Sequence[str], prompts: Sequence[str], out: Path) -> Path:
    """One table row per prompt, one column per preset; all seeds of a cell stacked in it."""
    by_key = {}
    for row in rows:
        by_key.setdefault((row["prompt"], row["preset"]), []).append(row)
    head = "".join(f"<th>{html.escape(p)}</th>" for p in presets)
    body = []
    for prompt in prompts:
        cells = "".join("<td>" + "".join(_cell_html(r, out) for r in by_key.get((prompt, p), [])) + "</td>"
                        for p in presets)
        body.append(f"<tr><th>{html.escape(prompt)}</th>{cells}</tr>")
    page = (f"<!doctype html>\n<html><head><meta charset=utf-8><title>mvsdi bench</title><style>{_STYLE}</style>"
            f"</head><body>\n<h1>mvsdi bench: turntables</h1>\n<table><tr><th>prompt</th>{head}</tr>\n"
            + "\n".join(body) + "\n</table></body></html>\n")
    path = Path(out) / GALLERY
    atomic_write_bytes(path, page.encode())
    return path
