#!/usr/bin/env bash
# ferry's main job, end to end: boot the test guest, run a memory-dirtying
# workload, pause/resume it, take the memory digest, snapshot it live,
# restore the image in a second VMM and compare digests, verify every page,
# migrate it live over mutual TLS to a third ferry (digests compared at both
# ends), verify every page there, migrate it on in hybrid mode (pre-copy
# rounds, then post-copy) over two streams to a fourth, verify again, shut
# down gracefully, and print what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ferry
ferry=target/release/ferry
work=$(mktemp -d); trap 'kill $pid ${rpid:-} ${dpid:-} ${epid:-} 2>/dev/null || true; rm -rf "$work"' EXIT
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

say "live migration over mutual TLS: a CA and one certificate per host, then a destination that waits (--verify-digest hashes all memory at both ends inside the pause)"
$ferry certs init --dir "$work/pki" >/dev/null
$ferry certs issue --dir "$work/pki" --name src >/dev/null
$ferry certs issue --dir "$work/pki" --name 127.0.0.1 >/dev/null
tls() { echo --tls-cert "$work/pki/$1.pem" --tls-key "$work/pki/$1.key" --tls-ca "$work/pki/ca.pem"; }
# shellcheck disable=SC2046
$ferry receive --listen tcp://127.0.0.1:0 $(tls 127.0.0.1) --allow-peer src --api-sock "$work/d.sock" \
  --serial "file:$work/dest.log" --report "$work/dest-report.json" 2>"$work/receive.log" &
dpid=$!
for _ in $(seq 100); do grep -q "waiting for a migration" "$work/receive.log" 2>/dev/null && break; sleep 0.1; done
to=$(grep -o 'tcp://[0-9.:]*' "$work/receive.log" | head -n 1)
echo "destination: $(cat "$work/receive.log")"
echo "destination API while waiting: $($ferry status --api-sock "$work/d.sock" | tr -d '\n ')"
# shellcheck disable=SC2046
$ferry migrate --api-sock "$sock" --to "$to" $(tls src) --verify-digest
set +e; wait $pid; status=$?; set -e
echo "source: $(tail -n 1 "$work/ferry.log") (exit status $status)"
echo "last source line:      $(grep PROGRESS "$work/serial.log" | tail -n 1)"
for _ in $(seq 100); do grep -q PROGRESS "$work/dest.log" 2>/dev/null && break; sleep 0.1; done
echo "first destination line: $(grep PROGRESS "$work/dest.log" | head -n 1)"
cat "$work/receive.log" | tail -n 1

say "ask the migrated guest to verify every page"
$ferry console --api-sock "$work/d.sock" verify >/dev/null
for _ in $(seq 100); do grep -q VERIFY "$work/dest.log" && break; sleep 0.1; done
grep VERIFY "$work/dest.log" | tail -n 1

say "migrate it on: hybrid (pre-copy rounds, then post-copy: the guest moves first, its last pages follow) over two streams"
$ferry receive --listen "unix://$work/m2.sock" --api-sock "$work/e.sock" --serial "file:$work/e.log" \
  2>"$work/receive2.log" &
epid=$!
for _ in $(seq 100); do grep -q "waiting for a migration" "$work/receive2.log" 2>/dev/null && break; sleep 0.1; done
$ferry migrate --api-sock "$work/d.sock" --to "unix://$work/m2.sock" --mode hybrid --streams 2
set +e; wait $dpid; set -e
for _ in $(seq 100); do grep -q PROGRESS "$work/e.log" 2>/dev/null && break; sleep 0.1; done
echo "first line on the fourth ferry: $(grep PROGRESS "$work/e.log" | head -n 1)"
$ferry console --api-sock "$work/e.sock" verify >/dev/null
for _ in $(seq 100); do grep -q VERIFY "$work/e.log" && break; sleep 0.1; done
grep VERIFY "$work/e.log" | tail -n 1
say "graceful shutdown (Ctrl-Alt-Del): the guest verifies again and exits with its status"
$ferry shutdown --api-sock "$work/e.sock" >/dev/null
set +e; wait $epid; status=$?; set -e
tail -n 2 "$work/e.log"; tail -n 1 "$work/receive2.log"
say "figures"
cat "$work/report.json"
echo; echo "ferry exit status: $status"
exit $status
