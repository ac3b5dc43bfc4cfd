#!/usr/bin/env bash
# A/B of two proxy builds on the same load, interleaved round by round: how each data-plane
# step of issue 21 was kept or rejected (bench/NOTES.md cites its output).
#
#   bench/ab.sh A_BINARY B_BINARY [ROUNDS] [SESSIONS...]
#
# Both binaries run `mcp-tunnel run` with the same config (but the port) against one
# `mcp-tunnel-bench upstream`; the load generator (target/release/mcp-tunnel-bench) runs
# tools/call POSTs (JSON) against each in turn, alternating which goes first. Prints one
# line per (sessions, build) with the median and range over rounds of req/s, the proxy's CPU
# per request, the load generator's CPU per request and p99. Runs inside its own
# loopback-only network namespace (root). Environment: AB_WARMUP (1s), AB_DUR (4s),
# AB_EXTRA (TOML lines appended to both configs), AB_EXTRA_B (appended to B's only), AB_LOAD_ARGS
# (more arguments for every load run, e.g. --ws-client tungstenite), AB_IDLE_STEPS (e.g.
# 1000,10000: first, on the freshly started builds, RSS per idle session at those counts, as
# BENCHMARKS.md (c); a build's sessions are closed before the other's are opened).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
[[ $# -ge 2 ]] || { echo "usage: bench/ab.sh A_BINARY B_BINARY [ROUNDS] [SESSIONS...]" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2")
ROUNDS=${3:-5}
shift $(($# < 3 ? $# : 3))
LEVELS=("$@")
[[ ${#LEVELS[@]} -gt 0 ]] || LEVELS=(1 16 64)
if [[ ${AB_IN_NETNS:-} != 1 ]]; then
  [[ $(id -u) == 0 ]] || { echo "bench/ab.sh: needs root (unshare -n)" >&2; exit 1; }
  exec unshare -n env AB_IN_NETNS=1 "$ROOT/bench/ab.sh" "$A" "$B" "$ROUNDS" "${LEVELS[@]}"
fi
ip link set lo up
BENCH=$ROOT/target/release/mcp-tunnel-bench
WORK=$(mktemp -d /tmp/mcp-tunnel-ab.XXXXXX)
mkdir -p "$WORK/logs"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_port() {
  local i
  for i in $(seq 1 500); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.01
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}
UP=18800 PA=18801 PB=18802 DOMAIN=bench.test NAME=echo.bench.test
"$A" certs init --tunnel-domain "$DOMAIN" --dir "$WORK/pki" >/dev/null
config() { # port file extra
  cat >"$2" <<EOF
listen_addr = "127.0.0.1:$1"
log_level = "info"
shutdown_timeout = "2s"
tunnel_domain = "$DOMAIN"
${AB_EXTRA:-}
$3

[tls]
cert_file = "$WORK/pki/tls.crt"
key_file = "$WORK/pki/tls.key"

[routes]
echo = "http://127.0.0.1:$UP"

[upstream]
allowed_ips = ["127.0.0.0/8"]

[cloudflared]
enabled = false

[admin]
enabled = false
EOF
}
mkdir -p "$WORK/a" "$WORK/b"
config "$PA" "$WORK/a/proxy.toml" ""
config "$PB" "$WORK/b/proxy.toml" "${AB_EXTRA_B:-}"
"$BENCH" upstream --listen "127.0.0.1:$UP" 2>"$WORK/logs/upstream.log" &
PIDS+=($!)
wait_port "$UP"
"$A" run --config "$WORK/a/proxy.toml" 2>"$WORK/logs/a.log" &
APID=$!
PIDS+=($APID)
"$B" run --config "$WORK/b/proxy.toml" 2>"$WORK/logs/b.log" &
BPID=$!
PIDS+=($BPID)
wait_port "$PA"
wait_port "$PB"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
if [[ -n ${AB_IDLE_STEPS:-} ]]; then
  for t in a b; do
    if [[ $t == a ]]; then port=$PA pid=$APID; else port=$PB pid=$BPID; fi
    "$BENCH" load --name "$t" --scenario ab-idle --round 1 --target "ws://127.0.0.1:$port" \
      --server-name "$NAME" --host "$NAME" --ca "$WORK/pki/ca.crt" --pid "$pid" \
      --mode idle --steps "$AB_IDLE_STEPS" --settle 2s --connect-parallelism 32 ${AB_LOAD_ARGS:-} \
      >>"$WORK/idle.jsonl"
  done
  python3 - "$WORK/idle.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| build | idle RSS KiB | sessions | open | KiB per idle session | errors |")
print("|---|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['target'].upper()} | {r['rss_idle_kib']} | {r['sessions']} | {r['open']} | {r['per_session_kib']:.1f} | {r['errors']} |")
EOF
fi
for s in "${LEVELS[@]}"; do
  for r in $(seq 1 "$ROUNDS"); do
    order=(a b)
    ((r % 2 == 0)) && order=(b a)
    for t in "${order[@]}"; do
      if [[ $t == a ]]; then port=$PA pid=$APID; else port=$PB pid=$BPID; fi
      "$BENCH" load --name "$t" --scenario ab --round "$r" --target "ws://127.0.0.1:$port" \
        --server-name "$NAME" --host "$NAME" --ca "$WORK/pki/ca.crt" --pid "$pid" \
        --mode post --path /mcp --sessions "$s" --warmup "${AB_WARMUP:-1s}" --duration "${AB_DUR:-4s}" ${AB_LOAD_ARGS:-} \
        >>"$RESULTS"
    done
  done
done
python3 - "$RESULTS" "$A" "$B" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}")
print("| sessions | build | rounds | req/s median (min-max) | proxy CPU µs/req median (min-max) | loadgen CPU µs/req | p99 ms | errors |")
print("|---:|---|---:|---|---|---:|---:|---:|")
def fmt(v, d=1):
    return f"{statistics.median(v):.{d}f} ({min(v):.{d}f}-{max(v):.{d}f})"
for s in sorted({r["sessions"] for r in rows}):
    med = {}
    for t in ("a", "b"):
        rs = [r for r in rows if r["sessions"] == s and r["target"] == t]
        rate = [r["rate"] for r in rs]
        cpu = [r["target_cpu_us_per_req"] for r in rs if r.get("target_cpu_us_per_req") is not None]
        lg = [r["loadgen_cpu_us_per_req"] for r in rs if r.get("loadgen_cpu_us_per_req") is not None]
        p99 = [r["p99_us"] / 1000 for r in rs]
        med[t] = (statistics.median(rate), statistics.median(cpu) if cpu else float("nan"))
        print(f"| {s} | {t.upper()} | {len(rs)} | {fmt(rate, 0)} | {fmt(cpu) if cpu else 'n/a'} | "
              f"{statistics.median(lg):.1f} | {statistics.median(p99):.2f} | {sum(r['errors'] for r in rs)} |"
              if lg else
              f"| {s} | {t.upper()} | {len(rs)} | {fmt(rate, 0)} | {fmt(cpu) if cpu else 'n/a'} | n/a | {statistics.median(p99):.2f} | {sum(r['errors'] for r in rs)} |")
    print(f"| {s} | B/A | | {med['b'][0] / med['a'][0]:.2f}x | {med['b'][1] / med['a'][1]:.2f}x | | | |")
EOF
