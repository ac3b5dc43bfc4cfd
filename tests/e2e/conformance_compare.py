#!/usr/bin/env python3
"""Compare two runs of the MCP conformance suite (`npx conformance server -o DIR`).

usage: conformance_compare.py DIRECT_DIR TUNNEL_DIR [--label NAME]

The suite writes one folder per scenario, named `server-<scenario>-<timestamp>`, each with a
checks.json: a list of checks {id, name, status: SUCCESS|FAILURE|WARNING|INFO, errorMessage?,
details?}. A scenario passes when none of its checks is FAILURE or WARNING (the suite's own
rule).

The proxy is transparent when every scenario has the same verdict and every check the same
status on both sides. One kind of check is set aside: the suite's dns-rebinding-protection
scenario only runs against a localhost URL, so through the tunnel (a non-localhost URL) it
reports FAILURE with details.reason "non-localhost-url" without sending anything. Such
checks are shown as "n/a" and not compared; the rest of the scenario still is.

Prints a table and exits 1 on any difference, or when the direct run has no scenario (a
broken run must not pass), or when a checks.json cannot be read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DIR_RE = re.compile(r"^server-(?P<name>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
NOT_COMPARABLE_REASONS = {"non-localhost-url"}


def load(root: Path) -> dict[str, list[dict]]:
    scenarios: dict[str, list[dict]] = {}
    if not root.is_dir():
        raise SystemExit(f"FAIL conformance: output folder {root} does not exist")
    for entry in sorted(root.iterdir()):
        m = DIR_RE.match(entry.name)
        if not entry.is_dir() or not m:
            continue
        name = m.group("name")
        if name in scenarios:
            raise SystemExit(f"FAIL conformance: scenario {name} appears twice in {root}")
        path = entry / "checks.json"
        try:
            checks = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"FAIL conformance: cannot read {path}: {exc}") from exc
        if not isinstance(checks, list):
            raise SystemExit(f"FAIL conformance: {path} is not a list of checks")
        scenarios[name] = checks
    return scenarios


def not_comparable(check: dict) -> bool:
    details = check.get("details") or {}
    return isinstance(details, dict) and details.get("reason") in NOT_COMPARABLE_REASONS


def statuses(checks: list[dict]) -> dict[str, str]:
    """check id -> status; repeated ids get a #n suffix so none is lost."""
    out: dict[str, str] = {}
    for check in checks:
        key = str(check.get("id"))
        n = 1
        while key in out:
            n += 1
            key = f"{check.get('id')}#{n}"
        out[key] = "n/a" if not_comparable(check) else str(check.get("status"))
    return out


def verdict(st: dict[str, str], skip: set[str]) -> str:
    relevant = [s for k, s in st.items() if k not in skip]
    if not relevant:
        return "n/a"
    if any(s in ("FAILURE", "WARNING") for s in relevant):
        return "fail"
    return "pass"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("direct")
    parser.add_argument("tunnel")
    parser.add_argument("--label", default="conformance")
    args = parser.parse_args()

    direct = load(Path(args.direct))
    tunnel = load(Path(args.tunnel))
    label = args.label

    if not direct:
        print(f"FAIL {label}: the direct run produced no scenario results in {args.direct}")
        return 1

    differences: list[str] = []
    rows: list[tuple[str, str, str, str]] = []
    passed_direct = 0
    for name in sorted(set(direct) | set(tunnel)):
        if name not in tunnel:
            rows.append((name, "?", "missing", "DIFF"))
            differences.append(f"{name}: no result through the tunnel")
            continue
        if name not in direct:
            rows.append((name, "missing", "?", "DIFF"))
            differences.append(f"{name}: no result in the direct run")
            continue
        d, t = statuses(direct[name]), statuses(tunnel[name])
        skip = {k for k, s in t.items() if s == "n/a"}
        passed_direct += verdict(d, set()) == "pass"
        if skip and skip >= set(d) | set(t):
            # nothing left to compare: show the direct verdict for information only
            rows.append((name, verdict(d, set()), "n/a", "not compared (the suite needs a localhost URL)"))
            continue
        vd, vt = verdict(d, skip), verdict(t, skip)
        diffs = []
        for key in sorted(set(d) | set(t)):
            if key in skip:
                continue
            if d.get(key) != t.get(key):
                diffs.append(f"{key}: direct {d.get(key, 'absent')}, tunnel {t.get(key, 'absent')}")
        if vd != vt:
            diffs.insert(0, f"verdict: direct {vd}, tunnel {vt}")
        note = "same"
        if diffs:
            note = "DIFF"
            differences.extend(f"{name}: {x}" for x in diffs)
        elif skip:
            note = f"same ({len(skip)} check(s) not compared: the suite needs a localhost URL)"
        rows.append((name, vd, vt, note))

    w = max(len(r[0]) for r in rows)
    print(f"{label}: per-scenario verdicts, direct vs through the tunnel")
    print(f"  {'scenario'.ljust(w)}  {'direct':7} {'tunnel':7} result")
    for name, vd, vt, note in rows:
        print(f"  {name.ljust(w)}  {vd:7} {vt:7} {note}")
    print(
        f"  {len(direct)} scenarios direct ({passed_direct} pass), {len(tunnel)} through the tunnel, "
        f"{len(differences)} difference(s)"
    )
    if differences:
        for diff in differences:
            print(f"  difference: {diff}")
        print(f"FAIL {label}: results differ through the tunnel")
        return 1
    not_compared = sum(1 for r in rows if r[3].startswith("not compared"))
    extra = f" ({not_compared} not compared: the suite needs a localhost URL)" if not_compared else ""
    print(f"PASS {label}: {len(direct) - not_compared} scenarios identical through the tunnel{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
