#!/bin/bash
# Migrates the test guest across a 1 Gbit/s link (two network namespaces
# joined by a veth pair shaped with tbf, as crates/cli/tests/migration_netns.rs
# builds it) once per FILL x CONFIG, and prints one line of figures per run
# (bytes on the wire, total time, downtime, round-1 wire rate). Every
# guest verifies its memory at the destination. Needs root.
#
#   scripts/bench-migrate-netns.sh [FERRY] [MEM] [RUNS]
#   CONFIGS="lz4 zstd none lz4@50M" FILLS="word random" scripts/bench-migrate-netns.sh target/release/ferry 512M 3
#
# A config is a codec, optionally with @RATE for --max-bandwidth.
# The namespaces, processes and temporary files are removed on every exit path.
set -euo pipefail
FERRY=$(realpath "${1:-target/release/ferry}")
MEM=${2:-512M}
RUNS=${3:-3}
CONFIGS=${CONFIGS:-"lz4 zstd none"}
FILLS=${FILLS:-"word random"}
LOAD=${LOAD:-"dirty wss=1 rate=1000"}
A=ferry-bench-$$-a
B=ferry-bench-$$-b
SRC_IP=10.78.$(($$ % 250 + 1)).1
DST_IP=10.78.$(($$ % 250 + 1)).2
DIR=$(mktemp -d)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

ip netns add "$A"
ip netns add "$B"
ip link add veth-a netns "$A" type veth peer name veth-b netns "$B"
for x in "$A veth-a $SRC_IP" "$B veth-b $DST_IP"; do
    set -- $x
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" link set lo up
    ip -n "$1" link set "$2" up
    ip netns exec "$1" tc qdisc add dev "$2" root tbf rate 1gbit burst 256kb latency 50ms
done

# Waits up to $2 seconds for a line starting with $3 in file $1.
wait_for() {
    local i
    for i in $(seq 1 $(($2 * 10))); do
        grep -q "^$3" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for $3 in $1" >&2
    tail -5 "$1" >&2
    return 1
}

printf '%-7s %-11s %3s %12s %10s %11s %8s %12s %s\n' fill config run wire_bytes total_ms downtime_ms rounds r1_MiB/s verify
for fill in $FILLS; do
    for run in $(seq 1 "$RUNS"); do
        for cfg in $CONFIGS; do
            codec=${cfg%@*}
            cap=()
            [[ $cfg == *@* ]] && cap=(--max-bandwidth "${cfg#*@}")
            n=$fill-$cfg-$run
            ip netns exec "$A" "$FERRY" run --kernel builtin:test --mem "$MEM" \
                --cmdline "$LOAD fill=$fill report=100" --api-sock "$DIR/src-$n.sock" \
                >"$DIR/src-$n.out" 2>"$DIR/src-$n.err" &
            PIDS+=($!)
            ip netns exec "$B" "$FERRY" receive --listen "tcp://$DST_IP:7777" --insecure \
                --api-sock "$DIR/dst-$n.sock" >"$DIR/dst-$n.out" 2>"$DIR/dst-$n.err" &
            PIDS+=($!)
            wait_for "$DIR/src-$n.out" 60 PROGRESS
            wait_for "$DIR/dst-$n.err" 30 "ferry: waiting"
            "$FERRY" migrate --api-sock "$DIR/src-$n.sock" --to "tcp://$DST_IP:7777" --insecure \
                --compress "$codec" "${cap[@]}" --json >"$DIR/m-$n.json"
            wait_for "$DIR/dst-$n.out" 30 PROGRESS
            "$FERRY" console --api-sock "$DIR/dst-$n.sock" verify >/dev/null
            wait_for "$DIR/dst-$n.out" 60 VERIFY
            ok=$(grep -m1 '^VERIFY' "$DIR/dst-$n.out" | cut -d' ' -f1-2)
            "$FERRY" shutdown --api-sock "$DIR/dst-$n.sock" >/dev/null
            wait
            PIDS=()
            python3 - "$DIR/m-$n.json" "$fill" "$cfg" "$run" "$ok" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
r1 = v["rounds"][0]
print(f'{sys.argv[2]:<7} {sys.argv[3]:<11} {sys.argv[4]:>3} {v["bytes_sent"]:>12} {v["total_ms"]:>10.0f} '
      f'{v["downtime_ms"]:>11.2f} {len(v["rounds"]):>8} {r1["wire_bytes_per_s"] / 1048576:>12.1f} {sys.argv[5]}')
EOF
        done
    done
done
