/**
 * Wrong clocks (a VPS without NTP): one process's wall clock is shifted by a preload
 * (test/fixtures/clock-shift.mjs on that child's node command line; the machine's clock is never
 * touched), with a real hub, real agents and real ban.ts processes: dry-run agents on loopback,
 * and ipset agents in network namespaces. What is checked: the hub's claims (`GET /v1/bans`, its
 * `until` against its own `now`), the agents' CSV rows (`SCHEDULE_UNBLOCK`'s `until` against the
 * row's `time`, both on the agent's clock) and the kernel's timeouts, so that no skew of minutes
 * to hours loses a ban, stretches it or makes it unliftable.
 */

import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { HubClock } from "../agent.ts";
import { CLOCK_TOLERANCE_MS, hubDetectedAt, type BanList, type NodeList } from "../messages.ts";
import { connectNode } from "./lib/client.ts";
import { enrol, freePort, rows, startHubProc, waitFor } from "./lib/fleet.ts";
import { createTopology, type Topology } from "./lib/netns.ts";
import { REPO_ROOT, spawnProc, stopAll, tsx, type Proc } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

const SHIFT_PRELOAD = join(REPO_ROOT, "test", "fixtures", "clock-shift.mjs");
const MIN = 60_000;
const HOUR = 60 * MIN;

/** Runs one of the scripts with its wall clock `shiftMs` off the machine's (0: as it is), in `netns` if given. */
function shifted(script: string, args: string[], shiftMs: number, name: string, netns?: string): Proc {
  const preload = shiftMs ? ["--import", SHIFT_PRELOAD] : [];
  return spawnProc(process.execPath, [...preload, "--import", import.meta.resolve("tsx"), join(REPO_ROOT, script), ...args], { name, cwd: REPO_ROOT, netns, env: { BANSHARE_TEST_CLOCK_SHIFT_MS: String(shiftMs) } });
}

/** A hub whose clock is `hubShift` off, nodes a, b, c (node role) and ops (admin), in a scratch directory. */
class ClockFleet {
  hub!: Proc;
  url = "";
  private tokens: Record<string, string> = {};
  readonly agents: Record<string, Proc> = {};

  private constructor(readonly dir: string) {}

  static async start(hubShift: number): Promise<ClockFleet> {
    const f = new ClockFleet(await mkdtemp(join(tmpdir(), "banshare-clock-")));
    f.tokens = await enrol(f.dir, [["a", "node"], ["b", "node"], ["c", "node"], ["ops", "admin"]]);
    f.hub = shifted("hub.ts", ["--tokens", join(f.dir, "tokens"), "--listen", `127.0.0.1:${await freePort()}`, "--csv", f.csv("hub")], hubShift, "hub");
    const line = await f.hub.waitForLine(/listening on ws:\/\/\S+:\d+/, 20_000);
    f.url = /(ws:\/\/\S+:\d+)/.exec(line)![1];
    return f;
  }

  csv(name: string): string {
    return join(this.dir, `${name}.csv`);
  }

  token(node: string): string {
    return this.tokens[node];
  }

  /** Starts `node`'s dry-run agent with its clock `shiftMs` off; resolves once its first sync is applied. */
  async agent(node: string, shiftMs: number): Promise<Proc> {
    const p = shifted("agent.ts", ["--hub", this.url, "--token-file", this.tokens[node], "--backend", "dry-run", "--csv", this.csv(node)], shiftMs, node);
    await p.waitForLine(/synced: \d+ address/, 20_000);
    this.agents[node] = p;
    return p;
  }

  /** Runs ban.ts as `node` with its clock `shiftMs` off. */
  async ban(node: string, shiftMs: number, ...args: string[]): Promise<{ code: number | null; output: string }> {
    const p = shifted("ban.ts", [...args, "--hub", this.url, "--token-file", this.tokens[node], "--spool", join(this.dir, `${node}-spool`), "--timeout", "5"], shiftMs, "ban");
    const info = await p.closed;
    return { code: info.code, output: p.output() };
  }

  async get<T>(path: string): Promise<T> {
    const { readFileSync } = await import("node:fs");
    const res = await fetch(this.url.replace(/^ws/, "http") + path, { headers: { authorization: `Bearer ${readFileSync(this.tokens.ops, "utf8").trim()}` } });
    assert.equal(res.status, 200, `GET ${path}`);
    return (path === "/metrics" ? res.text() : res.json()) as Promise<T>;
  }

  /** Seconds the hub's live claim of `origin` on `ip` has left by the hub's own clock; undefined: no live claim. */
  async hubLeft(ip: string, origin = "a"): Promise<number | undefined> {
    const list = await this.get<BanList>("/v1/bans");
    const c = list.bans.find((b) => b.ip === ip)?.claims.find((x) => x.origin === origin);
    return c && c.until !== null ? (c.until - list.now) / 1000 : undefined;
  }

