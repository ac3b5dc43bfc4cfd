#!/bin/bash
# Runs inside the booted Debian 12 container (systemd is PID 1), started by
# mcp-tunnel-systemtest.service; packaging/system-test.sh reads /root/systest/results.
# Each check prints PASS or FAIL and the run goes on, so one run reports every point.
set -u
export SYSTEMD_PAGER= SYSTEMD_COLORS=0 LC_ALL=C.UTF-8
cd /root/systest
failures=0
pass() { echo "PASS $*"; }
failc() { echo "FAIL $*"; failures=$((failures + 1)); }
step() { printf '\n=== %s\n' "$*"; }
show() { systemctl show -P "$1" mcp-tunnel.service; }
DOMAIN=systest.mcp-tunnel.test
CALL='{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"hello","arguments":{"name":"systemd"}}}'
# mcp_call ROUTE: tools/call hello through bridge (127.0.0.1:9443) -> fake-edge (7880) -> the
# real cloudflared -> proxy -> upstream
mcp_call() {
  curl -sS --max-time 10 --resolve "$1.$DOMAIN:9443:127.0.0.1" --cacert /var/lib/mcp-tunnel/ca.crt \
    -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    -d "$CALL" "https://$1.$DOMAIN:9443/mcp" 2>&1
}
wait_state() { # wait_state STATE SECONDS
  for _ in $(seq $(($2 * 10))); do [[ "$(show ActiveState)" == "$1" ]] && return 0; sleep 0.1; done; return 1
}

step "network: only lo (cloudflared dials public addresses by itself; it must reach none)"
ifaces="$(awk -F: 'NR > 2 { gsub(/ /, "", $1); print $1 }' /proc/net/dev | tr '\n' ' ')"
if [[ "$ifaces" == "lo " ]]; then
  pass "the container's only network interface is lo (--private-network)"
else
  failc "the container has network interfaces other than lo: $ifaces; refusing to start cloudflared"
  echo "done: $failures failed"; exit 1
fi

step "install the .deb (apt, offline: every dependency is in the root)"
apt-get install -y ./mcp-tunnel.deb >install.log 2>&1; rc=$?
cat install.log | sed -n '/mcp-tunnel: installed/,/PACKAGING.md/p'
if [[ $rc -eq 0 ]]; then pass "apt-get install ./mcp-tunnel.deb"; else cat install.log; failc "apt-get install ./mcp-tunnel.deb"; fi
[[ "$(systemctl is-enabled mcp-tunnel)" == enabled ]] && pass "unit enabled by postinst" || failc "unit not enabled: $(systemctl is-enabled mcp-tunnel)"
id mcp-tunnel >/dev/null 2>&1 && pass "user: $(id mcp-tunnel)" || failc "no mcp-tunnel user"
[[ "$(stat -c '%a %U' /var/lib/mcp-tunnel)" == "700 mcp-tunnel" ]] && pass "/var/lib/mcp-tunnel 0700 mcp-tunnel" || failc "/var/lib/mcp-tunnel: $(stat -c '%a %U' /var/lib/mcp-tunnel)"
cf_sha="$(sha256sum </usr/lib/mcp-tunnel/cloudflared | cut -d' ' -f1)"
if [[ "$(/usr/lib/mcp-tunnel/cloudflared --version)" == "cloudflared version 2026.8.2 "* && "$cf_sha" == "$(cat cloudflared.sha256)" ]] \
   && grep -qx "sha256: $cf_sha" /usr/lib/mcp-tunnel/cloudflared.version; then
  pass "bundled cloudflared is the real 2026.8.2, byte for byte: $(tr '\n' ' ' </usr/lib/mcp-tunnel/cloudflared.version)"
else failc "bundled cloudflared: --version '$(/usr/lib/mcp-tunnel/cloudflared --version 2>&1 | head -n1)', sha256 $cf_sha (want $(cat cloudflared.sha256)); cloudflared.version: $(tr '\n' ' ' </usr/lib/mcp-tunnel/cloudflared.version)"; fi

step "not configured: the start condition holds it back and status says why"
systemctl start mcp-tunnel
st="$(systemctl status mcp-tunnel 2>&1)"
if [[ "$(show ConditionResult)" == no ]] && grep -q 'ConditionPathExists=/var/lib/mcp-tunnel/tunnel-token was not met' <<<"$st"; then
  pass "unconfigured start skipped: $(grep -o 'Condition: .*' <<<"$st" | head -n1)"
else echo "$st"; failc "unconfigured: condition not reported"; fi

step "configure: fake-edge, a bridge client, sample MCP upstream, certificates, token, config"
# fake-edge stands in for Cloudflare's edge: 4 TLS listeners 7844-7847 for cloudflared's HA
# connections, and the eyeball port 7880 where clients come in; the bridge turns a TLS client
# into the WebSocket session the edge relays.
systemd-run --unit=fake-edge --quiet /root/systest/fake-edge -pki /root/systest/edge-pki \
  -eyeball 127.0.0.1:7880 -control 127.0.0.1:7881
