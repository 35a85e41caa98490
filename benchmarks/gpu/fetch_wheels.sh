#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (for its Python 3.12, x86-64) into .whl/,
# which run.sh installs there; .whl/ is carried to the device, not committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.7.0 typing_inspection==0.4.2 \
  pytorch_optimizer==4.1.0 schedulefree==1.4.1
python3 -m pip download -q --no-deps -d .whl asdfghjkl==0.1a5   # the peer K-FAC (ASDL)
ls -l .whl
