#!/usr/bin/env bash
# Set up a fresh machine for this project: a virtual environment with the pinned packages, and
# Fashion-MNIST from Debian when it is missing and installable. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # constraints.txt holds the exact pins; pyproject.toml the supported ranges. (The grep only
    # drops a warning this workplace's pip configuration prints for every package.)
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[test,diffusers,mlflow]' 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
            || echo "setup: could not install dataset-fashion-mnist; tests that need it will be skipped"
    else
        echo "setup: Fashion-MNIST is not in $FMNIST; run 'sudo apt-get install dataset-fashion-mnist' (tests that need it are skipped)"
    fi
fi
