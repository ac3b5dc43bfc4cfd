#!/usr/bin/env bash
# Runs every fuzz target for a short bounded time from the committed seeds; fails on any
# crash, panic, leak or timeout libFuzzer reports. See fuzz/README.md.
#
#   fuzz/ci.sh                 # 25 s per target
#   FUZZ_SECONDS=600 fuzz/ci.sh
#
# Needs: cargo-fuzz (installed here with `cargo install --locked cargo-fuzz` when missing,
# about 30 s) and a nightly toolchain, or, without one, the stable toolchain with
# RUSTC_BOOTSTRAP=1 (cargo fuzz needs -Zsanitizer). The first build of the targets takes
# several minutes on 2 cores; keep fuzz/target in the CI cache.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-25}"
targets=(config_loader route_matcher ws_adapter inner_http inner_tls mcp_inspector upstream_response)

if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz/ci.sh: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
    echo "fuzz/ci.sh: toolchain nightly ($(rustc +nightly --version))"
else
    toolchain=()
    export RUSTC_BOOTSTRAP=1
    echo "fuzz/ci.sh: no nightly toolchain: stable with RUSTC_BOOTSTRAP=1 ($(rustc --version))"
fi

start=$(date +%s)
failed=()
for t in "${targets[@]}"; do
    # A fresh corpus per run: the committed seeds are read, never written.
    corpus="target/ci-corpus/$t"
    rm -rf "$corpus" && mkdir -p "$corpus"
    echo "fuzz/ci.sh: $t for ${seconds}s from seeds/$t"
    log="target/ci-$t.log"
    if cargo "${toolchain[@]}" fuzz run "$t" "$corpus" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        runs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
        echo "fuzz/ci.sh: $t ok (${runs:-?} executions)"
    else
        echo "fuzz/ci.sh: $t FAILED; the last lines of its log:"
        tail -n 40 "$log"
        ls artifacts/"$t" 2>/dev/null | sed 's/^/  crash input: fuzz\/artifacts\/'"$t"'\//'
        failed+=("$t")
    fi
done
echo "fuzz/ci.sh: done in $(($(date +%s) - start))s"
if ((${#failed[@]})); then
    echo "fuzz/ci.sh: failed: ${failed[*]}"
    exit 1
fi
