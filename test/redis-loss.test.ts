/**
 * A Redis that forgets (issue 14, item 6): two hubs on one real redis-server, real agents on the
 * real kernel (ipset, each in a network namespace of its own), a raw WebSocket sender. Redis is
 * killed and started again without its append-only file (empty), or from an older RDB snapshot
 * (BGSAVE, dump.rdb copied, more bans and unbans acked, restarted from the copy), or flushed
 * while it runs (FLUSHALL: no reconnect, only the hubs' check each round). Each hub must
 * say it found the store emptied or rolled back (log line, /healthz, metric) and write back what
 * it holds; then hubs restarted from the store, an agent restarted without --state and a new
 * agent all hold exactly the fleet state, and an acked unban stays lifted.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { copyFile, mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test, type TestContext } from "node:test";
import type { BanFrame, UnbanFrame } from "../messages.ts";
import { enrol, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, type Topology } from "./lib/netns.ts";
import { stopAll, type Proc } from "./lib/proc.ts";
import { startRedis, type TestRedis } from "./lib/redis.ts";
import { frameMaker, startWsSender } from "./lib/frames.ts";
import { needs } from "./lib/skip.ts";

const PORTS = { hub1: 7700, hub2: 7701 };
const BANTIME = 3600;
const SLOW = 60_000;

type Frame = BanFrame | UnbanFrame;

/** The n-th test address of block `block`: 10.210.B.H, never the topology's 10.77.0.x. */
function addr(block: number, n: number): string {
  return `10.210.${block}.${1 + n}`;
}

const { bans, unbans } = frameMaker("l", BANTIME);

interface World {
  topo: Topology;
  dir: string;
  redis: TestRedis;
  tokens: Record<string, string>;
  hubs: Record<"hub1" | "hub2", HubProc>;
}

/** A topology (hub namespace with Redis and both hubs; a1, a2, a3, s1), tokens, Redis and the two hubs; all removed after the test. */
async function world(t: TestContext, prefix: string): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), `banshare-loss-${prefix}-`));
  let topo: Topology | undefined;
  t.after(async () => {
    await stopAll(5000);
    await topo?.destroy();
    await rm(dir, { recursive: true, force: true });
  });
  topo = await createTopology(["hub", "a1", "a2", "a3", "s1"], { prefix });
  const tokens = await enrol(dir, [...["a1", "a2", "a3", "s1"].map((n) => [n, "node"] as [string, "node"]), ["ops", "reader"]]);
  const redis = await startRedis(t, [], { netns: topo.ns("hub") });
  const w: World = { topo, dir, redis, tokens, hubs: {} as World["hubs"] };
  for (const h of ["hub1", "hub2"] as const) w.hubs[h] = await startHub(w, h);
  return w;
}

function startHub(w: World, name: "hub1" | "hub2"): Promise<HubProc> {
  const args = ["--tokens", join(w.dir, "tokens"), "--listen", `${w.topo.ip("hub")}:${PORTS[name]}`, "--store", w.redis.url, "--heartbeat", "2"];
  return startHubProc(args, { netns: w.topo.ns("hub"), name });
}

/** Both hubs, `first` first. */
function hubList(w: World, first: "hub1" | "hub2"): string {
  return [first, first === "hub1" ? "hub2" : "hub1"].map((h) => w.hubs[h as "hub1"].url).join(",");
}

function startAgent(w: World, n: string, first: "hub1" | "hub2", extra: string[] = []): Promise<Proc> {
  return startAgentProc(n, ["--hub", hubList(w, first), "--token-file", w.tokens[n], "--node", n, "--backend", "ipset", "--heartbeat", "2", ...extra], { netns: w.topo.ns(n) });
}

/** Sends `frames` from s1 to hub 1 and asserts every one was acked. */
async function sendAll(w: World, frames: Frame[]): Promise<void> {
  const p = await startWsSender(w.dir, w.hubs.hub1.url, w.tokens.s1, frames, { window: 8, netns: w.topo.ns("s1"), name: "sender s1" });
  const info = await p.closed;
  assert.equal(info.code, 0, p.output().slice(-2000));
  assert.equal(p.lines().filter((l) => l.startsWith("ack ")).length, frames.length, p.output().slice(-2000));
}

async function kernelSet(w: World, node: string): Promise<Set<string>> {
  const r = await w.topo.exec(node, "ipset", ["list", "banshare-v4", "-output", "save"], { reject: false });
  if (r.exitCode !== 0) return new Set();
  return new Set([...String(r.stdout).matchAll(/^add banshare-v4 (\S+)/gm)].map((m) => m[1]));
}

function diff(have: Set<string>, want: Set<string>): string {
  const missing = [...want].filter((ip) => !have.has(ip));
  const extra = [...have].filter((ip) => !want.has(ip));
  return `${have.size} address(es), want ${want.size}: ${missing.length} missing (${missing.slice(0, 5).join(" ")}), ${extra.length} extra (${extra.slice(0, 5).join(" ")})`;
}

