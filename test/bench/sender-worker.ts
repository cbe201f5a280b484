/**
 * Benchmark worker: a raw WebSocket client that publishes bans to a hub (no ban.ts process per
 * ban), so the hub and the agents are what is measured.
 *
 *   node --import tsx test/bench/sender-worker.ts spaced HUB TOKEN_FILE COUNT INTERVAL_MS BASE
 *   node --import tsx test/bench/sender-worker.ts burst  HUB TOKEN_FILE COUNT BASE
 *   node --import tsx test/bench/sender-worker.ts rate   HUB TOKEN_FILE PER_SECOND SECONDS BASE
 *
 * spaced: one ban at a time, the next INTERVAL_MS after the previous ack; prints
 * `SENT IP T` before each send and `ACK IP T` on its ack. burst: writes all COUNT ban frames
 * at once (pipelined), prints `START T` before the first and `ACKED COUNT T` after the last
 * ack. rate: PER_SECOND bans a second, in 10 ms slices, for SECONDS; prints `DONE SENT ACKED`.
 * Addresses come from benchIp(i, BASE). T is ms since the epoch, sub-ms resolution.
 */

import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { benchIp, nowMs, sleep } from "./lib.ts";

const [mode, hub, tokenFile, ...rest] = process.argv.slice(2);
const token = readFileSync(tokenFile, "utf8").trim();
const ws = new WebSocket(hub, { headers: { authorization: `Bearer ${token}` }, perMessageDeflate: false });
ws.on("error", (e) => {
  console.error(`sender: ${e.message}`);
  process.exit(1);
});
await new Promise<void>((resolve) => ws.once("open", () => resolve()));
ws.send(JSON.stringify({ type: "hello", v: 1 }));

const acks = new Map<string, () => void>();
let acked = 0;
let refused = 0;
ws.on("message", (data: Buffer) => {
  const f = JSON.parse(data.toString("utf8"));
  if (f.type === "ack") {
    acked++;
    acks.get(f.id)?.();
    acks.delete(f.id);
  } else if (f.type === "error") {
    refused++;
    if (refused <= 5) console.error(`sender: hub refused ${f.id ?? ""}: ${f.code}: ${f.message}`);
    acks.get(f.id)?.();
    acks.delete(f.id);
  }
});

const frame = (i: number, base: number) => JSON.stringify({ type: "ban", id: `b${base}-${i}`, ip: benchIp(i, base), jail: "bench", bantime: 3600, detectedAt: Date.now() });

if (mode === "spaced") {
  const [count, interval, base] = rest.map(Number);
  for (let i = 0; i < count; i++) {
    const done = new Promise<void>((r) => acks.set(`b${base}-${i}`, r));
    const ip = benchIp(i, base);
    const f = frame(i, base);
    process.stdout.write(`SENT ${ip} ${nowMs().toFixed(3)}\n`);
    ws.send(f);
    await done;
    process.stdout.write(`ACK ${ip} ${nowMs().toFixed(3)}\n`);
    await sleep(interval);
  }
} else if (mode === "burst") {
  const [count, base] = rest.map(Number);
  const frames = Array.from({ length: count }, (_, i) => frame(i, base));
  const all = new Promise<void>((resolve) => {
    const check = setInterval(() => {
      if (acked + refused >= count) {
        clearInterval(check);
        resolve();
      }
    }, 1);
  });
  process.stdout.write(`START ${nowMs().toFixed(3)}\n`);
  for (const f of frames) ws.send(f);
  await all;
  process.stdout.write(`ACKED ${acked} ${nowMs().toFixed(3)}\n`);
} else if (mode === "rate") {
  const [perSecond, seconds, base] = rest.map(Number);
  const start = nowMs();
  let sent = 0;
  while (nowMs() - start < seconds * 1000) {
    const due = Math.floor(((nowMs() - start) / 1000) * perSecond);
    while (sent < due) ws.send(frame(sent++, base));
    await sleep(10);
  }
  await sleep(500);
  process.stdout.write(`DONE ${sent} ${acked}\n`);
} else {
  console.error(`Expected mode spaced, burst or rate, got ${mode}`);
  process.exitCode = 2;
}
if (refused) console.error(`sender: ${refused} refused`);
ws.close();