for _ in $(seq 100); do [[ -s /root/systest/edge-pki/ca.crt ]] && curl -s -o /dev/null 127.0.0.1:7881/status && break; sleep 0.1; done
install -m 0644 /root/systest/edge-pki/ca.crt /etc/mcp-tunnel/fake-edge-ca.crt \
  && pass "fake-edge up: $(curl -s 127.0.0.1:7881/status)" || failc "fake-edge did not start: $(journalctl -u fake-edge -o cat | tail -5)"
systemd-run --unit=edge-client --quiet /usr/bin/mcp-tunnel bridge --listen 127.0.0.1:9443 --to ws://127.0.0.1:7880
systemd-run --unit=sample-upstream --quiet /usr/bin/mcp-tunnel demo --port 9444 --dir /tmp/demo-upstream
up=""
for _ in $(seq 100); do
  up="$(journalctl -u sample-upstream -o cat | sed -n 's#.*sample MCP server.*http://\([0-9.:]*\)/mcp.*#\1#p' | head -n1)"
  [[ -n "$up" ]] && break; sleep 0.1
done
[[ -n "$up" ]] && pass "sample MCP upstream (rmcp, tool hello) at $up" || failc "sample upstream did not start: $(journalctl -u sample-upstream -o cat | tail -5)"
mcp-tunnel certs init --tunnel-domain "$DOMAIN" --dir /var/lib/mcp-tunnel >/dev/null
printf '{"a":"0123456789abcdef0123456789abcdef","t":"6ff42ae2-765d-4adf-8112-31c55c1551ef","s":"%s"}' \
  "$(head -c 32 /dev/urandom | base64 -w0)" | base64 -w0 >/var/lib/mcp-tunnel/tunnel-token
