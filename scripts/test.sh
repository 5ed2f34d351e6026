#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests through the real
# binary (they boot the embedded test guest on /dev/kvm).
# Linux-guest tests are opt-in: FERRY_LINUX_TESTS=1 (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --workspace --release -- --test-threads=2 "$@"
