#!/usr/bin/env bash
# N trainer processes on this machine: the local stand-in for a multi-host pod.
#
#   launch/local.sh [--devices_per_process K] [--port P] N CONFIG WORKDIR [trainer flags ...]
#
# Each process gets K simulated CPU devices (default 1) and process id 0..N-1; they find each
# other through a coordinator on localhost:P (default: a free port) and exchange collectives with
# gloo over TCP. Output lines are prefixed with "[i] ". SIGTERM/SIGINT to this script reach every
# process (as a scheduler's preemption would). If a process fails, the others are stopped by
# JAX's coordination service (heartbeat timeout); this script kills any that are still alive
# KILL_AFTER_S (default 180) seconds later. The exit status is the first non-zero one, else 0.
# PYTHON picks the interpreter (default: python).
set -u

usage() {
  echo "usage: $0 [--devices_per_process K] [--port P] N CONFIG WORKDIR [trainer flags ...]" >&2
  exit 2
}

devices=1
port=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --devices_per_process=*) devices="${1#*=}"; shift ;;
    --devices_per_process) devices="${2:-}"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --port) port="${2:-}"; shift 2 ;;
    *) echo "unknown option $1 (valid: --devices_per_process K, --port P)" >&2; usage ;;
  esac
done
[[ $# -ge 3 ]] || usage
num_processes="$1"; config="$2"; workdir="$3"; shift 3
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$num_processes'" >&2; exit 2; }
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "--devices_per_process must be a positive integer, got '$devices'" >&2; exit 2; }
python="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
  JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$i" \
    "$python" -u -m vlmjax.train --config "$config" --workdir "$workdir" "$@" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
  echo "local.sh: process $i pid $! (${devices} CPU devices, coordinator localhost:${port})"
done

forward() { echo "local.sh: forwarding SIG$1 to all processes"; kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
live=("${pids[@]}")
watchdog=""
while ((${#live[@]} > 0)); do
  finished=""
  wait -n -p finished "${live[@]}"
  rc=$?
  [[ -z "$finished" ]] && continue  # a trapped signal interrupted the wait
  live=($(for p in "${live[@]}"; do [[ "$p" != "$finished" ]] && echo "$p"; done))
  if ((rc != 0)); then
    echo "local.sh: process pid $finished exited with status $rc"
    ((status == 0)) && status=$rc
    if [[ -z "$watchdog" && ${#live[@]} -gt 0 ]]; then  # a bound on how long the rest may hang
      (sleep "${KILL_AFTER_S:-180}"; echo "local.sh: killing processes still alive ${KILL_AFTER_S:-180}s after a failure"; kill -9 "${live[@]}" 2>/dev/null) &
      watchdog=$!
    fi
  fi
done
[[ -n "$watchdog" ]] && kill "$watchdog" 2>/dev/null
wait  # the output filters
exit "$status"