chown -R mcp-tunnel:mcp-tunnel /var/lib/mcp-tunnel; chmod 0600 /var/lib/mcp-tunnel/*
write_config() { # write_config EXTRA_ROUTE_LINE
cat >/etc/mcp-tunnel/mcp-tunnel.toml <<TOML
listen_addr = "127.0.0.1:8080"
log_level = "info"
shutdown_timeout = "5s"
tunnel_domain = "$DOMAIN"
[tls]
cert_file = "/var/lib/mcp-tunnel/tls.crt"
key_file = "/var/lib/mcp-tunnel/tls.key"
[routes]
hello = "http://$up"
$1
[upstream]
allowed_ips = ["127.0.0.0/8"]
[cloudflared]
enabled = true
grace_period = "2s"
ready_requires_tunnel = true
health_interval = "1s"
# the real cloudflared, pointed at fake-edge (http2; static edge addresses; the fake CA)
env = { TUNNEL_TRANSPORT_PROTOCOL = "http2", TUNNEL_EDGE = "127.0.0.1:7844,127.0.0.1:7845,127.0.0.1:7846,127.0.0.1:7847", TUNNEL_CACERT = "/etc/mcp-tunnel/fake-edge-ca.crt" }
TOML
}
write_config ""
mcp-tunnel check && pass "mcp-tunnel check" || failc "mcp-tunnel check"

step "systemctl start reaches active only after READY=1, sent once cloudflared registered with the edge"
systemctl start --no-block mcp-tunnel
sleep 0.3
early="$(show ActiveState)/$(show SubState)"
if wait_state active 30; then
  ready_status="$(show StatusText)"
  t0=$(show ExecMainStartTimestampMonotonic); t1=$(show ActiveEnterTimestampMonotonic)
  # The journal's monotonic clock is the one systemd's *Monotonic timestamps use.
  reg="$(journalctl -u mcp-tunnel _SYSTEMD_INVOCATION_ID="$(show InvocationID)" -o json --no-pager \
    | grep -m1 '"MESSAGE":"Registered tunnel connection"' | grep -o '"__MONOTONIC_TIMESTAMP":"[0-9]*' | grep -o '[0-9]*$')"
  # READY=1 carries the STATUS line of that moment: it must already count an edge connection.
  # (The journal stamps the registration line on receipt, so its order against READY gets
  # 250 ms of slack; READY before any registration would be about a second early.)
  if [[ "$early" == activating/* && "$ready_status" =~ ^tunnel\ [1-4]/4\ connections\; && -n "$reg" && $reg -le $((t1 + 250000)) ]]; then
    pass "$early at 0.3 s; cloudflared's first 'Registered tunnel connection' $(( (reg - t0) / 1000 )) ms after the main process started, active at $(( (t1 - t0) / 1000 )) ms; STATUS at READY: \"$ready_status\""
  else failc "ready timing: state at 0.3 s was $early, STATUS at READY \"$ready_status\", first registration at ${reg:-never} us, active at $t1 us (monotonic)"; fi
else
  failc "mcp-tunnel did not become active (state $(show ActiveState)/$(show SubState), result $(show Result))"
  journalctl -u mcp-tunnel -o cat --no-pager | tail -20
fi
mainpid=$(show MainPID)
four=""
for _ in $(seq 100); do
  [[ "$(show StatusText)" == "tunnel 4/4 connections;"* ]] && curl -s 127.0.0.1:9180/readyz | grep -q '"connected 4/4"' && four=1 && break
  sleep 0.2
done
if [[ -n "$four" ]]; then
  pass "4/4: STATUS \"$(show StatusText)\", readyz cloudflared \"connected 4/4\", fake-edge $(curl -s 127.0.0.1:7881/status | grep -o '"registered":[0-9][0-9]*')"
else failc "not 4/4 within 20 s: STATUS \"$(show StatusText)\", readyz $(curl -s 127.0.0.1:9180/readyz), fake-edge $(curl -s 127.0.0.1:7881/status)"; fi

step "systemctl status shows the STATUS line"
status_text="$(show StatusText)"
if [[ -n "$status_text" ]] && systemctl status mcp-tunnel 2>&1 | grep -q "Status: \"$status_text\""; then
  pass "Status: \"$status_text\""
else systemctl status mcp-tunnel --no-pager 2>&1 | head -12; failc "no STATUS line in systemctl status"; fi

step "MCP request: curl -> bridge -> fake-edge -> real cloudflared -> WebSocket -> inner TLS -> proxy -> upstream"
out="$(mcp_call hello)"
grep -q 'Hello, systemd!' <<<"$out" && pass "tools/call hello answered: $(grep -o 'Hello, systemd![^"]*' <<<"$out" | head -n1)" || failc "MCP call through the tunnel: $out"
relay="$(journalctl -u fake-edge -o cat --no-pager | grep -m1 'eyeball GET .* via conn#[0-9]* (connIndex [0-9]): 200')"
[[ -n "$relay" ]] && pass "fake-edge relayed the session through cloudflared: ${relay#*eyeball }" || failc "fake-edge shows no relayed session: $(journalctl -u fake-edge -o cat --no-pager | tail -3)"

step "sandbox: both processes run as mcp-tunnel, hardened; token not in argv"
cf=$(pgrep -f '^/usr/lib/mcp-tunnel/cloudflared' | head -n1)
if [[ -n "$cf" && "$(ps -o user= -p "$cf")" == mcp-tunnel && "$(ps -o user= -p "$mainpid")" == mcp-tunnel ]]; then
  pass "supervisor $mainpid and cloudflared $cf run as mcp-tunnel"
else failc "process users: supervisor $(ps -o user= -p "$mainpid"), cloudflared '${cf:-none}'"; fi
if [[ -n "$cf" ]] && ! tr '\0' ' ' </proc/$cf/cmdline | grep -qF "$(cat /var/lib/mcp-tunnel/tunnel-token)"; then
  pass "token absent from cloudflared's argv: $(tr '\0' ' ' </proc/$cf/cmdline)"
else failc "token visible in cloudflared's argv"; fi
grep -q '^NoNewPrivs:[[:space:]]*1' /proc/$mainpid/status && grep -q '^Seccomp:[[:space:]]*2' /proc/$mainpid/status \
  && grep -q '^CapBnd:[[:space:]]*0000000000000000' /proc/$mainpid/status \
  && pass "NoNewPrivs 1, Seccomp filter on, empty capability bounding set" || failc "hardening not applied: $(grep -E 'NoNewPrivs|Seccomp|CapBnd' /proc/$mainpid/status | tr '\n' ' ')"
echo "live: $(systemd-analyze security mcp-tunnel.service 2>/dev/null | tail -n1)"

step "journalctl -u mcp-tunnel holds structured fields"
j="$(journalctl -u mcp-tunnel -o json --no-pager)"
if grep '"MESSAGE":"proxy listening"' <<<"$j" | grep -q '"F_LISTEN":"127.0.0.1:8080"' \
   && grep '"MESSAGE":"proxy listening"' <<<"$j" | grep -q '"CODE_FILE":'; then
  pass "entry 'proxy listening' with F_LISTEN, F_ROUTES, TARGET, CODE_FILE fields"
else failc "no structured 'proxy listening' entry (journald logging: issue 3)"; fi
if grep '"TARGET":"cloudflared"' <<<"$j" | grep -q 'Registered tunnel connection'; then
  pass "cloudflared's JSON log lines re-emitted with TARGET=cloudflared"
else failc "no cloudflared entries with TARGET=cloudflared"; fi

step "systemctl reload applies a route change, the service stays active"
# The supervisor also watches its files, so the new route may be live before the reload;
# what proves the reload is its journal entry with trigger "reload request" (SIGHUP).
before="$(mcp_call hello2)"
cf_before=$(pgrep -f '^/usr/lib/mcp-tunnel/cloudflared' | head -n1)
write_config 'hello2 = "http://'"$up"'"'
sleep 1.5
since="$(date '+%Y-%m-%d %H:%M:%S')"
systemctl reload mcp-tunnel; rc=$?
sleep 1
after="$(mcp_call hello2)"
if [[ $rc -eq 0 && "$(show ActiveState)" == active && "$(show MainPID)" == "$mainpid" ]]; then
  pass "reload: exit 0, still active, same main PID $mainpid"
else systemctl status mcp-tunnel --no-pager 2>&1 | tail -n 8; failc "reload: rc $rc, state $(show ActiveState), main PID $(show MainPID) (was $mainpid)"; fi
if journalctl -u mcp-tunnel --since "$since" -o json --no-pager | grep '"MESSAGE":"reloading"' 2>/dev/null | grep -q '"F_TRIGGER":"reload request"'; then
  pass "the supervisor reloaded on systemctl reload (journal: reloading, trigger=reload request)"
else failc "no SIGHUP-triggered reload in the journal after systemctl reload (hot reload: issue 4)"; fi
if grep -q 'No route configured' <<<"$before" && grep -q 'Hello, systemd!' <<<"$after"; then
  pass "route hello2 absent before the change, served after the reload"
else failc "route change not applied (hot reload: issue 4); before: $(head -c 80 <<<"$before"); after: $(head -c 120 <<<"$after")"; fi
cf_after=$(pgrep -f '^/usr/lib/mcp-tunnel/cloudflared' | head -n1)
if [[ -n "$cf_before" && "$cf_before" == "$cf_after" ]] && curl -s 127.0.0.1:9180/readyz | grep -q '"connected 4/4"'; then
  pass "the reload left cloudflared alone: same PID $cf_after, still connected 4/4"
else failc "cloudflared across the reload: PID ${cf_before:-none} -> ${cf_after:-none}, readyz $(curl -s 127.0.0.1:9180/readyz)"; fi

step "a broken config: the reload is refused, the running configuration stays"
cp /etc/mcp-tunnel/mcp-tunnel.toml good.toml
echo 'listen_adr = "typo"' >>/etc/mcp-tunnel/mcp-tunnel.toml
since="$(date '+%Y-%m-%d %H:%M:%S')"
systemctl reload mcp-tunnel; sleep 1
out="$(mcp_call hello2)"
if [[ "$(show ActiveState)" == active && "$(show MainPID)" == "$mainpid" ]] && grep -q 'Hello, systemd!' <<<"$out"; then
  pass "still active (main PID $mainpid) and serving with the previous configuration"
else failc "broken config on reload: state $(show ActiveState), main PID $(show MainPID), call: $(head -c 120 <<<"$out")"; fi
refused="$(journalctl -u mcp-tunnel --since "$since" -o json --no-pager | grep 'reload refused' 2>/dev/null | grep -m1 'listen_adr')"
if [[ -n "$refused" ]]; then
  pass "the refusal is logged with the reason: $(sed -n 's/.*"MESSAGE":"\([^"]*\)".*/\1/p' <<<"$refused") / $(grep -o '"F_ERROR":"[^"]*' <<<"$refused" | head -c 140)"
