"""Tables, paired differences and plots of a bench, from the files in OUT alone (rerunnable).

A cell's status: "ok" (done and measured), "diverged" (its run or its renders diverged), "failed"
(``cells.jsonl`` recorded an error after every retry) or "missing" (not run yet, interrupted, or made
with another config). Everything but "ok" counts as diverged: in the divergence rate, and out of the
means and the paired differences (a pair needs both cells "ok").

Two protocols (docs/evaluation.md). ``ours`` (the default): the cells' ``bench_metrics.json``, each
preset's means over its own "ok" cells; files in OUT. ``reference``, the MV-SDI reference's: the
cells' ``metrics_reference.json`` (written by ``mvsdi eval --protocol reference``), means only over
the (prompt, seed) pairs that are "ok" for every preset compared (with two presets: valid for both,
as the reference's scripts/evaluate.py); files in OUT/reference, no gallery (ours shows the same videos).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from mvsdi.atomic_files import atomic_write_bytes
from mvsdi.bench.cells import CELL_METRICS, flatten_clip_metrics
from mvsdi.bench.gallery import write_gallery
from mvsdi.bench.matrix import BenchSpec, Cell, cells, redo_reason
from mvsdi.bench.plots import metric_range, plot_bars, plot_scatter
from mvsdi.bench.text import format_value, short_reason
from mvsdi.config import is_ideal
from mvsdi.rundir import SUMMARY, read_json
from mvsdi.statistics import mean_interval

CELLS_LOG = "cells.jsonl"
COSTS = ("guidance_evaluations", "unet_calls", "train_seconds")
LOWER_IS_BETTER = ("janus",)  # both the testbed's and CLIP's Janus score: a front seen from behind
PROTOCOLS = ("ours", "reference")
REFERENCE_METRICS = "metrics_reference.json"  # mvsdi.evaluate.protocol.REFERENCE.metrics_file
REFERENCE_DIR = "reference"  # OUT/reference: the reference protocol's tables and plots


def latest_records(out: Path) -> dict[str, dict[str, Any]]:
    """The last record of each cell in ``cells.jsonl`` (a torn last line from a killed driver is skipped)."""
    records: dict[str, dict[str, Any]] = {}
    try:
        lines = (Path(out) / CELLS_LOG).read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record["cell"]] = record
    return records


def peak_memory_gib(summary: dict[str, Any]) -> float | None:
    """GPU peak on CUDA runs, the process's peak resident memory on CPU runs."""
    return summary.get("peak_gpu_memory_gib", summary.get("peak_process_memory_gib"))


def reference_measurement(run: Path) -> dict[str, Any] | None:
    """A cell measured under the reference protocol, shaped like ``bench_metrics.json`` (None: not yet).
    A run whose training diverged counts as diverged, as ``cells.measure`` counts it."""
    data = read_json(run / REFERENCE_METRICS)
    if not isinstance(data, dict) or "divergence" not in data:
        return None
    divergence = data["divergence"]
    diverged, reason = bool(divergence.get("diverged")), divergence.get("reason") or ""
    if (read_json(run / SUMMARY) or {}).get("status") == "diverged":
        diverged, reason = True, reason or "training diverged"
    return {"metrics": flatten_clip_metrics(data.get("metrics", {})), "diverged": diverged, "diverged_reason": reason}


def _measured(cell: Cell, protocol: str) -> dict[str, Any] | None:
    if protocol == "reference":
        return reference_measurement(cell.path)
    return read_json(cell.path / CELL_METRICS)


