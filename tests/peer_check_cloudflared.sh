#!/usr/bin/env bash
# The listener's peer check (issue 17) with the REAL cloudflared, end to end, all inside a
# loopback-only network namespace:
#
#   MCP SDK clients (TypeScript; Python over HTTP/1.1 and h2) --TLS--> mcp-tunnel bridge
#     --WebSocket--> fake-edge --http2--> real cloudflared (spawned by `mcp-tunnel run`, as
#     the service's user) --WebSocket--> listener (peer check on, its default) --> server-everything
#
# The service runs as a dedicated non-root UID, as the packaged unit does. Checks: 4/4 edge
# connections; /readyz and `check` say who may connect; the SDK clients pass (initialize,
# tools, progress notifications streamed over SSE one by one, DELETE), so the real
# cloudflared got through the check; a `bridge` started with `setpriv --reuid=nobody`, and
# one started as root, straight to the listener, are refused before the upgrade, each with
# a log line naming its UID and a count in mcp_tunnel_peer_refusals_total; the clients still
# pass afterwards; SIGTERM ends the service with status 0.
#
#   bash tests/peer_check_cloudflared.sh      (as root: unshare -n, setpriv)
#
# Environment: MCP_TUNNEL_BIN (default target/debug/mcp-tunnel), CLOUDFLARED (default
# ../shared/cloudflared/cloudflared beside the repository: the guard script that runs the
# real binary only in a loopback-only namespace), FAKE_EDGE (default
# ../shared/fake-edge/fake-edge), KEEP=1 keeps the work folder.
# Needs: node + npm, python3 with venv (the e2e clients' packages are installed into
# tests/e2e as tests/e2e/run.sh does), curl, setpriv, ip, unshare; about 30 s.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
E2E="$HERE/e2e"
abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$REPO" "$1" ;; esac; }
BIN="$(abspath "${MCP_TUNNEL_BIN:-target/debug/mcp-tunnel}")"
CLOUDFLARED="$(abspath "${CLOUDFLARED:-../shared/cloudflared/cloudflared}")"
FAKE_EDGE="$(abspath "${FAKE_EDGE:-../shared/fake-edge/fake-edge}")"
DOMAIN=tunnel.test
ROUTE=everything
SVC_UID=4242 # the service's user: no passwd entry needed
NOBODY=65534
# Fixed ports: the namespace has its own loopback.
L=18080 A=19180 E=17880 B=18443 NB=18444 RB=18445 U=19000

