# shellcheck shell=bash
# One coordinator on loopback, one agent, one federated round, through the
# two binaries and the admin command line as an operator would. Sourced by
# dist/aarch64.sh and bench/agent_footprint.sh, which set:
#
#   COORD      the coordinator binary (runs on this machine);
#   AGENT      an array: the command that runs the agent (e.g. under qemu);
#   WORK       an empty directory for the coordinator's home, the agent's
#              state and data, and the logs.
#
# round_cleanup stops what round_* started; callers trap it on EXIT.

ROUND_SERVE_PID=""
ROUND_AGENT_PID=""

round_cleanup() {
  if [ -n "$ROUND_AGENT_PID" ]; then kill "$ROUND_AGENT_PID" 2>/dev/null || true; fi
  if [ -n "$ROUND_SERVE_PID" ]; then kill "$ROUND_SERVE_PID" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  ROUND_AGENT_PID="" ROUND_SERVE_PID=""
}

round_fail() {
  echo "error: $1" >&2
  echo "--- coordinator log ---" >&2; tail -40 "$WORK/coordinator.log" >&2 || true
  echo "--- agent log ---" >&2; tail -40 "$WORK/agent.log" >&2 || true
  exit 1
}

round_admin() { "$COORD" "$@" --dir "$WORK/coordinator"; }

# Creates the coordinator's home on a free UDP port and serves it.
round_start_coordinator() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ROUND_ADDR="localhost:$port"
  "$COORD" init --dir "$WORK/coordinator" --listen "127.0.0.1:$port" --host localhost >/dev/null
  "$COORD" serve --dir "$WORK/coordinator" >"$WORK/coordinator.log" 2>&1 &
  ROUND_SERVE_PID=$!
  for _ in $(seq 100); do round_admin devices list >/dev/null 2>&1 && return 0; sleep 0.2; done
  round_fail "the coordinator did not start"
}

# The embedded training set (5,000 examples) as one device's data, a
# one-time token in a file, enrollment; then the agent runs in the
# background (extra arguments are passed to `edge-agent run`).
round_enroll_and_run_agent() {
  "${AGENT[@]}" data split --out "$WORK/data" --devices 1 --partition iid >/dev/null
  round_admin token create --label round >"$WORK/token"
  "${AGENT[@]}" enroll --state "$WORK/agent" --coordinator "$ROUND_ADDR" \
    --ca "$WORK/coordinator/ca.crt" --token-file "$WORK/token" --data "$WORK/data/device-0" \
    >/dev/null || round_fail "the agent did not enroll"
  "${AGENT[@]}" run --state "$WORK/agent" --allow-battery "$@" >"$WORK/agent.log" 2>&1 &
  ROUND_AGENT_PID=$!
}

# Task `id` (the next one): one round of the 2NN, one local epoch, on the
# one device; waits until it finishes (at most `secs`, default 600) and
# checks that the round closed with that device's update in a new model.
round_run_task() {
  local id=$1 secs=${2:-600} state=""
  round_admin tasks create --name "round-$id" --model 2nn --rounds 1 --target 1 --population 1 \
    --over-selection 1 --epochs 1 --retry-secs 2 --selection-window 0 >/dev/null
  round_admin tasks start "$id" >/dev/null
  for _ in $(seq "$secs"); do
    state=$(round_admin tasks list --json | python3 -c "import json,sys; print(next(t['state'] for t in json.load(sys.stdin) if t['id'] == $id))")
    { [ "$state" = Finished ] || [ "$state" = Stopped ]; } && break
    sleep 1
  done
  [ "$state" = Finished ] || round_fail "task $id is $state, not Finished, after $secs s"
  local closed
  closed=$(round_admin rounds "$id" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(len(r) == 1 and len(r[0]["participants"]) == 1 and r[0]["model"] is not None)')
  [ "$closed" = True ] || round_fail "task $id's round did not close with the agent's update"
}