async function waitForKernel(w: World, node: string, want: Set<string>): Promise<void> {
  let last = "";
  await waitFor(async () => {
    const have = await kernelSet(w, node);
    last = diff(have, want);
    return have.size === want.size && [...want].every((ip) => have.has(ip));
  }, `${node}'s kernel set`, SLOW).catch(() => {
    throw new Error(`${node}'s kernel set never came to hold exactly what it should: ${last}`);
  });
}

/** Asserts the kernel holds exactly `want` now (no waiting: a ban dropped and put back later is a gap). */
async function assertKernel(w: World, node: string, want: Set<string>, what: string): Promise<void> {
  const have = await kernelSet(w, node);
  assert.ok(have.size === want.size && [...want].every((ip) => have.has(ip)), `${what}: ${node}'s kernel set holds ${diff(have, want)}`);
}

/** GET `path` of a hub, from inside the hubs' namespace (the test itself runs outside it). */
async function hubHttp(w: World, h: HubProc, path: string): Promise<string> {
  // A reader's token: /metrics and /healthz's details are for the fleet's readers, not strangers.
  const auth = `Authorization: Bearer ${readFileSync(w.tokens.ops, "utf8").trim()}`;
  const r = await w.topo.exec("hub", "curl", ["-sS", "--max-time", "10", "-H", auth, h.url.replace(/^ws/, "http") + path]);
  return String(r.stdout);
}

/** The claims hash as (ip|origin) -> kind. */
async function storedClaims(w: World): Promise<Map<string, string>> {
  // redis-cli answers raw when its output is not a terminal: field, value, field, value, one a line.
  const flat = (await w.redis.cli("HGETALL", "banshare:{fleet}:claims")).split("\n").filter(Boolean);
  const out = new Map<string, string>();
  for (let i = 0; i + 1 < flat.length; i += 2) out.set(flat[i], (JSON.parse(flat[i + 1]) as { kind: string }).kind);
  return out;
}

/**
 * What every loss test checks once Redis came back forgetful: both hubs said so and wrote back
 * until the claims hash holds `fleet` (bans) and `lifted` (unbans); both hubs restarted from the
 * store, an agent restarted without --state and a new agent, each hold exactly `fleet`.
 */
async function checkRecovered(t: TestContext, w: World, kind: RegExp, fleet: Set<string>, lifted: string[], a1: Proc, a2: Proc): Promise<void> {
  let stored = new Map<string, string>();
  await waitFor(async () => {
    stored = await storedClaims(w);
    return [...fleet].every((ip) => stored.get(`${ip}|s1`) === "ban") && lifted.every((ip) => stored.get(`${ip}|s1`) === "unban");
  }, "the claims hash to hold the fleet state again", SLOW).catch(() => {
    throw new Error(`the claims hash never held the fleet state again: ${JSON.stringify([...stored])}`);
  });
  for (const h of ["hub1", "hub2"] as const) {
    const hub = w.hubs[h];
    await hub.proc.waitForLine(/error: store .* lost the fleet state/, SLOW);
    await hub.proc.waitForLine(/wrote back \d+ of the \d+ claim\(s\)/, SLOW);
    for (const l of hub.proc.lines().filter((l) => /lost the fleet state|wrote back/.test(l))) t.diagnostic(`${h}: ${l}`);
    assert.match(hub.proc.output(), kind, `${h} says how the store forgot`);
    const health = JSON.parse(await hubHttp(w, hub, "/healthz")) as Record<string, string>;
    assert.equal(health.store, "up");
    assert.match(health.storeLost ?? "", /lost|emptied|rolled back|epoch/, `${h}'s /healthz: ${JSON.stringify(health)}`);
    assert.match(await hubHttp(w, hub, "/metrics"), /^banshare_store_losses_total [1-9]/m, `${h}'s /metrics counts the loss`);
  }
  // Kernels untouched meanwhile.
  for (const n of ["a1", "a2"]) await assertKernel(w, n, fleet, "after the write-back");
  // Restarted hubs take the fleet state from the store.
  for (const h of ["hub1", "hub2"] as const) {
    await w.hubs[h].proc.stop("SIGTERM", 10_000);
    w.hubs[h] = await startHub(w, h);
    assert.match(w.hubs[h].proc.output(), new RegExp(`${fleet.size + lifted.length} claim\\(s\\) loaded`), `restarted ${h} loads every claim`);
  }
  // An agent restarted without --state full-syncs and keeps every ban; a new agent gets them all.
  await a2.stop("SIGTERM", 10_000);
  const again = await startAgent(w, "a2", "hub2");
  assert.match(again.output(), new RegExp(`synced: ${fleet.size} address`), again.output());
  await assertKernel(w, "a2", fleet, "a2 restarted without --state, right after its full sync");
  await startAgent(w, "a3", "hub1");
  await assertKernel(w, "a3", fleet, "a new agent, right after its full sync");
  await assertKernel(w, "a1", fleet, "a1 (with --state), throughout");
  // And the fleet goes on: a ban sent now reaches all three.
  const late = addr(9, 0);
  await sendAll(w, bans([late], Date.now() + 5000));
  const withLate = new Set([...fleet, late]);
  for (const n of ["a1", "a2", "a3"]) await waitForKernel(w, n, withLate);
  assert.equal(a1.exitInfo(), undefined, "a1 kept running");
}

