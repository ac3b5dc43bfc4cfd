#!/usr/bin/env python3
"""A small MCP server built on the Python SDK (mcp 2.x), for the end-to-end tests.

It serves streamable HTTP on 127.0.0.1:PORT/mcp, where PORT is the first argument or
the PY_SERVER_PORT environment variable; with --json it answers POSTs with JSON bodies
instead of SSE streams (json_response=True). Tools:

- echo(message): returns "Echo: <message>" (the same text as server-everything's echo)
- trigger-long-running-operation(duration, steps): sleeps duration/steps seconds per step
  and sends one progress notification per step (progress=i, total=steps), like
  server-everything's tool of the same name, then returns a completion message.
- get-env(): returns "MCP_TUNNEL_E2E=1" (the name of server-everything's tool that dumps the
  environment; the tunnel's tool-policy test denies it).

The SDK's DNS-rebinding protection stays on (its default for a server bound to
127.0.0.1): a request whose Host is not 127.0.0.1/localhost gets 421. Through the tunnel
this only passes if the proxy rewrites Host to the upstream's authority.

mcp 2.x renamed FastMCP to MCPServer (mcp.server.mcpserver); this is that class.
"""

from __future__ import annotations

import os
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer(name="mcp-tunnel-e2e-pyserver", version="0.0.0")


@server.tool(name="echo", description="Echoes back the input string")
async def echo(message: str) -> str:
    return f"Echo: {message}"


@server.tool(
    name="trigger-long-running-operation",
    description="Long running operation that reports progress once per step",
)
async def trigger_long_running_operation(ctx: Context, duration: float = 10, steps: int = 5) -> str:
    if steps < 1:
        raise ValueError("steps must be >= 1")
    step_duration = duration / steps
    for i in range(1, steps + 1):
        await anyio.sleep(step_duration)
        await ctx.report_progress(i, steps)
    return f"Long running operation completed. Duration: {duration} seconds, Steps: {steps}."


@server.tool(name="get-env", description="Returns the environment (a stand-in value here)")
async def get_env() -> str:
    return "MCP_TUNNEL_E2E=1"


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--json"]
    port_text = args[0] if args else os.environ.get("PY_SERVER_PORT", "")
    if not port_text:
        sys.exit("usage: py_server.py PORT [--json] (or set PY_SERVER_PORT)")
    server.run(
        transport="streamable-http",
        host="127.0.0.1",
        port=int(port_text),
        json_response="--json" in sys.argv[1:],
    )


if __name__ == "__main__":
    main()
