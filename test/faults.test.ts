/**
 * Faults (issue 3, "Nothing lost, nothing reordered"): a real hub, real agents (ipset backend,
 * each in a network namespace of its own), ban.ts and raw WebSocket senders as real processes,
 * and the real kernel. Each test counts what was sent and what arrived in the agents' kernel
 * sets (`ipset save banshare-v4` in the agent's namespace) and asserts they are equal:
 * hub kill -9 in the middle of a burst, agent restart with --state, a network cut longer than
 * the heartbeat, ban.ts with the hub unreachable, failover between several hub URLs, and an
 * agent's sync that falls between a ban's acceptance and its fsync (strace slows the fsync).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test, type TestContext } from "node:test";
import { spool } from "../ban.ts";
import { readJournal } from "../hub.ts";
import type { BanFrame, UnbanFrame } from "../messages.ts";
import { enrol, runBan, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, type Topology } from "./lib/netns.ts";
import { REPO_ROOT, spawnProc, stopAll, type Proc } from "./lib/proc.ts";
import { frameMaker, startWsSender } from "./lib/frames.ts";
import { needs } from "./lib/skip.ts";

const PORT = 7700;
const BANTIME = 3600;
/** Generous: the machine may be slow, and reconnect backoff grows while a hub is down. */
const SLOW = 60_000;

type Frame = BanFrame | UnbanFrame;

/** The n-th test address (n >= 0) of block `block`: 10.200.B.H, never .0 or .255, never the topology's 10.77.0.x. */
function addr(block: number, n: number): string {
  return `10.200.${block + Math.floor(n / 250)}.${1 + (n % 250)}`;
}

const { bans, unbans } = frameMaker("f", BANTIME);

/** One test's world: a topology, a scratch folder, enrolled tokens; all removed after the test, also on failure. */
interface World {
  topo: Topology;
  dir: string;
  tokens: Record<string, string>;
}

async function world(t: TestContext, nodes: string[], prefix: string): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), `banshare-faults-${prefix}-`));
  let topo: Topology | undefined;
  t.after(async () => {
    await stopAll(5000);
    await topo?.destroy();
    await rm(dir, { recursive: true, force: true });
  });
  topo = await createTopology(nodes, { prefix });
  const tokens = await enrol(dir, nodes.filter((n) => !n.startsWith("hub")).map((n) => [n, "node"] as [string, "node"]));
  return { topo, dir, tokens };
}

function hubUrl(w: World, hub = "hub"): string {
  return `ws://${w.topo.ip(hub)}:${PORT}`;
}

/** Starts (or restarts: same journal, same address) the hub in namespace `hub`. */
function startHub(w: World, hub = "hub", extra: string[] = []): Promise<HubProc> {
  return startHubProc(hubArgs(w, hub, extra), { netns: w.topo.ns(hub), name: hub });
}

function hubArgs(w: World, hub = "hub", extra: string[] = []): string[] {
  return ["--tokens", join(w.dir, "tokens"), "--state", journalOf(w, hub), "--listen", `${w.topo.ip(hub)}:${PORT}`, ...extra];
}

function journalOf(w: World, hub = "hub"): string {
  return join(w.dir, `${hub}.journal.jsonl`);
}

/** Starts node `n`'s agent on the real kernel (ipset) in its namespace; resolves after its first sync. */
function startAgent(w: World, n: string, hubs: string, extra: string[] = []): Promise<Proc> {
  return startAgentProc(n, ["--hub", hubs, "--token-file", w.tokens[n], "--node", n, "--backend", "ipset", ...extra], { netns: w.topo.ns(n) });
}

/**
 * Starts the raw WebSocket sender (test/fixtures/ws-sender.ts) in `node`'s namespace with `node`'s
 * token. It keeps up to `window` frames unacked; with `hold` it waits for SIGUSR1 after the welcome.
 */
function startSender(w: World, node: string, url: string, frames: Frame[], opts: { window?: number; hold?: boolean } = {}): Promise<Proc> {
  return startWsSender(w.dir, url, w.tokens[node], frames, { ...opts, netns: w.topo.ns(node), name: `sender ${node}` });
}

