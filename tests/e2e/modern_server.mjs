// An MCP server of the TypeScript SDK v2 (2026-07-28), serving both eras from one endpoint
// (createMcpHandler: server/discover and stateless requests for 2026-07-28 clients,
// initialize for older ones). It validates the standard headers itself, as a server of the
// new revision must. Listens on 127.0.0.1 port 0 and prints "listening PORT".
import { createServer } from 'node:http';
import { createMcpHandler, McpServer } from '@modelcontextprotocol/server';
import { toNodeHandler } from '@modelcontextprotocol/node';
import * as z from 'zod/v4';

const handler = createMcpHandler(({ era }) => {
  const server = new McpServer({ name: 'modern-e2e', version: '1.0.0' });
  server.registerTool('echo', { description: 'Echoes the message', inputSchema: z.object({ message: z.string() }) },
    async ({ message }) => ({ content: [{ type: 'text', text: `echo (${era}): ${message}` }] }));
  // `region` is mirrored into the Mcp-Param-Region header by 2026-07-28 clients.
  server.registerTool('regional', {
    description: 'Answers from a region',
    inputSchema: z.object({ region: z.string().meta({ 'x-mcp-header': 'Region' }), text: z.string() }),
  }, async ({ region, text }) => ({ content: [{ type: 'text', text: `${region}: ${text}` }] }));
  server.registerTool('admin-reset', { description: 'Denied by the tunnel policy', inputSchema: z.object({}) },
    async () => ({ content: [{ type: 'text', text: 'reset done' }] }));
  return server;
});
const node = toNodeHandler(handler);
const srv = createServer((req, res) => node(req, res));
srv.listen(0, '127.0.0.1', () => console.log(`listening ${srv.address().port}`));
