#!/usr/bin/env bash
# Schema fuzzing of the control API: schemathesis, driven by the OpenAPI spec
# in docs/api.md, against the live API of a real ferry VM (the embedded test
# guest). Fails (non-zero) when a response is a 5xx, has an undocumented
# status, or does not match the documented content type or schema, and
# prints schemathesis' findings (a curl command for each).
#
#   scripts/api-fuzz.sh                # build ferry, then ~75-100 s of fuzzing
#
# Environment:
#   FERRY_FUZZ_VENV      venv holding schemathesis (default /opt/ferry-ci/venv;
#                        .ci/run installs it there)
#   FERRY_FUZZ_EXAMPLES  generated test cases per operation (default 50)
#   FERRY_FUZZ_SEED      hypothesis seed (default 1, so CI runs are repeatable;
#                        "random" for a new one each run)
#   FERRY_FUZZ_NO_BUILD=1  use target/release/ferry as it is
#   FERRY_FUZZ_KEEP=1    keep the work directory (spec copy, reports, logs)
#   FERRY_FUZZ_CHECKS    schemathesis checks (default: not_a_server_error,
#                        status_code_conformance, content_type_conformance,
#                        response_schema_conformance, and snapshot_files from
#                        scripts/api-fuzz/hooks.py: a 200 snapshot verifies
#                        with `ferry image verify`, a failed one leaves the
#                        file at its path untouched)
# Arguments are passed on to `schemathesis run` (e.g. --mode positive).
#
# SAFETY: PUT /vm/snapshot writes an image to any absolute path the fuzzer
# invents, replacing a regular file there. ferry therefore runs inside a
# private mount namespace in which every mount is read-only and nodev except
# the run directory, with a /dev of only kvm, userfaultfd, null, zero, full,
# random and urandom (scripts/api-fuzz/sandbox.sh proves that before it starts
# ferry, and this script aborts if it cannot).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv=${FERRY_FUZZ_VENV:-/opt/ferry-ci/venv}
st=$venv/bin/schemathesis
examples=${FERRY_FUZZ_EXAMPLES:-50}
seed=${FERRY_FUZZ_SEED:-1}
[ "$seed" = random ] && seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
ferry=$root/target/release/ferry
checks=${FERRY_FUZZ_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,snapshot_files}
extra_args=("$@") # passed on to `schemathesis run`

say() { echo "api-fuzz: $*"; }
die() { echo "api-fuzz: $*" >&2; exit 2; }

[ -x "$st" ] || die "schemathesis not found at $st; install it: python3 -m venv $venv && $venv/bin/pip install -r scripts/api-fuzz/requirements.txt (as .ci/run does)"
for t in unshare findmnt mount setsid timeout python3; do
  command -v "$t" >/dev/null || die "$t is missing"
done
[ "$(id -u)" = 0 ] || die "needs root (a private mount namespace, /dev/kvm)"

if [ "${FERRY_FUZZ_NO_BUILD:-0}" != 1 ]; then
  say "cargo build --release -p ferry"
  cargo build --release -q -p ferry
fi
[ -x "$ferry" ] || die "no $ferry"

work=$(mktemp -d /tmp/ferry-api-fuzz.XXXXXX)
rundir=$(mktemp -d /run/ferry-fuzz.XXXXXX)
sock=$rundir/api.sock
vm_pid= bridge_pid=

stop_vm() {
  [ -n "$vm_pid" ] || return 0
  # The whole process group: sandbox.sh and ferry (TERM twice stops the
  # guest at once), then KILL whatever is left after 10 s.
  kill -TERM -- "-$vm_pid" 2>/dev/null || true
  sleep 0.2
  kill -TERM -- "-$vm_pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 -- "-$vm_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$vm_pid" 2>/dev/null || true
  wait "$vm_pid" 2>/dev/null || true
  vm_pid=
}