  async stop(): Promise<void> {
    await stopAll();
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** The seconds `node`'s agent scheduled `ip`'s ban for: its SCHEDULE_UNBLOCK row's `until` minus the row's `time`. */
async function scheduled(f: ClockFleet, node: string, ip: string): Promise<number> {
  const row = await waitFor(() => rows(f.csv(node), "SCHEDULE_UNBLOCK", ip).at(-1), `${node}'s SCHEDULE_UNBLOCK of ${ip}`);
  return (Date.parse(row.until) - Date.parse(row.time)) / 1000;
}

/** Asserts a lifetime of about 600 s (a few seconds go by between the ban and the look). */
function about600(left: number | undefined, what: string): void {
  assert.ok(left !== undefined, `${what}: no live ban`);
  assert.ok(left > 590 && left <= 601, `${what}: expected about 600 s left, got ${left} s`);
}

describe("the hub's clock 10 minutes behind", () => {
  let f: ClockFleet;
  before(async () => {
    f = await ClockFleet.start(-10 * MIN);
    await f.agent("b", 0);
  });
  after(() => f.stop());

  test("a correct node's ban is acked, not refused, and lasts its 600 s on the hub and on every agent", async () => {
    const r = await f.ban("a", 0, "ban", "198.51.100.10", "--jail", "sshd", "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    assert.doesNotMatch(r.output, /spool/, "acked, not spooled");
    about600(await f.hubLeft("198.51.100.10"), "the hub's claim");
    about600(await scheduled(f, "b", "198.51.100.10"), "agent b's schedule");
  });

  test("the hub measures the skew: one warning line, the per-node gauge in /metrics, the column of GET /v1/nodes", async () => {
    await f.hub.waitForLine(/warning: node a's clock is 6\d\d\.\d s ahead of the hub's \(measured on its ban\)/, 5000);
    const metrics = await f.get<string>("/metrics");
    const a = Number(/^banshare_node_clock_skew_seconds\{node="a"\} (\S+)$/m.exec(metrics)?.[1]);
    assert.ok(a < -599 && a > -610, `skew of a: ${a} s`);
    const nodes = await f.get<NodeList>("/v1/nodes");
    const b = nodes.nodes.find((n) => n.node === "b")?.clockSkewMs;
    assert.ok(b !== null && b !== undefined && b < -599_000 && b > -610_000, `skew of b's agent: ${b} ms`);
  });
});

describe("the hub's clock 1 h ahead", () => {
  let f: ClockFleet;
  before(async () => {
    f = await ClockFleet.start(HOUR);
    await f.agent("b", 0);
  });
  after(() => f.stop());

  test("a ban from a correct node lives its 600 s on the hub's clock, and a connected agent holds it 600 s", async () => {
    const r = await f.ban("a", 0, "ban", "198.51.100.20", "--jail", "sshd", "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    about600(await f.hubLeft("198.51.100.20"), "the hub's claim");
    about600(await scheduled(f, "b", "198.51.100.20"), "agent b's schedule");
  });

  test("an agent joining afterwards gets that ban in its full sync, for what is left of its 600 s", async () => {
    await f.agent("c", 0);
    about600(await scheduled(f, "c", "198.51.100.20"), "agent c's schedule after its full sync");
  });
});

describe("senders and receivers with wrong clocks, the hub's right", () => {
  let f: ClockFleet;
  before(async () => {
    f = await ClockFleet.start(0);
    await f.agent("b", 0);
    await f.agent("c", -HOUR);
  });
  after(() => f.stop());

  test("a sender 1 h behind: its 600 s ban lasts 600 s, not already over", async () => {
    const r = await f.ban("a", -HOUR, "ban", "198.51.100.30", "--jail", "sshd", "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    about600(await f.hubLeft("198.51.100.30"), "the hub's claim");
    about600(await scheduled(f, "b", "198.51.100.30"), "agent b's schedule");
  });

  test("a sender 10 minutes ahead: its ban is acked, not refused, and lasts 600 s, not 1,200", async () => {
    const r = await f.ban("a", 10 * MIN, "ban", "198.51.100.40", "--jail", "sshd", "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    about600(await f.hubLeft("198.51.100.40"), "the hub's claim");
    about600(await scheduled(f, "b", "198.51.100.40"), "agent b's schedule");
  });

  test("a ban sent 4 minutes ahead is lifted by the origin's own unban once its clock is fixed", async () => {
    assert.equal((await f.ban("a", 4 * MIN, "ban", "198.51.100.50", "--jail", "sshd", "--bantime", "600")).code, 0);
    await waitFor(() => rows(f.csv("b"), "BLOCK", "198.51.100.50").length, "b blocks 198.51.100.50");
    const r = await f.ban("a", 0, "unban", "198.51.100.50", "--jail", "sshd");
    assert.equal(r.code, 0, r.output);
    assert.equal(await f.hubLeft("198.51.100.50"), undefined, "the hub holds no live claim");
    await waitFor(() => rows(f.csv("b"), "UNBLOCK", "198.51.100.50").length, "b unblocks 198.51.100.50");
  });

  test("a ban sent 4 minutes ahead is lifted by an admin's unban --all-nodes", async () => {
    assert.equal((await f.ban("a", 4 * MIN, "ban", "198.51.100.60", "--jail", "sshd", "--bantime", "600")).code, 0);
    await waitFor(() => rows(f.csv("b"), "BLOCK", "198.51.100.60").length, "b blocks 198.51.100.60");
    const r = await f.ban("ops", 0, "unban", "198.51.100.60", "--jail", "sshd", "--all-nodes");
    assert.equal(r.code, 0, r.output);
    assert.equal(await f.hubLeft("198.51.100.60"), undefined, "the hub holds no live claim");
    await waitFor(() => rows(f.csv("b"), "UNBLOCK", "198.51.100.60").length, "b unblocks 198.51.100.60");
  });

  test("a ban 0.9 s ahead (within the tolerance) is lifted by an admin's unban sent a moment after it", async () => {
    const a = await connectNode(f.url, { file: f.token("a") }, { hello: true });
    const ops = await connectNode(f.url, { file: f.token("ops") }, { hello: true });
    try {
      const ahead = Date.now() + 900;
      a.send({ type: "ban", id: "near1", ip: "198.51.100.90", jail: "sshd", bantime: 600, detectedAt: ahead, sentAt: ahead });
      await a.acks(1);
      ops.send({ type: "unban", id: "near2", ip: "198.51.100.90", jail: "sshd", all: true, detectedAt: Date.now(), sentAt: Date.now() });
      await ops.acks(1);
      assert.equal(await f.hubLeft("198.51.100.90"), undefined, "the hub holds no live claim");
    } finally {
      a.close();
      ops.close();
    }
  });

  test("a receiver 1 h behind schedules a 600 s ban for 600 s, not 4,200, and says its clock is off", async () => {
    const r = await f.ban("a", 0, "ban", "198.51.100.70", "--jail", "sshd", "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    about600(await scheduled(f, "c", "198.51.100.70"), "agent c's schedule");
    const row = rows(f.csv("c"), "SCHEDULE_UNBLOCK", "198.51.100.70").at(-1)!;
    const inS = Number(/^in (\d+) s$/.exec(row.detail)?.[1]);
    assert.ok(inS > 590 && inS <= 600, `c's row says ${row.detail}`);
    await f.agents.c.waitForLine(/warning: this server's clock is 3600\.\d s behind the hub's; bans are timed by the hub's clock/, 5000);
    const nodes = await f.get<NodeList>("/v1/nodes");
    const skew = nodes.nodes.find((n) => n.node === "c")?.clockSkewMs;
    assert.ok(skew !== null && skew !== undefined && Math.abs(skew - HOUR) < 10_000, `c's skew on the hub: ${skew} ms`);
    // The status page's feed: the Clock column's value.
    const page = await connectNode(f.url, { file: f.token("ops") }, { hello: { want: "status" } });
    try {
      const status = await page.next((x) => x.type === "status", "a status frame");
      const conn = status.conns.find((x: { name: string; kind: string }) => x.name === "c" && x.kind === "events");
      assert.ok(Math.abs(conn?.clockSkewMs - HOUR) < 10_000, `c's skew in the status frame: ${conn?.clockSkewMs} ms`);
    } finally {
      page.close();
    }
  });
});

describe("receivers 1 h behind and 1 h ahead on the real kernel (ipset)", needs(["root", "netns", "ipset", "iptables", "ip6tables"], "ipset and iptables in a namespace"), () => {
  let topo: Topology;
  let dir: string;
  let hubUrl = "";
  let tokens: Record<string, string> = {};
  const agents: Record<string, Proc> = {};
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-clock-kernel-"));
    topo = await createTopology(["hub", "rx", "ax"], { prefix: "bsclk" });
    tokens = await enrol(dir, [["a", "node"], ["rx", "node"], ["ax", "node"], ["ops", "admin"]]);
    // A private bridge the test made: plain ws:// with --insecure.
    hubUrl = (await startHubProc(["--tokens", join(dir, "tokens"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") })).url;
    for (const [n, shift] of [["rx", -HOUR], ["ax", HOUR]] as const) {
      agents[n] = shifted("agent.ts", ["--hub", hubUrl, "--token-file", tokens[n], "--backend", "ipset", "--insecure"], shift, n, topo.ns(n));
      await agents[n].waitForLine(/synced: \d+ address/, 20_000);
    }
    const ban = tsx("ban.ts", ["ban", "198.51.100.80", "--jail", "sshd", "--bantime", "600", "--hub", hubUrl, "--token-file", tokens.a, "--spool", join(dir, "spool"), "--insecure"], { netns: topo.ns("hub"), name: "ban" });
    assert.equal((await ban.closed).code, 0, ban.output());
  });
  after(async () => {
    await stopAll();
    await topo?.destroy(); // the sets and rules go with the namespaces
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** The kernel timeout of 198.51.100.80 in `node`'s set, s. */
  const kernelTimeout = (node: string) =>
    waitFor(async () => {
      const r = await topo.exec(node, "ipset", ["list", "banshare-v4"], { reject: false });
      return Number(/^198\.51\.100\.80 timeout (\d+)/m.exec(String(r.stdout))?.[1]) || undefined;
    }, `198.51.100.80 in ${node}'s kernel set`);

  test("1 h behind: the kernel entry of a 600 s ban times out in about 600 s, not 4,200", async () => {
    const timeout = await kernelTimeout("rx");
    assert.ok(timeout > 590 && timeout <= 600, `the kernel entry times out in ${timeout} s`);
  });

  test("1 h ahead: the 600 s ban is in the kernel for about 600 s, not already over", async () => {
    const timeout = await kernelTimeout("ax");
    assert.ok(timeout > 590 && timeout <= 600, `the kernel entry times out in ${timeout} s`);
  });

  test("1 h ahead: its enforcement reports are taken (their times on the hub's clock), and status --fleet says enforcing", async () => {
    const line = await waitFor(async () => {
      const p = tsx("ban.ts", ["status", "--fleet", "--hub", hubUrl, "--token-file", tokens.ops, "--insecure"], { netns: topo.ns("hub"), name: "status" });
      await p.closed;
      return p.lines().find((l) => /^ax\s+enforcing\s+\(ipset, 1 entry \/ 1 claim/.test(l));
    }, "ax enforcing its one ban in status --fleet");
    assert.match(line, /reported \d+s ago/);
    assert.doesNotMatch(agents.ax.output(), /hub refused/, "no report of ax was refused");
  });
});

describe("clock rules", () => {
  test("hubDetectedAt() keeps a sender's time within the tolerance and places it by its age beyond", () => {
    const now = 1_800_000_000_000;
    assert.equal(hubDetectedAt(now - 20, now - 5, now), now - 20, "in step: the sender's own time");
    assert.equal(hubDetectedAt(now - HOUR - 20, now - HOUR, now), now - 20, "1 h behind: 20 ms before the hub received it");
    assert.equal(hubDetectedAt(now + 10 * MIN - 5 * MIN, now + 10 * MIN, now), now - 5 * MIN, "10 min ahead, spooled 5 min: 5 min ago");
    assert.equal(hubDetectedAt(now + 10 * MIN, undefined, now), now, "an older sender ahead: never in the hub's future");
    assert.equal(hubDetectedAt(now + 500, now, now), now, "detected after sending: no later than sent");
    assert.equal(hubDetectedAt(now + CLOCK_TOLERANCE_MS - 100, now + CLOCK_TOLERANCE_MS, now), now, "a little ahead, within the tolerance: never in the hub's future");
  });

  test("HubClock times by the hub's clock once the local one is off, and keeps it across a step of the local clock", () => {
    let mono = 1000;
    let wall = 1_800_000_000_000 - HOUR;
    const lines: string[] = [];
    const c = new HubClock((l) => lines.push(l), () => mono, () => wall);
    assert.equal(c.now(), wall, "no hub yet: the local clock");
    c.welcomed(1_800_000_000_000 + 10, 980); // round trip 980 -> 1000: the hub said +10 at its middle
    assert.equal(c.now(), 1_800_000_000_000 + 20);
    assert.equal(c.toLocal(c.now() + 600_000), wall + 600_000);
    assert.match(lines[0], /3600\.0 s behind the hub's/);
    mono += 5000;
    wall += HOUR + 5000; // the local clock is fixed: stepped 1 h forward
    assert.equal(c.now(), wall, "in step now: the local clock as it is");
    c.heard(1_800_000_000_000 + 5015);
    assert.match(lines.at(-1)!, /back within/);
  });
});