else failc "no 'reload refused' entry naming listen_adr in the journal (hot reload: issue 4)"; fi
cp good.toml /etc/mcp-tunnel/mcp-tunnel.toml; systemctl reload mcp-tunnel

step "after the edits settle, no further reloads (no reload loop)"
sleep 2; since="$(date '+%Y-%m-%d %H:%M:%S')"; sleep 3
n=$(journalctl -u mcp-tunnel --since "$since" -o cat --no-pager | grep -c '^reloading$' || true)
if [[ $n -eq 0 ]]; then pass "no reloads in 3 idle seconds"
else failc "$n reloads in 3 idle seconds with no file change (trigger: $(journalctl -u mcp-tunnel --since "$since" -o json --no-pager | grep -o '"F_TRIGGER":"[^"]*"' | sort | uniq -c | tr '\n' ' ')): the file watcher reacts to the reload's own reads (hot reload: issue 4, src/supervisor/watch.rs)"; fi

# ---- peer check (issue 17): a self-contained block; it leaves the service active as it found it.
step "peer check: a local user other than the service's cannot reach an upstream through the listener"
# The calls above came through the service's own cloudflared. Here bridges run by other local
# users carry the same call straight to the listener (127.0.0.1:8080), as a local attacker would:
# nobody, and root (allow_root is off by default).
pc_metric() { curl -s 127.0.0.1:9180/metrics | awk -v m="$1" '$1 == m { print $2 }'; }
pc_refused='mcp_tunnel_peer_refusals_total{reason="other_user"}'
pc_before="$(pc_metric "$pc_refused")"
pc_since="$(date '+%Y-%m-%d %H:%M:%S')"
setpriv --reuid=nobody --regid=nogroup --clear-groups \
  mcp-tunnel bridge --listen 127.0.0.1:9451 --to ws://127.0.0.1:8080 >pc-bridge-nobody.log 2>&1 &
pc_nobody=$!
mcp-tunnel bridge --listen 127.0.0.1:9452 --to ws://127.0.0.1:8080 >pc-bridge-root.log 2>&1 &
pc_root=$!
for _ in $(seq 50); do
  grep -q 'bridge listening' pc-bridge-nobody.log && grep -q 'bridge listening' pc-bridge-root.log && break; sleep 0.1
done
pc_call() { # pc_call PORT: the tools/call of mcp_call, through the bridge on PORT
  curl -sS --max-time 10 --resolve "hello.$DOMAIN:$1:127.0.0.1" --cacert /var/lib/mcp-tunnel/ca.crt \
    -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    -d "$CALL" "https://hello.$DOMAIN:$1/mcp" 2>&1
}
for pc in "nobody 9451 65534 $pc_nobody" "root 9452 0 $pc_root"; do
  read -r pc_user pc_port pc_uid pc_pid <<<"$pc"
  pc_out="$(pc_call "$pc_port")"; pc_rc=$?
  pc_as="$(ps -o user= -p "$pc_pid")"
  pc_log=""
  for _ in $(seq 30); do
    pc_log="$(journalctl -u mcp-tunnel --since "$pc_since" -o json --no-pager | grep 'refused listener connection' | grep "\"F_PEER_UID\":\"$pc_uid\"" | head -n1)"
    [[ -n "$pc_log" ]] && break; sleep 0.1
  done
  if [[ $pc_rc -ne 0 && "$pc_as" == "$pc_user" ]] && ! grep -q 'Hello, systemd!' <<<"$pc_out" && [[ -n "$pc_log" ]]; then
    pass "a bridge run by $pc_user straight to the listener is refused: curl exit $pc_rc; journal: $(sed -n 's/.*"MESSAGE":"\([^"]*\)".*/\1/p' <<<"$pc_log" | cut -c1-60)... F_PEER_UID=$pc_uid $(grep -o '"F_ALLOWED":"[^"]*"' <<<"$pc_log")"
  else failc "bridge as $pc_user (process user '$pc_as'): curl exit $pc_rc: $(head -c 160 <<<"$pc_out"); journal line: '${pc_log:0:200}'"; fi
done
kill "$pc_nobody" "$pc_root" 2>/dev/null; wait "$pc_nobody" "$pc_root" 2>/dev/null
pc_after="$(pc_metric "$pc_refused")"
if [[ -n "$pc_after" && $((pc_after - ${pc_before:-0})) -eq 2 ]]; then pass "$pc_refused went from $pc_before to $pc_after"
else failc "$pc_refused: $pc_before before, '$pc_after' after (expected +2)"; fi
pc_status="$(mcp-tunnel status 2>&1)"
if grep -q 'peer_check   ready     on: uid [0-9]* (mcp-tunnel) only' <<<"$pc_status" && grep -q 'refused by the peer check: [0-9]* from other users' <<<"$pc_status"; then
  pass "status: $(grep peer_check <<<"$pc_status" | tr -s ' ')"
else echo "$pc_status"; failc "status does not say who may connect"; fi
out="$(mcp_call hello)"
grep -q 'Hello, systemd!' <<<"$out" && pass "the service's own cloudflared is still served" || failc "MCP call after the refusals: $out"

step "peer check: without AF_NETLINK in the sandbox the service refuses to start, and says why"
mkdir -p /run/systemd/system/mcp-tunnel.service.d
printf '[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n' \
  >/run/systemd/system/mcp-tunnel.service.d/no-netlink.conf
systemctl daemon-reload
pc_since="$(date '+%Y-%m-%d %H:%M:%S')"
systemctl restart mcp-tunnel 2>/dev/null; pc_rc=$?
pc_why="$(journalctl -u mcp-tunnel --since "$pc_since" -o cat --no-pager | grep -m1 'peer_check: cannot identify')"
if [[ $pc_rc -ne 0 && "$(show ActiveState)" != active && -n "$pc_why" ]]; then
  pass "start refused (systemctl restart exit $pc_rc, $(show ActiveState)/$(show Result)): ${pc_why:0:200}"
else failc "without AF_NETLINK: restart exit $pc_rc, state $(show ActiveState), journal: $(journalctl -u mcp-tunnel --since "$pc_since" -o cat --no-pager | tail -n 5)"; fi
rm -f /run/systemd/system/mcp-tunnel.service.d/no-netlink.conf
systemctl daemon-reload; systemctl reset-failed mcp-tunnel
systemctl restart mcp-tunnel
wait_state active 30 && pass "with AF_NETLINK back, the service starts again" || failc "restart after restoring AF_NETLINK: $(show ActiveState)/$(show Result)"
# ---- end of the peer check block

step "a stalled journald (SIGSTOP for 30 s) under 60 s of load: no call fails or stalls, every audit record is accounted for"
# Every request writes an access line and, on the inspected route, an audit line; the
# service sends journal entries from its log thread on a non-blocking socket, so requests
# go on while journald reads nothing. Four callers in parallel: 10 s with journald running,
# 30 s stopped, 20 s running again.
write_config 'audited = { upstream = "http://'"$up"'", inspect = true }'
systemctl reload mcp-tunnel
for _ in $(seq 50); do mcp_call audited | grep -q 'Hello, systemd!' && break; sleep 0.2; done
calls() { # calls SECONDS OUTFILE: tools/call in a loop, one line per call: ok|fail SECONDS
  local end=$((SECONDS + $1)) out
  while ((SECONDS < end)); do
    out="$(curl -sS --max-time 10 --resolve "audited.$DOMAIN:9443:127.0.0.1" --cacert /var/lib/mcp-tunnel/ca.crt \
      -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
      -w '\n%{time_total}' -d "$CALL" "https://audited.$DOMAIN:9443/mcp" 2>&1)"
    if grep -q 'Hello, systemd!' <<<"$out"; then echo "ok $(tail -n1 <<<"$out")"; else echo "fail $(tail -n1 <<<"$out")"; fi
  done >"$2"
}
load() { # load SECONDS TAG: four callers; prints "ok fail max_seconds"
  for i in 1 2 3 4; do calls "$1" "/tmp/calls-$2-$i" & done; wait
  cat /tmp/calls-"$2"-* | awk '$1 == "ok" { ok++ } $1 == "fail" { bad++ } $2 > max { max = $2 } END { printf "%d %d %s\n", ok, bad, max + 0 }'
}
jd_sum() { curl -s 127.0.0.1:9180/metrics | awk -v p="$1" 'index($1, p) == 1 { s += $2 } END { print s + 0 }'; }
read -r base_ok base_fail base_max < <(load 10 base)
jpid=$(systemctl show -P MainPID systemd-journald)
dropped_before=$(jd_sum 'mcp_tunnel_log_lines_dropped_total{sink="journald"')
kill -STOP "$jpid"
read -r stall_ok stall_fail stall_max < <(load 30 stall)
dropped_during=$(jd_sum 'mcp_tunnel_log_lines_dropped_total{sink="journald"')
kill -CONT "$jpid"
read -r after_ok after_fail after_max < <(load 20 after)
echo "journald stall: running $base_ok ok / $base_fail failed in 10 s (slowest ${base_max}s); stopped $stall_ok ok / $stall_fail failed in 30 s (slowest ${stall_max}s); running again $after_ok ok / $after_fail failed in 20 s; journald entries dropped while stopped: $((dropped_during - dropped_before))"
# While journald is stopped: no failed call, at least half the per-second rate of before,
# and no call slower than 3 s (the blocking sender made calls time out).
if ((stall_fail == 0 && base_fail == 0 && after_fail == 0 && stall_ok * 10 >= base_ok * 30 / 2)) \
   && awk -v m="$stall_max" 'BEGIN { exit !(m < 3) }'; then
  pass "tunnel served on with journald stopped for 30 s: $((stall_ok / 30))/s against $((base_ok / 10))/s, slowest call ${stall_max}s, no failed call"