cleanup() {
  local rc=$?
  stop_vm
  if [ -n "$bridge_pid" ]; then
    kill "$bridge_pid" 2>/dev/null || true
    wait "$bridge_pid" 2>/dev/null || true
  fi
  rm -rf "$rundir"
  if [ "${FERRY_FUZZ_KEEP:-0}" = 1 ]; then
    say "work directory kept: $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# 1. The spec: the yaml block of docs/api.md, plus a servers entry and
#    request examples (scripts/api-fuzz/prepare-spec.py: snapshot paths in
#    the writable run directory, so snapshots really run and their 200
#    responses are checked, and paths the API must refuse). docs/api.md
#    itself is not changed.
awk '/^```yaml[[:space:]]*$/ {on=1; next} on && /^```[[:space:]]*$/ {exit} on {print}' docs/api.md >"$work/api.yaml"
grep -q '^openapi:' "$work/api.yaml" || die "no OpenAPI yaml block in docs/api.md"

# 3a. The bridge (started first: its port goes into the spec).
setsid python3 "$root/scripts/api-fuzz/bridge.py" "$sock" "$work/port" 2>"$work/bridge.log" &
bridge_pid=$!
timeout 10 bash -c "until [ -s '$work/port' ]; do sleep 0.05; done" || die "the bridge did not start: $(cat "$work/bridge.log")"
port=$(cat "$work/port")
url=http://127.0.0.1:$port

"$venv/bin/python" "$root/scripts/api-fuzz/prepare-spec.py" "$work/api.yaml" "$url" "$rundir"
# The files the snapshot examples name.
head -c 32 /dev/urandom >"$rundir/key"
head -c 5000 /dev/urandom >"$rundir/bigkey"
mkfifo "$rundir/fifo"
ln -s "$rundir/fuzz.img" "$rundir/link"

mounts_before=$(findmnt -rno TARGET,OPTIONS)

# 2. A VM in a read-only mount namespace. $1 = 1: start ferry again whenever
#    it exits (for the shutdown group).
start_vm() {
  local restart=$1
  rm -f "$rundir/sandbox.ok" "$rundir/exits.log" "$sock"
  : >"$rundir/ferry.log"
  setsid unshare --mount --net --propagation private -- \
    bash "$root/scripts/api-fuzz/sandbox.sh" "$rundir" "$restart" -- \
    "$ferry" run --kernel builtin:test --mem 64M --cmdline "dirty wss=4 rate=20000" \
    --serial none --api-sock "$sock" 2>"$work/sandbox.log" &
  vm_pid=$!
  if ! timeout 15 bash -c "until [ -e '$rundir/sandbox.ok' ] || ! kill -0 $vm_pid 2>/dev/null; do sleep 0.05; done" ||
    [ ! -e "$rundir/sandbox.ok" ]; then
    cat "$work/sandbox.log" >&2
    die "the read-only mount namespace could not be set up; ferry was not started"
  fi
  [ "$(findmnt -rno TARGET,OPTIONS)" = "$mounts_before" ] || die "the host's mounts changed while setting up the namespace"
  timeout 15 bash -c "until [ -S '$sock' ]; do kill -0 $vm_pid 2>/dev/null || exit 1; sleep 0.05; done" || {
    cat "$rundir/ferry.log" >&2
    die "ferry did not open its API socket"
  }
  timeout 10 python3 -c '
import sys, time, urllib.request
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/vm", timeout=2).read()
        break
    except Exception:
        time.sleep(0.1)
' "$url" || {
    cat "$rundir/ferry.log" >&2
    die "GET /vm through the bridge did not answer"
  }
}

failed=()
# 3b. One schemathesis run. $1 = group name, rest = its filters.
fuzz() {
  local group=$1
  shift
  say "== $group: schemathesis (max $examples examples per operation, seed $seed)"
  local rc=0
  (cd "$work" && SCHEMATHESIS_HOOKS="$root/scripts/api-fuzz/hooks.py" \
    FERRY_FUZZ_FERRY="$ferry" FERRY_FUZZ_RUNDIR="$rundir" \
    timeout --kill-after=10 150 "$st" run "$work/api.yaml" \
    --url "$url" \
    --checks "$checks" \
    --max-examples "$examples" \
    --seed "$seed" \
    --workers 1 \
    --request-timeout 40 \
    --generation-database none \
    --suppress-health-check all \
    --no-color \
    --output-truncate false \
    --report junit,har --report-dir "$work/report-$group" \
    "$@" ${extra_args[@]+"${extra_args[@]}"}) || rc=$?
  case $rc in
    0) ;;
    124 | 137) failed+=("$group: schemathesis timed out") ;;
    *) failed+=("$group: schemathesis found failures (exit $rc)") ;;
  esac
}

report_exits() {
  local group=$1 expect_exits=$2
  if [ -s "$rundir/exits.log" ]; then
    local n bad
    n=$(wc -l <"$rundir/exits.log")
    bad=$(awk '$2 != 0' "$rundir/exits.log" | wc -l)
    say "$group: ferry exited $n time(s), $bad with a non-zero status"
    if [ "$expect_exits" = 0 ] || [ "$bad" -gt 0 ]; then
      failed+=("$group: ferry exited unexpectedly (see its log below)")
      tail -n 40 "$rundir/ferry.log"
    fi
  fi
}

# 4. No temporary file of an image write may be left (docs/api.md: a failed
#    or interrupted snapshot cleans up). Then a clean directory for the next group.
check_leftovers() {
  local group=$1 left
  left=$(find "$rundir" -maxdepth 1 -name '*.tmp-*')
  if [ -n "$left" ]; then
    echo "$left" | sed 's/^/api-fuzz: temporary file left: /'
    failed+=("$group: temporary image files left behind")
  fi
  find "$rundir" -maxdepth 1 \( -name '*.img' -o -name '*.tmp-*' \) -type f -delete
}

start=$(date +%s)

# PUT /vm/migrate needs a peer (and a successful one would end the VM): it
# is checked end to end by crates/cli/tests/migration.rs instead. The VM
# runs in a network namespace of its own, so nothing it is told to connect
# to can leave this machine either way.
#
# Every operation but shutdown, on one VM that must stay up throughout.
start_vm 0
fuzz vm --exclude-path /vm/shutdown --exclude-path /vm/migrate
report_exits vm 0
stop_vm
check_leftovers vm

# Every operation with shutdown among them, on a VM that the sandbox starts
# again each time it stops: the others also meet a VM that is shutting down
# or gone.
start_vm 1
fuzz with-shutdown --exclude-path /vm/migrate
stop_vm
report_exits with-shutdown 1
check_leftovers with-shutdown

say "done in $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  for f in "${failed[@]}"; do echo "api-fuzz: FAILED: $f" >&2; done
  exit 1
fi
say "no failures"
