#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run): lint first (a style error fails at once), then the
# fast tests on two pytest-xdist workers (one thread each; on 2 cores 589 s -> 512 s), each
# test module on one worker (--dist loadscope: its module fixtures are made once, not once per
# worker; 514 -> 499 s), then the multi-process tests (`dist`) in one process: their ranks (one
# thread each) fill both cores, and next to another worker's test their collectives wait for the
# scheduler (an MoE EP2 test: 191 s beside another worker, 62 s alone; the fast part 917 s ->
# 225 s + 526 s on the slower AMD machine; 154 s + 127 s once ranks were forked from a warm
# forkserver, runtime/launch.py), then the real-model tests (`slow`) in one process:
# they share one default run (tests/conftest.py) and each uses both cores. Every part always
# runs; the script fails when any has a failing test. Extra arguments go to every pytest (e.g.
# a test file: a part that selects none of its tests passes).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check minitron_nemo tests bench launch || exit 1
status=0
part() {  # exit code 5 (no test selected: the arguments named the other part's only) is fine
  .venv/bin/python -m pytest -q --durations=15 "$@" && return
  local rc=$?
  [ "$rc" -eq 5 ] || status=$rc
}
part -m "not slow and not dist" -n 2 --dist loadscope "$@"
part -m "dist and not slow" "$@"
part -m slow "$@"
exit "$status"