/** Sends `frames` from `node` and asserts the hub acked every one. */
async function sendAll(w: World, node: string, url: string, frames: Frame[]): Promise<void> {
  const p = await startSender(w, node, url, frames);
  const info = await p.closed;
  assert.equal(info.code, 0, p.output());
  assert.equal(ackedIds(p).size, frames.length, `acks for every frame\n${p.output().slice(-2000)}`);
}

/** Ids the sender printed an ack for. */
function ackedIds(p: Proc): Set<string> {
  const ids = new Set<string>();
  for (const l of p.lines()) {
    const m = /^ack \d+ (\S+) \d+$/.exec(l);
    if (m) ids.add(m[1]);
  }
  return ids;
}

/** Resolves once the senders' ack counts satisfy `enough` (checked every ms, as ack lines arrive). */
async function whenAcked(senders: Proc[], enough: (counts: number[]) => boolean, timeoutMs = SLOW): Promise<void> {
  const counts = () => senders.map((p) => p.lines().filter((l) => l.startsWith("ack ")).length);
  const end = Date.now() + timeoutMs;
  while (!enough(counts())) {
    if (Date.now() > end || senders.some((p) => p.exitInfo())) throw new Error(`the senders stopped at ${counts().join(" + ")} acks:\n${senders.map((p) => p.output().slice(-500)).join("\n")}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** The addresses in the agent's kernel set banshare-v4 in `node`'s namespace (empty if the set does not exist yet). */
async function kernelSet(w: World, node: string): Promise<Set<string>> {
  const r = await w.topo.exec(node, "ipset", ["list", "banshare-v4", "-output", "save"], { reject: false });
  if (r.exitCode !== 0) return new Set();
  return new Set([...String(r.stdout).matchAll(/^add banshare-v4 (\S+)/gm)].map((m) => m[1]));
}

function diff(have: Set<string>, want: Set<string>): string {
  const missing = [...want].filter((ip) => !have.has(ip));
  const extra = [...have].filter((ip) => !want.has(ip));
  return `${have.size} address(es), want ${want.size}: ${missing.length} missing (${missing.slice(0, 5).join(" ")}${missing.length > 5 ? " ..." : ""}), ${extra.length} extra (${extra.slice(0, 5).join(" ")}${extra.length > 5 ? " ..." : ""})`;
}

/** Waits until `node`'s kernel set holds exactly `want`; on timeout says what is missing and what is extra. */
async function waitForKernel(w: World, node: string, want: Set<string>, timeoutMs = SLOW): Promise<void> {
  let last = "";
  try {
    await waitFor(async () => {
      const have = await kernelSet(w, node);
      last = diff(have, want);
      return have.size === want.size && [...want].every((ip) => have.has(ip));
    }, `${node}'s kernel set`, timeoutMs);
  } catch {
    throw new Error(`${node}'s kernel set never came to hold exactly what it should: ${last}`);
  }
}

/** Files waiting in a spool folder. */
async function spooled(dir: string): Promise<string[]> {
  if (!existsSync(dir)) return [];
  return (await readdir(dir)).filter((f) => f.endsWith(".json"));
}

/** Runs `jobs` with at most `limit` at a time (each job starts a process; the machine has few cores). */
async function pool<T>(jobs: Array<() => Promise<T>>, limit: number): Promise<T[]> {
  const results: T[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, jobs.length) }, async () => {
      while (next < jobs.length) {
        const i = next++;
        results[i] = await jobs[i]();
      }
    }),
  );
  return results;
}

