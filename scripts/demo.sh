#!/usr/bin/env bash
# ferry's main job, end to end: boot the test guest, run a memory-dirtying
# workload, pause/resume it, take the memory digest, snapshot it live,
# restore the image in a second VMM and compare digests, verify every page,
# shut down gracefully, and print what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ferry
ferry=target/release/ferry
work=$(mktemp -d); trap 'kill $pid ${rpid:-} 2>/dev/null || true; rm -rf "$work"' EXIT
sock=$work/api.sock
say() { printf '\n== %s\n' "$*"; }

say "boot the test guest: 256 MiB, 2 vCPUs, 64 MiB working set dirtied at full speed"
$ferry run --kernel builtin:test --mem 256M --vcpus 2 --api-sock "$sock" \
  --cmdline "dirty wss=64 rate=max report=500" --report "$work/report.json" >"$work/serial.log" 2>"$work/ferry.log" &
pid=$!
for _ in $(seq 200); do grep -q PROGRESS "$work/serial.log" 2>/dev/null && break; sleep 0.1; done
head -n 4 "$work/serial.log"
say "status"
$ferry status --api-sock "$sock" | head -n 8
say "pause: the guest stops; its memory digest is stable"
$ferry pause --api-sock "$sock"
$ferry digest --api-sock "$sock" | grep -E '"digest"|gb_per_s'
sleep 0.5; $ferry digest --api-sock "$sock" | grep '"digest"'
say "resume"
$ferry resume --api-sock "$sock"
sleep 1; tail -n 1 "$work/serial.log"
say "live snapshot (the guest keeps running; pause only for the last dirty pages)"
$ferry snapshot --api-sock "$sock" --out "$work/vm.img" --digest
say "restore the image in a second ferry, paused: same memory digest as at the snapshot's pause"
$ferry restore "$work/vm.img" --paused --api-sock "$work/r.sock" --serial "file:$work/restored.log" 2>"$work/restore.log" &
rpid=$!
for _ in $(seq 300); do grep -q restored "$work/restore.log" 2>/dev/null && break; sleep 0.1; done
cat "$work/restore.log"
$ferry digest --api-sock "$work/r.sock" | grep '"digest"'
$ferry resume --api-sock "$work/r.sock" >/dev/null
$ferry console --api-sock "$work/r.sock" verify >/dev/null
for _ in $(seq 100); do grep -q VERIFY "$work/restored.log" && break; sleep 0.1; done
echo "restored guest: $(grep VERIFY "$work/restored.log" | tail -n 1)"
$ferry shutdown --api-sock "$work/r.sock" >/dev/null; wait $rpid || true
$ferry image inspect "$work/vm.img" | head -n 8

say "ask the original guest to verify every page"
$ferry console --api-sock "$sock" verify >/dev/null
for _ in $(seq 100); do grep -q VERIFY "$work/serial.log" && break; sleep 0.1; done
grep VERIFY "$work/serial.log" | tail -n 1
say "graceful shutdown (Ctrl-Alt-Del): the guest verifies again and exits with its status"
$ferry shutdown --api-sock "$sock" >/dev/null
set +e; wait $pid; status=$?; set -e
tail -n 2 "$work/serial.log"; cat "$work/ferry.log"
say "figures"
cat "$work/report.json"
echo; echo "ferry exit status: $status"
exit $status
