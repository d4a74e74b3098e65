# The two commands of the README. Each sets the machine up first (scripts/setup.sh).
.PHONY: setup test test-fast quickstart

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q tests

# No Ray, no subprocess, no real Inception, no training beyond a few steps (tests/conftest.py): small
# CPU-bound tests, spread over one pytest worker per core (pytest-xdist), each with one torch thread.
test-fast: setup
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n auto -m 'not ray and not slow' tests

quickstart: setup
	.venv/bin/orchestrator run specs/quickstart.yaml
