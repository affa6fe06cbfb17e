# The two commands of the README contract, both idempotent and both doing their own set-up.
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# Main job on the embedded default: no download, a few seconds on 2 CPU cores.
demo: setup
	.venv/bin/mvsdi generate "a ripe strawberry" --model tiny --preset mvsdi-k2 --budget 32 \
		--resolution 32 --samples-per-ray 32 --eval-resolution 32 --device cpu --out runs/demo --overwrite

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q
