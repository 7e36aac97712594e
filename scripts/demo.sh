#!/usr/bin/env bash
# The main job on the embedded default: boot the test guest, run its `mem`
# workload, take a live snapshot while it rewrites pages (over QMP), check
# the state file, restore it into a fresh VM where the guest carries on and
# verifies every page, print the figures.
# Extra arguments go to `ringvm demo`.
source "$(dirname "$0")/lib.sh"
ensure_build_deps
cd "$ROOT"
cargo build --release -q --bin ringvm
exec "$ROOT/target/release/ringvm" demo --cpus 2 --memory 1G --mib 512 --secs 2 "$@"
