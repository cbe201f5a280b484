/**
 * Benchmark worker: many lightweight agents, each one raw WebSocket that says hello with
 * `want: "events"` and then only reads (and answers pings). For measuring the hub's cost per
 * connected agent without running real agents.
 *
 *   node --import tsx test/bench/clients-worker.ts HUB TOKEN_DIR NAME...
 *
 * Prints `READY N` once every client got its sync, and `RECEIVED N` (frames) on SIGUSR2.
 */

import { readFileSync } from "node:fs";
import { join } from "node:path";
import WebSocket from "ws";

const [hub, tokenDir, ...names] = process.argv.slice(2);
let synced = 0;
let received = 0;
const socks: WebSocket[] = [];
// Connect in small waves: a thousand simultaneous TLS-less upgrades are fine, but gentle is closer to a real fleet.
for (let i = 0; i < names.length; i += 50) {
  await Promise.all(
    names.slice(i, i + 50).map(
      (name) =>
        new Promise<void>((resolve) => {
          const token = readFileSync(join(tokenDir, `${name}.token`), "utf8").trim();
          const ws = new WebSocket(hub, { headers: { authorization: `Bearer ${token}` }, perMessageDeflate: false });
          socks.push(ws);
          ws.on("error", (e) => console.error(`client ${name}: ${e.message}`));
          ws.on("open", () => ws.send(JSON.stringify({ type: "hello", v: 1, node: name, want: "events" })));
          let first = true;
          ws.on("message", (data: Buffer) => {
            received++;
            if (first && data.toString("utf8", 0, 40).includes('"sync"')) {
              first = false;
              if (++synced === names.length) process.stdout.write(`READY ${synced}\n`);
              resolve();
            }
          });
        }),
    ),
  );
}
process.on("SIGUSR2", () => process.stdout.write(`RECEIVED ${received}\n`));
process.on("SIGTERM", () => {
  for (const s of socks) s.terminate();
  process.exit(0);
});
setInterval(() => {}, 1 << 30);
