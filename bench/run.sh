#!/usr/bin/env bash
# Benchmarks: this proxy against two baselines terminating TLS to the same upstream (nginx
# with proxy_pass, HAProxy) and against the client talking to the upstream directly, side by
# side in one run, on loopback. Writes BENCHMARKS.md.
#
#   bench/run.sh            full run (about 23 minutes plus the release build)
#   bench/run.sh --smoke    every scenario briefly (about 30 s, debug build): exercises every
#                           path, fails on any error; writes target/bench-smoke/BENCHMARKS.md
#
# Needs: root, cargo, nginx and haproxy (installed with apt-get when missing), the real cloudflared
# 2026.8.2 and fake-edge from ../shared (scenario (f); README, "The real cloudflared in tests",
# says how to obtain them). After the build, the script re-runs itself in a fresh loopback-only
# network namespace (unshare -n): cloudflared dials public addresses by itself, so every
# process of the run stays on a loopback that leads nowhere.
# Environment: BENCH_PORT_BASE (default 18700; eleven ports from it are used, in the namespace),
#              BENCH_OUT (where BENCHMARKS.md goes), BENCH_PROFILE (cargo profile: release
#              for full runs, dev for smoke runs), BENCH_KEEP=1 keeps the work directory,
#              MCP_TUNNEL_SHARED (folder holding cloudflared/ and fake-edge/; default ../shared),
#              BENCH_WS_CLIENT (the load generator's WebSocket client for ws:// targets: lean,
#              the default, or tungstenite), CARGO_TARGET_DIR (where the binaries are built).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

MODE=full
case "${1:-}" in
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: bench/run.sh [--smoke]" >&2; exit 2 ;;
esac

if [[ $MODE == smoke ]]; then
  PROFILE=${BENCH_PROFILE:-dev}
  ROUNDS=1 WARMUP=200ms DUR=1s
  SSE_STREAMS=(1 50) SSE_WARMUP=700ms SSE_DUR=1s SSE_RATE=20
  IDLE_STEPS=20,100 SETTLE=300ms
  CHURN_DUR=4s RELOAD_EVERY=500ms ROTATE_EVERY=1500ms RECONNECT_EVERY=20
  READY_RUNS=2
  LOOKUPS=2000
  CF_LEVELS=(1 16 64)
  OUT=${BENCH_OUT:-$ROOT/target/bench-smoke/BENCHMARKS.md}
else
  PROFILE=${BENCH_PROFILE:-release}
  SETTLE=2s
  # Five rounds per figure, interleaved; 4 s measured keeps the run near 23 minutes with
  # two baselines (sessions are open and warm before the warm-up starts).
  ROUNDS=5 WARMUP=500ms DUR=4s
  SSE_STREAMS=(1 1000) SSE_WARMUP=3s SSE_DUR=4s SSE_RATE=10
  IDLE_STEPS=1000,10000
  CHURN_DUR=30s RELOAD_EVERY=1s ROTATE_EVERY=5s RECONNECT_EVERY=50
  READY_RUNS=10
  LOOKUPS=100000
  CF_LEVELS=(1 16 64)
  OUT=${BENCH_OUT:-$ROOT/BENCHMARKS.md}
fi
BASE=${BENCH_PORT_BASE:-18700}
UP_PORT=$BASE NGINX_PORT=$((BASE + 1)) PROXY_PORT=$((BASE + 2))
READY_PROXY_PORT=$((BASE + 3)) READY_NGINX_PORT=$((BASE + 4))
PEER_CHECK_PORT=$((BASE + 9)) HAPROXY_PORT=$((BASE + 10))
# (f): the proxy that runs the real cloudflared, its admin endpoint, fake-edge's eyeball and
# control ports (fake-edge's 4 tunnel listeners are 7844-7847 of the namespace's lo).
CF_PROXY_PORT=$((BASE + 5)) CF_ADMIN_PORT=$((BASE + 6))
EYEBALL_PORT=$((BASE + 7)) EDGE_CONTROL_PORT=$((BASE + 8))
SHARED=${MCP_TUNNEL_SHARED:-$(cd "$ROOT/.." && pwd)/shared}
CLOUDFLARED=$SHARED/cloudflared/cloudflared   # the guard script: runs only in a lo-only netns
FAKE_EDGE=$SHARED/fake-edge/fake-edge
DOMAIN=bench.test NAME=echo.bench.test

step() { printf '\n==> %s\n' "$*" >&2; }
T_START=${BENCH_T_START:-$(date +%s)}

