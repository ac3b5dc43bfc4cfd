#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests, and the end-to-end
# tests with real MCP peers (npm and PyPI packages are installed into tests/e2e by run.sh).
# Run it as root on Debian 12 with Rust: it first installs what is missing (Debian packages,
# rustup components, cargo tools: the lists are in tests/install-deps.sh). Without root it
# prints what to install and stops (the packaging, system and namespace tests need root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each step says when it starts and how long the suite has run, so a slow CI run shows where.
started=$SECONDS
step() { printf '\n==> [%s +%dm%02ds] %s\n' "$(date -u +%H:%M:%S)" $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)) "$*"; }

step "dependencies (tests/install-deps.sh)"
if [[ $EUID -eq 0 ]]; then
  tests/install-deps.sh
else
  tests/install-deps.sh --check || true
  echo "tests/all.sh: run it as root (it installs what is missing; the packaging, system and namespace tests need root). Without root: cargo test (see README)" >&2
  exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
step "cargo test --workspace"
cargo test --locked --workspace
step "full disk: a rotation on a full state directory (a tmpfs, in a private mount namespace)"
unshare -m cargo test --locked --test provision -- --ignored --exact a_full_state_directory_fails_a_rotation_whole_and_the_next_attempt_succeeds
step "monitoring: promtool check/test rules, dashboard queries (packaging/monitoring/check.sh)"
packaging/monitoring/check.sh
step "status page: the admin endpoint's / in headless Chromium (tests/status_page.sh)"
tests/status_page.sh
step "doctor and status against run + the real cloudflared + fake-edge (unshare -n)"
tests/doctor-cloudflared.sh
step "real cloudflared 2026.8.2 + fake-edge: supervision tests in a loopback-only netns"
tests/real-cloudflared.sh
step "end-to-end: real MCP peers through bridge -> WebSocket -> inner TLS -> proxy"
MCP_TUNNEL_BIN=target/debug/mcp-tunnel bash tests/e2e/run.sh
step "peer check: MCP SDK clients through fake-edge + the real cloudflared, other users refused (loopback-only netns)"
MCP_TUNNEL_BIN=target/debug/mcp-tunnel bash tests/peer_check_cloudflared.sh
step "end-to-end through the REAL cloudflared: bridge -> fake-edge -> cloudflared 2026.8.2 -> proxy, in a loopback-only netns (needs ../shared)"
E2E_VIA=cloudflared MCP_TUNNEL_BIN=target/debug/mcp-tunnel bash tests/e2e/run.sh
step "packages: build .deb/.rpm (plain and bundled), lintian, rpmlint, file lists, unit checks, rpm --root"
packaging/test-packages.sh
step "system test: the .deb under real systemd (systemd-nspawn)"
packaging/system-test.sh
step "benchmark smoke: every scenario of bench/run.sh briefly (the figures mean nothing)"
bench/run.sh --smoke
step "fuzz smoke: every cargo-fuzz target for a short bounded time from the committed seeds"
fuzz/ci.sh
step "all tests passed"
