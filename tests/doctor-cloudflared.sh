#!/usr/bin/env bash
# `mcp-tunnel doctor` and `status` against the real appliance: `mcp-tunnel run` supervising
# the REAL cloudflared (2026.8.2), registered with fake-edge, serving the demo's MCP server.
# A healthy setup must report every check ok (or skipped), with cloudflared's real version,
# its connector ID and four connections; then, with the edge gone, the connector and the
# edge checks must say so.
#
# cloudflared dials public addresses by itself, so everything here runs inside a fresh
# loopback-only network namespace (the script re-execs itself under `unshare -n`; root).
#
#   tests/doctor-cloudflared.sh          after `cargo build` (tests/all.sh builds it)
#
# Environment: MCP_TUNNEL (default target/debug/mcp-tunnel); MCP_TUNNEL_SHARED, where
# cloudflared/ and fake-edge/ are (default ../shared, as tests/real-cloudflared.sh), or
# CLOUDFLARED (default $MCP_TUNNEL_SHARED/cloudflared/cloudflared, the guarded test copy) and
# FAKE_EDGE (default $MCP_TUNNEL_SHARED/fake-edge/fake-edge); WORK (default: a new temporary
# directory, removed on success).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
shared="${MCP_TUNNEL_SHARED:-$(cd .. && pwd)/shared}"
MCP_TUNNEL=$(abs "${MCP_TUNNEL:-target/debug/mcp-tunnel}")
CLOUDFLARED=$(abs "${CLOUDFLARED:-$shared/cloudflared/cloudflared}")
FAKE_EDGE=$(abs "${FAKE_EDGE:-$shared/fake-edge/fake-edge}")
fail() { echo "FAIL: $*" >&2; exit 1; }
for v in MCP_TUNNEL CLOUDFLARED FAKE_EDGE; do
  [[ -x "${!v}" ]] || fail "$v=${!v} is not executable (build mcp-tunnel with cargo build; the other two: README, \"The real cloudflared in tests\")"
done
for tool in unshare ip python3 curl; do
  command -v "$tool" >/dev/null || fail "$tool is missing"
done

if [[ "${DOCTOR_CF_NETNS:-}" != 1 ]]; then
  [[ "$(id -u)" == 0 ]] || fail "needs root: it runs everything under unshare -n"
  export MCP_TUNNEL CLOUDFLARED FAKE_EDGE
  exec unshare -n env DOCTOR_CF_NETNS=1 bash "$here/$(basename "$0")" "$@"
fi
ip link set lo up
if ip -o link show | grep -qv ': lo:'; then
  fail "this network namespace has interfaces other than lo"
fi

WORK=${WORK:-$(mktemp -d -t doctor-cf.XXXXXX)}
mkdir -p "$WORK"
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ $rc == 0 ]]; then rm -rf "$WORK"; else echo "logs kept in $WORK" >&2; fi
}
trap cleanup EXIT
bg() { "$@" & pids+=($!); }
wait_for() { # SECONDS CMD...
  local n=$(($1 * 10)); shift
  until "$@" >/dev/null 2>&1; do
    n=$((n - 1)); ((n > 0)) || return 1; sleep 0.1
  done
}
# json FILE PYTHON-EXPR: evaluates EXPR with `d` = the JSON document, prints the result.
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }
check() { # FILE NAME: "verdict|reason" of one check
  python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
c=[c for c in d["checks"] if c["name"]==sys.argv[2]]
print(c[0]["verdict"]+"|"+c[0]["reason"] if c else "missing|")' "$1" "$2"
}
expect() { # FILE NAME VERDICT TEXT
  local got; got=$(check "$1" "$2")
  [[ "${got%%|*}" == "$3" ]] || fail "$2 is ${got%%|*}, expected $3: ${got#*|}"
  [[ "$got" == *"$4"* ]] || fail "$2 reason lacks '$4': ${got#*|}"
  echo "ok   $2 $3: ${got#*|}" | cut -c1-160
}

