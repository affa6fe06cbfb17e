"""Figures written to files, one way to make and save them.

Figures are ``matplotlib.figure.Figure`` objects, not pyplot's: they draw with Agg when saved (no
display on servers and CI) without switching the backend of a program that imports mvsdi, and
nothing keeps them alive once saved. The PNGs are byte-identical to pyplot's under Agg (checked
with matplotlib 3.11).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def subplots(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure and its ``rows`` × ``cols`` array of axes (2D even for one row or column)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Lay out and write ``path`` (creating its folder)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
