# The two commands of the README contract, both idempotent and both doing their own set-up.
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# Main job on the embedded default: the weights-free ground-truth study, small setting (no download).
demo: setup
	.venv/bin/mvsdi testbed --out runs/testbed --overwrite

test: setup
	.venv/bin/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q
