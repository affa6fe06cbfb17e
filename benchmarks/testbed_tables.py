"""Rewrite a testbed study's tables and plots from its results, without rerunning it.

    python benchmarks/testbed_tables.py runs/testbed

Reads RUN/results.jsonl, RUN/variance.json and RUN/study.json (the settings) and writes table.md,
table.csv and the plots again with the current summary code (e.g. after a change to the tables);
the cells' numbers are not recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mvsdi.field import FieldConfig
from mvsdi.testbed.settings import StudySettings
from mvsdi.testbed.study import write_summaries


def settings_of(meta: dict) -> StudySettings:
    fields = {f.name for f in dataclasses.fields(StudySettings)}
    raw = {k: v for k, v in meta["settings"].items() if k in fields}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k != "field"}
    return StudySettings(**values, field=FieldConfig(**raw["field"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a folder written by `mvsdi testbed`")
    args = parser.parse_args()
    results = [json.loads(line) for line in (args.study / "results.jsonl").read_text().splitlines()]
    variance = json.loads((args.study / "variance.json").read_text())
    meta = json.loads((args.study / "study.json").read_text())
    coverage = meta.get("blocks", {}).get("coverage")  # a study cut by its time limit says so again
    write_summaries(results, variance, settings_of(meta), args.study, coverage)
    print((args.study / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
