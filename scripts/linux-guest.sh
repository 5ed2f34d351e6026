#!/usr/bin/env bash
# Builds ferry's Linux test guest from Debian's packages (no other network):
#   assets/linux/vmlinuz     the Debian cloud kernel (bzImage; 8250 serial built in)
#   assets/linux/initrd.img  a newc initramfs: busybox-static, /init, memdirty
# Idempotent: does nothing when both files exist. Usage: scripts/linux-guest.sh [OUTDIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../assets/linux}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
  echo "linux guest: already built in $out"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
need=()
command -v cpio >/dev/null || need+=(cpio)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
# The kernel version the cloud meta-package names today.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'); fi
[ -n "$pkg" ] || { echo "linux guest: cannot find the Debian cloud kernel package" >&2; exit 1; }
apt-get download -qq "$pkg" busybox-static
dpkg-deb -x linux-image-*.deb k
dpkg-deb -x busybox-static_*.deb bb
mkdir -p root/bin root/proc root/sys root/dev root/tmp
cp bb/bin/busybox root/bin/busybox
gcc -O2 -static -o root/bin/memdirty "$here/linux/memdirty.c"
install -m 0755 "$here/linux/init" root/init
(cd root && find . | cpio -o -H newc --quiet) | gzip -1 > "$out/initrd.img"
cp k/boot/vmlinuz-* "$out/vmlinuz"
echo "$pkg" > "$out/VERSION"
echo "linux guest: $pkg -> $out/vmlinuz, $out/initrd.img"
