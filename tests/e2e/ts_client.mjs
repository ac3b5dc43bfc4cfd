#!/usr/bin/env node
// MCP client on the TypeScript SDK (StreamableHTTPClientTransport), for the end-to-end tests.
//
// usage: node ts_client.mjs URL [LABEL] [--deny TOOL] [--skip-progress]
//
// Checks, each printed as a PASS/FAIL line:
//   initialize                 the session opens and the server names itself
//   tools/list                 echo and trigger-long-running-operation are listed (it also
//                              prints "TOOLS name,name,..." for run.sh to compare)
//   denied tool (--deny TOOL)  TOOL is not listed, and calling it anyway gets the tunnel's
//                              JSON-RPC error (-32602, "denied by the tunnel's policy")
//   tools/call echo            the text comes back as "Echo: <message>"
//   progress streaming         trigger-long-running-operation (steps=5, duration=2) sends its
//                              progress notifications one by one, before the final result,
//                              with values strictly increasing 1..steps and spread in time
//                              (a proxy that buffers the SSE response would deliver them all
//                              at once with the result)
//                              (skipped with --skip-progress: a server answering POSTs as
//                              JSON sends no progress in the answer)
//   session DELETE             the session is terminated with DELETE
// Exits 1 on the first failure, 2 on bad usage.
//
// A private CA is trusted through NODE_EXTRA_CA_CERTS, which must be set by the caller
// (Node reads it at startup).

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const STEPS = 5;
const DURATION = 2; // seconds
const REQUEST_TIMEOUT_MS = 30_000;

const positional = [];
let deny = null;
let skipProgress = false;
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === "--deny") deny = process.argv[++i];
  else if (a === "--skip-progress") skipProgress = true;
  else positional.push(a);
}
const url = positional[0];
const label = positional[1] || url;
if (!url || (deny !== null && !deny)) {
  console.error("usage: node ts_client.mjs URL [LABEL] [--deny TOOL] [--skip-progress]");
  process.exit(2);
}

const prefix = `ts-client[${label}]`;
let current = "setup";

function pass(check, detail = "") {
  console.log(`PASS ${prefix} ${check}${detail ? ": " + detail : ""}`);
}

class CheckFailed extends Error {}

function fail(message) {
  throw new CheckFailed(message);
}

function assert(cond, message) {
  if (!cond) fail(message);
}

function textOf(result) {
  const first = (result.content || []).find((c) => c.type === "text");
  return first ? first.text : undefined;
}

