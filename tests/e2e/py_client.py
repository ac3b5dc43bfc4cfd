#!/usr/bin/env python3
"""MCP client on the Python SDK (mcp 2.x, httpx2), for the end-to-end tests.

usage: py_client.py URL [--label NAME] [--ca CA_PEM] [--http2] [--deny TOOL] [--skip-progress]

The same checks as ts_client.mjs, each printed as a PASS/FAIL line:
  initialize, tools/list (also printed as "TOOLS name,name,..."), with --deny TOOL: TOOL is
  not listed and calling it gets the tunnel's JSON-RPC error (-32602), tools/call echo,
  progress streaming (steps=5, duration=2: progress notifications one by one, strictly
  increasing, spread in time, all before the result; skipped with --skip-progress),
  session DELETE (answered 200/204 when the client closes).
With --http2 the client offers only h2 over TLS (ALPN) and asserts that every exchange
used HTTP/2; otherwise it asserts HTTP/1.1.
--ca makes the client trust only that CA (the default is the system store).
Exit status 1 on the first failed check, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
from typing import Any

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

STEPS = 5
DURATION = 2.0  # seconds
REQUEST_TIMEOUT = 30.0
OVERALL_TIMEOUT = 60.0


class CheckFailed(Exception):
    pass


def check(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def text_of(result: Any) -> str | None:
    for block in result.content or []:
        if getattr(block, "type", None) == "text":
            return block.text
    return None


class Run:
    def __init__(
        self, url: str, label: str, ca: str | None, http2: bool, deny: str | None = None, skip_progress: bool = False
    ) -> None:
        self.url = url
        self.deny = deny
        self.skip_progress = skip_progress
        self.prefix = f"py-client[{label}]"
        self.ca = ca
        self.http2 = http2
        self.current = "setup"
        self.exchanges: list[tuple[str, int, str]] = []  # (method, status, http_version)

    def ok(self, detail: str = "") -> None:
        print(f"PASS {self.prefix} {self.current}{': ' + detail if detail else ''}", flush=True)

    async def _on_response(self, response: httpx2.Response) -> None:
        self.exchanges.append((response.request.method, response.status_code, response.http_version))

    def _http_client(self) -> httpx2.AsyncClient:
        if self.ca:
            ssl_ctx = ssl.create_default_context(cafile=self.ca)
        else:
            ssl_ctx = ssl.create_default_context()
        return httpx2.AsyncClient(
            verify=ssl_ctx,
            http1=not self.http2,
            http2=self.http2,
            trust_env=False,  # no proxy or CA settings from the environment
            timeout=httpx2.Timeout(REQUEST_TIMEOUT, read=300.0),
            event_hooks={"response": [self._on_response]},
        )

    async def run(self) -> None:
        started = time.monotonic()
        async with self._http_client() as http_client:
            async with streamable_http_client(self.url, http_client=http_client) as (read, write):
                async with ClientSession(read, write, read_timeout_seconds=REQUEST_TIMEOUT) as session:
                    await self._checks(session)
                self.current = "session DELETE"
            # leaving streamable_http_client sent DELETE for the session
        deletes = [e for e in self.exchanges if e[0] == "DELETE"]
        check(len(deletes) == 1, f"expected one DELETE, saw {self.exchanges}")
        check(deletes[0][1] in (200, 204), f"DELETE answered {deletes[0][1]}")
        self.ok(f"status {deletes[0][1]}")

        self.current = "HTTP version"
        want = "HTTP/2" if self.http2 else "HTTP/1.1"
        versions = sorted({e[2] for e in self.exchanges})
        check(versions == [want], f"expected only {want}, saw {versions} in {self.exchanges}")
        self.ok(f"{want} for all {len(self.exchanges)} exchanges")
        print(f"{self.prefix} done in {time.monotonic() - started:.2f} s", flush=True)

    async def _checks(self, session: ClientSession) -> None:
        self.current = "initialize"
        init = await session.initialize()
        check(bool(init.server_info.name), "server sent no serverInfo name")
        self.ok(f"server {init.server_info.name} {init.server_info.version}, protocol {init.protocol_version}")

        self.current = "tools/list"
        tools = await session.list_tools()
        names = [t.name for t in tools.tools]
        for wanted in ("echo", "trigger-long-running-operation"):
            check(wanted in names, f"tool {wanted} missing; got {names}")
        self.ok(f"{len(names)} tools")
        print(f"TOOLS {','.join(sorted(names))}", flush=True)

        if self.deny:
            self.current = f"denied tool {self.deny}"
            check(self.deny not in names, f"{self.deny} is listed: {names}")
            try:
                result = await session.call_tool(self.deny, {})
            except MCPError as err:
                check(err.code == -32602, f"expected JSON-RPC error -32602, got {err.code}: {err.message}")
                check("denied by the tunnel's policy" in err.message, f"unexpected error message: {err.message}")
                self.ok(f"not listed; call refused with {err.code}: {err.message}")
            else:
                raise CheckFailed(f"calling {self.deny} succeeded: {result}")

        self.current = "tools/call echo"
        message = f"hello through the tunnel {time.time_ns()} ünïcødé ✓"
        echoed = await session.call_tool("echo", {"message": message})
        check(not echoed.is_error, f"echo returned is_error: {echoed}")
        check(text_of(echoed) == f"Echo: {message}", f"echo text {text_of(echoed)!r} != {'Echo: ' + message!r}")
        self.ok()

        if self.skip_progress:
            self.current = "progress streaming"
            self.ok("skipped (--skip-progress)")
            return
        self.current = "progress streaming"
        events: list[tuple[str, float, float]] = []  # (kind, progress, t)
        t0 = time.monotonic()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            events.append(("progress", progress, time.monotonic() - t0))

        result = await session.call_tool(
            "trigger-long-running-operation",
            {"duration": DURATION, "steps": STEPS},
            progress_callback=on_progress,
        )
        events.append(("result", 0.0, time.monotonic() - t0))
        self._check_progress(events, result)

    def _check_progress(self, events: list[tuple[str, float, float]], result: Any) -> None:
        order = " ".join(
            f"p{p:g}@{t:.2f}s" if kind == "progress" else f"result@{t:.2f}s" for kind, p, t in events
        )
        check(not result.is_error, f"tool returned is_error: {result}")
        check("completed" in (text_of(result) or "").lower(), f"unexpected result text {text_of(result)!r}")
        progress = [e for e in events if e[0] == "progress"]
        result_index = [i for i, e in enumerate(events) if e[0] == "result"][0]
        check(result_index == len(events) - 1, f"an event came after the result: {order}")
        check(len(progress) == STEPS, f"expected {STEPS} progress notifications, got {len(progress)}: {order}")
        for i, (_, p, _) in enumerate(progress):
            check(p == i + 1, f"progress #{i} has value {p:g}, expected {i + 1}: {order}")
            if i > 0:
                check(p > progress[i - 1][1], f"progress not strictly increasing: {order}")
        # Streamed, not buffered: see ts_client.mjs for the reasoning behind the margins.
        step = DURATION / STEPS
        expected_lead = step * (STEPS - 1)
        first_lead = events[result_index][2] - progress[0][2]
        spread = progress[-1][2] - progress[0][2]
        check(
            first_lead >= expected_lead / 2,
            f"first progress arrived only {first_lead:.3f} s before the result "
            f"(expected about {expected_lead:.1f} s): buffered? {order}",
        )
        check(
            spread >= expected_lead / 2,
            f"progress notifications arrived within {spread:.3f} s of each other "
            f"(expected about {expected_lead:.1f} s): buffered? {order}",
        )
        self.ok(order)


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    if isinstance(exc, CheckFailed):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and describe(cause) != text:
        text += f" (cause: {describe(cause)})"
    return text


async def amain(args: argparse.Namespace) -> int:
    run = Run(args.url, args.label or args.url, args.ca, args.http2, args.deny, args.skip_progress)
    try:
        with anyio.fail_after(OVERALL_TIMEOUT):
            await run.run()
    except BaseException as exc:  # noqa: BLE001 - report anything, including exception groups
        if isinstance(exc, TimeoutError):
            msg = f"timed out after {OVERALL_TIMEOUT:.0f} s"
        else:
            msg = describe(exc)
        print(f"FAIL {run.prefix} {run.current}: {msg}", flush=True)
        if run.exchanges:
            print(f"     {run.prefix} HTTP exchanges so far: {run.exchanges}", flush=True)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--label")
    parser.add_argument("--ca", help="PEM file of the only CA to trust")
    parser.add_argument("--http2", action="store_true", help="offer only h2 and require HTTP/2")
    parser.add_argument("--deny", help="a tool the tunnel's policy must hide and refuse")
    parser.add_argument("--skip-progress", action="store_true", help="skip the progress streaming check")
    args = parser.parse_args()
    sys.exit(anyio.run(amain, args))


if __name__ == "__main__":
    main()