else failc "journald stopped: $stall_ok ok, $stall_fail failed in 30 s, slowest ${stall_max}s (running: $base_ok ok, $base_fail failed in 10 s)"; fi
marker="after-stall-$RANDOM"
curl -sS --max-time 10 --resolve "hello.$DOMAIN:9443:127.0.0.1" --cacert /var/lib/mcp-tunnel/ca.crt \
  -o /dev/null "https://hello.$DOMAIN:9443/$marker" || true
found=""
for _ in $(seq 100); do
  journalctl -u mcp-tunnel -o json --no-pager --since "-90s" | grep -q "\"F_PATH\":\"/$marker\"" && { found=1; break; }
  sleep 0.1
done
[[ -n "$found" ]] && pass "journald resumed: the access line of a request after the stall is in the journal (TARGET=mcp_tunnel::access)" \
  || failc "no access line for /$marker in the journal after journald resumed"
if ((dropped_during > dropped_before)); then
  journalctl -u mcp-tunnel --no-pager -o cat --since "-90s" | grep -q 'log lines dropped' \
    && pass "the drops are told in the journal once it reads again" || failc "entries were dropped but no 'log lines dropped' notice reached the journal"
fi
# Every audit record made is written to journald or counted as dropped (once the queue
# has drained), and the journal holds the written ones.
records="" written="" dropped=""
for _ in $(seq 50); do
  records=$(jd_sum 'mcp_tunnel_audit_records_total')
  written=$(jd_sum 'mcp_tunnel_log_lines_written_total{sink="journald",kind="audit"}')
  dropped=$(jd_sum 'mcp_tunnel_log_lines_dropped_total{sink="journald",kind="audit"}')
  ((records > 0 && records == written + dropped)) && break
  sleep 0.2