L=18080 A=19180 EYE=17880 CTL=17881
TOKEN='eyJhIjoiMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYiLCJ0IjoiNmZmNDJhZTItNzY1ZC00YWRmLTgxMTItMzFjNTVjMTU1MWVmIiwicyI6ImMyVmpjbVYwYzJWamNtVjBjMlZqY21WMGMyVmpjbVYwYzJWamNtVjBNVEk9In0='
EDGES=127.0.0.1:7844,127.0.0.1:7845,127.0.0.1:7846,127.0.0.1:7847

# The upstream: the demo's MCP server (rmcp); its line "sample MCP server ... http://ADDR/mcp".
bg "$MCP_TUNNEL" demo --port 0 --dir "$WORK/demo" >"$WORK/demo.out" 2>&1
wait_for 20 grep -q 'sample MCP server' "$WORK/demo.out" || fail "demo did not start: $(cat "$WORK/demo.out")"
UPSTREAM=$(sed -n 's|.*sample MCP server.*http://\([0-9.:]*\)/mcp.*|\1|p' "$WORK/demo.out")

(cd "$WORK" && exec "$FAKE_EDGE" -pki pki -eyeball 127.0.0.1:$EYE -control 127.0.0.1:$CTL 2>edge.log) &
edge_pid=$!; pids+=($edge_pid)
wait_for 10 curl -sf "127.0.0.1:$CTL/status" || fail "fake-edge did not start: $(cat "$WORK/edge.log")"

"$MCP_TUNNEL" certs init --tunnel-domain t.example.test --dir "$WORK/certs" >/dev/null
printf '%s\n' "$TOKEN" >"$WORK/token"; chmod 600 "$WORK/token"
cat >"$WORK/mcp-tunnel.toml" <<EOF
listen_addr = "127.0.0.1:$L"
tunnel_domain = "t.example.test"
shutdown_timeout = "5s"
[tls]
cert_file = "$WORK/certs/tls.crt"
key_file = "$WORK/certs/tls.key"
[routes]
hello = "http://$UPSTREAM"
[upstream]
allowed_ips = ["127.0.0.0/8"]
[admin]
listen_addr = "127.0.0.1:$A"
[cloudflared]
binary = "$CLOUDFLARED"
token_file = "$WORK/token"
health_interval = "200ms"
[cloudflared.env]
TUNNEL_TRANSPORT_PROTOCOL = "http2"
TUNNEL_EDGE = "$EDGES"
TUNNEL_CACERT = "$WORK/pki/ca.crt"
TUNNEL_NO_PRECHECKS = "true"
EOF
WATCHDOG_USEC=10000000 bg "$MCP_TUNNEL" run --config "$WORK/mcp-tunnel.toml" 2>"$WORK/run.log"
connected() { curl -s "127.0.0.1:$A/status" | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["cloudflared"]["connections"] != 4)'; }
wait_for 40 connected || fail "cloudflared did not register 4 connections: $(tail -20 "$WORK/run.log")"
echo "== run + real cloudflared: 4/4 connections"