async function main() {
  const started = performance.now();
  const transport = new StreamableHTTPClientTransport(new URL(url));
  const client = new Client({ name: "mcp-tunnel-e2e-ts-client", version: "0.0.0" });

  current = "initialize";
  await client.connect(transport, { timeout: REQUEST_TIMEOUT_MS });
  const info = client.getServerVersion();
  assert(info && info.name, "server sent no serverInfo");
  assert(transport.sessionId, "server assigned no Mcp-Session-Id");
  pass(current, `server ${info.name} ${info.version || ""}, protocol ${transport.protocolVersion}`);

  current = "tools/list";
  const { tools } = await client.listTools(undefined, { timeout: REQUEST_TIMEOUT_MS });
  const names = tools.map((t) => t.name);
  for (const wanted of ["echo", "trigger-long-running-operation"]) {
    assert(names.includes(wanted), `tool ${wanted} missing; got ${JSON.stringify(names)}`);
  }
  pass(current, `${names.length} tools`);
  console.log(`TOOLS ${[...names].sort().join(",")}`);

  if (deny) {
    current = `denied tool ${deny}`;
    assert(!names.includes(deny), `${deny} is listed: ${JSON.stringify(names)}`);
    let refused = null;
    try {
      const r = await client.callTool({ name: deny, arguments: {} }, undefined, { timeout: REQUEST_TIMEOUT_MS });
      fail(`calling ${deny} succeeded: ${JSON.stringify(r)}`);
    } catch (err) {
      if (err instanceof CheckFailed) throw err;
      refused = err;
    }
    assert(refused.code === -32602, `expected JSON-RPC error -32602, got ${refused.code}: ${refused.message}`);
    assert(/denied by the tunnel's policy/.test(refused.message), `unexpected error message: ${refused.message}`);
    pass(current, `not listed; call refused with ${refused.code}: ${refused.message}`);
  }

  current = "tools/call echo";
  const message = `hello through the tunnel ${Date.now()} ünïcødé ✓`;
  const echoed = await client.callTool(
    { name: "echo", arguments: { message } },
    undefined,
    { timeout: REQUEST_TIMEOUT_MS },
  );
  assert(!echoed.isError, `echo returned isError: ${JSON.stringify(echoed)}`);
  assert(
    textOf(echoed) === `Echo: ${message}`,
    `echo text ${JSON.stringify(textOf(echoed))} != ${JSON.stringify("Echo: " + message)}`,
  );
  pass(current);

  if (skipProgress) {
    pass("progress streaming", "skipped (--skip-progress)");
  } else {
    current = "progress streaming";
    const events = []; // {kind: "progress"|"result", progress?, t}
    const t0 = performance.now();
    const result = await client.callTool(
      { name: "trigger-long-running-operation", arguments: { duration: DURATION, steps: STEPS } },
      undefined,
      {
        timeout: REQUEST_TIMEOUT_MS,
        onprogress: (p) => {
          events.push({ kind: "progress", progress: p.progress, total: p.total, t: performance.now() - t0 });
        },
      },
    );
    events.push({ kind: "result", t: performance.now() - t0 });
    checkProgress(events, result);
  }

  current = "session DELETE";
  await transport.terminateSession();
  pass(current);
  await client.close();
  console.log(`${prefix} done in ${((performance.now() - started) / 1000).toFixed(2)} s`);
}

// The order and timing rules for the progress check, in one place.
function checkProgress(events, result) {
  const order = events
    .map((e) => (e.kind === "progress" ? `p${e.progress}@${(e.t / 1000).toFixed(2)}s` : `result@${(e.t / 1000).toFixed(2)}s`))
    .join(" ");
  assert(!result.isError, `tool returned isError: ${JSON.stringify(result)}`);
  assert(/completed/i.test(textOf(result) || ""), `unexpected result text ${JSON.stringify(textOf(result))}`);
  const progress = events.filter((e) => e.kind === "progress");
  const resultIndex = events.findIndex((e) => e.kind === "result");
  assert(resultIndex === events.length - 1, `an event came after the result: ${order}`);
  assert(progress.length === STEPS, `expected ${STEPS} progress notifications, got ${progress.length}: ${order}`);
  for (let i = 0; i < progress.length; i++) {
    assert(progress[i].progress === i + 1, `progress #${i} has value ${progress[i].progress}, expected ${i + 1}: ${order}`);
    if (i > 0) {
      assert(progress[i].progress > progress[i - 1].progress, `progress not strictly increasing: ${order}`);
    }
  }
  // Streaming, not buffering: the server emits progress i at i*DURATION/STEPS seconds and the
  // result right after the last one. Ask for half the expected spread to allow for slow machines.
  const stepMs = (DURATION * 1000) / STEPS;
  const expectedLeadMs = stepMs * (STEPS - 1);
  const firstLeadMs = events[resultIndex].t - progress[0].t;
  const spreadMs = progress[progress.length - 1].t - progress[0].t;
  assert(
    firstLeadMs >= expectedLeadMs / 2,
    `first progress arrived only ${firstLeadMs.toFixed(0)} ms before the result (expected about ${expectedLeadMs} ms): buffered? ${order}`,
  );
  assert(
    spreadMs >= expectedLeadMs / 2,
    `progress notifications arrived within ${spreadMs.toFixed(0)} ms of each other (expected about ${expectedLeadMs} ms): buffered? ${order}`,
  );
  pass(current, order);
}

const watchdog = setTimeout(() => {
  console.error(`FAIL ${prefix} ${current}: timed out after 60 s`);
  process.exit(1);
}, 60_000);
watchdog.unref();

main().then(
  () => process.exit(0),
  (err) => {
    const detail = err instanceof CheckFailed ? err.message : (err && err.stack) || String(err);
    const cause = err && err.cause ? ` (cause: ${err.cause.code || ""} ${err.cause.message || err.cause})` : "";
    console.log(`FAIL ${prefix} ${current}: ${detail}${cause}`);
    process.exit(1);
  },
);
