#!/usr/bin/env bash
# Checks the shipped monitoring files with the real Prometheus tooling:
#  - promtool check rules mcp-tunnel.rules.yml (syntax, PromQL, templates);
#  - promtool test rules mcp-tunnel.rules.test.yml (each alert fires when it should, not
#    before its `for:`, and not on look-alikes);
#  - the Grafana dashboard is JSON with unique panel ids, every panel on the ${datasource}
#    variable, and every query valid PromQL (each one checked by promtool as a recording
#    rule, Grafana's $__rate_interval and $instance substituted); a copy with one broken
#    query is refused, so the check can fail.
# That every metric name in these files is exported by a running appliance is checked by
# tests/monitoring.rs (cargo test), which scrapes a real `mcp-tunnel run`.
#
# Usage: packaging/monitoring/check.sh        (apt: prometheus, for promtool; ~1 s)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
pass() { printf 'PASS %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*" >&2; exit 1; }
command -v promtool >/dev/null || fail "promtool not found (apt-get install -y prometheus, or tests/install-deps.sh)"
work="$(mktemp -d /tmp/mcp-tunnel-monitoring.XXXXXX)"
trap 'rm -rf "$work"' EXIT

promtool check rules mcp-tunnel.rules.yml || fail "promtool check rules mcp-tunnel.rules.yml"
pass "promtool check rules: $(grep -c '^      - alert:' mcp-tunnel.rules.yml) alerts"
promtool test rules mcp-tunnel.rules.test.yml || fail "promtool test rules mcp-tunnel.rules.test.yml"
pass "promtool test rules: $(grep -c '^  - name:' mcp-tunnel.rules.test.yml) test groups"

# dashboard_rules DASHBOARD OUT: one recording rule per query (or exit 1 on a structural fault).
dashboard_rules() {
  python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
assert d["uid"] and d["title"], "dashboard needs a uid and a title"
names = [v["name"] for v in d["templating"]["list"]]
assert "datasource" in names and "instance" in names, f"variables: {names}"
rules = []
for p in d["panels"]:
    assert p["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r}: datasource {p['datasource']}"
    assert p["targets"], f"panel {p['title']!r} has no query"
    for t in p["targets"]:
        expr = t["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*")
        assert "$" not in expr, f"panel {p['title']!r}: unknown variable in {t['expr']!r}"
        rules.append((f"dashboard:panel_{p['id']}_{t['refId']}", expr))
with open(sys.argv[2], "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for name, expr in rules:
        f.write(f"      - record: {name}\n        expr: {json.dumps(expr)}\n")
print(f"{len(d['panels'])} panels, {len(rules)} queries")
PY
}
summary="$(dashboard_rules mcp-tunnel.dashboard.json "$work/dashboard.rules.yml")" || fail "mcp-tunnel.dashboard.json: structure"
promtool check rules "$work/dashboard.rules.yml" >"$work/promtool.out" 2>&1 || { cat "$work/promtool.out" >&2; fail "a dashboard query is not valid PromQL"; }
pass "dashboard: $summary, every query valid PromQL"

python3 - mcp-tunnel.dashboard.json "$work/broken.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["panels"][-1]["targets"][0]["expr"] = "sum by (route (rate(mcp_tunnel_requests_total[5m]))"
json.dump(d, open(sys.argv[2], "w"))
PY
dashboard_rules "$work/broken.json" "$work/broken.rules.yml" >/dev/null
if promtool check rules "$work/broken.rules.yml" >/dev/null 2>&1; then
  fail "promtool accepted a dashboard query with unbalanced parentheses: the check above proves nothing"
fi
pass "a dashboard copy with one broken query is refused"
