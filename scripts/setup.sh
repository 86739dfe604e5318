#!/usr/bin/env bash
# Set up (or reuse) the project environment in .venv: idempotent, and about a second when nothing
# changed. Needs only python3 (>= 3.10) and network access to PyPI on the first run.
#
# torch and torchvision come from PyPI as a matching pair (timm imports torchvision; a CPU-only
# torch wheel paired with PyPI's torchvision fails to import), pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${AUTOCOMP_VENV:-.venv}"
stamp="$venv/.autocomp-setup"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import autocomp" 2>/dev/null; then
    exit 0
fi

echo "autocomp: setting up $venv (first run downloads PyTorch, a few GB; later runs reuse it)" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install --quiet --constraint constraints.txt --editable ".[dev,ray]"
"$venv/bin/python" -c "import torch, torchvision, timm, onnxruntime, autocomp.cli" \
    || { echo "autocomp: set-up finished but the stack does not import (see above)" >&2; exit 1; }
echo "$want" > "$stamp"
echo "autocomp: environment ready in $venv" >&2
