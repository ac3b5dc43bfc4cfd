#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests, and the end-to-end
# tests with real MCP peers (npm and PyPI packages are installed into tests/e2e by run.sh).
# Needs node + npm, python3 with venv, curl, openssl and nginx (benchmark smoke run), and for
# the packaging and system tests root, lintian, rpm, rpmlint, debootstrap, systemd-container,
# binutils, cargo-deb and cargo-generate-rpm; `.ci/run` installs them all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

for tool in node npm python3 curl openssl nginx lintian rpmlint rpm debootstrap systemd-nspawn strip cargo-deb cargo-generate-rpm; do
  command -v "$tool" >/dev/null || { echo "tests/all.sh: $tool is missing (run .ci/run, which installs it)" >&2; exit 1; }
done

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
step "cargo test"
cargo test --locked
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
