#!/usr/bin/env bash
# Shows that the fault harness catches real bugs, not only the anomalies its self-test plants
# in a history: builds roomctl with each patch of this directory (a deliberate bug) and expects
# the harness to fail with the anomaly that bug must cause. Each patch is reverted whatever
# happens, so the tree is left as it was found. Run from anywhere: tests/faults/planted/check.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."

failed=0
# plant PATCH EXPECTED HARNESS-ARGS...: EXPECTED is an extended regular
# expression an anomaly the report lists must match.
plant() {
  local name=$1 patch="tests/faults/planted/$1" expected=$2
  shift 2
  git apply "$patch"
  trap 'git apply -R "'"$patch"'"' EXIT
  echo "planted: $name ($*)"
  local out rc=0
  out=$(cargo test --locked --quiet --test faults -- "$@" 2>&1) || rc=$?
  git apply -R "$patch"
  trap - EXIT
  if [[ $rc -ne 0 ]] && grep -qE "ANOMALY .*$expected" <<<"$out"; then
    echo "planted: $name caught, e.g." \
      "$(grep -m1 -E "ANOMALY .*$expected" <<<"$out")"
  else
    echo "planted: $name NOT caught (exit $rc); the harness said:"
    tail -n 40 <<<"$out"
    failed=1
  fi
}

# A resumed stream that skips the event after its cursor: subscribers resume when a node is
# killed, so one Redis (whose first faults include a killed node) shows it.
plant skip-on-resume.patch "subscriber .* expected seq" --store redis --duration 20s
# A locked room that admits participants: the workload locks rooms and joins them all the
# time, so the replay of any run's logs shows it.
plant admit-into-locked-rooms.patch "a participant joined a locked room" --store memory --duration 10s

exit $failed
