/**
 * Benchmark 5 (issue 6): the hub's cost. RSS and CPU with 1,000 connected agents idle and under
 * 1,000 events/s; RSS per 100,000 active bans.
 */

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startHubProc } from "../lib/fleet.ts";
import { tsx } from "../lib/proc.ts";
import { enrolMany, mib, sleep, table, watchProc, sampleProc } from "./lib.ts";
import { seedJournal } from "./fleet.ts";

export const title = "5. Hub cost: memory and CPU with 1,000 agents, and per 100,000 bans";

const AGENTS = 1000;

async function agentsLoad(seconds: number, rate: number) {
  const dir = mkdtempSync(join(tmpdir(), "banshare-bench-"));
  const names = Array.from({ length: AGENTS }, (_, i) => `a${i}`);
  await enrolMany(dir, [...names, "sender"]);
  const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0", "--state", join(dir, "journal.jsonl"), "--heartbeat", "15", "--rate", String(rate * 2), "--burst", String(rate * 5)]);
  try {
    await sleep(500);
    const empty = await watchProc(hub.proc.pid, 1000);
    const clients = tsx("test/bench/clients-worker.ts", [hub.url, dir, ...names], { name: "clients" });
    await clients.waitForLine(/^READY \d+/, 120_000);
    await sleep(1000);
    const idle = await watchProc(hub.proc.pid, seconds * 1000);
    clients.signal("SIGUSR2");
    const before = Number(/\d+/.exec(await clients.waitForLine(/^RECEIVED/, 5000))![0]);
    const sender = tsx("test/bench/sender-worker.ts", ["rate", hub.url, join(dir, "sender.token"), String(rate), String(seconds + 1), "60"], { name: "sender" });
    await sleep(1000);
    const busy = await watchProc(hub.proc.pid, seconds * 1000);
    await sender.closed;
    const done = /^DONE (\d+) (\d+)/.exec(sender.lines().find((l) => l.startsWith("DONE")) ?? "");
    await sleep(500);
    const clientCpu = sampleProc(clients.pid);
    clients.signal("SIGUSR2");
    await sleep(300);
    const recv = clients.lines().filter((l) => l.startsWith("RECEIVED")).map((l) => Number(l.split(" ")[1]));
    await clients.stop("SIGTERM", 5000);
    return { empty, idle, busy, sent: Number(done?.[1]), acked: Number(done?.[2]), framesOut: (recv[recv.length - 1] ?? 0) - before, clientCpu };
  } finally {
    await hub.proc.stop("SIGTERM", 5000);
    rmSync(dir, { recursive: true, force: true });
  }
}

async function bansRss(bans: number) {
  const dir = mkdtempSync(join(tmpdir(), "banshare-bench-"));
  await enrolMany(dir, ["a0"]);
  if (bans) await seedJournal(dir, bans, 70);
  const t0 = Date.now();
  const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0", "--state", join(dir, "journal.jsonl")], {});
  const startMs = Date.now() - t0;
  try {
    await sleep(1000);
    const w = await watchProc(hub.proc.pid, 1500);
    return { bans, rss: w.meanRss, peak: w.peakRss, startMs };
  } finally {
    await hub.proc.stop("SIGTERM", 10_000);
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function run({ quick }: { quick: boolean }): Promise<string> {
  const seconds = quick ? 2 : 10;
  const load = await agentsLoad(seconds, 1000);
  const sizes = quick ? [0, 100_000] : [0, 100_000, 1_000_000];
  const mem = [];
  for (const b of sizes) mem.push(await bansRss(b));
  const base = mem[0].rss;
  const per100k = mem.filter((m) => m.bans).map((m) => ((m.rss - base) * 100_000) / m.bans);
  const rss1000 = Math.max(load.idle.peakRss, load.busy.peakRss);
  const worst = Math.max(...per100k);
  return [
    `## ${title}`,
    "",
    `Command: \`npm run bench -- ${quick ? "--quick " : ""}hub\`. The hub is a real \`hub.ts\` process on loopback with a journal; RSS (VmRSS) and CPU (utime+stime) are sampled from /proc/PID every 250 ms over ${seconds} s windows. The 1,000 agents are lightweight raw WebSocket clients in one separate process, each enrolled as its own node, saying hello with \`want: "events"\` and then reading everything the hub sends. The load is a raw WebSocket sender publishing 1,000 distinct bans a second (hub \`--rate 2000 --burst 5000\`), each relayed to all 1,000 agents.`,
    "",
    table(
      ["hub state", "RSS mean MiB", "RSS peak MiB", "CPU (1.0 = one core)"],
      [
        ["no agents, no bans", mib(load.empty.meanRss), mib(load.empty.peakRss), load.empty.cpu.toFixed(3)],
        [`${AGENTS} agents connected, idle`, mib(load.idle.meanRss), mib(load.idle.peakRss), load.idle.cpu.toFixed(3)],
        [`${AGENTS} agents, 1,000 events/s in`, mib(load.busy.meanRss), mib(load.busy.peakRss), load.busy.cpu.toFixed(3)],
      ],
    ),
    "",
    `Under load the sender published ${load.sent} bans (${load.acked} acked) and the agents received ${load.framesOut.toLocaleString("en")} frames (\`event\` frames, or one \`sync\` frame per journal flush when several events became durable together).`,
    "",
    table(
      ["active bans (journal at start)", "hub RSS mean MiB", "RSS peak MiB", "start -> listening ms", "RSS per 100k bans MiB"],
      mem.map((m) => [m.bans.toLocaleString("en"), mib(m.rss), mib(m.peak), m.startMs, m.bans ? mib(((m.rss - base) * 100_000) / m.bans) : "-"]),
    ),
    "",
    `Targets: under 150 MB with 1,000 agents: **${rss1000 < 150e6 ? "met" : "missed"}** (peak ${(rss1000 / 1e6).toFixed(0)} MB). Under 100 MB per 100k bans: **${worst < 100e6 ? "met" : "missed"}** (${per100k.map((x) => `${(x / 1e6).toFixed(0)} MB`).join(", ")}).`,
    "",
  ].join("\n");
}