echo "== doctor (not offline: the edge check dials the static TUNNEL_EDGE addresses on loopback)"
rc=0; "$MCP_TUNNEL" doctor --config "$WORK/mcp-tunnel.toml" --json >"$WORK/doctor.json" || rc=$?
"$MCP_TUNNEL" doctor --config "$WORK/mcp-tunnel.toml" >"$WORK/doctor.txt" || true
cat "$WORK/doctor.txt"
[[ $rc == 0 ]] || fail "doctor exited $rc on a healthy setup"
bad=$(json "$WORK/doctor.json" '[c["name"]+": "+c["reason"] for c in d["checks"] if c["verdict"] not in ("ok","skip")]')
[[ "$bad" == "[]" ]] || fail "not all ok: $bad"
expect "$WORK/doctor.json" cloudflared.version ok "cloudflared version 2026.8.2"
expect "$WORK/doctor.json" cloudflared.flags ok "run --url http://127.0.0.1:$L"
expect "$WORK/doctor.json" cloudflared.token ok "names tunnel 6ff42ae2-765d-4adf-8112-31c55c1551ef"
expect "$WORK/doctor.json" cloudflared.connector ok "connected: 4/4 edge connections"
expect "$WORK/doctor.json" cloudflared.connector ok "cloudflared 2026.8.2"
expect "$WORK/doctor.json" cloudflared.edge ok "static edge from [cloudflared.env] TUNNEL_EDGE"
expect "$WORK/doctor.json" route.hello.mcp ok "server rmcp"
expect "$WORK/doctor.json" service.cloudflared ok "connected 4/4"
expect "$WORK/doctor.json" service.watchdog ok "WatchdogSec=10s"
via=$(json "$WORK/doctor.json" '[c["facts"]["via"] for c in d["checks"] if c["name"]=="route.hello.mcp"][0]')
[[ "$via" == "the running listener ws://127.0.0.1:$L" ]] || fail "probe went via: $via"
# The connector ID doctor reports is the one cloudflared registered with the edge.
connector=$(json "$WORK/doctor.json" '[c["facts"]["connector_id"] for c in d["checks"] if c["name"]=="cloudflared.connector"][0]')
grep -q "connector=$connector " "$WORK/edge.log" || fail "connector $connector not in fake-edge's registrations"
echo "ok   connector $connector registered with the edge"

rc=0; "$MCP_TUNNEL" doctor --config "$WORK/mcp-tunnel.toml" --offline --json >"$WORK/offline.json" || rc=$?
[[ $rc == 0 ]] || fail "doctor --offline exited $rc"
expect "$WORK/offline.json" cloudflared.edge skip "--offline"

# Without a static edge, the check does what cloudflared does first: the SRV lookup. In this
# namespace DNS cannot work, so it is reported (warn), never required (exit 0).
mkdir -p "$WORK/srv"
grep -v '^TUNNEL_EDGE' "$WORK/mcp-tunnel.toml" >"$WORK/srv/mcp-tunnel.toml"
rc=0; "$MCP_TUNNEL" doctor --config "$WORK/srv/mcp-tunnel.toml" --json >"$WORK/srv.json" || rc=$?
[[ $rc == 0 ]] || fail "doctor exited $rc when only the edge is unreachable"
expect "$WORK/srv.json" cloudflared.edge warn "DNS SRV _v2-origintunneld._tcp.argotunnel.com failed"

echo "== status"
"$MCP_TUNNEL" status --admin 127.0.0.1:$A | tee "$WORK/status.txt"
grep -q "cloudflared 2026.8.2, connector $connector, 4/4 connections" "$WORK/status.txt" || fail "status lacks cloudflared facts"
grep -Eq '^  hello +[0-9]+ +0$' "$WORK/status.txt" || fail "status lacks the per-route row"
grep -Eq 'certificate expires in (89|90) days' "$WORK/status.txt" || fail "status lacks the certificate's days"
if grep -Eq '(^| )-0([ ,]|$)' "$WORK/status.txt"; then fail "status prints a negative zero"; fi

echo "== the edge goes away: doctor reports the connector and the edge"
kill "$edge_pid"; wait "$edge_pid" 2>/dev/null || true
gone() { curl -s "127.0.0.1:$A/status" | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["cloudflared"]["state"] != "disconnected")'; }
wait_for 30 gone || fail "cloudflared never reported the lost connections"
rc=0; "$MCP_TUNNEL" doctor --config "$WORK/mcp-tunnel.toml" --json >"$WORK/gone.json" || rc=$?
[[ $rc == 1 ]] || fail "doctor exited $rc with the edge gone (expected 1)"
expect "$WORK/gone.json" cloudflared.connector fail "disconnected: 0/4 edge connections"
expect "$WORK/gone.json" cloudflared.edge warn "not reachable"
expect "$WORK/gone.json" service.cloudflared fail "no edge connection"
expect "$WORK/gone.json" route.hello.mcp ok "server rmcp"
echo "PASS doctor-cloudflared"
