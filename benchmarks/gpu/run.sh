#!/usr/bin/env bash
# The prepared GPU run of issue 16 (see benchmarks/gpu/run.py for what it does).
#   on the GPU machine:  bash benchmarks/gpu/run.sh --out "$OUT" --data-dir gpu_data
#   here, on a CPU:      bash benchmarks/gpu/run.sh --dry-run --out /tmp/gpu
# Wheels in .whl/ (benchmarks/gpu/fetch_wheels.sh) are installed first: the GPU image has a
# CUDA torch but not bigbatch's pure-Python dependencies, and it cannot download.
set -uo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/bigbatch-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/bigbatch-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" benchmarks/gpu/run.py "$@"
