#!/usr/bin/env bash
# The agent's footprint on a device: the size of the shipped binary and its
# memory (from /proc/<pid>/status) while it runs against a coordinator on
# loopback with the embedded training set (5,000 examples) as its data:
#
#   idle        VmRSS once enrolled, connected and waiting (before any task);
#   training    VmHWM (peak RSS) after one round of the 2NN, one epoch;
#   after       VmRSS a few seconds after that round, idle again.
#
#   bench/agent_footprint.sh [AGENT_BINARY ...]
#
# Each binary given is measured in turn, side by side (default: the
# release-agent build, `cargo build --profile release-agent -p
# fleet-edge-agent --bin edge-agent`). The coordinator is the debug build
# of $CARGO_TARGET_DIR (default /var/cache/fleet-target).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/fleet-target}"
if [ "$#" -eq 0 ]; then
  set -- "$TARGET_DIR/release-agent/edge-agent"
fi
COORD="$TARGET_DIR/debug/coordinator"
[ -x "$COORD" ] || { echo "error: no $COORD; build it with: cargo build -p fleet-coordinator --bin coordinator" >&2; exit 1; }

# shellcheck source=dist/round.sh
. dist/round.sh
trap round_cleanup EXIT

kib() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$ROUND_AGENT_PID/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Waits until the coordinator has seen the agent check in, at most 60 s.
wait_checked_in() {
  for _ in $(seq 300); do
    seen=$(round_admin devices list --json | python3 -c 'import json,sys; print(any(d.get("last_seen") for d in json.load(sys.stdin)))')
    [ "$seen" = True ] && return 0
    sleep 0.2
  done
  round_fail "the agent did not check in within 60 s"
}

echo "| binary | size (bytes) | idle RSS (MiB) | peak RSS training (MiB) | RSS after the round (MiB) |"
echo "| --- | ---: | ---: | ---: | ---: |"
for bin in "$@"; do
  [ -x "$bin" ] || { echo "error: $bin is not an executable" >&2; exit 1; }
  WORK=$(mktemp -d)
  AGENT=("$bin")
  round_start_coordinator
  # shellcheck disable=SC2119 # no extra arguments for `edge-agent run`
  round_enroll_and_run_agent
  wait_checked_in
  sleep 5
  idle=$(kib VmRSS)
  round_run_task 1
  peak=$(kib VmHWM)
  sleep 5
  after=$(kib VmRSS)
  echo "| $bin | $(stat -c %s "$bin") | $(mib "$idle") | $(mib "$peak") | $(mib "$after") |"
  round_cleanup
  rm -rf "$WORK"
done
