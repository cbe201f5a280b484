/**
 * Several hubs on one Redis (`hub.ts --store redis://...`): real redis-server on a free loopback
 * port, real hubs, real agents (dry-run backend: the kernel path is the kernel suites' job) and
 * real senders, as processes. What each agent applied is counted from its structured log (every
 * BLOCK and UNBLOCK row, replayed), never sampled: three hubs relaying to each other's agents,
 * a hub kill -9 with agents failing over by cursor, Redis kill -9 and restart, a cursor the
 * stream was trimmed past, and a hub that finds its master through a Sentinel and follows a
 * failover to the replica.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test, type TestContext } from "node:test";
import { comparePositions, isPosition, parseStoreUrl } from "../hub.ts";
import { freePort, readCsv, runBan, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { spawnProc, type Proc } from "./lib/proc.ts";
import type { BanFrame, UnbanFrame } from "../messages.ts";
import { frameMaker, startWsSender } from "./lib/frames.ts";
import { redisWorld, startRedis, type RedisWorld } from "./lib/redis.ts";
import { needs } from "./lib/skip.ts";

const SLOW = 60_000;
const BANTIME = 3600;

type Frame = BanFrame | UnbanFrame;

/** The n-th test address of block `block` (TEST-NET-2 and -3 style ranges, never .0 or .255). */
function addr(block: number, n: number): string {
  return `10.${block}.${Math.floor(n / 250)}.${1 + (n % 250)}`;
}
const { bans, unbans } = frameMaker("r", BANTIME);

const world = (t: TestContext, nodes: string[]) => redisWorld(t, nodes, "banshare-redis-test-");

function startHub(w: RedisWorld, name: string, extra: string[] = []): Promise<HubProc> {
  return startHubProc(["--tokens", join(w.dir, "tokens"), "--listen", "127.0.0.1:0", "--store", w.redis.url, "--heartbeat", "2", ...extra], { name });
}

function csvOf(w: RedisWorld, n: string): string {
  return join(w.dir, `${n}.csv`);
}

function startAgent(w: RedisWorld, n: string, hubs: string, extra: string[] = []): Promise<Proc> {
  return startAgentProc(n, ["--hub", hubs, "--token-file", w.tokens[n], "--node", n, "--backend", "dry-run", "--csv", csvOf(w, n), "--heartbeat", "2", ...extra]);
}

/** What an agent holds blocked now: its BLOCK and UNBLOCK rows, replayed in order. */
function blocked(w: RedisWorld, n: string): Set<string> {
  const set = new Set<string>();
  for (const r of readCsv(csvOf(w, n))) {
    if (r.action === "BLOCK") set.add(r.ip);
    else if (r.action === "UNBLOCK") set.delete(r.ip);
  }
  return set;
}

function diff(have: Set<string>, want: Set<string>): string {
  const missing = [...want].filter((ip) => !have.has(ip));
  const extra = [...have].filter((ip) => !want.has(ip));
  return `${have.size} address(es), want ${want.size}: ${missing.length} missing (${missing.slice(0, 5).join(" ")}), ${extra.length} extra (${extra.slice(0, 5).join(" ")})`;
}

/** Waits until agent `n` holds exactly `want`. */
async function waitForSet(w: RedisWorld, n: string, want: Set<string>, timeoutMs = SLOW): Promise<void> {
  let last = "";
  try {
    await waitFor(() => {
      const have = blocked(w, n);
      last = diff(have, want);
      return have.size === want.size && [...want].every((ip) => have.has(ip));
    }, `${n}'s blocked set`, timeoutMs);
  } catch {
    throw new Error(`${n} never came to hold exactly what it should: ${last}`);
  }
}

function startSender(w: RedisWorld, node: string, url: string, frames: Frame[], window = 16): Promise<Proc> {
  return startWsSender(w.dir, url, w.tokens[node], frames, { window, name: `sender ${node}` });
}

/** Ids the sender printed an ack for, with the seq of each. */
function acks(p: Proc): Map<string, string> {
  const out = new Map<string, string>();
  for (const l of p.lines()) {
    const m = /^ack \d+ (\S+) (\S+)$/.exec(l);
    if (m) out.set(m[1], m[2]);
  }
  return out;
}

async function sendAll(w: RedisWorld, node: string, url: string, frames: Frame[]): Promise<void> {
  const p = await startSender(w, node, url, frames);
  const info = await p.closed;
  assert.equal(info.code, 0, p.output().slice(-2000));
  assert.equal(acks(p).size, frames.length);
}

