#!/usr/bin/env bash
# The admin endpoint's status page (`/`) in a real browser: Debian's chromium, headless.
#
# Inside a loopback-only network namespace (`unshare -n`, everything of the test in it):
# `mcp-tunnel run` with the cloudflared stand-in (4 edge connections, carrying TLS clients
# to the listener as the edge does), an upstream (python3 http.server), and three routes:
# `echo` (answers), `down` (nothing listens: connect failed) and no route at all. curl sends
# requests through the tunnel, then a config edit with a route key full of markup is refused
# by the live reload. Chromium loads the page: a screenshot, and the rendered DOM, whose
# tables are asserted cell by cell (readiness, routes with counts and upstream verdicts,
# cloudflared connections and restarts, certificate days left, the refused reload with its
# markup shown as text and never as elements).
#
# Usage: tests/status_page.sh        (as root, for unshare; apt: chromium, curl, python3)
# Artifacts: $STATUS_PAGE_ARTIFACTS (default target/status-page/): status.png, dom.html,
#            mcp-tunnel.log. Runtime: ~10 s with built binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
pass() { printf 'PASS %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

ART="${STATUS_PAGE_ARTIFACTS:-$ROOT/target/status-page}"
BIN="$ROOT/target/debug/mcp-tunnel"
STANDIN="$ROOT/target/debug/cloudflared-standin"

if [[ -z "${STATUS_PAGE_IN_NETNS:-}" ]]; then
  [[ $EUID -eq 0 ]] || fail "run as root (the test runs in its own network namespace: unshare -n)"
  for tool in chromium curl python3 unshare ip; do
    command -v "$tool" >/dev/null || fail "$tool not found (tests/install-deps.sh installs it)"
  done
  # Build outside the namespace (cargo may need the registry).
  cargo build --locked -p mcp-tunnel -p cloudflared-standin
  exec unshare -n env STATUS_PAGE_IN_NETNS=1 bash -c 'ip link set lo up && exec "$0"' "$0"
fi

# Inside the namespace: nothing but loopback exists, fixed ports are ours.
ADMIN=127.0.0.1:19180 LISTEN=127.0.0.1:18080 EDGE=18443 UP=18090
rm -rf "$ART" && mkdir -p "$ART"
WORK="$(mktemp -d /tmp/mcp-tunnel-status-page.XXXXXX)"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" certs init --tunnel-domain tunnel.test --dir "$WORK/pki" >/dev/null
# A token of cloudflared's shape (base64 of {"a","t","s"}) for the stand-in.
printf '{"a":"acct","t":"2f1e8a4c-1111-4222-8333-944455556666","s":"c2VjcmV0"}' | base64 -w0 >"$WORK/tunnel-token"
chmod 600 "$WORK/tunnel-token"
mkdir -p "$WORK/www" && echo "hello from the upstream" >"$WORK/www/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$UP" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$UP/" && break
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$UP/" || fail "the upstream (python3 -m http.server) did not start"

write_config() { # write_config EXTRA_ROUTE_LINE
  cat >"$WORK/mcp-tunnel.toml.new" <<EOF
listen_addr = "$LISTEN"
tunnel_domain = "tunnel.test"
shutdown_timeout = "2s"
[tls]
cert_file = "$WORK/pki/tls.crt"
key_file = "$WORK/pki/tls.key"
[routes]
echo = "http://127.0.0.1:$UP"
down = "http://127.0.0.1:1"
$1
[upstream]
allowed_ips = ["127.0.0.0/8"]
[admin]
listen_addr = "$ADMIN"
[cloudflared]
binary = "$STANDIN"
token_file = "$WORK/tunnel-token"
health_interval = "200ms"
[cloudflared.env]
STANDIN_FORWARD = "127.0.0.1:$EDGE"
EOF
  mv "$WORK/mcp-tunnel.toml.new" "$WORK/mcp-tunnel.toml"
}
write_config ""
"$BIN" run --config "$WORK/mcp-tunnel.toml" >"$ART/mcp-tunnel.log" 2>&1 &
PIDS+=($!)

for _ in $(seq 1 100); do
  curl -sf -o /dev/null "http://$ADMIN/readyz" && break
  sleep 0.1
done
curl -sf -o /dev/null "http://$ADMIN/readyz" || { cat "$ART/mcp-tunnel.log" >&2; fail "the appliance did not become ready"; }
pass "mcp-tunnel run is ready with the cloudflared stand-in connected"

call() { # call ROUTE -> prints the HTTP status
  curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$WORK/pki/ca.crt" \
    --resolve "$1.tunnel.test:$EDGE:127.0.0.1" "https://$1.tunnel.test:$EDGE/"
}
for _ in 1 2 3; do [[ "$(call echo)" == 200 ]] || fail "echo through the tunnel did not answer 200"; done
[[ "$(call down)" == 502 ]] || fail "down: expected 502 (connect failed)"
[[ "$(call nothing)" == 502 ]] || fail "nothing: expected 502 (no route)"
pass "traffic: 3 x 200 on echo, 502 on down (connect failed), 502 for a host without route"

# An edit the live reload must refuse; its message quotes the markup-laden key.
write_config '"<b>bold</b><script>alert(1)</script>" = "http://127.0.0.1:1"'
# The metrics are read whole before grep: with pipefail, `curl | grep -q` fails whenever grep
# stops reading first and curl gets SIGPIPE.
reload_refused() { local m; m=$(curl -sf "http://$ADMIN/metrics") && grep -qx 'mcp_tunnel_config_last_reload_success 0' <<<"$m"; }
for _ in $(seq 1 100); do
  reload_refused && break
  sleep 0.1
done
reload_refused || fail "the broken config was not refused"
pass "a config edit with markup in a route key was refused by the live reload"

chrome() {
  local profile
  profile="$(mktemp -d "$WORK/chromium.XXXXXX")"
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" "$@" 2>>"$ART/chromium.log"
}
chrome --window-size=1280,1000 --screenshot="$ART/status.png" "http://$ADMIN/" >/dev/null
[[ "$(head -c 8 "$ART/status.png" | od -An -tx1 | tr -d ' \n')" == 89504e470d0a1a0a ]] || fail "no PNG screenshot"
pass "screenshot: $ART/status.png ($(stat -c %s "$ART/status.png") bytes)"
chrome --dump-dom "http://$ADMIN/" >"$ART/dom.html"
[[ -s "$ART/dom.html" ]] || fail "chromium --dump-dom printed nothing"

# The rendered DOM, table by table, as the browser built it.
python3 - "$ART/dom.html" <<'PY'
import sys
from html.parser import HTMLParser

class Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.table, self.row, self.cell = {}, None, None, None
        self.elements, self.h1 = [], ""
        self.in_h1 = False
    def handle_starttag(self, tag, attrs):
        self.elements.append(tag)
        a = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(a.get("id", "?"), [])
        elif tag == "tr" and self.table is not None:
            self.row = []
            self.table.append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ""
        elif tag == "h1":
            self.in_h1 = True
    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.row is not None and self.cell is not None:
            self.row.append(" ".join(self.cell.split()))
            self.cell = None
        elif tag == "table":
            self.table = None
        elif tag == "h1":
            self.in_h1 = False
    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data
        if self.in_h1:
            self.h1 += data

dom = open(sys.argv[1]).read()
p = Tables()
p.feed(dom)
t = p.tables
fails = []
def check(cond, what):
    print(("PASS " if cond else "FAIL ") + what)
    if not cond:
        fails.append(what)

check("READY" in p.h1 and "NOT READY" not in p.h1, f"heading says READY: {p.h1.strip()!r}")
comps = {r[0]: r[1:] for r in t.get("components", [])[1:]}
for name, state in [("listener", "listening"), ("cloudflared", "connected 4/4"), ("supervisor", "running")]:
    check(comps.get(name, [None, None])[:2] == ["yes", state], f"readiness {name}: {comps.get(name)}")
check(comps.get("certificate", ["", ""])[1].startswith("expires in 89d"), f"readiness certificate: {comps.get('certificate')}")

routes = {r[0]: r[1:] for r in t.get("routes", [])[1:]}
echo, down = routes.get("echo"), routes.get("down")
check(echo is not None and echo[1:3] == ["3", "0"] and echo[3].startswith("answered 200,"), f"route echo: 3 requests, 0 errors, answered 200: {echo}")
check(down is not None and down[1:3] == ["1", "1"] and down[3].startswith("connect failed,"), f"route down: 1 request, 1 error, connect failed: {down}")
check("http://127.0.0.1:1" in (down or ["", ""])[0], f"route down shows its upstream: {down}")
check(echo is not None and echo[4:5] == ["not audited"], f"route echo is shown as not audited (plain route): {echo}")
nomatch = routes.get("(no route matched)")
check(nomatch is not None and nomatch[1:3] == ["1", "1"], f"requests without a route are counted: {nomatch}")

cf = {r[0]: r[1] for r in t.get("cloudflared", []) if len(r) == 2}
check(cf.get("state") == "connected", f"cloudflared state: {cf}")
check(cf.get("edge connections") == "4 of 4", f"cloudflared connections: {cf}")
check(cf.get("restarts since start") == "0", f"cloudflared restarts: {cf}")
check(cf.get("pid", "").isdigit(), f"cloudflared pid: {cf}")

conf = {r[0]: r[1] for r in t.get("config", []) if len(r) == 2}
check(conf.get("server certificate", "").startswith("89 days left"), f"certificate: {conf.get('server certificate')}")
last = conf.get("last reload", "")
check(last.startswith("refused at ") and "<b>bold</b><script>alert(1)</script>" in last, f"last reload refused, the key shown as text: {last}")
check(conf.get("reloads refused since start") == "1", f"reload failures: {conf.get('reloads refused since start')}")
# Markup from the config became text: the browser built no such element.
check("b" not in p.elements and "script" not in p.elements, f"no <b> or <script> element in the DOM: {sorted(set(p.elements))}")
sys.exit(1 if fails else 0)
PY
pass "status page rendered by chromium: every assertion on the DOM held (artifacts in $ART)"
