#!/usr/bin/env bash
# Two hosts on one machine: each launcher runs in its own UTS, mount and PID namespaces (its
# own hostname and /dev/shm; its ranks go when it goes), and they meet over loopback. CP runs
# across the hosts and TP inside each, so TP's sums take shared memory and CP's ring the
# network, as on two real hosts (docs/checkpoints.md). Needs root or user namespaces.
#
#   bash examples/two_hosts.sh [OUT_DIR]     (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out/two_hosts}
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo
PORT=$("$PY" -c 'from cp_infer.distributed import free_port; print(free_port())')
ARGS=(generate --preset tiny-llama --tp 2 --cp 2 --input examples/prompts.jsonl --timeout 120)

# host N: its own hostname and /dev/shm, then the same torchrun a real host N would run
host() {
    HOST="host$1" unshare --uts --mount --pid --fork --kill-child \
        sh -c 'hostname "$HOST" && mount -t tmpfs tmpfs /dev/shm && exec "$@"' sh \
        "$BIN/torchrun" --nnodes 2 --node-rank "$1" --nproc-per-node 2 \
        --master-addr 127.0.0.1 --master-port "$PORT" -m cp_infer "${ARGS[@]}" "${@:2}"
}
host 0 --output "$OUT/two_hosts.jsonl" 2> "$OUT/host0.log" &
h0=$!
host 1 --output "$OUT/two_hosts.jsonl" 2> "$OUT/host1.log" &
h1=$!
wait "$h0" && wait "$h1" || { tail -n 30 "$OUT"/host*.log; exit 1; }
grep -h "exchange over" "$OUT/host0.log" || true

# the same job in one process, no launcher: every layout gives the same tokens
"$PY" -m cp_infer generate --preset tiny-llama --input examples/prompts.jsonl \
    --output "$OUT/one_process.jsonl" 2> "$OUT/one_process.log"
cmp "$OUT/two_hosts.jsonl" "$OUT/one_process.jsonl"
echo "two hosts (cp across, tp inside) give one process's tokens: $OUT/two_hosts.jsonl"
