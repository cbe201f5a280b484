/**
 * Benchmark: an honest ban's ack while strangers and a reader hammer the hub (issue 15).
 *
 * A hub on loopback starts from a journal holding 200,000 live claims (20,000 with --quick).
 * One ban at a time is sent as ban.ts sends it (POST /v1/events with a node's token), the next
 * as soon as the last is acked, and its ack time measured: first idle, then while 32 clients
 * (one worker process, from another loopback address) send GET after GET to every endpoint a
 * stranger or a reader can reach: the status page, /healthz with and without a token, /metrics
 * with a reader's token and without one (401), /v1/whoami, /v1/bans and /v1/nodes (403 for a
 * reader). Goal: p99 while hammered within 2x of idle.
 */

import { mkdtemp, open, rm } from "node:fs/promises";
import { readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { enrol, freePort, startHubProc } from "../lib/fleet.ts";
import { tsx } from "../lib/proc.ts";
import { benchIp, fmt, nowMs, sleep, stats, statsHeader, statsRow } from "./lib.ts";

export const title = "Hostile load: an honest ban's ack while 32 clients hammer every unauthenticated and reader endpoint";

const ROUNDS = 5;
/** hub.ts's pace for one address's HTTP requests (HTTP_RATE, HTTP_BURST there), for the description. */
const HTTP_RATE = 20;
const HTTP_BURST = 100;
const ENDPOINTS = ["/", "/status.js", "/healthz", "/healthz@auth", "/metrics@auth", "/metrics", "/v1/whoami@auth", "/v1/blocked@auth", "/v1/bans@auth", "/v1/nodes@auth"];

/** A journal of `count` live ban claims of node `seed`, an hour left each. */
async function seedJournal(path: string, count: number): Promise<void> {
  const fh = await open(path, "w", 0o600);
  const now = Date.now();
  let chunk = JSON.stringify({ journal: "banshare-journal", v: 1, hub: "hammerhub", seq: count }) + "\n";
  for (let i = 0; i < count; i++) {
    chunk += JSON.stringify({ seq: String(i + 1), kind: "ban", ip: benchIp(i, 12), origin: "seed", jail: "sshd", until: now + 3_600_000, detectedAt: now - 1000, id: `seed-${i}`, relayedAt: now - 1000 }) + "\n";
    if (chunk.length > 1 << 20) {
      await fh.write(chunk);
      chunk = "";
    }
  }
  await fh.write(chunk);
  await fh.close();
}

/** Ack times (ms) of `n` bans sent one after another by POST, as ban.ts sends them. */
async function acks(http: string, token: string, n: number, tag: string): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = nowMs();
    const res = await fetch(`${http}/v1/events`, { method: "POST", headers: { authorization: `Bearer ${token}` }, body: JSON.stringify({ type: "ban", id: `${tag}-${i}`, ip: benchIp(i + 1000 * Number(/\d+$/.exec(tag)?.[0] ?? 0), tag.startsWith("idle") ? 13 : 14), jail: "sshd", bantime: 600, detectedAt: Date.now() }) });
    const body = (await res.json()) as { type: string };
    if (body.type !== "ack") throw new Error(`ban ${tag}-${i} was not acked: ${JSON.stringify(body)}`);
    out.push(nowMs() - t0);
  }
  return out;
}

export async function run({ quick }: { quick: boolean }): Promise<string> {
  const claims = quick ? 20_000 : 200_000;
  const bans = quick ? 50 : 300;
  const dir = await mkdtemp(join(tmpdir(), "banshare-bench-hammer-"));
  const tokens = await enrol(dir, [["web1", "node"], ["viewer", "reader"]]);
  const token = (n: string) => readFileSync(tokens[n], "utf8").trim();
  await seedJournal(join(dir, "journal.jsonl"), claims);
  const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `127.0.0.1:${await freePort()}`, "--rate", "100000", "--burst", "100000"]);
  const http = hub.url.replace(/^ws/, "http");
  try {
    await acks(http, token("web1"), 10, "warm");
    const hammer = tsx("test/bench/hammer-worker.ts", ["32", http, token("viewer"), "127.0.1.1+32", ...ENDPOINTS], { name: "hammer" });
    await hammer.waitForLine(/hammering/, 20_000);
    // Measured once each client's burst (HTTP_BURST requests at once) is spent: the steady state of a long attack.
    await sleep(8000);
    // Idle and hammered in alternating rounds (the hammer stopped with SIGSTOP, then let go on), so
    // a shared machine's changing load weighs on both alike.
    const idle: number[] = [];
    const loaded: number[] = [];
    let hammeredMs = 8000;
    for (let r = 0; r < ROUNDS; r++) {
      hammer.signal("SIGSTOP");
      await sleep(200);
      idle.push(...(await acks(http, token("web1"), bans / ROUNDS, `idle${r}`)));
      hammer.signal("SIGCONT");
      await sleep(200);
      const h0 = nowMs();
      loaded.push(...(await acks(http, token("web1"), bans / ROUNDS, `load${r}`)));
      hammeredMs += nowMs() - h0 + 200;
    }
    await hammer.stop("SIGTERM", 5000);
    const secs = hammeredMs / 1000;
    const served = Number(/requests (\d+)/.exec(hammer.output())?.[1] ?? NaN);
    const ratio = stats(loaded).p99 / stats(idle).p99;
    return [
      `Command: \`npm run bench -- ${quick ? "--quick " : ""}hammer\`${quick ? " (200,000 claims and 300 bans without --quick)" : ""}. A hub on loopback starts from a journal of ${claims.toLocaleString("en")} live claims. 32 clients in another process, each from its own loopback address, send GET after GET to ${ENDPOINTS.map((e) => `\`${e.replace("@auth", "")}\`${e.endsWith("@auth") ? " (reader token)" : ""}`).join(", ")}; measuring starts 8 s later, once each client's burst of ${HTTP_BURST} is spent (the hub paces each address to ${HTTP_RATE} requests/s). One ban at a time goes to the hub as \`ban.ts\` sends it (\`POST /v1/events\` with a node's token), the next once the last is acked, in ${ROUNDS} alternating rounds of ${bans / ROUNDS} idle (the hammer stopped with SIGSTOP) and ${bans / ROUNDS} hammered, so a shared machine's changing load weighs on both alike.`,
      "",
      statsHeader(["hub", "claims"]),
      statsRow(["idle", claims], idle),
      statsRow(["hammered by 32 clients", claims], loaded),
      "",
      `p99 hammered / idle: ${fmt(ratio)} (goal: at most 2). The hammer had ${served.toLocaleString("en")} requests answered in its ${fmt(secs)} s, bursts included.`,
    ].join("\n");
  } finally {
    await hub.proc.stop("SIGTERM", 5000);
    await rm(dir, { recursive: true, force: true });
  }
}