/** Runs a command to completion and returns its output. */
async function spawnOut(cmd: string, args: string[]): Promise<string> {
  const p = spawnProc(cmd, args, { name: cmd });
  await p.closed;
  return p.output().trim();
}

async function healthz(url: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(url.replace(/^ws/, "http") + "/healthz");
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function spooled(dir: string): Promise<string[]> {
  return existsSync(dir) ? (await readdir(dir)).filter((f) => f.endsWith(".json")) : [];
}

describe("positions and store URLs: stream IDs order by time then sequence, and a store URL's password is hidden", () => {
  test("comparePositions() orders journal seqs and stream IDs by milliseconds, then sequence", () => {
    assert.ok(comparePositions("999-5", "1000-0") < 0, "not a string comparison");
    assert.ok(comparePositions("1000-10", "1000-9") > 0);
    assert.equal(comparePositions("42", "42-0"), 0);
    assert.ok(comparePositions("9", "10") < 0);
    assert.ok(isPosition("1718000000000-3") && isPosition("7") && !isPosition("1-2-3") && !isPosition("x"));
    assert.throws(() => comparePositions("abc", "1"), /Expected positions/);
  });

  test("parseStoreUrl() takes redis://, rediss:// and redis-sentinel:// URLs and hides the password", () => {
    assert.deepEqual(parseStoreUrl("redis://127.0.0.1:6379/2"), { url: "redis://127.0.0.1:6379/2", username: undefined, password: undefined, db: 2, tls: false, display: "redis://127.0.0.1:6379/2" });
    const s = parseStoreUrl("redis-sentinel://:s3cret@192.0.2.1:26379,192.0.2.2,[2001:db8::3]:26380/banshare/1");
    assert.deepEqual(s.sentinels, [{ host: "192.0.2.1", port: 26379 }, { host: "192.0.2.2", port: 26379 }, { host: "2001:db8::3", port: 26380 }]);
    assert.equal(s.master, "banshare");
    assert.equal(s.db, 1);
    assert.equal(s.password, "s3cret");
    assert.doesNotMatch(s.display, /s3cret/);
    assert.equal(parseStoreUrl("rediss://user:pw@redis.example:6380/0").tls, true);
    for (const bad of ["http://x:1/0", "redis://a,b/0", "redis-sentinel://192.0.2.1:26379", "redis://h:1/db"]) assert.throws(() => parseStoreUrl(bad), /Expected --store/, bad);
  });
});

describe("several hubs on one Redis serve one fleet: bans cross hubs, agents fail over by cursor, no acked ban is lost when Redis restarts, an agent behind the trimmed stream gets a full sync", needs(["redis-server", "redis-cli"], "redis-server (Debian's redis-server package: the Redis tests start their own on a free loopback port)"), () => {
  test("three hubs: a ban sent to hub 1 reaches the agents of hubs 2 and 3, an unban too; the origin's agent gets both", async (t) => {
    const w = await world(t, ["s1", "a1", "a2", "a3"]);
    const hubs = [await startHub(w, "hub1"), await startHub(w, "hub2"), await startHub(w, "hub3")];
    const fleets = new Set(hubs.map((h) => /as a hub of fleet (\S+)/.exec(h.proc.output())?.[1]));
    assert.equal(fleets.size, 1, "every hub on the Redis names the same fleet");
    await startAgent(w, "a1", hubs[0].url);
    await startAgent(w, "a2", hubs[1].url);
    await startAgent(w, "a3", hubs[2].url);
    await startAgent(w, "s1", hubs[1].url); // the origin's agent, on another hub than the one it sends to
    const ip = "198.51.100.7";
    const ban = await runBan(["ban", ip, "--jail", "sshd", "--bantime", String(BANTIME), "--hub", hubs[0].url, "--token-file", w.tokens.s1, "--spool", join(w.dir, "spool")]);
    assert.equal(ban.code, 0, ban.output);
    for (const n of ["a1", "a2", "a3", "s1"]) await waitForSet(w, n, new Set([ip]));
    const unban = await runBan(["unban", ip, "--jail", "sshd", "--hub", hubs[0].url, "--token-file", w.tokens.s1, "--spool", join(w.dir, "spool")]);
    assert.equal(unban.code, 0, unban.output);
    // The origin's agent (on hub 2, not the one it sent to) holds its own node's ban too.
    for (const n of ["a1", "a2", "a3", "s1"]) await waitFor(() => readCsv(csvOf(w, n)).some((r) => r.action === "UNBLOCK" && r.ip === ip), `${n} unblocks ${ip}`);
    assert.deepEqual(readCsv(csvOf(w, "s1")).filter((r) => r.ip === ip).map((r) => r.action), ["BLOCK", "SCHEDULE_UNBLOCK", "UNBLOCK"], "the origin's agent's rows");
    assert.deepEqual(await spooled(join(w.dir, "spool")), []);
  });

  test("kill -9 of one hub while bans flow: its agents fail over by cursor (no full sync) and every acked ban is applied everywhere", async (t) => {
    const w = await world(t, ["s1", "s2", "a1", "a2", "a3", "a4"]);
    const hubs = [await startHub(w, "hub1"), await startHub(w, "hub2"), await startHub(w, "hub3")];
    const list = (first: number) => [0, 1, 2].map((i) => hubs[(first + i) % 3].url).join(",");
    const agents: Record<string, Proc> = {};
    agents.a1 = await startAgent(w, "a1", list(0));
    agents.a2 = await startAgent(w, "a2", list(0));
    agents.a3 = await startAgent(w, "a3", list(1));
    agents.a4 = await startAgent(w, "a4", list(2));
    // s1 publishes to the hub that dies, s2 to one that lives; both bursts together.
    const f1 = bans(Array.from({ length: 400 }, (_, i) => addr(201, i)));
    const f2 = bans(Array.from({ length: 400 }, (_, i) => addr(202, i)));
    const s1 = await startSender(w, "s1", hubs[0].url, f1, 8);
    const s2 = await startSender(w, "s2", hubs[2].url, f2, 8);
    await waitFor(() => acks(s1).size >= 100 && acks(s2).size >= 50, "both senders in full flow", SLOW);
    await hubs[0].proc.kill9();
    assert.equal((await s1.closed).code, 3, "s1 lost its hub mid-burst");
    assert.equal((await s2.closed).code, 0, s2.output().slice(-1000));
    const acked1 = f1.filter((f) => acks(s1).has(f.id)).map((f) => f.ip);
    assert.ok(acked1.length >= 100 && acked1.length < f1.length, `the kill came mid-burst (${acked1.length} of ${f1.length} acked)`);
    for (const s of acks(s2).values()) assert.match(s, /^\d+-\d+$/, "an ack carries the stream entry ID");
    t.diagnostic(`s1: ${acked1.length} of ${f1.length} acked before kill -9; s2: ${acks(s2).size} of ${f2.length}`);

    for (const n of ["a1", "a2"]) {
      await agents[n].waitForLine(new RegExp(`connected to ${hubs[1].url.replace(/[.]/g, "\\.")} `), SLOW);
      await agents[n].waitForLine(/resumed after seq \d+-\d+|full sync.*\n.*full sync/, SLOW);
    }
    // Every acked ban, in every agent but the origin's. A ban that reached Redis without its ack
    // getting out may be there too: the fleet state is what the stream holds.
    const want = new Set([...acked1, ...f2.map((f) => f.ip)]);
    const sent = new Set([...f1, ...f2].map((f) => f.ip));
    for (const n of ["a1", "a2", "a3", "a4"]) {
      await waitFor(() => [...want].every((ip) => blocked(w, n).has(ip)), `${n} to hold every acked ban`, SLOW).catch(() => {
        throw new Error(`${n} misses acked bans: ${diff(blocked(w, n), want)}`);
      });
      for (const ip of blocked(w, n)) assert.ok(sent.has(ip), `${n} blocked ${ip}, which nobody sent`);
    }
    // The same fleet state on every agent (they converge on the stream, whichever hub relays it).
    const a3 = blocked(w, "a3");
    for (const n of ["a1", "a2", "a4"]) await waitForSet(w, n, a3);
    for (const n of ["a1", "a2"]) {
      const out = agents[n].output();
      assert.equal((out.match(/full sync/g) ?? []).length, 1, `${n} did a full sync only at its start:\n${out.slice(-3000)}`);
      assert.match(out.slice(out.lastIndexOf("connected to")), /resumed after seq \d+-\d+: \d+ event\(s\) missed/, `${n} resumed on the next hub by its cursor:\n${out.slice(-3000)}`);
      assert.equal(agents[n].exitInfo(), undefined);
    }
  });

  test("Redis kill -9 and restart (appendonly): no acked ban lost, ban.ts spools meanwhile, hubs say so in /healthz and reconnect by themselves", async (t) => {
    const w = await world(t, ["s1", "a1", "a2"]);
    const hub1 = await startHub(w, "hub1");
    const hub2 = await startHub(w, "hub2");
    const spoolDir = join(w.dir, "s1-spool");
    const a1 = await startAgent(w, "a1", hub1.url);
    const a2 = await startAgent(w, "a2", hub2.url);
    await startAgent(w, "s1", hub2.url, ["--spool", spoolDir]);
    const before = bans(Array.from({ length: 300 }, (_, i) => addr(203, i)));
    const sender = await startSender(w, "s1", hub1.url, before, 8);
    await waitFor(() => acks(sender).size >= 100, "100 acks", SLOW);
    await w.redis.kill9();
    await sender.closed;
    const acked = before.filter((f) => acks(sender).has(f.id)).map((f) => f.ip);
    const refused = sender.lines().filter((l) => / internal /.test(l)).length;
    t.diagnostic(`${acked.length} of ${before.length} acked before Redis died, ${refused} refused as internal`);
    assert.ok(acked.length >= 100 && acked.length < before.length, `Redis died mid-burst (${acked.length} acked)`);

    // Down: both hubs say so, keep their agents, and ban.ts is not acked, so it spools.
    for (const h of [hub1, hub2]) {
      await waitFor(async () => (await healthz(h.url)).body.store === "down", "/healthz to say the store is down", SLOW);
      assert.equal((await healthz(h.url)).status, 503);
      await h.proc.waitForLine(/store .* unreachable/, SLOW);
    }
    const during = "198.51.100.77";
    const r = await runBan(["ban", during, "--jail", "sshd", "--bantime", String(BANTIME), "--hub", `${hub1.url},${hub2.url}`, "--token-file", w.tokens.s1, "--spool", spoolDir, "--timeout", "3"]);
    // Handed to s1's agent: the hub refused it for now (internal), so it stays in the agent's spool.
    assert.equal(r.code, 0, r.output);
    assert.equal(r.output, "");
    await waitFor(async () => (await spooled(spoolDir)).length === 1, "the ban in s1's spool");
    for (const a of [a1, a2]) assert.equal(a.exitInfo(), undefined);
    assert.doesNotMatch(a1.output() + a2.output(), /disconnected from/, "an agent lost its hub while only Redis was down");

    await w.redis.restart();
    for (const h of [hub1, hub2]) {
      await h.proc.waitForLine(/store .* is back/, SLOW);
      await waitFor(async () => (await healthz(h.url)).body.store === "up", "/healthz to say the store is up", SLOW);
      // Its append-only file kept everything: no hub may take the restart for a loss.
      assert.doesNotMatch(h.proc.output(), /lost the fleet state/);
      assert.equal((await healthz(h.url)).body.storeLost, undefined);
    }
    await waitFor(async () => (await spooled(spoolDir)).length === 0, "s1's agent to deliver the spooled ban", SLOW);
    const after = bans(Array.from({ length: 50 }, (_, i) => addr(204, i)), Date.now() + 5000);
    await sendAll(w, "s1", hub2.url, after);
    const sent = new Set([...before, ...after].map((f) => f.ip).concat(during));
    const want = new Set([...acked, during, ...after.map((f) => f.ip)]);
    for (const n of ["a1", "a2"]) {
      await waitFor(() => [...want].every((ip) => blocked(w, n).has(ip)), `${n} to hold every acked ban`, SLOW).catch(() => {
        throw new Error(`${n} misses acked bans: ${diff(blocked(w, n), want)}`);
      });
      for (const ip of blocked(w, n)) assert.ok(sent.has(ip), `${n} blocked ${ip}, which nobody sent`);
    }
    // What Redis kept is what the fleet holds: every acked ban is in the claims hash.
    const claims = await w.redis.cli("HLEN", "banshare:{fleet}:claims");
    assert.ok(Number(claims) >= want.size, `the claims hash holds ${claims}, fewer than the ${want.size} acked bans`);
  });

  test("an agent whose cursor fell behind the trimmed stream gets a full sync and ends equal to the fleet state", async (t) => {
    const w = await world(t, ["s1", "a1", "a2"]);
    const hub = await startHub(w, "hub1", ["--stream-max-len", "10"]);
    const state = join(w.dir, "a1.state.json");
    let a1 = await startAgent(w, "a1", hub.url, ["--state", state]);
    const early = Array.from({ length: 20 }, (_, i) => addr(205, i));
    await sendAll(w, "s1", hub.url, bans(early));
    await waitForSet(w, "a1", new Set(early));
    assert.equal((await a1.stop("SIGTERM", 10_000)).code, 0);

    // While a1 is away: 400 bans, 100 of them lifted again, and the 20 early ones lifted: far more
    // than the stream keeps, so the entries after a1's cursor are trimmed.
    const ips = Array.from({ length: 400 }, (_, i) => addr(206, i));
    const lifted = ips.filter((_, i) => i % 4 === 0);
    await sendAll(w, "s1", hub.url, [...bans(ips), ...unbans([...lifted, ...early], Date.now() + 2000)]);
    const info = await w.redis.cli("XINFO", "STREAM", "banshare:{fleet}:events");
    const [added, kept] = ["entries-added", "length"].map((k) => Number(new RegExp(`${k}\\n(\\d+)`).exec(info)?.[1]));
    const trimmedTo = added > kept;
    assert.ok(trimmedTo, `the stream was trimmed:\n${info}`);

    a1 = await startAgent(w, "a1", hub.url, ["--state", state]);
    assert.match(a1.output(), /loaded \d+ address\(es\) and cursor/);
    assert.match(a1.output(), /full sync: \d+ event\(s\)/, "a cursor behind the trimmed stream gets a full sync");
    const fleet = new Set(ips.filter((ip) => !lifted.includes(ip)));
    await waitForSet(w, "a1", fleet);
    await startAgent(w, "a2", hub.url);
    await waitForSet(w, "a2", fleet);
  });
});

describe("a hub on Redis through Sentinel finds the master, and bans flow again after a failover", needs(["redis-server", "redis-cli"], "redis-server (Debian's redis-server package runs a Sentinel too: `redis-server FILE --sentinel`)"), () => {
  test("the hub finds the master through a Sentinel, and after a failover to the replica bans flow again", async (t) => {
    const w = await world(t, ["s1", "a1"]);
    const replica = await startRedis(t, ["--replicaof", "127.0.0.1", String(w.redis.port)]);
    await waitFor(async () => /master_link_status:up/.test(await replica.cli("INFO", "replication")), "the replica to sync", SLOW);
    // A Sentinel of our own, on a free port, with its rewritable config in the test's folder.
    const sport = await freePort();
    const conf = join(w.dir, "sentinel.conf");
    await writeFile(conf, [`port ${sport}`, "bind 127.0.0.1", `dir ${w.dir}`, `sentinel monitor fleet 127.0.0.1 ${w.redis.port} 1`, "sentinel down-after-milliseconds fleet 1000", "sentinel failover-timeout fleet 10000", ""].join("\n"));
    const sentinel = spawnProc("redis-server", [conf, "--sentinel"], { name: "sentinel" });
    t.after(() => sentinel.stop("SIGTERM", 5000).then(() => undefined));
    await sentinel.waitForLine(/\+monitor master fleet/, 20_000);
    const askMaster = async () => (await spawnOut("redis-cli", ["-p", String(sport), "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fleet"])).split("\n")[1];
    await waitFor(async () => (await spawnOut("redis-cli", ["-p", String(sport), "SENTINEL", "REPLICAS", "fleet"])).includes(String(replica.port)), "the Sentinel to see the replica", SLOW);

    const hub = await startHubProc(["--tokens", join(w.dir, "tokens"), "--listen", "127.0.0.1:0", "--store", `redis-sentinel://127.0.0.1:${sport}/fleet/0`, "--store-replicas", "1", "--heartbeat", "2"], { name: "hub" });
    assert.match(hub.proc.output(), new RegExp(`127\\.0\\.0\\.1:${w.redis.port}|as a hub of fleet`));
    await startAgent(w, "a1", hub.url);
    await startAgent(w, "s1", hub.url, ["--spool", join(w.dir, "spool")]);
    const send = (ip: string) => runBan(["ban", ip, "--jail", "sshd", "--bantime", String(BANTIME), "--hub", hub.url, "--token-file", w.tokens.s1, "--spool", join(w.dir, "spool"), "--timeout", "5"]);
    const first = await send("198.51.100.31");
    assert.equal(first.code, 0, first.output);
    await waitForSet(w, "a1", new Set(["198.51.100.31"]));
    assert.equal(await replica.cli("HLEN", "banshare:{fleet}:claims"), "1", "the ban did not reach the replica");

    // The Sentinel promotes the replica; the old master becomes a replica of it.
    assert.match(await spawnOut("redis-cli", ["-p", String(sport), "SENTINEL", "FAILOVER", "fleet"]), /OK/);
    await waitFor(async () => (await askMaster()) === String(replica.port), "the Sentinel to name the replica as master", SLOW);
    // A ban now is acked by the new master, or spooled and forwarded by s1's agent once the hub is back on it.
    const second = await send("198.51.100.32");
    assert.equal(second.code, 0, second.output);
    await waitForSet(w, "a1", new Set(["198.51.100.31", "198.51.100.32"]));
    await waitFor(async () => (await replica.cli("HLEN", "banshare:{fleet}:claims")) === "2", "the new master to hold both claims", SLOW);
  });
});
