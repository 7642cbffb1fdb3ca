#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run): lint first (a style error fails at once), then the
# fast tests on two pytest-xdist workers (one thread each; on 2 cores 589 s -> 512 s), each
# test module on one worker (--dist loadscope: its module fixtures are made once, not once per
# worker; 514 -> 499 s), then the real-model tests (`slow`) in one process: they share one
# default run (tests/conftest.py) and each uses both cores. Both test parts always run; the
# script fails when either has a failing test. Extra arguments go to both pytests (e.g. a test
# file: the part that selects none of its tests passes).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check minitron_nemo tests bench launch || exit 1
status=0
part() {  # exit code 5 (no test selected: the arguments named the other part's only) is fine
  .venv/bin/python -m pytest -q --durations=15 "$@" && return
  local rc=$?
  [ "$rc" -eq 5 ] || status=$rc
}
part -m "not slow" -n 2 --dist loadscope "$@"
part -m slow "$@"
exit "$status"
