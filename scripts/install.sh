#!/usr/bin/env bash
# Sets up visdistill in ./.venv: Debian's Fashion-MNIST (the embedded default data set),
# torch, and the package with its dev extra. Safe to re-run; each step is skipped when done.
#   TORCH_SPEC  torch packages to install (default: the versions this project is tested with)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[install] Debian dataset-fashion-mnist"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "[install] no apt-get: Fashion-MNIST will need data.init_args.download=true" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
if ! $PY -c "import torch, torchvision" 2>/dev/null; then
  echo "[install] $TORCH_SPEC"
  # shellcheck disable=SC2086
  $PY -m pip install -q $TORCH_SPEC
fi
echo "[install] visdistill[dev]"
$PY -m pip install -q -e ".[dev]"
