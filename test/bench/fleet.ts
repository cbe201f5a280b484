/**
 * Benchmark fleets: a hub process and agent worker processes, on loopback (dry-run) or with
 * each worker in a network namespace of its own (kernel backends), torn down after use.
 */

import { mkdtempSync, rmSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startHubProc, type HubProc } from "../lib/fleet.ts";
import { createTopology, type Topology } from "../lib/netns.ts";
import { tsx, type Proc } from "../lib/proc.ts";
import { benchIp, enrolMany, nowMs, sleep } from "./lib.ts";

export interface BenchFleet {
  dir: string;
  hub: HubProc;
  topo?: Topology;
  /** Namespace of the hub (and of the sender), when namespaced. */
  hubNs?: string;
  workers: Proc[];
  agentNames: string[];
  senderToken: string;
  /** Ms from spawning the workers to every agent's first sync. */
  readyMs: number;
  stop(): Promise<void>;
}

export interface FleetOptions {
  agents: number;
  backend: "dry-run" | "ipset" | "nftables";
  /** Worker processes (each a namespace for ipset). */
  workers: number;
  hubArgs?: string[];
  /** Called with the folder before the hub starts (seed its journal); returns extra hub flags. With `agents: 0` no worker starts. */
  seed?: (dir: string) => Promise<string[]>;
  subnet?: number;
  readyTimeoutMs?: number;
}

/** Starts a hub and `agents` real agents spread over `workers` processes; resolves when all synced. */
export async function startFleet(o: FleetOptions): Promise<BenchFleet> {
  const dir = mkdtempSync(join(tmpdir(), "banshare-bench-"));
  const agentNames = Array.from({ length: o.agents }, (_, i) => `a${i}`);
  await enrolMany(dir, [...(o.agents ? agentNames : ["a0"]), "sender"]);
  const extra = o.seed ? await o.seed(dir) : [];
  let topo: Topology | undefined;
  const workers: Proc[] = [];
  let hub: HubProc | undefined;
  const stop = async () => {
    await Promise.all(workers.map((w) => w.stop("SIGTERM", 5000)));
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const nw = Math.max(1, Math.min(o.workers, o.agents));
    if (o.backend !== "dry-run") topo = await createTopology(["hub", ...Array.from({ length: nw }, (_, i) => `w${i}`)], { prefix: "bsbench", subnet: o.subnet ?? 78 });
    const hubNs = topo?.ns("hub");
    const listen = topo ? `${topo.ip("hub")}:0` : "127.0.0.1:0";
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", listen, "--state", join(dir, "journal.jsonl"), "--heartbeat", "600", "--max-conns-per-node", "4", ...extra, ...(o.hubArgs ?? [])], { netns: hubNs });
    const t0 = nowMs();
    for (let w = 0; w < (o.agents ? nw : 0); w++) {
      const mine = agentNames.filter((_, i) => i % nw === w);
      workers.push(tsx("test/bench/agents-worker.ts", [hub.url, dir, o.backend, `bb${w}a`, ...mine], { netns: topo?.ns(`w${w}`), name: `agents${w}` }));
    }
    await Promise.all(workers.map((w) => w.waitForLine(/^READY$/, o.readyTimeoutMs ?? 180_000)));
    const readyMs = nowMs() - t0;
    return { dir, hub, topo, hubNs, workers, agentNames, senderToken: join(dir, "sender.token"), readyMs, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

/**
 * Writes a hub journal holding `count` active bans by node `origin` (addresses benchIp(i, base),
 * an hour left), so a hub starts with a fleet's worth of state without publishing it first.
 */
export async function seedJournal(dir: string, count: number, base: number, origin = "seed"): Promise<string[]> {
  const path = join(dir, "journal.jsonl");
  const fh = await open(path, "w", 0o600);
  const now = Date.now();
  let chunk = JSON.stringify({ journal: "banshare-journal", v: 1, hub: "benchhub" + String(count), seq: count }) + "\n";
  for (let i = 0; i < count; i++) {
    chunk += JSON.stringify({ seq: String(i + 1), kind: "ban", ip: benchIp(i, base), origin, jail: "bench", until: now + 3_600_000, detectedAt: now - 1000, id: `seed-${i}`, relayedAt: now - 1000 }) + "\n";
    if (chunk.length > 1 << 20) {
      await fh.write(chunk);
      chunk = "";
    }
  }
  await fh.write(chunk);
  await fh.close();
  return [];
}

/** Runs the sender worker to completion in the hub's namespace; returns its output lines. */
export async function runSender(f: BenchFleet, args: string[]): Promise<string[]> {
  const p = tsx("test/bench/sender-worker.ts", [args[0], f.hub.url, f.senderToken, ...args.slice(1)], { netns: f.hubNs, name: "sender" });
  const info = await p.closed;
  if (info.code !== 0) throw new Error(`sender exited ${info.code}: ${p.output().slice(-2000)}`);
  return [...p.lines()];
}

/** Waits until `check` is true or `timeoutMs` passed (polling every 20 ms); returns whether it became true. */
export async function until(check: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = nowMs() + timeoutMs;
  while (!check()) {
    if (nowMs() > end) return false;
    await sleep(20);
  }
  return true;
}
