#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECS seconds (default 20; argument or
# RINGVM_FUZZ_SECS) from its seeds (fuzz/seeds/, tracked; fuzz/corpus/ if
# grown locally), new inputs in a scratch corpus.
# A crash fails the script (libFuzzer leaves the input in fuzz/artifacts/).
source "$(dirname "$0")/lib.sh"
SECS="${1:-${RINGVM_FUZZ_SECS:-20}}"
command -v cargo-fuzz >/dev/null || { log "installing cargo-fuzz"; cargo install -q cargo-fuzz --locked; }
cd "$ROOT/fuzz"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# cargo-fuzz passes sanitizer flags the stable toolchain takes only with this.
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O >&2
for t in $(cargo fuzz list); do
    mkdir -p "$scratch/$t"
    # Seeds kept in git (seeds/), and a local corpus if one was grown.
    seeds=(); for d in "seeds/$t" "corpus/$t"; do [ -d "$d" ] && seeds+=("$d"); done
    out="$(cargo fuzz run -O "$t" "$scratch/$t" "${seeds[@]}" -- -max_total_time="$SECS" -rss_limit_mb=4096 2>&1)" || { echo "$out" | tail -40; log "fuzz target $t FAILED"; exit 1; }
    runs="$(echo "$out" | grep -o 'Done [0-9]* runs in [0-9]* second(s)' | tail -1)"
    cov="$(echo "$out" | grep -o 'cov: [0-9]* ft: [0-9]*' | tail -1)"
    printf '[ringvm] fuzz %-18s %s, %s\n' "$t" "$runs" "$cov" >&2
done
