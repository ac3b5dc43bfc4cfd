#!/usr/bin/env python3
"""The Python SDK's client (mcp 2.x `mcp.Client`) through the tunnel to modern_server.mjs.

usage: py_modern_client.py URL auto|legacy --ca CA_PEM

auto: the client probes server/discover and must speak 2026-07-28, sending the standard
headers (Mcp-Method, Mcp-Name, and Mcp-Param-Region for the annotated argument); legacy: the
initialize handshake. Both: the route's policy hides admin-reset from tools/list and
refuses a call of it; echo and regional answer. Exit 1 on any failed check.
"""

import argparse
import asyncio
import ssl
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

failures = 0


def check(ok: bool, what: str, detail: str = "") -> None:
    global failures
    print(f"{'ok  ' if ok else 'FAIL'} py {ARGS.mode}: {what}{'' if ok or not detail else ': ' + detail}")
    if not ok:
        failures += 1


async def main() -> int:
    sent: list[dict[str, str]] = []

    async def on_request(request: httpx2.Request) -> None:
        sent.append({k.lower(): v for k, v in request.headers.items() if k.lower().startswith("mcp-")})

    http = httpx2.AsyncClient(
        verify=ssl.create_default_context(cafile=ARGS.ca),
        event_hooks={"request": [on_request]},
        timeout=httpx2.Timeout(30.0, read=60.0),
    )
    async with http, Client(streamable_http_client(ARGS.url, http_client=http), mode=ARGS.mode) as client:
        version = client.protocol_version
        want = "2026-07-28" if ARGS.mode == "auto" else None
        check(version == want if want else not version.startswith("2026"), f"negotiated {version}")
        listed = await client.list_tools()
        names = sorted(t.name for t in listed.tools)
        check(names == ["echo", "regional"], f"tools/list without admin-reset ({names})")
        r = await client.call_tool("echo", {"message": "hi"})
        text = r.content[0].text if r.content else ""
        check(text.endswith(": hi") and not r.is_error, f"echo answers ({text})")
        before = len(sent)
        r = await client.call_tool("regional", {"region": "eu-west", "text": "x"})
        text = r.content[0].text if r.content else ""
        check(text == "eu-west: x", f"regional answers ({text})")
        if ARGS.mode == "auto":
            h = next((h for h in sent[before:] if h.get("mcp-method") == "tools/call"), {})
            check(
                h.get("mcp-name") == "regional" and h.get("mcp-param-region") == "eu-west",
                "the client sent Mcp-Name and Mcp-Param-Region through the tunnel",
                str(h),
            )
        refused = None
        try:
            d = await client.call_tool("admin-reset", {})
            if d.is_error:
                refused = str(d.content)
            else:
                check(False, "admin-reset refused", f"it ran: {d}")
        except Exception as e:  # the SDK raises on a JSON-RPC error
            refused = str(e)
        check(refused is not None and "policy" in refused, "admin-reset refused by the tunnel", str(refused))
    print(f"py modern client ({ARGS.mode}): {'all checks passed' if failures == 0 else f'{failures} failed'}")
    return 0 if failures == 0 else 1


parser = argparse.ArgumentParser()
parser.add_argument("url")
parser.add_argument("mode", choices=["auto", "legacy"])
parser.add_argument("--ca", required=True)
ARGS = parser.parse_args()
sys.exit(asyncio.run(main()))
