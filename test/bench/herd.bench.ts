/**
 * Benchmark: a thundering herd. Every agent of a fleet asks one hub for a full sync at the same
 * moment (a power cut, the whole fleet booting) while Fail2Ban keeps banning: how long an honest
 * ban waits for its ack, and `GET /healthz` for its answer, while the hub sends the herd's syncs.
 */

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connectNode } from "../lib/client.ts";
import { startHubProc } from "../lib/fleet.ts";
import { tsx } from "../lib/proc.ts";
import { enrolMany, fmt, nowMs, sleep, statsHeader, statsRow } from "./lib.ts";
import { seedJournal } from "./fleet.ts";

export const title = "Thundering herd: an honest ban and /healthz while every agent full-syncs at once";

/** Between two honest bans, and two /healthz requests, during the herd. */
const EVERY_MS = 100;

interface Result {
  conns: number;
  bans: number;
  ackMs: number[];
  healthMs: number[];
  /** Honest bans acked before the herd's last sync frame arrived. */
  ackedDuring: number;
  herdMs: number;
  gb: number;
}

async function measure(conns: number, bans: number): Promise<Result> {
  const dir = mkdtempSync(join(tmpdir(), "banshare-bench-herd-"));
  await enrolMany(dir, ["herd", "s1"]);
  await seedJournal(dir, bans, 54);
  const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0", "--state", join(dir, "journal.jsonl"), "--heartbeat", "600", "--rate", "1000", "--burst", "1000", "--max-conns-per-node", String(conns + 10), "--max-pending-per-address", String(conns + 10)]);
  const sender = await connectNode(hub.url, { file: join(dir, "s1.token") }, { hello: true, timeoutMs: 180_000 });
  const herd = tsx("test/fixtures/herd-clients.ts", [hub.url, join(dir, "herd.token"), String(conns), "0"], { name: "herd" });
  const r: Result = { conns, bans, ackMs: [], healthMs: [], ackedDuring: 0, herdMs: NaN, gb: NaN };
  try {
    await herd.waitForLine(/^HELLO /, 120_000);
    const helloAt = Number(herd.lines().find((l) => l.startsWith("HELLO "))!.split(" ")[1]);
    const sentAt = new Map<string, number>();
    sender.onFrame = (f) => {
      const at = sentAt.get(f.id);
      if (f.type !== "ack" || at === undefined) return;
      r.ackMs.push(nowMs() - at);
      if (!herd.lines().some((l) => l.startsWith("ALLDONE "))) r.ackedDuring++;
    };
    const health = async () => {
      const t0 = nowMs();
      await (await fetch(`${hub.url.replace(/^ws/, "http")}/healthz`)).text();
      r.healthMs.push(nowMs() - t0);
    };
    const probes: Promise<void>[] = [];
    // The herd is under way once the first sync frame is in; probe until its last one is.
    await herd.waitForLine(/^FIRST /, 120_000);
    for (let i = 0; !herd.lines().some((l) => l.startsWith("ALLDONE ")); i++) {
      const id = `herd-${i}`;
      sentAt.set(id, nowMs());
      sender.send({ type: "ban", id, ip: `10.251.${Math.floor(i / 250)}.${1 + (i % 250)}`, jail: "sshd", bantime: 3600, detectedAt: Date.now() });
      probes.push(health());
      await sleep(EVERY_MS);
    }
    await Promise.all(probes);
    await sender.acks(sentAt.size, 120_000);
    const done = herd.lines().find((l) => l.startsWith("ALLDONE "))!.split(" ");
    r.herdMs = Number(done[1]) - helloAt;
    r.gb = Number(done[2]) / 1e9;
  } finally {
    sender.close();
    await herd.stop("SIGTERM", 5000);
    await hub.proc.stop("SIGTERM", 10_000);
    rmSync(dir, { recursive: true, force: true });
  }
  return r;
}

export async function run({ quick }: { quick: boolean }): Promise<string> {
  const sizes: Array<[number, number]> = quick ? [[100, 20_000]] : [[200, 50_000]];
  const results: Result[] = [];
  for (const [conns, bans] of sizes) {
    const r = await measure(conns, bans);
    results.push(r);
    process.stderr.write(`herd ${conns} x ${bans}: honest ban ack max ${fmt(Math.max(...r.ackMs))} ms, herd ${fmt(r.herdMs)} ms\n`);
  }
  return [
    `## ${title}`,
    "",
    `Command: \`npm run bench -- ${quick ? "--quick " : ""}herd\`. One \`hub.ts\` process on loopback, its journal seeded with the fleet's active bans; a worker process opens the herd's WebSocket connections (one node token, \`--max-conns-per-node\` raised), then sends every hello in the same tick and reads the full syncs (counted, not parsed). From the herd's first sync frame until its last, a sender publishes an honest ban every ${EVERY_MS} ms on its own WebSocket and \`GET /healthz\` is asked as often; measured from the send to the ack (or the answer), in the sender's process.`,
    "",
    statsHeader(["agents x bans", "what"]),
    ...results.flatMap((r) => {
      const label = `${r.conns} x ${r.bans.toLocaleString("en")}`;
      return [statsRow([label, "honest ban: send -> ack"], r.ackMs), statsRow([label, "GET /healthz"], r.healthMs)];
    }),
    "",
    ...results.map((r) => `- ${r.conns} x ${r.bans.toLocaleString("en")}: every sync complete ${fmt(r.herdMs)} ms after the hellos (${r.gb.toFixed(2)} GB); ${r.ackedDuring} of ${r.ackMs.length} honest bans acked while the herd was still syncing.`),
    "",
  ].join("\n");
}
