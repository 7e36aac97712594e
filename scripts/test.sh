#!/usr/bin/env bash
# Passes the tests on a fresh machine: installs what they need (idempotent),
# builds the Linux guest for the smoke test, runs the whole workspace's tests.
source "$(dirname "$0")/lib.sh"
ensure_build_deps
RINGVM_LINUX_DIR="$("$ROOT/scripts/linux-guest.sh")"
export RINGVM_LINUX_DIR
cd "$ROOT"
cargo test --workspace --release "$@"