for f in "$CLOUDFLARED" "$SHARED/cloudflared/cloudflared-2026.8.2" "$FAKE_EDGE"; do
  if [[ ! -x $f ]]; then
    echo "bench/run.sh: $f is missing: scenario (f) needs the real cloudflared 2026.8.2 and fake-edge (README, \"The real cloudflared in tests\", says how to obtain them); set MCP_TUNNEL_SHARED to the folder holding cloudflared/ and fake-edge/" >&2
    exit 1
  fi
done
if [[ ${BENCH_IN_NETNS:-} != 1 ]]; then
  [[ $(id -u) == 0 ]] || { echo "bench/run.sh: needs root (it runs in its own network namespace, unshare -n)" >&2; exit 1; }
  for tool in unshare ip pgrep; do
    command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool not found" >&2; exit 1; }
  done
fi

# --- tools -----------------------------------------------------------------------------
if ! command -v nginx >/dev/null; then
  step "installing nginx (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq nginx >/dev/null
fi
NGINX=$(command -v nginx)
if ! command -v haproxy >/dev/null; then
  step "installing haproxy (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq haproxy >/dev/null
fi
HAPROXY=$(command -v haproxy)
WS_CLIENT=${BENCH_WS_CLIENT:-lean}

if [[ ${BENCH_IN_NETNS:-} != 1 ]]; then
  step "building binaries (profile $PROFILE)"
  T_BUILD=$(date +%s)
  cargo build --profile "$PROFILE" --locked -p mcp-tunnel -p mcp-tunnel-bench >&2
  # (h) runs the three-host test of tests/real_cloudflared.rs; build it on the host network.
  [[ $MODE == full ]] && cargo test --locked --test real_cloudflared --no-run >&2
  BUILD_SECS=$(($(date +%s) - T_BUILD))
  # --- everything else in a loopback-only network namespace ------------------------------
  step "re-running in a new loopback-only network namespace (unshare -n)"
  export BENCH_T_START=$T_START BENCH_BUILD_SECS=$BUILD_SECS MCP_TUNNEL_SHARED=$SHARED
  exec unshare -n env BENCH_IN_NETNS=1 "$ROOT/bench/run.sh" "$@"
fi
ip link set lo up
if ip -o link show | grep -qv ': lo:'; then
  echo "bench/run.sh: refusing to run cloudflared: this network namespace has interfaces other than lo" >&2
  exit 1
fi
BUILD_SECS=${BENCH_BUILD_SECS:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
BIN_DIR=$TARGET_DIR/$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")
TUNNEL=$BIN_DIR/mcp-tunnel
BENCH=$BIN_DIR/mcp-tunnel-bench

# --- workspace and cleanup -------------------------------------------------------------
WORK=$(mktemp -d /tmp/mcp-tunnel-bench.XXXXXX)
# Logs live apart from the configs and certificates: the proxy watches those directories,
# and a log written next to them would wake its file watcher on every request (measured:
# twice the proxy's CPU per request).
LOGS=$WORK/logs
mkdir -p "$LOGS"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
PIDS=()
UP_PID="" NGINX_PID="" HAPROXY_PID="" PROXY_PID="" CF_RUN_PID="" CF_PID="" EDGE_PID=""
cleanup() {
  local pid
  # `run` stops its cloudflared first; fake-edge goes last.
  for pid in "${PIDS[@]}" $UP_PID $NGINX_PID $HAPROXY_PID $PROXY_PID $CF_RUN_PID $CF_PID $EDGE_PID; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}" $UP_PID $NGINX_PID $HAPROXY_PID $PROXY_PID $CF_RUN_PID $CF_PID $EDGE_PID; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n ${BENCH_KEEP:-} ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port
  local i
  for i in $(seq 1 500); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.01
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# --- certificates, configs -------------------------------------------------------------
"$TUNNEL" certs init --tunnel-domain "$DOMAIN" --dir "$WORK/pki" >/dev/null
mkdir -p "$WORK/nginx/tmp"
cp "$WORK/pki/tls.crt" "$WORK/pki/tls.key" "$WORK/nginx/"
CA=$WORK/pki/ca.crt

proxy_config() { # port file
  cat >"$2" <<EOF
listen_addr = "127.0.0.1:$1"
log_level = "info"
shutdown_timeout = "5s"
tunnel_domain = "$DOMAIN"

[tls]
cert_file = "$WORK/pki/tls.crt"
key_file = "$WORK/pki/tls.key"

[routes]
echo = "http://127.0.0.1:$UP_PORT"
# (i): the same upstream with MCP inspection (audit + metrics), and with a tool policy.
inspect = { upstream = "http://127.0.0.1:$UP_PORT", inspect = true }
policy = { upstream = "http://127.0.0.1:$UP_PORT", tools_deny = ["never-called"] }

[upstream]
allowed_ips = ["127.0.0.0/8"]

[cloudflared]
enabled = false
EOF
  if grep -q '\[admin\]' "$ROOT/config/mcp-tunnel.toml"; then
    printf '\n[admin]\nenabled = false\n' >>"$2"
  fi
}
proxy_config "$PROXY_PORT" "$WORK/proxy.toml"
proxy_config "$READY_PROXY_PORT" "$WORK/proxy-ready.toml"
# (f): the same proxy with the listener's peer check on (off above: no cloudflared here).
proxy_config "$PEER_CHECK_PORT" "$WORK/proxy-peer-check.toml"
printf '\n[peer_check]\nenabled = true\n' >>"$WORK/proxy-peer-check.toml"

nginx_config() { # port file pidfile
  cat >"$2" <<EOF
worker_processes auto;
worker_rlimit_nofile 30000;
daemon off;
pid $3;
error_log $LOGS/nginx-error.log warn;
events { worker_connections 25000; }
http {
    access_log $LOGS/nginx-access.log;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    keepalive_timeout 1h;
    keepalive_requests 10000000;
    upstream bench_upstream {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 1h;
    }
    server {
        listen 127.0.0.1:$1 ssl;
        server_name $NAME;
        ssl_certificate $WORK/nginx/tls.crt;
        ssl_certificate_key $WORK/nginx/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }
    }
}
EOF
}
nginx_config "$NGINX_PORT" "$WORK/nginx/nginx.conf" "$WORK/nginx/nginx.pid"
nginx_config "$READY_NGINX_PORT" "$WORK/nginx/nginx-ready.conf" "$WORK/nginx/nginx-ready.pid"
"$NGINX" -t -q -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf"

