#!/usr/bin/env bash
# The test command: sets up the runtime (idempotent) and runs the whole suite on it.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k enhance`, or `-m "not browser"`; the
# markers are listed in pytest.ini).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
start=$(date +%s)
bash "$ROOT/scripts/setup_runtime.sh"
source "${FREEVIDEO_RUNTIME:-$ROOT/.runtime}/env.sh"
setup_done=$(date +%s)
cd "$ROOT"
set +e
# Two test processes (pytest-xdist; a file's tests stay together in one), each with one torch
# thread: the two cores of the machine CI runs on. FREEVIDEO_TEST_WORKERS=0 runs in this process.
# The files go out in the order tests/conftest.py gives them (the longest first): xdist's default
# order, most tests first, left the few long files (compile, install) to run alone at the end.
workers=${FREEVIDEO_TEST_WORKERS:-2}
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
"$FREEVIDEO_PYTHON" -m pytest -q "${parallel[@]}" "$@"
rc=$?
set -e
end=$(date +%s)
echo "[test] set-up $((setup_done - start)) s, tests $((end - setup_done)) s"
exit $rc