def cell_row(cell: Cell, record: dict[str, Any] | None, protocol: str = "ours") -> dict[str, Any]:
    row: dict[str, Any] = {"preset": cell.preset, "prompt": cell.prompt, "seed": cell.seed, "status": "missing",
                           "reason": "", "metrics": {}, "path": cell.key}
    redo = redo_reason(cell)
    measured = _measured(cell, protocol) if redo is None else None
    if measured is not None:
        summary = read_json(cell.path / SUMMARY) or {}
        row.update({k: summary.get(k) for k in COSTS}, peak_memory_gib=peak_memory_gib(summary),
                   metrics=measured["metrics"], status="diverged" if measured["diverged"] else "ok",
                   reason=measured.get("diverged_reason", ""))
    elif record is not None and record.get("status") == "failed":
        row.update(status="failed", reason=record.get("error", ""))
    elif redo is None and protocol == "reference":
        row["reason"] = f"not evaluated under the reference protocol: run `mvsdi eval --protocol reference {cell.path}`"
    else:
        row["reason"] = redo or "not measured"
    return row


def collect(spec: BenchSpec, out: Path, protocol: str = "ours") -> list[dict[str, Any]]:
    records = latest_records(out)
    return [cell_row(cell, records.get(cell.key), protocol) for cell in cells(spec, Path(out))]


def valid_for_all(rows: Sequence[dict[str, Any]], presets: Sequence[str]) -> set[tuple[str, int]]:
    """The (prompt, seed) pairs whose cells are "ok" for every preset: the reference's "valid for both"."""
    ok = {name: {(r["prompt"], r["seed"]) for r in rows if r["preset"] == name and r["status"] == "ok"}
          for name in presets}
    return set.intersection(*ok.values()) if ok else set()


def metric_names(rows: Sequence[dict[str, Any]], order: Sequence[str] = ()) -> list[str]:
    """The metrics measured, in the order asked for (``clip_iqa`` stands for its parts ``clip_iqa_*``)."""
    names = sorted({name for row in rows for name in row["metrics"]})
    rank = {name: next((i for i, m in enumerate(order) if name == m or name.startswith(m + "_")), len(order))
            for name in names}
    return sorted(names, key=lambda name: rank[name])


def _finite(value: Any) -> float:
    """A metric as a float; nan when it is absent (e.g. a Janus score without a back view)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def summarise(rows: Sequence[dict[str, Any]], presets: Sequence[str], metrics: Sequence[str],
              scored: set[tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    """Per preset: counts by status, divergence rate, mean ± 95% interval of each metric over "ok" cells
    (only those whose (prompt, seed) is in ``scored`` when given), mean costs and the largest peak memory."""
    table = []
    for name in presets:
        mine = [r for r in rows if r["preset"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        counts = {s: sum(r["status"] == s for r in mine) for s in ("ok", "diverged", "failed", "missing")}
        entry: dict[str, Any] = {"preset": name, "cells": len(mine), **counts}
        entry["divergence_rate"] = (len(mine) - len(ok)) / len(mine) if mine else math.nan  # over every cell
        averaged = ok if scored is None else [r for r in ok if (r["prompt"], r["seed"]) in scored]
        for metric in metrics:
            entry[metric] = mean_interval([_finite(r["metrics"].get(metric)) for r in averaged])
        ran = [r for r in mine if r.get("guidance_evaluations") is not None]
        for cost in COSTS:
            entry[cost] = sum(r[cost] for r in ran) / len(ran) if ran else math.nan
        memory = [r["peak_memory_gib"] for r in ran if r.get("peak_memory_gib") is not None]
        entry["peak_memory_gib"] = max(memory) if memory else math.nan
        table.append(entry)
    return table


def paired_differences(rows: Sequence[dict[str, Any]], baseline: str, presets: Sequence[str],
                       metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Preset − baseline on the same prompt and seed, over pairs where neither diverged (mean ± 95%)."""
    base = {(r["prompt"], r["seed"]): r for r in rows if r["preset"] == baseline and r["status"] == "ok"}
    table = []
    for name in presets:
        if name == baseline:
            continue
        pairs = [(r, base[(r["prompt"], r["seed"])]) for r in rows
                 if r["preset"] == name and r["status"] == "ok" and (r["prompt"], r["seed"]) in base]
        for metric in metrics:
            values = [(_finite(r["metrics"].get(metric)), _finite(b["metrics"].get(metric))) for r, b in pairs]
            values = [(v, w) for v, w in values if math.isfinite(v - w)]
            mean, half = mean_interval([v - w for v, w in values])
            table.append({"preset": name, "baseline": baseline, "metric": metric, "pairs": len(values),
                          "mean_difference": mean, "ci95": half,
                          # the reference's two means: each method over the pairs valid for both
                          "preset_mean": _mean([v for v, _ in values]), "baseline_mean": _mean([w for _, w in values])})
    return table


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# writing


