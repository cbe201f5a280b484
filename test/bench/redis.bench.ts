/**
 * Benchmark 7 (issue "Beyond one hub"): several hubs on one Redis.
 *
 * a) Relay latency, ban sender -> applied by real agents (dry-run, `startAgent()` in a worker),
 *    for three set-ups in the same run: one hub with its journal (the single-hub figure), one hub
 *    on Redis (sender and agents on the same hub), and two hubs on Redis with the sender on hub 1
 *    and the agents on hub 2 (every event crosses Redis: XADD by hub 1, XREAD by hub 2).
 * b) A fleet of 3 hubs x 300 agents (raw WebSocket agents, clients-worker.ts, as in benchmark 5:
 *    900 real agents applying 1,000 events/s would measure the 2 cores, not the hubs) under
 *    1,000 events/s spread over the three hubs: relay p99 (sender's detectedAt -> the event at a
 *    probe agent's socket on each hub) and each hub's RSS and CPU.
 *
 * Redis runs as `redis-server` on a free loopback port with a scratch folder, `appendfsync always`.
 */

import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { tmpdir } from "node:os";
import WebSocket from "ws";
import { freePort, startHubProc, type HubProc } from "../lib/fleet.ts";
import { spawnProc, tsx, type Proc } from "../lib/proc.ts";
import { enrolMany, fmt, mib, nowMs, sleep, stats, statsHeader, statsRow, watchProc } from "./lib.ts";
import { until } from "./fleet.ts";

export const title = "7. Several hubs on Redis: relay across hubs, and 3 hubs x 300 agents under 1,000 events/s";

async function startRedis(dir: string): Promise<{ url: string; proc: Proc }> {
  const port = await freePort();
  const proc = spawnProc("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"], { name: "redis" });
  await proc.waitForLine(/Ready to accept connections/, 20_000);
  return { url: `redis://127.0.0.1:${port}/0`, proc };
}

interface Latency {
  setup: string;
  allN: number[];
  ack: number[];
  missing: number;
}

/** Sender spaced on `sendHub`, N real dry-run agents on `agentHub`: per ban, the time until the last agent applied it. */
async function latency(setup: string, dir: string, sendHub: HubProc, agentHub: HubProc, n: number, events: number, base: number): Promise<Latency> {
  const names = Array.from({ length: n }, (_, i) => `a${i}`);
  const worker = tsx("test/bench/agents-worker.ts", [agentHub.url, dir, "dry-run", `bl${base}a`, ...names], { name: "agents" });
  try {
    await worker.waitForLine(/^READY$/, 120_000);
    const sender = tsx("test/bench/sender-worker.ts", ["spaced", sendHub.url, join(dir, "sender.token"), String(events), "50", String(base)], { name: "sender" });
    const info = await sender.closed;
    if (info.code !== 0) throw new Error(`sender exited ${info.code}: ${sender.output().slice(-2000)}`);
    const sent = new Map<string, number>();
    const acked = new Map<string, number>();
    for (const l of sender.lines()) {
      const m = /^(SENT|ACK) (\S+) ([\d.]+)$/.exec(l);
      if (m) (m[1] === "SENT" ? sent : acked).set(m[2], Number(m[3]));
    }
    const applied = () => worker.lines().filter((l) => l.startsWith("APPLIED "));
    await until(() => applied().length >= n * events, 10_000);
    const last = new Map<string, number>();
    const count = new Map<string, number>();
    for (const l of applied()) {
      const [, , ip, t] = l.split(" ");
      const s = sent.get(ip);
      if (s === undefined) continue;
      last.set(ip, Math.max(last.get(ip) ?? 0, Number(t) - s));
      count.set(ip, (count.get(ip) ?? 0) + 1);
    }
    return {
      setup,
      allN: [...last].filter(([ip]) => count.get(ip) === n).map(([, v]) => v),
      ack: [...sent].map(([ip, s]) => (acked.get(ip) ?? NaN) - s).filter(Number.isFinite),
      missing: n * events - applied().length,
    };
  } finally {
    await worker.stop("SIGTERM", 5000);
  }
}

