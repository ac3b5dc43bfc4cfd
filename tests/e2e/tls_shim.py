#!/usr/bin/env python3
"""A plain-TCP listener that forwards each connection over TLS (a client of the tunnel).

usage: tls_shim.py CONNECT_HOST:PORT SNI CA_FILE

The 2026-07-28 conformance suite sends its raw-header checks with node:http, plain HTTP even
for an https URL; through this shim the suite speaks plain HTTP on loopback and every byte
still crosses the tunnel inside TLS (SNI = the route's host, verified against CA_FILE).
Listens on 127.0.0.1 port 0 and prints "listening PORT".
"""

import asyncio
import ssl
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, ssl.SSLError):
            pass


async def main() -> None:
    target, sni, ca = sys.argv[1], sys.argv[2], sys.argv[3]
    host, port = target.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])

    async def serve(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=sni)
        except (OSError, ssl.SSLError) as e:
            print(f"connect to {target} failed: {e}", file=sys.stderr, flush=True)
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
