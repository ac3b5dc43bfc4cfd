// The TypeScript SDK v2 client through the tunnel to modern_server.mjs on a route whose
// policy denies admin-reset.
//   node modern_client.mjs URL auto|legacy
// auto: the client probes with server/discover and must speak 2026-07-28 (standard headers,
// Mcp-Param-Region mirrored); legacy: the initialize handshake of 2025-11-25. Both: the
// policy hides admin-reset from tools/list and refuses a call of it; the other tools work;
// tools/list keeps the server's annotations and (2026-07-28) its ttlMs and cacheScope.
// Then, raw POSTs whose standard headers disagree with the body must get the tunnel's
// 400 with JSON-RPC -32020 (HeaderMismatch).
import { Client, StreamableHTTPClientTransport } from '@modelcontextprotocol/client';

const [url, mode] = process.argv.slice(2);
const sent = [];
const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const h = new Headers(init?.headers);
  sent.push(Object.fromEntries([...h.entries()].filter(([k]) => k.startsWith('mcp-'))));
  return realFetch(input, init);
};
let failures = 0;
const check = (ok, what, detail = '') => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${mode}: ${what}${ok || !detail ? '' : `: ${detail}`}`);
  if (!ok) failures++;
};

const client = new Client({ name: 'modern-e2e-client', version: '1' }, { versionNegotiation: { mode } });
await client.connect(new StreamableHTTPClientTransport(new URL(url)));
const era = client.getProtocolEra();
check(era === (mode === 'auto' ? 'modern' : 'legacy'), `negotiated era ${era}`);

const raw = await realFetch(url, {
  method: 'POST',
  headers: modernHeaders('tools/list'),
  body: JSON.stringify(modernBody(90, 'tools/list', {})),
}).then(r => r.json());
const list = await client.listTools();
const names = list.tools.map(t => t.name).sort();
check(JSON.stringify(names) === '["echo","regional"]', `tools/list without admin-reset (${names})`);
const regional = list.tools.find(t => t.name === 'regional');
check(regional?.inputSchema?.properties?.region?.['x-mcp-header'] === 'Region', 'x-mcp-header annotation kept in tools/list');
if (mode === 'auto') {
  check(typeof raw.result?.ttlMs === 'number' && typeof raw.result?.cacheScope === 'string',
    `tools/list keeps ttlMs and cacheScope`, JSON.stringify(raw).slice(0, 300));
}

const echo = await client.callTool({ name: 'echo', arguments: { message: 'hi' } });
check(echo.content?.[0]?.text === `echo (${era}): hi`, 'echo answers', JSON.stringify(echo));
const before = sent.length;
const r = await client.callTool({ name: 'regional', arguments: { region: 'eu-west', text: 'x' } });
check(r.content?.[0]?.text === 'eu-west: x', 'regional answers', JSON.stringify(r));
if (mode === 'auto') {
  const h = sent.slice(before).find(h => h['mcp-method'] === 'tools/call');
  check(h?.['mcp-name'] === 'regional' && h?.['mcp-param-region'] === 'eu-west',
    'the client sent Mcp-Name and Mcp-Param-Region through the tunnel', JSON.stringify(h));
}
let refused;
try {
  const d = await client.callTool({ name: 'admin-reset', arguments: {} });
  refused = d.isError ? JSON.stringify(d) : undefined;
  if (!d.isError) check(false, 'admin-reset refused', `it ran: ${JSON.stringify(d)}`);
} catch (e) {
  refused = String(e?.message ?? e);
}
check(refused !== undefined && /policy|denied|not allowed/i.test(refused), 'admin-reset refused by the tunnel', refused);
await client.close();

function modernHeaders(method, name) {
  const h = { 'content-type': 'application/json', accept: 'application/json, text/event-stream',
    'mcp-protocol-version': '2026-07-28', 'mcp-method': method };
  if (name !== undefined) h['mcp-name'] = name;
  return h;
}
function modernBody(id, method, params) {
  return { jsonrpc: '2.0', id, method, params: { ...params, _meta: {
    'io.modelcontextprotocol/protocolVersion': '2026-07-28',
    'io.modelcontextprotocol/clientCapabilities': {} } } };
}

if (mode === 'auto') {
  // Headers that disagree with the body: refused by the tunnel, whatever the server would do.
  const cases = [
    ['Mcp-Name names an allowed tool, the body a denied one', modernHeaders('tools/call', 'echo'),
      modernBody(91, 'tools/call', { name: 'admin-reset', arguments: {} })],
    ['Mcp-Method differs from the body', modernHeaders('tools/list', 'echo'),
      modernBody(92, 'tools/call', { name: 'echo', arguments: { message: 'm' } })],
    ['Mcp-Name missing on tools/call', modernHeaders('tools/call'),
      modernBody(93, 'tools/call', { name: 'echo', arguments: { message: 'm' } })],
    ['Mcp-Name on a method without a name', modernHeaders('tools/list', 'echo'), modernBody(94, 'tools/list', {})],
  ];
  for (const [what, headers, body] of cases) {
    const resp = await realFetch(url, { method: 'POST', headers, body: JSON.stringify(body) });
    const text = await resp.text();
    let code;
    try { code = JSON.parse(text).error?.code; } catch { code = undefined; }
    check(resp.status === 400 && code === -32020 && text.includes('Header mismatch'),
      `${what}: 400 with -32020`, `${resp.status} ${text.slice(0, 200)}`);
  }
}
console.log(failures === 0 ? `modern client (${mode}): all checks passed` : `modern client (${mode}): ${failures} failed`);
process.exit(failures === 0 ? 0 : 1);
