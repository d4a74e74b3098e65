# The two commands of the README. Each sets the machine up first (scripts/setup.sh).
.PHONY: setup test quickstart

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q tests

quickstart: setup
	.venv/bin/orchestrator run specs/quickstart.yaml