describe("faults: nothing lost, nothing reordered", needs(["root", "netns", "ipset", "iptables", "ip6tables"], "fault tests"), () => {
  test("hub kill -9 in the middle of a burst of 1,000 bans from two senders: every acked ban reaches every agent's kernel, the rest is spooled and delivered", async (t) => {
    const SENDERS = ["s1", "s2"];
    const w = await world(t, ["hub", ...SENDERS, "a1", "a2"], "bfkill");
    const spoolOf = (s: string) => join(w.dir, `${s}-spool`);
    let hub = await startHub(w);
    // Receivers a1 and a2; each sender's host runs its agent too, which delivers its spool.
    const agents: Record<string, Proc> = {};
    for (const n of ["a1", "a2", ...SENDERS]) agents[n] = await startAgent(w, n, hub.url, SENDERS.includes(n) ? ["--spool", spoolOf(n)] : []);

    const frames: Record<string, BanFrame[]> = {
      s1: bans(Array.from({ length: 500 }, (_, i) => addr(10, i))),
      s2: bans(Array.from({ length: 500 }, (_, i) => addr(20, i))),
    };
    const senders: Record<string, Proc> = {};
    for (const s of SENDERS) senders[s] = await startSender(w, s, hub.url, frames[s], { hold: true });
    // Both connected, then both bursts at once.
    for (const s of SENDERS) await senders[s].waitForLine(/^welcome /, SLOW);
    for (const s of SENDERS) senders[s].signal("SIGUSR1");
    // kill -9 once ~300 bans are acked, with both senders in full flow.
    await whenAcked([senders.s1, senders.s2], ([a, b]) => a + b >= 300 && Math.min(a, b) >= 50);
    await hub.proc.kill9();
    for (const s of SENDERS) assert.equal((await senders[s].closed).code, 3, `sender ${s} lost the hub mid-burst\n${senders[s].output().slice(-1000)}`);

    // Count: acked (in the journal) plus not acked (to be spooled) is every ban, for each sender.
    const acked: Record<string, BanFrame[]> = {};
    const unacked: Record<string, BanFrame[]> = {};
    for (const s of SENDERS) {
      const ids = ackedIds(senders[s]);
      acked[s] = frames[s].filter((f) => ids.has(f.id));
      unacked[s] = frames[s].filter((f) => !ids.has(f.id));
      assert.equal(ids.size, acked[s].length, "an ack for an id that was never sent");
      assert.equal(acked[s].length + unacked[s].length, 500);
    }
    const totalAcked = acked.s1.length + acked.s2.length;
    assert.ok(totalAcked >= 300 && totalAcked < 1000, `the kill came mid-burst (${totalAcked} of 1000 acked)`);
    t.diagnostic(`acked before kill -9: ${totalAcked} of 1000 (s1 ${acked.s1.length}, s2 ${acked.s2.length})`);

    // While the hub is down, what was not acked is handed to ban.ts, which must exit 0: it hands
    // each to the host's agent, which spools it at once (no warning: the ban is where it belongs).
    // A few go through the real ban.ts process each (one Node start-up apiece); the rest are
    // written with ban.ts's own spool(), the same atomic file, so the run stays short.
    const VIA_BAN_TS = 5;
    const results = await pool(
      SENDERS.flatMap((s) =>
        unacked[s].slice(0, VIA_BAN_TS).map((f) => () =>
          runBan(["ban", f.ip, "--jail", "sshd", "--bantime", String(BANTIME), "--hub", hub.url, "--token-file", w.tokens[s], "--spool", spoolOf(s), "--timeout", "1"], { netns: w.topo.ns(s) }),
        ),
      ),
      4,
    );
    for (const r of results) {
      assert.equal(r.code, 0, r.output);
      assert.equal(r.output, "");
    }
    for (const s of SENDERS) {
      for (const f of unacked[s].slice(VIA_BAN_TS)) await spool(spoolOf(s), f);
      assert.equal((await spooled(spoolOf(s))).length, unacked[s].length, `one spool file per unacked ban of ${s}`);
    }

    hub = await startHub(w);
    for (const s of SENDERS) await waitFor(async () => (await spooled(spoolOf(s))).length === 0, `${s}'s agent to deliver its spool`, SLOW);
    // Every acked ban and every spooled one (together all 1,000), in every agent's kernel set, the
    // senders' own agents included (each holds its own node's bans too).
    const arrived = new Set([...acked.s1, ...acked.s2, ...unacked.s1, ...unacked.s2].map((f) => f.ip));
    assert.equal(arrived.size, 1000);
    for (const n of ["a1", "a2", "s1", "s2"]) await waitForKernel(w, n, arrived);
    for (const n of Object.keys(agents)) assert.equal(agents[n].exitInfo(), undefined, `${n}'s agent kept running across the hub's crash`);
  });

  test("an agent stopped while 500 bans and 100 unbans happen resumes from its --state: its kernel ends with exactly the fleet's 400 bans", async (t) => {
    const w = await world(t, ["hub", "s1", "a1"], "bfstate");
    const hub = await startHub(w);
    const state = join(w.dir, "a1.state.json");
    let a1 = await startAgent(w, "a1", hub.url, ["--state", state]);
    // First 20 bans the agent applies, so its state holds a cursor and claims.
    const early = Array.from({ length: 20 }, (_, i) => addr(30, i));
    await sendAll(w, "s1", hub.url, bans(early));
    await waitForKernel(w, "a1", new Set(early));

    // Then 500 bans with 100 unbans of some of them among them (each 50 bans after its ban), and
    // unbans of the 20 first ones; the agent gets SIGTERM while they flow and stays down to the end.
    const ips = Array.from({ length: 500 }, (_, i) => addr(40, i));
    const banFrames = bans(ips);
    const lifted = ips.filter((_, i) => i % 5 === 0);
    const unbanOf = new Map(unbans(lifted).map((f) => [f.ip, f]));
    const stream: Frame[] = [];
    banFrames.forEach((f, i) => {
      stream.push(f);
      if (i >= 50 && unbanOf.has(ips[i - 50])) stream.push(unbanOf.get(ips[i - 50])!);
    });
    for (const ip of ips.slice(-50)) if (unbanOf.has(ip)) stream.push(unbanOf.get(ip)!);
    stream.push(...unbans(early));
    assert.equal(stream.filter((f) => f.type === "ban").length, 500);
    assert.equal(stream.filter((f) => f.type === "unban").length, 120);
    const sender = await startSender(w, "s1", hub.url, stream);
    await whenAcked([sender], ([n]) => n >= 150);
    const stopped = await a1.stop("SIGTERM", 10_000);
    assert.deepEqual({ code: stopped.code, signal: stopped.signal }, { code: 0, signal: null }, a1.output().slice(-3000));
    assert.equal((await sender.closed).code, 0, sender.output());
    assert.equal(ackedIds(sender).size, stream.length, "the hub acked every event");

    a1 = await startAgent(w, "a1", hub.url, ["--state", state]);
    const out = a1.output();
    const resumed = /resumed after seq (\d+): (\d+) event\(s\) missed/.exec(out);
    assert.ok(resumed && Number(resumed[1]) >= early.length, `a resume from the saved cursor, not a full sync:\n${out}`);
    assert.doesNotMatch(out, /full sync/);
    t.diagnostic(`stopped at seq ${resumed[1]}; ${resumed[2]} event(s) missed`);
    await waitForKernel(w, "a1", new Set(ips.filter((ip) => !lifted.includes(ip))));
  });

  test("a network cut longer than the heartbeat: the same agent process catches up on every ban made during the cut", async (t) => {
    const w = await world(t, ["hub", "s1", "a1", "a2"], "bfcut");
    const hub = await startHub(w, "hub", ["--heartbeat", "1"]);
    const a1 = await startAgent(w, "a1", hub.url, ["--heartbeat", "1"]);
    await startAgent(w, "a2", hub.url, ["--heartbeat", "1"]);
    const before = Array.from({ length: 10 }, (_, i) => addr(50, i));
    await sendAll(w, "s1", hub.url, bans(before));
    await waitForKernel(w, "a1", new Set(before));
    const pid = a1.pid;

    await w.topo.linkDown("a1");
    // Right away, while the hub still counts a1 as connected: these go into a dead connection.
    const duringA = Array.from({ length: 50 }, (_, i) => addr(60, i));
    await sendAll(w, "s1", hub.url, bans(duringA));
    // Both ends notice the silence within a heartbeat or two.
    await a1.waitForLine(/no answer from .* reconnecting/, SLOW);
    await hub.proc.waitForLine(/a1 \(.*\) missed a heartbeat/, SLOW);
    const duringB = Array.from({ length: 50 }, (_, i) => addr(70, i));
    await sendAll(w, "s1", hub.url, bans(duringB));
    const everything = new Set([...before, ...duringA, ...duringB]);
    await waitForKernel(w, "a2", everything);
    assert.deepEqual([...(await kernelSet(w, "a1"))].sort(), [...before].sort(), "a1 got bans through a cut cable");

    await w.topo.linkUp("a1");
    await waitForKernel(w, "a1", everything);
    assert.equal(a1.pid, pid);
    assert.equal(a1.exitInfo(), undefined, "the agent was not restarted");
    assert.match(a1.output(), /resumed after seq \d+: 100 event\(s\) missed/);
  });

  test("ban.ts with the hub unreachable exits 0 and spools; once the hub is back the ban is in every agent's kernel and the spool is empty", async (t) => {
    const w = await world(t, ["hub", "s1", "a1", "a2"], "bfdown");
    let hub = await startHub(w, "hub", ["--heartbeat", "2"]);
    const spoolDir = join(w.dir, "s1-spool");
    for (const n of ["a1", "a2", "s1"]) await startAgent(w, n, hub.url, ["--heartbeat", "2", ...(n === "s1" ? ["--spool", spoolDir] : [])]);
    const ban = (ip: string) => runBan(["ban", ip, "--jail", "sshd", "--bantime", String(BANTIME), "--hub", hub.url, "--token-file", w.tokens.s1, "--spool", spoolDir, "--timeout", "2"], { netns: w.topo.ns("s1") });

    // The hub's host is cut off without a sound: the connect hangs until ban.ts's --timeout.
    await w.topo.linkDown("hub", { silent: true });
    const silent = addr(80, 0);
    const r1 = await ban(silent);
    assert.equal(r1.code, 0, r1.output);
    assert.equal((await spooled(spoolDir)).length, 1, r1.output);
    // The hub's process is down: the connection is refused at once.
    await hub.proc.stop("SIGTERM", 5000);
    await w.topo.linkUp("hub");
    const refused = addr(80, 1);
    const r2 = await ban(refused);
    assert.equal(r2.code, 0, r2.output);
    assert.equal((await spooled(spoolDir)).length, 2, r2.output);
    for (const n of ["a1", "a2"]) assert.equal((await kernelSet(w, n)).size, 0, `${n} blocked a ban that was only spooled`);

    hub = await startHub(w, "hub", ["--heartbeat", "2"]);
    await waitFor(async () => (await spooled(spoolDir)).length === 0, "s1's agent to deliver the spool", SLOW);
    for (const n of ["a1", "a2"]) await waitForKernel(w, n, new Set([silent, refused]));
  });

  test("several hub URLs: agents fail over to the second hub and keep receiving; ban.ts --hub DOWN,UP is acked by UP", async (t) => {
    const w = await world(t, ["hub1", "hub2", "s1", "a1", "a2"], "bfover");
    const hub1 = await startHub(w, "hub1");
    await startHub(w, "hub2");
    const urls = `${hubUrl(w, "hub1")},${hubUrl(w, "hub2")}`;
    const a1 = await startAgent(w, "a1", urls);
    assert.match(a1.output(), new RegExp(`connected to ${hubUrl(w, "hub1")} `), "a1 starts on the first hub");
    await hub1.proc.kill9();
    await a1.waitForLine(new RegExp(`connected to ${hubUrl(w, "hub2")} `), SLOW);
    const a2 = await startAgent(w, "a2", urls); // the first hub is down from its start
    assert.match(a2.output(), new RegExp(`connected to ${hubUrl(w, "hub2")} `));

    const spoolDir = join(w.dir, "s1-spool");
    const viaBanTs = Array.from({ length: 3 }, (_, i) => addr(90, i));
    const results = await Promise.all(
      viaBanTs.map((ip) => runBan(["ban", ip, "--jail", "sshd", "--bantime", String(BANTIME), "--hub", urls, "--token-file", w.tokens.s1, "--spool", spoolDir, "--timeout", "5"], { netns: w.topo.ns("s1") })),
    );
    for (const r of results) assert.equal(r.code, 0, r.output);
    assert.deepEqual(await spooled(spoolDir), [], "ban.ts spooled although the second hub was up");
    const burst = Array.from({ length: 100 }, (_, i) => addr(91, i));
    await sendAll(w, "s1", hubUrl(w, "hub2"), bans(burst));
    // The first hub's host gone without a sound (packets to it vanish, as behind a router): the
    // first URL must not use up all of --timeout, the second still acks.
    await w.topo.exec("s1", "iptables", ["-I", "OUTPUT", "-d", w.topo.ip("hub1"), "-j", "DROP"]);
    const blackholed = addr(92, 0);
    const r = await runBan(["ban", blackholed, "--jail", "sshd", "--bantime", String(BANTIME), "--hub", urls, "--token-file", w.tokens.s1, "--spool", spoolDir, "--timeout", "4"], { netns: w.topo.ns("s1") });
    assert.equal(r.code, 0, r.output);
    assert.deepEqual(await spooled(spoolDir), [], `ban.ts spooled although the second hub was up: ${r.output}`);
    for (const n of ["a1", "a2"]) await waitForKernel(w, n, new Set([...viaBanTs, ...burst, blackholed]));
    assert.equal(a1.exitInfo(), undefined);
    assert.equal(a2.exitInfo(), undefined);
  });

  test("an agent that syncs while a burst is still on its way to the hub's disk, then hub kill -9: its cursor covers only durable events, so after the restart it has exactly the hub's state", needs(["strace"], "strace"), async (t) => {
    const w = await world(t, ["hub", "s1", "a1", "a2"], "bfsync");
    // The hub with each fsync slowed to 300 ms (strace fault injection), so that accepted events
    // wait on their way to the disk long enough for an agent's sync to fall in between.
    const slow = spawnProc(
      "strace",
      ["-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", "trace=fsync,fdatasync", "-e", "inject=fsync,fdatasync:delay_enter=300000", process.execPath, "--import", import.meta.resolve("tsx"), join(REPO_ROOT, "hub.ts"), ...hubArgs(w, "hub", ["--insecure"])],
      { netns: w.topo.ns("hub"), name: "hub (slow fsync)", cwd: REPO_ROOT },
    );
    await slow.waitForLine(/listening on/, SLOW);
    const url = hubUrl(w);
    await startAgent(w, "a1", url);
    const state = join(w.dir, "a2.state.json");
    // Long enough (20 in flight, 300 ms a flush: about 6 s) to still be flowing once a2 is up.
    const first = bans(Array.from({ length: 400 }, (_, i) => addr(100, i)));
    const sender = await startSender(w, "s1", url, first, { window: 20 });
    await sender.waitForLine(/^ack /, SLOW);
    // a2 connects mid-burst: up to 20 bans are accepted but not yet durable when it gets its sync.
    let a2 = await startAgent(w, "a2", url, ["--state", state]);
    await slow.kill9();
    assert.equal((await sender.closed).code, 3, sender.output().slice(-1000));
    const acked = first.filter((f) => ackedIds(sender).has(f.id)).map((f) => f.ip);
    assert.ok(acked.length > 0 && acked.length < first.length, `the kill came mid-burst (${acked.length} of ${first.length} acked)`);
    assert.equal((await a2.stop("SIGTERM", 10_000)).code, 0, a2.output());

    const hub = await startHub(w);
    const synced = Number(/full sync: \d+ event\(s\) at seq (\d+)/.exec(a2.output())?.[1]);
    const onDisk = Number(/claimed, seq (\d+)/.exec(hub.proc.output())?.[1]);
    t.diagnostic(`a2 synced at seq ${synced}; the hub restarted with seq ${onDisk} on disk; ${acked.length} of ${first.length} acked`);
    assert.ok(synced <= onDisk, `a2's cursor (seq ${synced}) ran ahead of what the hub had on disk (seq ${onDisk})`);
    // New bans after the restart take the seqs after what is on disk; a2, back from its state,
    // resumes from its cursor and must get every one of them.
    const second = Array.from({ length: 100 }, (_, i) => addr(110, i));
    await sendAll(w, "s1", hub.url, bans(second));
    a2 = await startAgent(w, "a2", hub.url, ["--state", state]);
    assert.match(a2.output(), /resumed after seq/);
    // The fleet's state is the hub's journal: every acked ban, what else made it to disk, the new bans.
    const fleet = new Set((await readJournal(journalOf(w)))!.events.filter((e) => e.kind === "ban").map((e) => e.ip));
    for (const ip of [...acked, ...second]) assert.ok(fleet.has(ip), `${ip} was acked but is not in the hub's journal`);
    await waitForKernel(w, "a2", fleet);
    await waitForKernel(w, "a1", fleet);
  });
});