done
in_journal=$(journalctl -u mcp-tunnel -o json --no-pager _SYSTEMD_INVOCATION_ID="$(show InvocationID)" | grep -c '"TARGET":"mcp_audit"' || true)
if ((records > 0 && records == written + dropped && in_journal >= written)); then
  pass "audit records: $records made = $written written + $dropped dropped; the journal holds $in_journal"
else failc "audit records: $records made, $written written, $dropped dropped, $in_journal in the journal"; fi
write_config 'hello2 = "http://'"$up"'"'
systemctl reload mcp-tunnel

step "the watchdog is armed"
[[ "$(show WatchdogUSec)" == 30s ]] && pass "WatchdogUSec=30s" || failc "WatchdogUSec=$(show WatchdogUSec)"
mkdir -p /run/systemd/system/mcp-tunnel.service.d
printf '[Service]\nWatchdogSec=2s\n' >/run/systemd/system/mcp-tunnel.service.d/watchdog-test.conf
systemctl daemon-reload; systemctl restart mcp-tunnel
wait_state active 30; sleep 3
if [[ "$(show ActiveState)" == active ]]; then pass "pings keep a 2 s watchdog satisfied for 3 s"; else failc "service died under a 2 s watchdog: $(show Result)"; fi
wd_pid=$(show MainPID); restarts=$(show NRestarts)
kill -STOP "$wd_pid"
for _ in $(seq 100); do [[ "$(show NRestarts)" -gt "$restarts" ]] && break; sleep 0.1; done
if journalctl -u mcp-tunnel --no-pager | grep -q 'Watchdog timeout' && [[ "$(show NRestarts)" -gt "$restarts" ]]; then
  pass "a frozen supervisor (SIGSTOP) is killed on watchdog timeout and restarted (Restart=on-failure)"
else failc "no watchdog timeout after SIGSTOP (NRestarts $(show NRestarts), was $restarts)"; fi
rm -rf /run/systemd/system/mcp-tunnel.service.d; systemctl daemon-reload
systemctl restart mcp-tunnel; wait_state active 30