# HAProxy: the same TLS termination in front of the same upstream, one thread per core,
# upstream connections kept and shared (`http-reuse always`), its request log on as nginx's
# access log is (to a file, through stdout).
mkdir -p "$WORK/haproxy"
cat "$WORK/pki/tls.crt" "$WORK/pki/tls.key" >"$WORK/haproxy/tls.pem"
HAPROXY_CFG=$WORK/haproxy/haproxy.cfg
cat >"$HAPROXY_CFG" <<EOF
global
    nbthread $(nproc)
    # (b) holds 1,000 streams (two descriptors each); the hard limit here is 20,000.
    maxconn 8000
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    http-reuse always
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-keep-alive 1h
    timeout http-request 10s

frontend tls
    bind 127.0.0.1:$HAPROXY_PORT ssl crt $WORK/haproxy/tls.pem alpn http/1.1 ssl-min-ver TLSv1.3
    default_backend upstream

backend upstream
    server up 127.0.0.1:$UP_PORT
EOF
"$HAPROXY" -c -q -f "$HAPROXY_CFG"

start_upstream() {
  "$BENCH" upstream --listen "127.0.0.1:$UP_PORT" 2>"$LOGS/upstream.log" &
  UP_PID=$!
  wait_port "$UP_PORT"
}
start_nginx() {
  "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" 2>>"$LOGS/nginx-stderr.log" &
  NGINX_PID=$!
  wait_port "$NGINX_PORT"
}
start_haproxy() {
  "$HAPROXY" -f "$HAPROXY_CFG" >>"$LOGS/haproxy-access.log" 2>>"$LOGS/haproxy-stderr.log" &
  HAPROXY_PID=$!
  wait_port "$HAPROXY_PORT"
  # Its CPU is read as that process with its direct children: make sure that is every
  # process HAProxy runs (one process with nbthread threads, or a master and its worker).
  local p ppid
  for p in $(pgrep -f "haproxy -f $HAPROXY_CFG"); do
    ppid=$(awk '{print $4}' "/proc/$p/stat")
    if [[ $p != "$HAPROXY_PID" && $ppid != "$HAPROXY_PID" ]]; then
      echo "haproxy process $p is neither $HAPROXY_PID nor its child: its CPU would go unread" >&2
      exit 1
    fi
  done
}
start_proxy() {
  "$TUNNEL" run --config "$WORK/proxy.toml" 2>>"$LOGS/proxy.log" &
  PROXY_PID=$!
  wait_port "$PROXY_PORT"
}
stop_pid() { # pid
  [[ -n $1 ]] || return 0
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# The targets: name and load arguments. proxy-tungstenite is the proxy reached through the
# load generator's other WebSocket client (scenario (w), the client's own cost).
WS="--ws-client $WS_CLIENT"
declare -A TARGET_ARGS=(
  [direct]="--target http://127.0.0.1:$UP_PORT"
  [nginx]="--target https://127.0.0.1:$NGINX_PORT --server-name $NAME --host $NAME --ca $CA"
  [haproxy]="--target https://127.0.0.1:$HAPROXY_PORT --server-name $NAME --host $NAME --ca $CA"
  [proxy]="--target ws://127.0.0.1:$PROXY_PORT --server-name $NAME --host $NAME --ca $CA $WS"
  [proxy-lean]="--target ws://127.0.0.1:$PROXY_PORT --server-name $NAME --host $NAME --ca $CA --ws-client lean"
  [proxy-tungstenite]="--target ws://127.0.0.1:$PROXY_PORT --server-name $NAME --host $NAME --ca $CA --ws-client tungstenite"
  [proxy-inspect]="--target ws://127.0.0.1:$PROXY_PORT --server-name inspect.$DOMAIN --host inspect.$DOMAIN --ca $CA $WS"
  [proxy-policy]="--target ws://127.0.0.1:$PROXY_PORT --server-name policy.$DOMAIN --host policy.$DOMAIN --ca $CA $WS"
)
# Round N runs the targets in this order rotated by N-1, so that none always goes first.
rotated() { # round target...
  local n=$(($1 - 1)) list
  shift
  list=("$@")
  n=$((n % ${#list[@]}))
  echo "${list[@]:n}" "${list[@]:0:n}"
}
BASELINE_TARGETS=(direct nginx haproxy proxy)

load() { # target scenario round args...
  local target=$1 scenario=$2 round=$3 pid=()
  shift 3
  # The process whose CPU per request (post) or RSS (idle) is read: nginx, HAProxy or the
  # proxy, each with its direct children.
  [[ $target == nginx ]] && pid=(--pid "$NGINX_PID")
  [[ $target == haproxy ]] && pid=(--pid "$HAPROXY_PID")
  [[ $target == proxy* ]] && pid=(--pid "$PROXY_PID")
  # shellcheck disable=SC2086
  "$BENCH" load --name "$target" --scenario "$scenario" --round "$round" ${TARGET_ARGS[$target]} "${pid[@]}" "$@" \
    | tee -a "$RESULTS" >&2
}

# --- (e) time to READY=1 ---------------------------------------------------------------
start_upstream
step "(e) start to READY=1, $READY_RUNS runs each"
"$BENCH" ready --name mcp-tunnel --probe "127.0.0.1:$READY_PROXY_PORT" --runs "$READY_RUNS" --notify \
  -- "$TUNNEL" run --config "$WORK/proxy-ready.toml" | tee -a "$RESULTS" >&2
"$BENCH" ready --name nginx --probe "127.0.0.1:$READY_NGINX_PORT" --runs "$READY_RUNS" \
  -- "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx-ready.conf" | tee -a "$RESULTS" >&2

start_nginx
start_haproxy
start_proxy

# --- (a) tools/call ----------------------------------------------------------------------
for path in /mcp /mcp-sse; do
  levels=(1 16 64)
  for sessions in "${levels[@]}"; do
    step "(a) tools/call $path, $sessions sessions, $ROUNDS rounds"
    for round in $(seq 1 "$ROUNDS"); do
      for target in $(rotated "$round" "${BASELINE_TARGETS[@]}"); do
        load "$target" a "$round" --mode post --path "$path" --sessions "$sessions" \
          --warmup "$WARMUP" --duration "$DUR"
      done
    done
  done
done

# --- (i) tools/call with MCP inspection off, on, and with a tool policy ----------------
# The same proxy and upstream; routes differ only in their MCP settings (see proxy_config).
for path in /mcp /mcp-sse; do
  step "(i) tools/call $path with MCP inspection off / inspect / policy, 16 sessions, $ROUNDS rounds"
  for round in $(seq 1 "$ROUNDS"); do
    for target in $(rotated "$round" proxy proxy-inspect proxy-policy); do
      load "$target" i "$round" --mode post --path "$path" --sessions 16 \
        --warmup "$WARMUP" --duration "$DUR"
    done
  done
done

# --- (b) SSE event latency -----------------------------------------------------------------
for streams in "${SSE_STREAMS[@]}"; do
  step "(b) SSE, $streams streams at $SSE_RATE events/s each, $ROUNDS rounds"
  for round in $(seq 1 "$ROUNDS"); do
    for target in $(rotated "$round" "${BASELINE_TARGETS[@]}"); do
      load "$target" b "$round" --mode sse --sessions "$streams" --rate "$SSE_RATE" \
        --warmup "$SSE_WARMUP" --duration "$SSE_DUR"
    done
  done
done
stop_pid "$HAPROXY_PID"; HAPROXY_PID=""

# --- (w) the load generator's own WebSocket clients, A/B against the same proxy ---------
step "(w) tools/call /mcp through the lean and the tungstenite WebSocket client, 16 sessions, $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
  for target in $(rotated "$round" proxy-lean proxy-tungstenite); do
    load "$target" w "$round" --mode post --path /mcp --sessions 16 --warmup "$WARMUP" --duration "$DUR"
  done
done

# --- (g) peer check on vs off: session set-up and throughput --------------------------------
step "(g) peer check on vs off: session set-up and tools/call, $ROUNDS rounds"
"$TUNNEL" run --config "$WORK/proxy-peer-check.toml" 2>>"$LOGS/proxy-peer-check.log" &
PEER_CHECK_PID=$!
PIDS+=("$PEER_CHECK_PID")
wait_port "$PEER_CHECK_PORT"
# The log is written in batches (a few ms late): wait for the line.
for _ in $(seq 1 200); do grep -q 'peer check on' "$LOGS/proxy-peer-check.log" && break; sleep 0.01; done
grep -q 'peer check on' "$LOGS/proxy-peer-check.log" || { echo "(g): the peer check is not on" >&2; exit 1; }
grep -q 'peer check off' "$LOGS/proxy.log" || { echo "(g): the reference proxy's peer check is not off" >&2; exit 1; }
for round in $(seq 1 "$ROUNDS"); do
  order="off on"; ((round % 2)) || order="on off"
  for which in $order; do
    port=$PROXY_PORT pid=$PROXY_PID
    [[ $which == on ]] && port=$PEER_CHECK_PORT pid=$PEER_CHECK_PID
    for mode in connect post; do
      sessions=16; [[ $mode == connect ]] && sessions=4
      # shellcheck disable=SC2086
      "$BENCH" load --name "$which" --scenario g --round "$round" --target "ws://127.0.0.1:$port" \
        --server-name "$NAME" --host "$NAME" --ca "$CA" --pid "$pid" --mode "$mode" $WS \
        --sessions "$sessions" --warmup "$WARMUP" --duration "$DUR" | tee -a "$RESULTS" >&2
    done
  done
done
"$BENCH" peer-lookup --count "$LOOKUPS" | tee -a "$RESULTS" >&2
stop_pid "$PEER_CHECK_PID"

# --- (d) reload every second, rotation every 5 s, under (a) at 16 sessions ---------------
step "(d) config rewrite every $RELOAD_EVERY, cert rotation every $ROTATE_EVERY, for $CHURN_DUR"
"$BENCH" churn --config "$WORK/proxy.toml" --cert-dir "$WORK/pki" --domain "$DOMAIN" \
  --duration "$CHURN_DUR" --reload-every "$RELOAD_EVERY" --rotate-every "$ROTATE_EVERY" \
  --log "$LOGS/proxy.log" >"$WORK/churn.json" &
CHURN_PID=$!
PIDS+=("$CHURN_PID")
load proxy d 1 --mode post --sessions 16 --reconnect-every "$RECONNECT_EVERY" \
  --warmup 0s --duration "$CHURN_DUR"
wait "$CHURN_PID"
cat "$WORK/churn.json" | tee -a "$RESULTS" >&2

# --- (c) memory, on freshly started targets ----------------------------------------------
step "(c) RSS idle and with $IDLE_STEPS idle sessions"
stop_pid "$PROXY_PID"; PROXY_PID=""
stop_pid "$NGINX_PID"; NGINX_PID=""
start_nginx
start_proxy
for target in nginx proxy; do
  load "$target" c 1 --mode idle --steps "$IDLE_STEPS" --settle "$SETTLE" --connect-parallelism 32
done

# --- (f) tools/call through fake-edge -> the real cloudflared -> proxy -------------------
# A second `run`, with cloudflared enabled: it spawns the real connector with its argv as
# shipped; [cloudflared.env] points it at fake-edge. The other targets stop first, so that
# they cost nothing during these rounds.
step "(f) tools/call through fake-edge -> real cloudflared -> proxy, sessions ${CF_LEVELS[*]}, $ROUNDS rounds"
stop_pid "$PROXY_PID"; PROXY_PID=""
stop_pid "$NGINX_PID"; NGINX_PID=""
"$FAKE_EDGE" -pki "$WORK/edge-pki" -eyeball "127.0.0.1:$EYEBALL_PORT" \
  -control "127.0.0.1:$EDGE_CONTROL_PORT" -quiet 2>"$LOGS/fake-edge.log" &
EDGE_PID=$!
wait_port "$EYEBALL_PORT"
printf '%s\n' 'eyJhIjoiMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYiLCJ0IjoiNmZmNDJhZTItNzY1ZC00YWRmLTgxMTItMzFjNTVjMTU1MWVmIiwicyI6ImMyVmpjbVYwYzJWamNtVjBjMlZqY21WMGMyVmpjbVYwYzJWamNtVjBNVEk9In0=' >"$WORK/tunnel-token"
chmod 600 "$WORK/tunnel-token"
cat >"$WORK/proxy-cf.toml" <<EOF
listen_addr = "127.0.0.1:$CF_PROXY_PORT"
log_level = "info"
shutdown_timeout = "5s"
tunnel_domain = "$DOMAIN"

[tls]
cert_file = "$WORK/pki/tls.crt"
key_file = "$WORK/pki/tls.key"

[routes]
echo = "http://127.0.0.1:$UP_PORT"

[upstream]
allowed_ips = ["127.0.0.0/8"]

[cloudflared]
enabled = true
binary = "$CLOUDFLARED"
token_file = "$WORK/tunnel-token"
grace_period = "5s"
health_interval = "1s"

[cloudflared.env]
TUNNEL_TRANSPORT_PROTOCOL = "http2"
TUNNEL_EDGE = "127.0.0.1:7844,127.0.0.1:7845,127.0.0.1:7846,127.0.0.1:7847"
TUNNEL_CACERT = "$WORK/edge-pki/ca.crt"

[admin]
listen_addr = "127.0.0.1:$CF_ADMIN_PORT"
EOF
"$TUNNEL" run --config "$WORK/proxy-cf.toml" 2>>"$LOGS/proxy-cf.log" &
CF_RUN_PID=$!
connected=""
for _ in $(seq 1 600); do
  if grep -q '"connected 4/4"' <<<"$(curl -s --max-time 2 "http://127.0.0.1:$CF_ADMIN_PORT/readyz")"; then connected=1; break; fi
  kill -0 "$CF_RUN_PID" 2>/dev/null || break
  sleep 0.1
done
if [[ -z $connected ]]; then
  echo "(f): cloudflared did not reach 4/4 connections within 60 s; last lines of the logs:" >&2
  tail -n 20 "$LOGS/proxy-cf.log" "$LOGS/fake-edge.log" >&2
  exit 1
fi
CF_PID=$(pgrep -P "$CF_RUN_PID" | head -n1)
[[ -n $CF_PID ]] || { echo "(f): no cloudflared child of mcp-tunnel run ($CF_RUN_PID)" >&2; exit 1; }
echo "cloudflared pid $CF_PID: $(tr '\0' ' ' <"/proc/$CF_PID/cmdline")" >&2
declare -A CF_TARGET_ARGS=(
  [tunnel]="--target ws://127.0.0.1:$EYEBALL_PORT"
  [proxy]="--target ws://127.0.0.1:$CF_PROXY_PORT"
)
for sessions in "${CF_LEVELS[@]}"; do
  for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2)); then order="tunnel proxy"; else order="proxy tunnel"; fi
    for target in $order; do
      # shellcheck disable=SC2086
      "$BENCH" load --name "$target" --scenario f --round "$round" ${CF_TARGET_ARGS[$target]} \
        --server-name "$NAME" --host "$NAME" --ca "$CA" --mode post --path /mcp --sessions "$sessions" \
        --warmup "$WARMUP" --duration "$DUR" $WS \
        --cpu "proxy=$CF_RUN_PID" --cpu "cloudflared=$CF_PID" --cpu "fake-edge=$EDGE_PID" \
        | tee -a "$RESULTS" >&2
    done
  done
done
kill -0 "$CF_PID" 2>/dev/null || { echo "(f): cloudflared ($CF_PID) is gone: the figures above do not stand" >&2; exit 1; }
stop_pid "$CF_RUN_PID"; CF_RUN_PID=""; CF_PID=""
stop_pid "$EDGE_PID"; EDGE_PID=""

# --- BENCHMARKS.md -----------------------------------------------------------------------
TOTAL_SECS=$(($(date +%s) - T_START))
mkdir -p "$(dirname "$OUT")"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo "# Benchmarks"
  echo
  if [[ $MODE == smoke ]]; then
    echo "**Smoke run** (\`bench/run.sh --smoke\`): every path exercised briefly; the figures mean nothing."
    echo
  fi
  echo "Regenerate with \`bench/run.sh\` (needs nginx and haproxy; it installs them with apt-get when missing)."
  echo "Generated $(date -u '+%Y-%m-%d %H:%M UTC') from commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'); the run took ${TOTAL_SECS} s, of which ${BUILD_SECS} s building."
  echo
  echo "## Machine and conditions"
  echo
  echo "- CPU: $cpu, $(nproc) cores; $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM; $(uname -sr)"
  echo "- Load average at the end of the run: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- $("$NGINX" -v 2>&1); $("$HAPROXY" -v | head -n1 | cut -d' ' -f1-3); mcp-tunnel $("$TUNNEL" --version | cut -d' ' -f2) (cargo profile $PROFILE)"
  echo "- Everything runs in one loopback-only network namespace (\`unshare -n\`; scenario (f) runs the real"
  echo "  cloudflared, which must never reach the network)."
  echo "- All processes on loopback on the same machine: the load generator, the upstream and the"
  echo "  target compete for the same cores, so absolute figures are low and drift. The cores are"
  echo "  shared with other work (builds of other branches may run at the same time). Compare the"
  echo "  **ratios**: every comparison is measured in the same run, interleaved round by round"
  echo "  (order rotated each round), and reported as medians over rounds."
  echo
  echo "## What runs"
  echo
  echo "- **direct**: the load generator speaks plain HTTP/1.1 to the upstream (the physical limit)."
  echo "- **nginx**: TLS (1.3) to nginx, which \`proxy_pass\`es to the same upstream (\`proxy_http_version 1.1\`,"
  echo "  \`proxy_buffering off\`, upstream \`keepalive 64\`), \`worker_processes auto\`, access log on."
  echo "- **haproxy**: TLS (1.3, ALPN http/1.1) to HAProxy in HTTP mode, to the same upstream: \`nbthread $(nproc)\`"
  echo "  (one per core), \`http-reuse always\` (upstream connections kept and shared), \`option httplog\` to a file"
  echo "  (\`log stdout format raw\`), run in the foreground (\`haproxy -f haproxy.cfg\`; PEM = certificate + key)."
  echo "- Every target is judged against the **better** of nginx and HAProxy in the same run (the higher req/s,"
  echo "  the lower CPU per request, the lower added p99)."
  echo "- **proxy**: what the edge does: WebSocket to \`mcp-tunnel run\`'s listener, inner TLS (1.3) inside it,"
  echo "  HTTP/1.1 inside that; the proxy forwards to the same upstream. Log level info (default)."
  echo "- **via cloudflared** (f): WebSocket + inner TLS to fake-edge (a stand-in for Cloudflare's edge, built on"
  echo "  cloudflared's own RPC code), which relays each session over the HTTP/2 tunnel connections of the real"
  echo "  cloudflared 2026.8.2 spawned by \`mcp-tunnel run\`, which hands it to the proxy; against the same"
  echo "  load straight to that proxy's listener."
  echo "- Upstream: \`mcp-tunnel-bench upstream\` (hyper): \`POST /mcp\` answers a tools/call as JSON,"
  echo "  \`POST /mcp-sse\` as one SSE event, \`GET /events?rate=N\` streams timestamped events."
  echo "- Load: \`mcp-tunnel-bench load\` (one hyper HTTP/1.1 client code path over three transports),"
  echo "  fixed sessions, warm-up ${WARMUP}, then ${DUR} measured, ${ROUNDS} round(s); HDR histogram. Its"
  echo "  WebSocket client for ws:// targets: \`$WS_CLIENT\` (\`--ws-client\`; lean = the bench's own codec: each"
  echo "  write masked into one reused buffer and sent in one write, reads unframed in place; (w) compares it"
  echo "  with the tungstenite one). It runs on the same cores,"
  echo "  so its own CPU per request (user + system over the measured window) is reported beside each target's."
  echo
  echo "Commands (see bench/run.sh for the generated nginx and proxy configs):"
  echo
  echo '```'
  echo "mcp-tunnel-bench upstream --listen 127.0.0.1:$UP_PORT"
  echo "mcp-tunnel-bench load --name proxy --target ws://127.0.0.1:$PROXY_PORT --server-name $NAME --host $NAME --ca ca.crt --ws-client $WS_CLIENT --mode post --path /mcp --sessions 16 --warmup $WARMUP --duration $DUR"
  echo "mcp-tunnel-bench load --name nginx --target https://127.0.0.1:$NGINX_PORT ... (same arguments)"
  echo "mcp-tunnel-bench load --name haproxy --target https://127.0.0.1:$HAPROXY_PORT ... (same arguments)"
  echo "haproxy -f haproxy.cfg  # nbthread $(nproc), http-reuse always, option httplog, bind ... ssl crt tls.pem alpn http/1.1 ssl-min-ver TLSv1.3"
  echo "mcp-tunnel-bench load --name direct --target http://127.0.0.1:$UP_PORT ... (same arguments)"
  echo "mcp-tunnel-bench load ... --mode sse --sessions ${SSE_STREAMS[-1]} --rate $SSE_RATE --warmup $SSE_WARMUP --duration $SSE_DUR"
  echo "mcp-tunnel-bench load ... --mode idle --steps $IDLE_STEPS --pid PID"
  echo "mcp-tunnel-bench churn --config proxy.toml --cert-dir pki --domain $DOMAIN --duration $CHURN_DUR --reload-every $RELOAD_EVERY --rotate-every $ROTATE_EVERY  # with: load --name proxy --sessions 16 --reconnect-every $RECONNECT_EVERY"
  echo "fake-edge -pki edge-pki -eyeball 127.0.0.1:$EYEBALL_PORT -quiet; mcp-tunnel run --config proxy-cf.toml  # [cloudflared] enabled, [cloudflared.env] -> fake-edge"
  echo "mcp-tunnel-bench load --name tunnel --target ws://127.0.0.1:$EYEBALL_PORT --server-name $NAME --host $NAME --ca ca.crt --mode post --sessions 16 --cpu proxy=RUN_PID --cpu cloudflared=CLOUDFLARED_PID --cpu fake-edge=EDGE_PID ..."
  echo "mcp-tunnel-bench ready --name mcp-tunnel --probe 127.0.0.1:$READY_PROXY_PORT --runs $READY_RUNS --notify -- mcp-tunnel run --config proxy-ready.toml"
  echo "mcp-tunnel-bench load --name on --scenario g --target ws://127.0.0.1:$PEER_CHECK_PORT ... --mode connect --sessions 4  # and --mode post --sessions 16; --name off against :$PROXY_PORT"
  echo "mcp-tunnel-bench peer-lookup --count $LOOKUPS"
  echo '```'
} >"$WORK/header.md"
footer=()
[[ -f $ROOT/bench/NOTES.md && $MODE == full ]] && footer=(--footer "$ROOT/bench/NOTES.md")
mkdir -p "$ROOT/target"
cp "$RESULTS" "$ROOT/target/bench-results-$MODE.jsonl"
"$BENCH" report --results "$RESULTS" --header "$WORK/header.md" "${footer[@]}" --out "$OUT"
# (h) three appliance hosts, one tunnel: the CI test (tests/real-cloudflared.sh runs it with
# 0.5 s holds) with 5 s of steady load between steps; its per-step table goes in as printed.
if [[ $MODE == full ]]; then
  step "(h) three hosts, one tunnel: rolling changes and a killed host (5 s holds)"
  table=$(cd "$ROOT" && MCP_TUNNEL_SHARED="$SHARED" MCP_TUNNEL_MULTIHOST_HOLD_MS=5000 \
    cargo test --locked --offline --test real_cloudflared three_hosts -- --ignored --nocapture 2>&1 |
    sed -n '/^three hosts/,/^requests in all/p')
  [[ -n $table ]] || { echo "(h): the three-host test printed no table" >&2; exit 1; }
  {
    echo
    echo "## (h) three hosts, one tunnel: rolling changes and a killed host"
    echo
    echo "Three \`mcp-tunnel run\` instances, each with its own real cloudflared, registered with one fake-edge"
    echo "as connectors of one tunnel; load throughout; 5 s of steady load between steps"
    echo "(\`tests/real_cloudflared.rs\`, \`three_hosts_one_tunnel_roll_changes_and_survive_a_killed_host\`)."
    echo
    echo "$table"
  } >>"$OUT"
fi
step "done in ${TOTAL_SECS} s: $OUT"