/** A probe agent: a raw WebSocket that records, for every event it is relayed, now minus its detectedAt. */
async function probe(url: string, tokenFile: string, name: string): Promise<{ samples: number[]; close(): void }> {
  const samples: number[] = [];
  const ws = new WebSocket(url, { headers: { authorization: `Bearer ${readFileSync(tokenFile, "utf8").trim()}` }, perMessageDeflate: false });
  ws.on("error", () => {});
  let synced = false;
  await new Promise<void>((resolve) => {
    ws.on("open", () => ws.send(JSON.stringify({ type: "hello", v: 1, node: name, want: "events" })));
    ws.on("message", (data: Buffer) => {
      const now = Date.now();
      const f = JSON.parse(data.toString("utf8"));
      if (f.type === "sync" && !synced) {
        synced = true;
        return resolve();
      }
      if (f.type === "event") samples.push(now - f.detectedAt);
      else if (f.type === "sync") for (const e of f.events) samples.push(now - e.detectedAt);
    });
  });
  return { samples, close: () => ws.terminate() };
}

export async function run({ quick }: { quick: boolean }): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), "banshare-bench-redis-"));
  const procs: Proc[] = [];
  const stopAll = async () => {
    for (const p of procs.reverse()) await p.stop("SIGTERM", 5000);
    procs.length = 0;
  };
  const n = 10;
  const events = quick ? 6 : 60;
  const perHub = quick ? 50 : 300;
  const seconds = quick ? 3 : 15;
  const rate = 1000;
  try {
    const clientNames = Array.from({ length: 3 * perHub }, (_, i) => `c${i}`);
    await enrolMany(dir, [...Array.from({ length: n }, (_, i) => `a${i}`), ...clientNames, "p0", "p1", "p2", "sender", "s0", "s1", "s2"]);
    const hubArgs = (extra: string[]) => ["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0", "--heartbeat", "600", "--rate", String(rate * 2), "--burst", String(rate * 5), "--max-conns-per-node", "4", ...extra];

    // a) latency: journal, Redis same hub, Redis across hubs.
    const results: Latency[] = [];
    const journalHub = await startHubProc(hubArgs(["--state", join(dir, "journal.jsonl")]), { name: "hub-journal" });
    procs.push(journalHub.proc);
    results.push(await latency("one hub, journal (fsync)", dir, journalHub, journalHub, n, events, 30));
    await stopAll();
    const redis = await startRedis(dir);
    procs.push(redis.proc);
    const h1 = await startHubProc(hubArgs(["--store", redis.url]), { name: "hub1" });
    const h2 = await startHubProc(hubArgs(["--store", redis.url]), { name: "hub2" });
    procs.push(h1.proc, h2.proc);
    results.push(await latency("one hub, Redis", dir, h1, h1, n, events, 31));
    results.push(await latency("hub 1 -> Redis -> hub 2", dir, h1, h2, n, events, 32));
    for (const r of results) process.stderr.write(`redis latency ${r.setup}: p99 ${fmt(stats(r.allN).p99)} ms\n`);
    await stopAll();

    // b) 3 hubs x perHub agents, 1,000 events/s spread over the three hubs.
    const redis2 = await startRedis(mkdtempSync(join(dir, "r2-")));
    procs.push(redis2.proc);
    const hubs: HubProc[] = [];
    for (let i = 0; i < 3; i++) {
      const h = await startHubProc(hubArgs(["--store", redis2.url]), { name: `hub${i}` });
      hubs.push(h);
      procs.push(h.proc);
    }
    const t0 = nowMs();
    const clients = hubs.map((h, i) => tsx("test/bench/clients-worker.ts", [h.url, dir, ...clientNames.slice(i * perHub, (i + 1) * perHub)], { name: `clients${i}` }));
    procs.push(...clients);
    await Promise.all(clients.map((c) => c.waitForLine(/^READY \d+/, 180_000)));
    const readyS = (nowMs() - t0) / 1000;
    const probes = await Promise.all(hubs.map((h, i) => probe(h.url, join(dir, `p${i}.token`), `p${i}`)));
    await sleep(1000);
    const senders = hubs.map((h, i) => tsx("test/bench/sender-worker.ts", ["rate", h.url, join(dir, `s${i}.token`), String(Math.round(rate / 3)), String(seconds + 1), String(40 + i)], { name: `sender${i}` }));
    procs.push(...senders);
    await sleep(1000);
    const watched = await Promise.all(hubs.map((h) => watchProc(h.proc.pid, seconds * 1000)));
    const done = await Promise.all(senders.map(async (s) => (await s.closed, /^DONE (\d+) (\d+)/.exec(s.lines().find((l) => l.startsWith("DONE")) ?? ""))));
    await sleep(2000);
    for (const p of probes) p.close();
    const sent = done.reduce((a, m) => a + Number(m?.[1] ?? 0), 0);
    const acked = done.reduce((a, m) => a + Number(m?.[2] ?? 0), 0);
    const all = probes.flatMap((p) => p.samples);
    const section = [
      `## ${title}`,
      "",
      `Command: \`npm run bench -- ${quick ? "--quick " : ""}redis\`. Redis ${"7.0"} (Debian's redis-server) on loopback, \`appendonly yes\`, \`appendfsync always\`; hubs, Redis, agents and senders share the machine's 2 cores.`,
      "",
      `### a) Relay latency through Redis, against the single hub in the same run`,
      "",
      `${events} bans, one at a time (the next 50 ms after the previous ack), from a raw WebSocket sender; ${n} real agents (dry-run, \`startAgent()\` in one worker process). **all N**: per ban, send -> the last of the ${n} agents logged the block; **ack**: send -> the hub's ack (journal: after the fsync; Redis: after the Lua script returned, with Redis's fsync).`,
      "",
      statsHeader(["set-up", "figure"]),
      ...results.flatMap((r) => [statsRow([r.setup, "**all N**"], r.allN), statsRow([r.setup, "ack"], r.ack)]),
      "",
      results.some((r) => r.missing) ? `Missing applications: ${results.filter((r) => r.missing).map((r) => `${r.setup}: ${r.missing}`).join(", ")}.` : "Every agent applied every ban.",
      "",
      `### b) 3 hubs x ${perHub} agents, ${rate} events/s`,
      "",
      `${perHub} raw WebSocket agents on each hub (they said hello with \`want: "events"\` and read everything, like benchmark 5's), one probe agent per hub that timestamps each event it is relayed, and three senders at ${Math.round(rate / 3)} bans/s each, one per hub, for ${seconds} s. Latency: the sender's \`detectedAt\` (taken as it writes the frame) -> the frame at the probe's socket, on the hub that accepted it and on the two others (ms resolution). Agents connected and synced in ${readyS.toFixed(1)} s.`,
      "",
      statsHeader(["", "figure"]),
      statsRow(["every probe", "**relay latency**"], all),
      ...probes.map((p, i) => statsRow([`probe on hub ${i + 1}`, "relay latency"], p.samples)),
      "",
      `Sent ${sent} bans, acked ${acked}; the probes received ${all.length} events (${(3 * acked)} expected: every acked ban to every probe).`,
      "",
      "| hub | mean RSS MiB | peak RSS MiB | CPU (1 = one core) |",
      "| --- | ---: | ---: | ---: |",
      ...watched.map((w, i) => `| hub ${i + 1} | ${mib(w.meanRss)} | ${mib(w.peakRss)} | ${w.cpu.toFixed(2)} |`),
      "",
    ].join("\n");
    return section;
  } finally {
    await stopAll();
    rmSync(dir, { recursive: true, force: true });
  }
}