step "sever: the service stops serving at once and stays down across systemctl restart, until lifted"
# The restarts of the steps before count against StartLimitBurst=5 per 5 min: start clean.
systemctl reset-failed mcp-tunnel
for _ in $(seq 100); do curl -s 127.0.0.1:9180/readyz | grep -q '"connected 4/4"' && break; sleep 0.2; done
sv_pid=$(show MainPID); restarts=$(show NRestarts)
sever_out="$(mcp-tunnel sever --reason "system test" 2>&1)"; sever_rc=$?
sv_readyz="$(curl -s 127.0.0.1:9180/readyz)"
call_out="$(mcp_call hello)"
if [[ $sever_rc == 0 && "$sever_out" == *"severed in"* && "$(show ActiveState)" == active && "$(show MainPID)" == "$sv_pid" \
      && "$(show StatusText)" == SEVERED* && "$sv_readyz" == *'"severed":"severed since'*"(system test)"* \
      && "$call_out" != *'Hello, systemd!'* ]] && ! pgrep -f '^/usr/lib/mcp-tunnel/cloudflared' >/dev/null; then
  pass "severed: cloudflared gone, the call fails (${call_out:0:60}), the unit stays active with STATUS \"$(show StatusText | cut -c1-60)...\""
else failc "sever: rc $sever_rc, out: $sever_out; state $(show ActiveState) pid $(show MainPID) (was $sv_pid); STATUS $(show StatusText); readyz $sv_readyz; call: $call_out"; fi
systemctl restart mcp-tunnel; sleep 7
refused="$(journalctl -u mcp-tunnel -o cat --no-pager | grep -c 'refusing to start: severed since' || true)"
if [[ "$(show ActiveState)" == failed && "$(show ExecMainStatus)" == 78 && "$(show NRestarts)" == "$restarts" && $refused -ge 1 ]]; then
  pass "systemctl restart: run refused to start (exit 78, naming the marker), and systemd did not restart it within RestartSec"
else failc "after restart while severed: $(show ActiveState)/$(show Result), status $(show ExecMainStatus), NRestarts $(show NRestarts) (was $restarts), refusals logged: $refused"; fi
status_out="$(mcp-tunnel status 2>&1)"
[[ "$status_out" == *"SEVERED: severed since"*"mcp-tunnel sever --lift"* ]] && pass "mcp-tunnel status names the marker while the service is down" \
  || failc "status while severed and down: $status_out"
lift_out="$(mcp-tunnel sever --lift 2>&1)"; systemctl reset-failed mcp-tunnel; systemctl start mcp-tunnel; wait_state active 30
for _ in $(seq 100); do curl -s 127.0.0.1:9180/readyz | grep -q '"connected 4/4"' && break; sleep 0.2; done
out="$(mcp_call hello)"
[[ "$lift_out" == *"marker removed"* && "$(show ActiveState)" == active && "$out" == *'Hello, systemd!'* ]] \
  && pass "sever --lift, then systemctl start: serving again" || failc "after lift: $lift_out; $(show ActiveState); call: $out"
# Lifted while a severed service runs: it exits 75 and Restart=on-failure brings it back.
mcp-tunnel sever --reason "system test, second" >/dev/null 2>&1
restarts=$(show NRestarts)
lift_out="$(mcp-tunnel sever --lift 2>&1)"
for _ in $(seq 150); do [[ "$(show NRestarts)" -gt "$restarts" && "$(show ActiveState)" == active ]] && break; sleep 0.1; done
for _ in $(seq 100); do curl -s 127.0.0.1:9180/readyz | grep -q '"connected 4/4"' && break; sleep 0.2; done
out="$(mcp_call hello)"
if [[ "$(show NRestarts)" -gt "$restarts" && "$(show ActiveState)" == active && "$out" == *'Hello, systemd!'* ]]; then
  pass "lifted while severed and running: the service exited 75 and systemd restarted it; serving again"
else failc "lift of a running severed service: $lift_out; NRestarts $(show NRestarts) (was $restarts), $(show ActiveState); call: $out"; fi

step "mcp-tunnel audit reviews the window from the real journal"
audit_out="$(mcp-tunnel audit --since -30min 2>audit.err)"; audit_rc=$?
ok_calls=$(awk '$1 == "audited" && $2 == "tools/call" && $3 == "hello" && $4 == "ok" {print $5}' <<<"$audit_out")
hello_reqs=$(awk '$1 == "hello" && $3 ~ /^\(/ {print $2}' <<<"$audit_out")
reload_at=$(grep -n '  config reloaded' <<<"$audit_out" | head -1 | cut -d: -f1)
sever_at=$(grep -n '  SEVERING' <<<"$audit_out" | head -1 | cut -d: -f1)
if [[ $audit_rc == 0 && ${ok_calls:-0} -ge 1000 && ${hello_reqs:-0} -ge 1 && -n "$reload_at" && -n "$sever_at" && $reload_at -lt $sever_at ]] \
   && grep -q '^callers' <<<"$audit_out" && grep -q '^refusals' <<<"$audit_out"; then
  pass "audit --since -30min from the journal: $(head -1 <<<"$audit_out"); $ok_calls audited tools/call ok, $hello_reqs requests on hello, the reload listed before the sever"
