/**
 * Issue 3, "nothing lost": the hub's journal. A journal torn mid-line by a crash keeps every
 * event before the tear; a hub killed with SIGKILL right after acking a burst has every acked
 * ban after its restart; compaction shrinks the journal without losing the hub's id or any
 * live claim, and is not redone on every write when many nodes claim the same addresses.
 * Publishers are raw WebSocket clients (test/lib/client.ts) that pipeline their frames; what
 * survived is read from /healthz, from a full sync, and from a real dry-run agent's log.
 */
import assert from "node:assert/strict";
import { readFileSync, statSync, truncateSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import type { FleetEvent } from "../messages.ts";
import { connectNode, type HubClient } from "./lib/client.ts";
import { enrol, readCsv, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { stopAll, type Proc } from "./lib/proc.ts";

type Frame = Record<string, unknown>;

/** A node's client that has said hello, for frames sent all at once, without waiting for any ack. */
const publisher = (url: string, tokenFile: string) => connectNode(url, { file: tokenFile }, { hello: true });
const sendAll = (pub: HubClient, frames: Frame[]) => frames.forEach((f) => pub.send(f));

/** The events of the full sync a fresh agent of node `tokenFile` gets (all chunks). */
async function fullSync(url: string, tokenFile: string): Promise<FleetEvent[]> {
  const c = await connectNode(url, { file: tokenFile }, { hello: { want: "events" } });
  let closed = false;
  void c.closed.then(() => (closed = true));
  await waitFor(() => {
    if (c.frames.some((f) => f.type === "sync" && !f.more)) return true;
    if (closed) throw new Error("the hub closed the connection before the sync ended");
    return false;
  }, "the end of the full sync");
  c.close();
  const chunks = c.frames.filter((f) => f.type === "sync");
  for (const f of chunks) assert.equal(f.full, true, "a client without a cursor got a partial sync");
  return chunks.flatMap((f) => f.events as FleetEvent[]);
}

/** The hub's /healthz as an enrolled node sees it (a stranger is told only whether it is up). */
async function healthz(hub: HubProc, tokenFile: string): Promise<{ hub: string; seq: string; claims: number }> {
  return (await fetch(`http://127.0.0.1:${hub.port}/healthz`, { headers: { authorization: `Bearer ${readFileSync(tokenFile, "utf8").trim()}` } })).json();
}

/** The i-th address of 10.200.0.0/16. */
const addr = (i: number) => `10.200.${i >> 8}.${i & 255}`;
const ban = (id: string, ip: string, detectedAt: number): Frame => ({ type: "ban", id, ip, jail: "sshd", bantime: 3600, detectedAt });
const unban = (id: string, ip: string, detectedAt: number): Frame => ({ type: "unban", id, ip, jail: "sshd", detectedAt });
const lineCount = (path: string) => readFileSync(path, "utf8").split("\n").filter(Boolean).length;

/** The addresses a dry-run agent's CSV says it blocked from its full sync. */
function syncedBlocks(csv: string): Set<string> {
  return new Set(readCsv(csv).filter((r) => r.action === "BLOCK" && r.detail.startsWith("sync")).map((r) => r.ip));
}

/** Waits until the agent's CSV holds a BLOCK row for each address its log says the sync blocked; returns them. */
async function agentSynced(agent: Proc, csv: string): Promise<Set<string>> {
  const n = Number(/synced: (\d+) address/.exec(await agent.waitForLine(/synced: \d+ address/))![1]);
  await waitFor(() => syncedBlocks(csv).size >= n, `${n} BLOCK rows in ${csv}`);
  return syncedBlocks(csv);
}

describe("the hub's journal loses no acked ban: not to a torn line, a kill -9 or compaction, which keeps the hub id and every live claim", () => {
  const dirs: string[] = [];

  /** A fresh folder with a publisher node `pub`, an agent node `agent1` and `extra` more publishers `pub1`... */
  const setup = async (extra = 0) => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-journal-"));
    dirs.push(dir);
    const more = Array.from({ length: extra }, (_, i) => [`pub${i + 1}`, "node"] as [string, "node"]);
    const tokens = await enrol(dir, [["pub", "node"], ["agent1", "node"], ...more]);
    const journal = join(dir, "journal.jsonl");
    // The rate limit is not what these tests are about: let the bursts through.
    const start = () => startHubProc(["--tokens", join(dir, "tokens"), "--state", journal, "--listen", "127.0.0.1:0", "--rate", "100000", "--burst", "100000"]);
    const agent = (hub: HubProc) => startAgentProc("agent1", ["--hub", hub.url, "--token-file", tokens.agent1, "--backend", "dry-run", "--csv", join(dir, "agent1.csv")]);
    return { dir, tokens, journal, start, agent, csv: join(dir, "agent1.csv") };
  };

  after(async () => {
    await stopAll();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  test("a journal torn in its last line (a crash mid-write) loads with a warning and keeps every event before it", async () => {
    const s = await setup();
    let hub = await s.start();
    const pub = await publisher(hub.url, s.tokens.pub);
    const ips = Array.from({ length: 50 }, (_, i) => `198.51.100.${i + 1}`);
    const now = Date.now();
    sendAll(pub, ips.map((ip, i) => ban(`torn-${i}`, ip, now + i)));
    await pub.acks(ips.length);
    const before = await healthz(hub, s.tokens.pub);
    assert.equal(before.claims, 50);
    pub.ws.close();
    await hub.proc.stop();

    // Cut the file in the middle of its last line, as a crash during the write would.
    const text = readFileSync(s.journal, "utf8");
    assert.ok(text.endsWith("\n"));
    const lastStart = text.lastIndexOf("\n", text.length - 2) + 1;
    const torn = JSON.parse(text.slice(lastStart)) as FleetEvent;
    assert.equal(torn.seq, before.seq, "the last line is the last event");
    truncateSync(s.journal, Buffer.byteLength(text.slice(0, lastStart)) + Math.floor((text.length - lastStart) / 2));

    hub = await s.start();
    assert.match(hub.proc.output(), /warning: skipped 1 torn or corrupt line/);
    const afterTear = await healthz(hub, s.tokens.pub);
    assert.equal(afterTear.hub, before.hub, "the hub id changed");
    assert.equal(afterTear.claims, 49);
    assert.equal(afterTear.seq, String(Number(before.seq) - 1));
    const blocked = await agentSynced(await s.agent(hub), s.csv);
    assert.deepEqual([...blocked].sort(), ips.filter((ip) => ip !== torn.ip).sort(), "the agent's full sync is every event before the torn line");

    // The torn line is gone for good: the next event and the next restart are clean.
    const again = await publisher(hub.url, s.tokens.pub);
    sendAll(again, [ban("torn-again", torn.ip, Date.now())]);
    await again.acks(1);
    again.ws.close();
    await hub.proc.stop();
    hub = await s.start();
    assert.doesNotMatch(hub.proc.output(), /skipped/);
    assert.equal((await healthz(hub, s.tokens.pub)).claims, 50);
    await hub.proc.stop();
  });

  test("kill -9 right after a burst: every acked ban is in the state after the restart", async (t) => {
    const s = await setup();
    let hub = await s.start();
    const { hub: hubId } = await healthz(hub, s.tokens.pub);
    const pub = await publisher(hub.url, s.tokens.pub);
    const sent = 3000;
    const killAt = 1500;
    const now = Date.now();
    // SIGKILL the moment the killAt-th ack arrives; the acks already on their way still count.
    pub.onFrame = (f) => {
      if (f.type === "ack" && pub.acked.size === killAt) void hub.proc.kill9();
    };
    sendAll(pub, Array.from({ length: sent }, (_, i) => ban(`burst-${i}`, addr(i), now + i)));
    await pub.closed;
    assert.deepEqual(pub.frames.filter((f) => f.type === "error"), []);
    const acked = [...pub.acked.keys()].map((id) => addr(Number(id.slice("burst-".length))));
    t.diagnostic(`${acked.length} of ${sent} bans acked before the hub died`);
    assert.ok(acked.length >= killAt);

    hub = await s.start();
    const health = await healthz(hub, s.tokens.pub);
    assert.equal(health.hub, hubId, "the hub id changed");
    assert.ok(health.claims >= acked.length && health.claims <= sent, `${health.claims} claims after the restart, ${acked.length} acked, ${sent} sent`);
    const synced = await agentSynced(await s.agent(hub), s.csv);
    const lost = acked.filter((ip) => !synced.has(ip));
    assert.deepEqual(lost, [], `${lost.length} acked ban(s) missing from the agent's full sync`);
    assert.equal(synced.size, health.claims, "the agent's full sync and the hub's claims disagree");
    await hub.proc.stop();
  });

  test("compaction shrinks the journal, and the hub id, seq and every live claim survive a restart", async () => {
    const s = await setup();
    let hub = await s.start();
    const { hub: hubId } = await healthz(hub, s.tokens.pub);
    const pub = await publisher(hub.url, s.tokens.pub);
    const n = 2000;
    const base = Date.now() - 60_000;
    // Round r of address i: bans on even rounds, unbans on odd ones, each newer than the last.
    const round = (r: number, i: number) => (r % 2 ? unban : ban)(`r${r}-${i}`, addr(i), base + r * 1000);
    const all = (r: number, keep: (i: number) => boolean = () => true) => Array.from({ length: n }, (_, i) => i).filter(keep).map((i) => round(r, i));

    // 8000 events: below the compaction threshold, max(10000, 4 x live claims).
    const phase1 = [...all(0), ...all(1), ...all(2), ...all(3)];
    sendAll(pub, phase1);
    await pub.acks(phase1.length);
    const linesBefore = lineCount(s.journal);
    const sizeBefore = statSync(s.journal).size;
    assert.equal(linesBefore, 1 + phase1.length, "the journal was compacted before it reached the threshold");

    // 3000 more: past the threshold. Every address ends banned, the even ones then unbanned.
    const phase2 = [...all(4), ...all(5, (i) => i % 2 === 0)];
    sendAll(pub, phase2);
    await pub.acks(phase1.length + phase2.length);
    const health = await healthz(hub, s.tokens.pub);
    assert.equal(health.seq, String(phase1.length + phase2.length));
    assert.equal(health.claims, n);
    await waitFor(() => statSync(s.journal).size < sizeBefore, "the journal to shrink");
    assert.ok(lineCount(s.journal) <= 1 + n + phase2.length, `${lineCount(s.journal)} lines after compaction`);
    pub.ws.close();

    await hub.proc.stop();
    hub = await s.start();
    assert.doesNotMatch(hub.proc.output(), /skipped/);
    assert.deepEqual(await healthz(hub, s.tokens.pub), { ...health, nodes: 0 });
    assert.equal((await healthz(hub, s.tokens.pub)).hub, hubId);

    // The newest event of every address, exactly: odd addresses banned, even ones unbanned.
    const events = await fullSync(hub.url, s.tokens.agent1);
    assert.equal(events.length, n);
    const byIp = new Map(events.map((e) => [e.ip, e]));
    for (let i = 0; i < n; i++) {
      const e = byIp.get(addr(i));
      assert.ok(e, `${addr(i)} is missing from the state`);
      assert.equal(e.id, i % 2 ? `r4-${i}` : `r5-${i}`, `${addr(i)} lost its newest event`);
      assert.equal(e.kind, i % 2 ? "ban" : "unban");
    }
    // And a real agent blocks exactly the live bans.
    const blocked = await agentSynced(await s.agent(hub), s.csv);
    assert.deepEqual([...blocked].sort(), events.filter((e) => e.kind === "ban").map((e) => e.ip).sort());
    assert.equal(blocked.size, n / 2);
    await hub.proc.stop();
  });

  test("many nodes claiming the same addresses: a compacted journal is not rewritten again by the next event", async () => {
    // Five nodes ban the same 2100 addresses: 10,500 claims (address, node) on 2100 addresses.
    const s = await setup(5);
    const hub = await s.start();
    const nodes = ["pub1", "pub2", "pub3", "pub4", "pub5"];
    const pubs = await Promise.all(nodes.map((n) => publisher(hub.url, s.tokens[n])));
    const n = 2100;
    const now = Date.now();
    for (const [k, p] of pubs.entries()) sendAll(p, Array.from({ length: n }, (_, i) => ban(`m${k}-${i}`, addr(i), now + i)));
    await Promise.all(pubs.map((p) => p.acks(n)));
    const health = await healthz(hub, s.tokens.pub);
    assert.equal(health.claims, n);
    assert.equal(health.seq, String(nodes.length * n));
    // Past the 10,000-line threshold once, the journal was compacted to the 10,500 live claims.
    await waitFor(() => lineCount(s.journal) === 1 + nodes.length * n, "the journal to hold the live claims");

    // One more event is one more line, not another rewrite of every claim.
    const { ino } = statSync(s.journal);
    sendAll(pubs[0], [ban("one-more", addr(n), Date.now())]);
    await pubs[0].acks(n + 1);
    assert.equal(lineCount(s.journal), 2 + nodes.length * n);
    assert.equal(statSync(s.journal).ino, ino, "one more event made the hub rewrite (compact) the whole journal");
    for (const p of pubs) p.ws.close();
    await hub.proc.stop();
  });
});