die() { printf 'FAIL peer-check setup: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- outside the namespace
if [[ "${PEER_CHECK_IN_NETNS:-}" != 1 ]]; then
  [[ $EUID -eq 0 ]] || die "run as root (unshare -n, setpriv)"
  for tool in node npm python3 curl setpriv ip unshare getent; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
  done
  [[ -x "$BIN" ]] || die "mcp-tunnel binary not found at $BIN (cargo build, or set MCP_TUNNEL_BIN)"
  [[ -x "$CLOUDFLARED" ]] || die "cloudflared not found at $CLOUDFLARED (set CLOUDFLARED to the guard script beside cloudflared-2026.8.2)"
  [[ -x "$FAKE_EDGE" ]] || die "fake-edge not found at $FAKE_EDGE (set FAKE_EDGE)"
  # The clients' packages, as tests/e2e/run.sh installs them (needs the registries, so here).
  cd "$E2E"
  if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
    npm ci --no-audit --no-fund --loglevel=error >/dev/null || die "npm ci failed"
  fi
  if [[ ! -x .venv/bin/python || requirements.txt -nt .venv/.installed ]]; then
    python3 -m venv --clear .venv || die "python3 -m venv failed"
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt || die "pip install failed"
    touch .venv/.installed
  fi
  host="$ROUTE.$DOMAIN"
  if [[ "$(getent ahostsv4 "$host" | awk 'NR==1{print $1}')" != 127.0.0.1 ]]; then
    printf '127.0.0.1 %s\n' "$host" >>/etc/hosts
  fi
  export MCP_TUNNEL_BIN="$BIN" CLOUDFLARED FAKE_EDGE
  exec unshare -n env PEER_CHECK_IN_NETNS=1 bash "$HERE/$(basename "${BASH_SOURCE[0]}")" "$@"
fi

# ---------------------------------------------------------------- inside: lo only
ip link set lo up
if ip -o link show | grep -qv ': lo:'; then
  die "refusing to run: this namespace has interfaces other than lo"
fi

PASSED=0 FAILED=0 PIDS=()
WORK="$(mktemp -d /tmp/mcp-tunnel-peer-check.XXXXXX)"
cleanup() {
  local rc=$? pid
  trap - EXIT
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ $rc -ne 0 || "${KEEP:-}" == 1 ]]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
log() { printf '[peer-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
check() { # check NAME CMD...: PASS/FAIL, never aborts
  local name=$1 rc=0; shift
  "$@" || rc=$?
  if [[ $rc -eq 0 ]]; then PASSED=$((PASSED + 1)); echo "PASS $name"; else FAILED=$((FAILED + 1)); echo "FAIL $name"; fi
}
start() { # start NAME CMD...
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}
wait_for() { # wait_for SECONDS CMD...
  local t=$1; shift
  for _ in $(seq 1 $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
listening() { ss -Hltn "sport = :$1" | grep -q .; }
readyz() { curl -s "127.0.0.1:$A/readyz"; }
metric() { curl -s "127.0.0.1:$A/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
OTHER_USER='mcp_tunnel_peer_refusals_total{reason="other_user"}'

# Binaries where every user may run them (a checkout under /root is not).
chmod 0755 "$WORK"
mkdir -m 0755 "$WORK/bin"
install -m 0755 "$BIN" "$WORK/bin/mcp-tunnel"
install -m 0755 "$CLOUDFLARED" "$WORK/bin/cloudflared"
install -m 0755 "$(dirname "$CLOUDFLARED")/cloudflared-2026.8.2" "$WORK/bin/cloudflared-2026.8.2"
MT="$WORK/bin/mcp-tunnel"
# Arrays, not functions: a backgrounded function is a subshell, and $! would be its PID.
AS_SERVICE=(setpriv --reuid="$SVC_UID" --regid="$SVC_UID" --clear-groups)
AS_NOBODY=(setpriv --reuid="$NOBODY" --regid="$NOBODY" --clear-groups)

log "work folder $WORK"
"$MT" certs init --tunnel-domain "$DOMAIN" --dir "$WORK/certs" >"$WORK/certs-init.log"
TOKEN='eyJhIjoiMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYiLCJ0IjoiNmZmNDJhZTItNzY1ZC00YWRmLTgxMTItMzFjNTVjMTU1MWVmIiwicyI6ImMyVmpjbVYwYzJWamNtVjBjMlZqY21WMGMyVmpjbVYwYzJWamNtVjBNVEk9In0='
printf '%s\n' "$TOKEN" >"$WORK/certs/tunnel-token"
chown -R "$SVC_UID:$SVC_UID" "$WORK/certs"
chmod 0600 "$WORK/certs/tunnel-token" "$WORK/certs/tls.key" "$WORK/certs/ca.key"
cat >"$WORK/mcp-tunnel.toml" <<EOF
listen_addr = "127.0.0.1:$L"
tunnel_domain = "$DOMAIN"
shutdown_timeout = "5s"
[tls]
cert_file = "$WORK/certs/tls.crt"
key_file = "$WORK/certs/tls.key"
[routes]
$ROUTE = "http://127.0.0.1:$U"
[upstream]
allowed_ips = ["127.0.0.0/8"]
[cloudflared]
binary = "$WORK/bin/cloudflared"
token_file = "$WORK/certs/tunnel-token"
grace_period = "2s"
health_interval = "1s"
[cloudflared.env]
TUNNEL_TRANSPORT_PROTOCOL = "http2"
TUNNEL_EDGE = "127.0.0.1:7844,127.0.0.1:7845,127.0.0.1:7846,127.0.0.1:7847"
TUNNEL_CACERT = "$WORK/pki/ca.crt"
[admin]
listen_addr = "127.0.0.1:$A"
# [peer_check] left at its default: on (cloudflared supervised, loopback listener).
EOF

start everything env PORT="$U" node "$E2E/node_modules/@modelcontextprotocol/server-everything/dist/index.js" streamableHttp
start fake-edge "$FAKE_EDGE" -pki "$WORK/pki" -eyeball "127.0.0.1:$E" -quiet
wait_for 10 listening "$E" || die "fake-edge did not listen on $E: $(tail -5 "$WORK/fake-edge.log")"
wait_for 10 listening "$U" || die "server-everything did not listen on $U"
chmod a+rx "$WORK/pki" && chmod a+r "$WORK/pki/ca.crt"

check_cmd() {
  local out
  out="$("${AS_SERVICE[@]}" "$MT" check --config "$WORK/mcp-tunnel.toml" 2>&1)" || { echo "$out"; return 1; }
  echo "  $(grep 'peer check' <<<"$out")"
  grep -q "peer check: on, the listener serves uid $SVC_UID only" <<<"$out"
}
check "check (as the service's user): peer check on, uid $SVC_UID only, NETLINK_SOCK_DIAG answers" check_cmd

start mcp-tunnel "${AS_SERVICE[@]}" "$MT" run --config "$WORK/mcp-tunnel.toml"
RUN_PID=${PIDS[-1]}
connected() { readyz | grep -q 'connected 4/4'; }
if ! wait_for 40 connected; then
  tail -30 "$WORK/mcp-tunnel.log"; die "cloudflared not connected 4/4 within 40 s: $(readyz)"
fi
log "readyz: $(readyz)"

users() {
  local cf run_uid cf_uid
  cf="$(pgrep -f "^$WORK/bin/cloudflared-2026.8.2" | head -n1)"
  run_uid="$(ps -o uid= -p "$(pgrep -f "^$MT run" | head -n1)" | tr -d ' ')"
  cf_uid="$(ps -o uid= -p "$cf" | tr -d ' ')"
  echo "  run uid $run_uid, real cloudflared (pid $cf) uid $cf_uid"
  [[ "$run_uid" == "$SVC_UID" && "$cf_uid" == "$SVC_UID" ]]
}
check "mcp-tunnel run and the real cloudflared it spawned run as uid $SVC_UID" users
readyz_says() {
  readyz | grep -q "\"name\":\"peer_check\",\"ready\":true,\"state\":\"on: uid $SVC_UID only\""
}
check "/readyz: peer_check on: uid $SVC_UID only" readyz_says

start bridge "$MT" bridge --listen "127.0.0.1:$B" --to "ws://127.0.0.1:$E"
wait_for 5 listening "$B" || die "bridge did not listen"
URL="https://$ROUTE.$DOMAIN:$B/mcp"
PY="$E2E/.venv/bin/python"
clients() { # clients LABEL
  check "ts-client through fake-edge + real cloudflared, check on ($1)" \
    env NODE_EXTRA_CA_CERTS="$WORK/certs/ca.crt" timeout 90 node "$E2E/ts_client.mjs" "$URL" "cf-$1"
  check "py-client HTTP/1.1 through fake-edge + real cloudflared, check on ($1)" \
    timeout 90 "$PY" "$E2E/py_client.py" "$URL" --label "cf-$1" --ca "$WORK/certs/ca.crt"
  check "py-client h2 through fake-edge + real cloudflared, check on ($1)" \
    timeout 90 "$PY" "$E2E/py_client.py" "$URL" --label "cf-$1-h2" --ca "$WORK/certs/ca.crt" --http2
}
clients before
served_none_refused() { [[ "$(metric "$OTHER_USER")" == 0 ]]; }
check "no refusals while only cloudflared connected ($OTHER_USER $(metric "$OTHER_USER"))" served_none_refused

refused() { # refused NAME PORT UID EXPECTED_COUNT: a bridge of that user straight to the listener
  local name=$1 port=$2 uid=$3 want=$4 out rc=0
  out="$(curl -sS --max-time 10 --cacert "$WORK/certs/ca.crt" \
    --resolve "$ROUTE.$DOMAIN:$port:127.0.0.1" -H 'content-type: application/json' \
    -H 'accept: application/json, text/event-stream' \
    -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"intruder","version":"0"}}}' \
    "https://$ROUTE.$DOMAIN:$port/mcp" 2>&1)" || rc=$?
  echo "  curl through $name's bridge: exit $rc: $(head -c 200 <<<"$out")"
  [[ $rc -ne 0 ]] || return 1
  wait_for 5 grep -q "refused listener connection.*peer_uid=$uid " "$WORK/mcp-tunnel.log" || { echo "  no log line for uid $uid"; return 1; }
  echo "  log: $(grep "refused listener connection.*peer_uid=$uid " "$WORK/mcp-tunnel.log" | head -n1 | cut -c1-260)"
  local n; n="$(metric "$OTHER_USER")"
  echo "  $OTHER_USER $n"
  [[ "$n" == "$want" ]]
}
start bridge-nobody "${AS_NOBODY[@]}" "$MT" bridge --listen "127.0.0.1:$NB" --to "ws://127.0.0.1:$L"
start bridge-root "$MT" bridge --listen "127.0.0.1:$RB" --to "ws://127.0.0.1:$L"
wait_for 5 listening "$NB" && wait_for 5 listening "$RB" || die "the direct bridges did not listen"
nobody_bridge_uid() { [[ "$(ps -o uid= -p "$(pgrep -f "bridge --listen 127.0.0.1:$NB" | head -n1)" | tr -d ' ')" == "$NOBODY" ]]; }
check "the setpriv --reuid=nobody bridge runs as uid $NOBODY" nobody_bridge_uid
check "bridge as nobody straight to the listener: refused, logged with peer_uid=$NOBODY, counted" refused nobody "$NB" "$NOBODY" 1
check "bridge as root straight to the listener: refused (allow_root is off), logged with peer_uid=0, counted" refused root "$RB" 0 2
clients after
status_says() {
  local out; out="$("$MT" status --admin "127.0.0.1:$A")"
  sed 's/^/  /' <<<"$out"
  grep -q "peer_check   ready     on: uid $SVC_UID only" <<<"$out" \
    && grep -q 'refused by the peer check: 2 from other users, 0 of unknown owner' <<<"$out"
}
check "status names who may connect and counts the refusals" status_says

stop() {
  local rc=0
  kill -TERM "$RUN_PID"; wait "$RUN_PID" || rc=$?
  echo "  mcp-tunnel run exited with status $rc"
  [[ $rc -eq 0 ]]
}
check "SIGTERM: run stops cloudflared and exits 0" stop

echo "peer check with the real cloudflared: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