else failc "audit: rc $audit_rc, audited ok ${ok_calls:-none}, hello ${hello_reqs:-none}, reload line ${reload_at:-none}, sever line ${sever_at:-none}; $(head -c 300 audit.err); $(head -20 <<<"$audit_out" | tr '\n' '|')"; fi
empty_out="$(mcp-tunnel audit --since '2100-01-01' 2>&1)"; empty_rc=$?
[[ $empty_rc == 1 && "$empty_out" == *"no entries of unit mcp-tunnel since 2100-01-01"* ]] && pass "an empty window says so (exit 1)" || failc "empty window: rc $empty_rc: $empty_out"
nobody_out="$(runuser -u nobody -- mcp-tunnel audit --since -30min 2>&1)"; nobody_rc=$?
[[ $nobody_rc == 1 && "$nobody_out" == *"not readable by this user"* ]] && pass "a caller who may not read the journal is told so (exit 1)" || failc "audit as nobody: rc $nobody_rc: $nobody_out"

step "systemctl stop is clean"
# All 4 connections up first: READY=1 comes with the first one, and a SIGTERM while the others
# are still being set up makes cloudflared register and unregister them one by one until its
# grace period ends.
for _ in $(seq 100); do curl -s 127.0.0.1:9180/readyz | grep -q '"connected 4/4"' && break; sleep 0.2; done
mainpid=$(show MainPID); inv="$(show InvocationID)"
t0=$(date +%s%N); systemctl stop mcp-tunnel; ms=$(( ($(date +%s%N) - t0) / 1000000 ))
log="$(journalctl _SYSTEMD_INVOCATION_ID="$inv" -o cat --no-pager; journalctl -u mcp-tunnel -o cat --no-pager | tail -n 20)"
if [[ "$(show Result)" == success && "$(show ExecMainStatus)" == 0 ]] && ! grep -q 'SIGKILL\|Killing process\|timed out' <<<"$log" \
   && ! pgrep -f '^/usr/lib/mcp-tunnel/cloudflared' >/dev/null; then
  pass "stopped in $ms ms: Result=success, exit 0, no SIGKILL, cloudflared gone"
else failc "stop: Result=$(show Result) status=$(show ExecMainStatus) in $ms ms; $(grep -m2 'SIGKILL\|Killing\|timed out' <<<"$log")"; fi
unreg=$(journalctl _SYSTEMD_INVOCATION_ID="$inv" -o cat --no-pager | grep -c '^Unregistered tunnel connection' || true)
if [[ $unreg -eq 4 ]]; then
  pass "cloudflared unregistered from the edge on stop: 'Unregistered tunnel connection' x4 in the journal; fake-edge: $(journalctl -u fake-edge -o cat --no-pager | grep -c 'UnregisterConnection') UnregisterConnection calls in all"
else failc "stop: 'Unregistered tunnel connection' x$unreg in the journal (want 4): $(journalctl _SYSTEMD_INVOCATION_ID="$inv" -o cat --no-pager | tail -n 8 | tr '\n' '|')"; fi
denied="$(journalctl -u mcp-tunnel -o cat --no-pager | grep -iE 'SIGSYS|operation not permitted|permission denied|bad system call' | head -n 3)"
[[ -z "$denied" ]] && pass "the sandbox denied cloudflared and the supervisor nothing (no SIGSYS / EPERM / EACCES in the unit's journal)" \
  || failc "the sandbox denied something: $denied"

step "apt purge removes everything but /var/lib/mcp-tunnel"
systemctl stop sample-upstream edge-client fake-edge
apt-get purge -y mcp-tunnel >purge.log 2>&1 || { cat purge.log; failc "apt-get purge"; }
left=""
for p in /usr/bin/mcp-tunnel /usr/lib/mcp-tunnel /etc/mcp-tunnel /usr/lib/systemd/system/mcp-tunnel.service \
         /etc/systemd/system/multi-user.target.wants/mcp-tunnel.service /usr/lib/sysusers.d/mcp-tunnel.conf \
         /usr/lib/tmpfiles.d/mcp-tunnel.conf /usr/share/doc/mcp-tunnel /usr/share/man/man1/mcp-tunnel.1.gz \
         /var/lib/systemd/deb-systemd-helper-enabled/mcp-tunnel.service.dsh-also; do
  [[ -e "$p" || -L "$p" ]] && left+=" $p"
done
dpkg -s mcp-tunnel >/dev/null 2>&1 && left+=" (dpkg still knows mcp-tunnel)"
[[ -z "$left" ]] && pass "purged: binary, bundle, config, unit, enable symlink, sysusers/tmpfiles, docs" || failc "left after purge:$left"
if [[ -f /var/lib/mcp-tunnel/tunnel-token && -f /var/lib/mcp-tunnel/ca.key && -f /var/lib/mcp-tunnel/tls.key ]]; then
  pass "kept on purpose: /var/lib/mcp-tunnel ($(ls /var/lib/mcp-tunnel | tr '\n' ' ')) and the mcp-tunnel user"
else failc "state directory lost on purge"; fi

journalctl -b --no-pager -o short-monotonic >journal-boot.txt 2>&1
journalctl -b --no-pager -o verbose -u mcp-tunnel >journal-mcp-tunnel-verbose.txt 2>&1
step "done: $failures failed"
exit $((failures > 0))
