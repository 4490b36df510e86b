#!/usr/bin/env bash
# Wheels for a GPU machine without a package index: the service's packages that a PyTorch GPU image
# usually lacks, at the versions installed here (those the tests passed with), with what they need,
# built for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored). bench/gpu_bench.sh installs
# them from there into a folder of its own, ahead of the image's packages.
# Usage: bench/wheels.sh [PYTHON_VERSION]   (in the project's virtual environment; needs an index)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
NAMES="fastapi starlette pydantic pydantic-settings sqlalchemy alembic uvicorn httptools
python-multipart itsdangerous"
# shellcheck disable=SC2086
PINS=$(python - $NAMES <<'PY'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
rm -rf .whl
mkdir .whl
PLATFORMS=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
# shellcheck disable=SC2086
python -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp \
    $PLATFORMS -d .whl $PINS
ls .whl
du -sh .whl
