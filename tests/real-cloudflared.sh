#!/usr/bin/env bash
# Runs tests/real_cloudflared.rs: `mcp-tunnel run` with the REAL cloudflared 2026.8.2 and
# fake-edge from ../shared/, inside a fresh loopback-only network namespace (cloudflared
# dials public addresses by itself: it must never run on the host network).
#
#   tests/real-cloudflared.sh [cargo test filter]      (as root: unshare -n needs it)
#
# MCP_TUNNEL_SHARED overrides where cloudflared/ and fake-edge/ are (default ../shared).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shared="${MCP_TUNNEL_SHARED:-$(cd .. && pwd)/shared}"
for f in cloudflared/cloudflared cloudflared/cloudflared-2026.8.2 fake-edge/fake-edge; do
  [[ -x "$shared/$f" ]] || {
    echo "tests/real-cloudflared.sh: $shared/$f is missing. These tests need the real cloudflared and fake-edge: see README, \"The real cloudflared in tests\"." >&2
    exit 1
  }
done
[[ "$(id -u)" == 0 ]] || { echo "tests/real-cloudflared.sh: needs root (unshare -n)" >&2; exit 1; }
# Build on the host network (cargo may fetch), run in the namespace (offline).
cargo test --locked --test real_cloudflared --no-run
export MCP_TUNNEL_SHARED="$shared"
exec unshare -n bash -c '
  set -euo pipefail
  ip link set lo up
  if ip -o link show | grep -qv ": lo:"; then
    echo "refusing to run: this namespace has interfaces other than lo" >&2; exit 1
  fi
  run() { cargo test --locked --offline --test real_cloudflared -- --ignored "$@"; }
  if (($#)); then
    run --test-threads 4 "$@"
  else
    # The three-host run (three appliances, six cloudflared at times, 18 load clients) gets the
    # machine to itself: beside the other tests on 2 cores its replacements missed 60 s.
    run --test-threads 4 --skip three_hosts
    run --exact three_hosts_one_tunnel_roll_changes_and_survive_a_killed_host
  fi
' real-cloudflared "$@"
