#!/usr/bin/env bash
# Runs inside `unshare --mount --propagation private` (see scripts/api-fuzz.sh):
#   sandbox.sh RUNDIR RESTART -- FERRY ARGS...
# Makes every mount of this private namespace read-only and nodev except
# RUNDIR, puts a /dev with only kvm, userfaultfd, null, zero, full, random and
# urandom in place of the host's, proves it (no file can be created anywhere
# else, no block device in /dev), then runs ferry and, when
# RESTART=1, starts it again each time it exits (a fuzzed shutdown stops it).
# Each exit of ferry is logged to RUNDIR/exits.log as "EPOCH_MS STATUS".
# The API's PUT /vm/snapshot writes to any absolute path a client names, so
# nothing here may run ferry unless the namespace is proven read-only.
set -uo pipefail

die() { echo "sandbox: $*" >&2; exit 3; }

rundir=$1 restart=$2
shift 2
[ "${1:-}" = "--" ] && shift
[ -d "$rundir" ] || die "no run directory $rundir"
case "$rundir" in /*) ;; *) die "run directory must be absolute" ;; esac

# The device nodes ferry needs, read before /dev is replaced.
devs=()
for d in kvm userfaultfd null zero full random urandom; do
  [ -c "/dev/$d" ] && devs+=("$d $(stat -c '%t %T %a' "/dev/$d")")
done
[ -c /dev/kvm ] || die "no /dev/kvm"

# The run directory becomes a mount of its own, so remounting its parent
# filesystem read-only leaves it writable.
mount --bind "$rundir" "$rundir" || die "cannot bind-mount $rundir"
mount -o remount,bind,nodev,nosuid "$rundir" || die "cannot remount $rundir nodev"

# Every other read-write mount becomes read-only, and every mount nodev (a
# device node stays writable on a read-only mount), in this namespace only.
# `bind` makes these per-mount flags (MS_REMOUNT|MS_BIND): the filesystems
# themselves and the mounts of every other namespace stay as they are.
targets=()
while read -r t o; do
  t=$(printf '%b' "$t") # findmnt -r escapes spaces etc. as \xNN
  targets+=("$t")
  [ "$t" = "$rundir" ] && continue
  case ",$o," in *,ro,*,nodev,* | *,nodev,*,ro,*) continue ;; esac
  mount -o remount,bind,ro,nodev "$t" || die "cannot remount $t read-only"
done < <(findmnt -rno TARGET,OPTIONS)
[ ${#targets[@]} -gt 0 ] || die "findmnt listed no mounts"

# /dev: a new read-only tmpfs with only the character devices above (no
# disk, no tty), covering the host's /dev and its submounts.
mount -t tmpfs -o mode=755,nosuid,size=64k ferry-fuzz-dev /dev || die "cannot mount a tmpfs on /dev"
for e in "${devs[@]}"; do
  read -r d maj min mode <<<"$e"
  mknod -m "$mode" "/dev/$d" c "$((16#$maj))" "$((16#$min))" || die "mknod /dev/$d"
done
ln -s /proc/self/fd /dev/fd
mount -o remount,bind,ro /dev || die "cannot remount /dev read-only"
[ -z "$(find /dev -type b)" ] || die "a block device is reachable in /dev"

# Proof: nothing can be created or written outside the run directory.
probe_failed=0
for t in / "${targets[@]}"; do
  [ "$t" = "$rundir" ] && continue
  if [ -d "$t" ] && [ ! -L "$t" ]; then
    if p=$(mktemp "$t/.ferry-fuzz-probe.XXXXXX" 2>/dev/null); then
      rm -f "$p"
      echo "sandbox: could create $p" >&2
      probe_failed=1
    fi
  elif [ -f "$t" ] && [ -w "$t" ]; then
    echo "sandbox: $t is writable" >&2
    probe_failed=1
  fi
done
if ( : >/ferry-fuzz-probe ) 2>/dev/null; then
  rm -f /ferry-fuzz-probe
  echo "sandbox: could write /ferry-fuzz-probe" >&2
  probe_failed=1
fi
[ "$probe_failed" = 0 ] || die "the namespace is not read-only; refusing to start ferry"
p=$(mktemp "$rundir/.probe.XXXXXX") || die "run directory $rundir is not writable"
rm -f "$p"
: >"$rundir/sandbox.ok"

child=
stopping=0
on_term() {
  stopping=1
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}
trap on_term TERM INT HUP

starts=0
while :; do
  starts=$((starts + 1))
  "$@" >>"$rundir/ferry.log" 2>&1 </dev/null &
  child=$!
  # `wait` returns early when a trapped signal arrives: wait again for the
  # child's real status.
  wait "$child"
  st=$?
  while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    st=$?
  done
  echo "$(date +%s%3N) $st" >>"$rundir/exits.log"
  child=
  [ "$stopping" = 1 ] && exit 0
  [ "$restart" = 1 ] || exit 0
  [ "$starts" -lt 1000 ] || die "ferry restarted 1000 times; giving up"
done
