#!/usr/bin/env bash
# Installs the optional mmdet stack (mmengine 0.10.7, mmcv 2.1.0 with its compiled ops, mmdet 3.3.0)
# into ./.venv, after scripts/install.sh. PyPI has only mmcv's source tarball and it does not build
# against torch >= 2.10 as shipped (setup.py forces -std=c++17, torch's headers need C++20; setup
# imports pkg_resources, gone in setuptools >= 81). This script patches the flag, builds the wheel once
# and caches it keyed by mmcv, torch and Python version (a wheel fits only the exact torch/Python it was
# built against); later runs install the cached wheel in seconds. Safe to re-run.
#   VISDISTILL_WHEEL_CACHE  cache folder (default: ~/.cache/visdistill/wheels)
#   MAX_JOBS                compiler jobs for the mmcv build (default: 2, ~8-10 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
if [ ! -x "$PY" ]; then
  echo "[install-mmdet] no .venv: run 'bash scripts/install.sh' first" >&2
  exit 1
fi

# pkg_resources is needed by mmcv's setup.py and by mmengine at run time.
$PY -m pip install -q "setuptools<81" ninja "mmengine==$MMENGINE_VERSION"

KEY=$($PY -c 'import sys, sysconfig, torch; print(f"torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}")')
CACHE_ROOT=${VISDISTILL_WHEEL_CACHE:-"$HOME/.cache/visdistill/wheels"}
CACHE="$CACHE_ROOT/mmcv-$MMCV_VERSION/$KEY"
mkdir -p "$CACHE"
WHEEL=$(ls "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)

if [ -z "$WHEEL" ]; then
  echo "[install-mmdet] building mmcv $MMCV_VERSION for $KEY (about 8-10 min on 2 cores) -> $CACHE"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$BUILD" "mmcv==$MMCV_VERSION"
  tar xzf "$BUILD/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD"
  sed -i "s/-std=c++17/-std=c++20/g" "$BUILD/mmcv-$MMCV_VERSION/setup.py"
  # Precompile the header that 63 of mmcv's 77 CPU sources include first (it pulls in torch's
  # headers), so gcc parses torch once instead of per file: nms.cpp's front end went from 19 s to
  # 3.4 s of CPU. Same flags as the build's; gcc ignores a PCH whose flags differ, so this can only
  # make the build faster, never change it.
  COMMON="$BUILD/mmcv-$MMCV_VERSION/mmcv/ops/csrc/common"
  INCLUDES=$($PY -c 'import sysconfig; from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))')
  # shellcheck disable=SC2086
  nice -n 5 c++ -g0 -fPIC -I"$COMMON" $INCLUDES -x c++-header "$COMMON/pytorch_cpp_helper.hpp" \
    -o "$COMMON/pytorch_cpp_helper.hpp.gch" -std=c++20 -DTORCH_API_INCLUDE_EXTENSION_H \
    -DTORCH_EXTENSION_NAME=_ext || echo "[install-mmdet] no precompiled header; building without"
  # Build into the temporary folder, then move: an interrupted build never leaves a partial wheel in the cache.
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} CFLAGS="-g0" CXXFLAGS="-g0" \
    nice -n 5 $PY -m pip wheel -q --no-build-isolation --no-deps -w "$BUILD/wheels" "$BUILD/mmcv-$MMCV_VERSION"
  BUILT=$(ls "$BUILD"/wheels/mmcv-"$MMCV_VERSION"-*.whl)
  mv "$BUILT" "$CACHE/$(basename "$BUILT").part"
  mv "$CACHE/$(basename "$BUILT").part" "$CACHE/$(basename "$BUILT")"
  WHEEL="$CACHE/$(basename "$BUILT")"
else
  echo "[install-mmdet] cached mmcv wheel: $WHEEL"
fi

# The extra pins mmengine/mmdet; mmcv comes from the wheel (mmdet's metadata does not require it).
$PY -m pip install -q "$WHEEL" -e ".[dev,mmdet]"
$PY -c "import mmcv.ops, mmdet, mmengine; print('[install-mmdet] mmdet', mmdet.__version__, 'mmcv', mmcv.__version__, 'mmengine', mmengine.__version__)"