def _pm(pair: tuple[float, float]) -> str:
    mean, half = pair
    if math.isnan(mean):
        return "-"
    return f"{mean:.4g} ± {half:.2g}" if math.isfinite(half) else f"{mean:.4g} (n=1)"


def _markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows) + "\n"


def _csv(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    return buffer.getvalue()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path


def summary_tables(summary: Sequence[dict[str, Any]], metrics: Sequence[str]) -> tuple[str, str]:
    """(markdown, csv) with one row per preset."""
    counts = ["cells", "ok", "diverged", "failed", "missing", "divergence_rate"]
    costs = [*COSTS, "peak_memory_gib"]
    md = _markdown(["preset", *counts, *metrics, *costs],
                   [[e["preset"], *(format_value(e[c]) for c in counts), *(_pm(e[m]) for m in metrics),
                     *(format_value(e[c]) for c in costs)] for e in summary])
    header = ["preset", *counts, *(f"{m}_{part}" for m in metrics for part in ("mean", "ci95")), *costs]
    csv_text = _csv(header, [[e["preset"], *(e[c] for c in counts), *(v for m in metrics for v in e[m]),
                              *(e[c] for c in costs)] for e in summary])
    return md, csv_text


def cell_tables(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> tuple[str, str]:
    """(markdown, csv) with one row per cell of one preset."""
    fields = ["prompt", "seed", "status"]
    costs = [*COSTS, "peak_memory_gib"]
    md = _markdown([*fields, *metrics, *costs, "reason", "run"],
                   [[r["prompt"], r["seed"], r["status"], *(format_value(r["metrics"].get(m)) for m in metrics),
                     *(format_value(r.get(c)) for c in costs), short_reason(r), r["path"]]
                    for r in rows])
    csv_text = _csv([*fields, *metrics, *costs, "reason", "run"],
                    [[r["prompt"], r["seed"], r["status"], *(r["metrics"].get(m) for m in metrics),
                      *(r.get(c) for c in costs), r["reason"], r["path"]] for r in rows])
    return md, csv_text


def paired_tables(paired: Sequence[dict[str, Any]], with_means: bool = False) -> tuple[str, str]:
    """(markdown, csv); ``with_means`` adds each side's mean over the pairs (the reference's table)."""
    means = ["baseline_mean", "preset_mean"] if with_means else []
    header = ["preset", "baseline", "metric", "pairs", *means, "mean_difference", "ci95"]
    md = _markdown(["preset", "metric", "pairs", *means,
                    "difference vs " + (paired[0]["baseline"] if paired else "baseline")],
                   [[p["preset"], p["metric"], p["pairs"], *(format_value(p[m]) for m in means),
                     _pm((p["mean_difference"], p["ci95"]))] for p in paired])
    return md, _csv(header, [[p[h] for h in header] for p in paired])


def _summary_line(entry: dict[str, Any], metrics: Sequence[str]) -> str:
    parts = [f"{m} {_pm(entry[m])}" for m in metrics]
    return (f"{entry['ok']}/{entry['cells']} cells ok, divergence rate {format_value(entry['divergence_rate'])}"
            + (": " + "; ".join(parts) if parts else "") + ".\n")


def write_tables(out: Path, rows, summary, paired, metrics: Sequence[str], with_means: bool = False) -> dict[str, Path]:
    """summary.csv, paired.csv and tables/<preset>.md/.csv; returns them by name."""
    written = {"summary.csv": _write(out / "summary.csv", summary_tables(summary, metrics)[1]),
               "paired.csv": _write(out / "paired.csv", paired_tables(paired, with_means)[1])}
    for entry in summary:
        name = entry["preset"]
        md, csv_text = cell_tables([r for r in rows if r["preset"] == name], metrics)
        written[f"tables/{name}.md"] = _write(out / "tables" / f"{name}.md",
                                              f"# {name}\n\n{_summary_line(entry, metrics)}\n{md}")
        written[f"tables/{name}.csv"] = _write(out / "tables" / f"{name}.csv", csv_text)
    return written


def _statistics_text(scored: set[tuple[str, int]] | None) -> str:
    if scored is None:
        return "Means ± 95% interval (Student t) over the cells that did not diverge"
    return ("Reference protocol (MV-SDI's scripts/evaluate.py: 50 of 120 turntable views, metrics_reference.json). "
            f"Means ± 95% interval (Student t; the reference gives none) over the {len(scored)} (prompt, seed) "
            "pairs that diverged for no preset; the divergence rate is over every cell")


def report_markdown(spec: BenchSpec, out: Path, rows, summary, paired, metrics: Sequence[str],
                    figures: Sequence[Path], scored: set[tuple[str, int]] | None = None) -> str:
    """summary.md: the table, the paired differences, links to the figures and gallery, the failed cells."""
    links = "".join(f"- [{p.relative_to(out)}]({p.relative_to(out)})\n" for p in figures)
    failed = "".join(f"- `{r['path']}`: {short_reason(r)}\n" for r in rows if r["status"] == "failed")
    return (f"# Benchmark: {len(spec.presets)} presets × {len(spec.prompts)} prompts × {len(spec.seeds)} seeds\n\n"
            f"{_statistics_text(scored)}; failed and missing cells count "
            f"as diverged. Lower is better for: {', '.join(LOWER_IS_BETTER)}.\n\n"
            + summary_tables(summary, metrics)[0]
            + f"\n## Paired differences against {spec.baseline} (same prompt and seed, neither diverged)\n\n"
            + paired_tables(paired, with_means=scored is not None)[0] + "\n## Plots and gallery\n\n"
            + "The bar plot cuts each 95% interval at the metric's range (e.g. IoU at [0, 1]); the tables give it "
              "whole.\n\n" + links
            + (f"\n## Failed cells\n\n{failed}" if failed else ""))


def check_protocol(spec: BenchSpec, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if protocol == "reference" and is_ideal(spec.model):
        raise ValueError("the reference protocol scores Stable Diffusion runs with CLIP; the testbed prior "
                         f"({spec.model}) is measured against its true scenes: aggregate it with the protocol 'ours'")


def aggregate(spec: BenchSpec, out: Path, protocol: str = "ours") -> dict[str, Any]:
    """Write the tables, plots, gallery and summary.md of the bench at ``out`` from its files; under the
    reference protocol into ``out/reference`` (no gallery), means over pairs valid for every preset."""
    check_protocol(spec, protocol)
    out = Path(out)
    reference = protocol == "reference"
    report = out / REFERENCE_DIR if reference else out  # the two protocols never overwrite each other
    rows = collect(spec, out, protocol)
    metrics = metric_names(rows, spec.metrics)
    scored = valid_for_all(rows, spec.presets) if reference else None
    summary = summarise(rows, spec.presets, metrics, scored)
    paired = paired_differences(rows, spec.baseline, spec.presets, metrics)
    written = write_tables(report, rows, summary, paired, metrics, with_means=reference)
    ranges = {m: metric_range(m, is_ideal(spec.model)) for m in metrics}
    plots = report / "plots"
    figures = [p for p in (plot_bars(summary, metrics, plots / "metrics.png", ranges),
                           plot_scatter(rows, spec.baseline, spec.presets, metrics, plots / "per_prompt.png"))
               if p is not None]
    if not reference:  # the gallery's videos are the same under both protocols; its links are relative to OUT
        figures.append(write_gallery(rows, spec.presets, spec.prompts, out, metrics))
    written["summary.md"] = _write(report / "summary.md",
                                   report_markdown(spec, report, rows, summary, paired, metrics, figures, scored))
    return {"rows": rows, "summary": summary, "paired": paired, "files": written, "protocol": protocol}
