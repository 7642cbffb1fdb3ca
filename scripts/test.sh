#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run): the fast tests on two pytest-xdist workers (one
# thread each; on 2 cores 589 s -> 503 s), then the real-model tests (`slow`) in one process:
# they share one default run (tests/conftest.py) and each uses both cores. Both parts always
# run; the script fails when either has a failing test. Extra arguments go to both pytests.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
.venv/bin/python -m pytest -q -m "not slow" -n 2 --durations=15 "$@" || status=$?
.venv/bin/python -m pytest -q -m slow --durations=15 "$@" || status=$?
exit "$status"