describe("a Redis that forgets: hubs find it emptied or rolled back, say so and write back what they hold; no agent drops a ban the fleet still has", needs(["root", "netns", "ipset", "iptables", "ip6tables", "redis-server", "redis-cli"], "redis-loss tests"), () => {
  test("Redis restarted without its append-only file (empty) while two hubs run: both say so, the store holds the 20 bans and 5 unbans again, restarted hubs and agents hold all 20", async (t) => {
    const w = await world(t, "lossaof");
    const a1 = await startAgent(w, "a1", "hub1", ["--state", join(w.dir, "a1.state.json")]);
    const a2 = await startAgent(w, "a2", "hub2");
    const live = Array.from({ length: 20 }, (_, i) => addr(1, i));
    const lifted = Array.from({ length: 5 }, (_, i) => addr(2, i));
    await sendAll(w, [...bans([...live, ...lifted]), ...unbans(lifted)]);
    const fleet = new Set(live);
    for (const n of ["a1", "a2"]) await waitForKernel(w, n, fleet);

    await w.redis.kill9();
    for (const f of await readdir(w.redis.dir)) await rm(join(w.redis.dir, f), { recursive: true, force: true });
    await w.redis.restart();
    assert.doesNotMatch(w.redis.proc.output(), /Done loading|DB loaded/, "Redis came back empty");
    await checkRecovered(t, w, /emptied/, fleet, lifted, a1, a2);
  });

  test("FLUSHALL while two hubs run (no restart, no reconnect): the hubs' check finds it within seconds and writes the 20 bans and 5 unbans back", async (t) => {
    const w = await world(t, "lossfl");
    const a1 = await startAgent(w, "a1", "hub1", ["--state", join(w.dir, "a1.state.json")]);
    const a2 = await startAgent(w, "a2", "hub2");
    const live = Array.from({ length: 20 }, (_, i) => addr(5, i));
    const lifted = Array.from({ length: 5 }, (_, i) => addr(6, i));
    await sendAll(w, [...bans([...live, ...lifted]), ...unbans(lifted)]);
    const fleet = new Set(live);
    for (const n of ["a1", "a2"]) await waitForKernel(w, n, fleet);
    assert.equal(await w.redis.cli("FLUSHALL"), "OK");
    await checkRecovered(t, w, /emptied/, fleet, lifted, a1, a2);
    for (const h of ["hub1", "hub2"] as const) assert.doesNotMatch(w.hubs[h].proc.output(), /unreachable/, `${h} never lost its connection`);
    // The fleet id went back with the claims: the agents resumed by cursor on the restarted hubs, no full sync.
    assert.equal((a1.output().match(/full sync: /g) ?? []).length, 1, `a1 full-synced only at its start:\n${a1.output().slice(-3000)}`);
  });

  test("Redis restarted from an older RDB snapshot while two hubs run: both say it rolled back, the 5 unbans and 10 bans acked after the snapshot are written back, the unbanned addresses stay lifted", async (t) => {
    const w = await world(t, "lossrdb");
    const a1 = await startAgent(w, "a1", "hub1", ["--state", join(w.dir, "a1.state.json")]);
    const a2 = await startAgent(w, "a2", "hub2");
    const first = Array.from({ length: 20 }, (_, i) => addr(3, i));
    await sendAll(w, bans(first));
    for (const n of ["a1", "a2"]) await waitForKernel(w, n, new Set(first));

    await w.redis.cli("BGSAVE");
    await waitFor(async () => /rdb_bgsave_in_progress:0/.test(await w.redis.cli("INFO", "persistence")) && /rdb_last_bgsave_status:ok/.test(await w.redis.cli("INFO", "persistence")) && (await readdir(w.redis.dir)).includes("dump.rdb"), "the snapshot", SLOW);
    const older = join(w.dir, "older.rdb");
    await copyFile(join(w.redis.dir, "dump.rdb"), older);

    const lifted = first.slice(0, 5);
    const later = Array.from({ length: 10 }, (_, i) => addr(4, i));
    await sendAll(w, [...unbans(lifted, Date.now() + 1000), ...bans(later, Date.now() + 2000)]);
    const fleet = new Set([...first.slice(5), ...later]);
    for (const n of ["a1", "a2"]) await waitForKernel(w, n, fleet);

    await w.redis.kill9();
    for (const f of await readdir(w.redis.dir)) await rm(join(w.redis.dir, f), { recursive: true, force: true });
    await copyFile(older, join(w.redis.dir, "dump.rdb"));
    await w.redis.restart(["--appendonly", "no"]);
    assert.match(w.redis.proc.output(), /Done loading RDB, keys loaded: \d+/, "Redis came back from the snapshot");
    await checkRecovered(t, w, /rolled back/, fleet, lifted, a1, a2);
  });
});
