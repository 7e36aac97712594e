#!/usr/bin/env bash
# Passes the tests on a fresh machine: installs what they need (idempotent),
# the peers (fio, QEMU 10: the Linux tests compare ringvm with QEMU), builds
# the Linux test guest (scripts/linux-guest.sh, cached by its inputs) and the
# Python QMP client, runs the
# format and lint checks, the whole workspace's tests, then every fuzz target for a short bounded time
# (RINGVM_FUZZ_SECS per target, default 15; 0 skips), then the benchmark
# harness once with --quick as a smoke check of it (RINGVM_PERF_SMOKE=0
# skips; it asserts nothing about speed, only that every suite runs).
source "$(dirname "$0")/lib.sh"
ensure_build_deps
ensure_nfs_deps
"$ROOT/scripts/peers.sh"
RINGVM_LINUX_DIR="$("$ROOT/scripts/linux-guest.sh")"
RINGVM_PYTHON="$(ensure_python_clients)"
export RINGVM_LINUX_DIR RINGVM_PYTHON
cd "$ROOT"
# Format and lints are part of the tests (rustfmt.toml; clippy with
# warnings as errors). rustup installs the components if they are missing.
if command -v rustup >/dev/null; then
    rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed | grep -q '^clippy' || rustup component add clippy
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets --release -- -D warnings
# Every test binary runs even after a failure, so one run reports them all.
cargo test --workspace --release --no-fail-fast "$@"
if [ "${RINGVM_FUZZ_SECS:-15}" != 0 ]; then
    "$ROOT/scripts/fuzz.sh" "${RINGVM_FUZZ_SECS:-15}"
fi
if [ "${RINGVM_PERF_SMOKE:-1}" != 0 ]; then
    cargo run --release -p ringvm-perf -- all --quick
fi
