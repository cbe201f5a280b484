/**
 * Issue 3, "nothing reordered": node A and node B ban one address and A unbans it; whatever
 * order these events reach an agent in, replayed or not, the address stays blocked until B's
 * claim ends, on every agent.
 *
 * To choose the delivery order the test plays the hub itself: a WebSocket server in this
 * process speaks the hub's side of the protocol to real agent processes (dry-run backend) and
 * sends each of them the events in a different permutation. After every step it sends a
 * "sentinel" ban on a fresh address and waits for the agent to log it: an agent applies events
 * in arrival order, so the sentinel's BLOCK row means everything before it has been applied.
 * The last test runs the same race through a real hub with real ban.ts senders.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";
import type { FleetEvent } from "../messages.ts";
import { enrol, readCsv, rows, runBan, startAgentProc, startHubProc, waitFor, type Row } from "./lib/fleet.ts";
import { stopAll, type Proc } from "./lib/proc.ts";

/** An event as the test writes it; the fake hub adds `seq` and `relayedAt` when it sends it. */
type Claim = Omit<FleetEvent, "seq" | "relayedAt">;

/** Every order of `items`. */
function permutations<T>(items: T[]): T[][] {
  if (items.length <= 1) return [items];
  return items.flatMap((x, i) => permutations([...items.slice(0, i), ...items.slice(i + 1)]).map((rest) => [x, ...rest]));
}

/** A deterministic shuffle (seeded LCG), so a failing order can be reproduced. */
function shuffle<T>(items: T[], seed: number): T[] {
  const out = [...items];
  let s = seed * 2654435761 + 1;
  for (let i = out.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    const j = s % (i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** One agent's connection as the fake hub sees it. */
interface Link {
  name: string;
  ws?: WebSocket;
  seq: number;
  hellos: number;
  /** Everything sent to this agent, for the full sync after a reconnect. */
  history: FleetEvent[];
}

/**
 * The hub's side of the protocol, driven by the test: welcome and an empty full sync on the
 * first hello, the whole history (shuffled, with duplicates, in chunks) on a reconnect, and
 * whatever events the test sends, in the order it sends them. Accepts any bearer token; the
 * token's text up to the first dot is the node name.
 */
class FakeHub {
  readonly links = new Map<string, Link>();
  private constructor(
    private readonly wss: WebSocketServer,
    readonly url: string,
  ) {
    wss.on("connection", (ws, req) => {
      const name = /^Bearer ([A-Za-z0-9_-]+)\./.exec(req.headers.authorization ?? "")?.[1] ?? "unknown";
      const link = this.links.get(name) ?? { name, seq: 0, hellos: 0, history: [] };
      this.links.set(name, link);
      ws.on("error", () => {});
      ws.on("message", (data) => {
        const f = JSON.parse(String(data));
        if (f.type !== "hello") return;
        link.hellos++;
        link.ws = ws;
        ws.send(JSON.stringify({ type: "welcome", v: 1, hub: "testhub", node: name, role: "node", seq: String(link.seq) }));
        if (link.hellos === 1) {
          ws.send(JSON.stringify({ type: "sync", full: true, events: [], seq: String(link.seq) }));
          return;
        }
        // A reconnect: replay the whole history in another order, each event twice, in chunks.
        const replay = shuffle([...link.history, ...link.history], link.hellos + link.seq);
        for (let i = 0; i < replay.length; i += 5) {
          const more = i + 5 < replay.length || undefined;
          ws.send(JSON.stringify({ type: "sync", full: true, events: replay.slice(i, i + 5), seq: String(link.seq), more }));
        }
      });
    });
  }

  static async start(): Promise<FakeHub> {
    const wss = new WebSocketServer({
      host: "127.0.0.1",
      port: 0,
      perMessageDeflate: false,
      verifyClient: (info: { req: { headers: Record<string, string | string[] | undefined> } }) => /^Bearer \S+$/.test(String(info.req.headers.authorization ?? "")),
    });
    await new Promise<void>((resolve, reject) => {
      wss.once("listening", resolve);
      wss.once("error", reject);
    });
    return new FakeHub(wss, `ws://127.0.0.1:${(wss.address() as AddressInfo).port}`);
  }

  /** Sends `claims` to agent `name`, one `event` frame each, or all in one relayed `sync` burst. */
  send(name: string, claims: Claim[], as: "events" | "burst" = "events"): void {
    const link = this.links.get(name);
    assert.ok(link?.ws && link.ws.readyState === WebSocket.OPEN, `${name} is not connected to the test hub`);
    const events = claims.map((c) => ({ ...c, seq: String(++link.seq), relayedAt: Date.now() }));
    link.history.push(...events);
    if (as === "burst") link.ws.send(JSON.stringify({ type: "sync", full: false, events, seq: String(link.seq) }));
    else for (const e of events) link.ws.send(JSON.stringify({ type: "event", ...e }));
  }

  /** Drops agent `name`'s connection, as a hub restart or a network cut would. */
  disconnect(name: string): void {
    this.links.get(name)?.ws?.terminate();
  }

  close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    return new Promise((resolve) => this.wss.close(() => resolve()));
  }
}

const t = (ms: number) => new Date(ms).toISOString();
const timeOf = (r: Row) => Date.parse(r.time);

/** Rows of one address that say when it is blocked until: BLOCK and SCHEDULE_UNBLOCK, in log order. */
function untilRows(csv: string, ip: string): Row[] {
  return readCsv(csv).filter((r) => r.ip === ip && (r.action === "BLOCK" || r.action === "SCHEDULE_UNBLOCK"));
}

describe("two nodes ban an address and one unbans: every delivery order blocks it until the other's claim ends", () => {
  let dir: string;
  let hub: FakeHub;
  const perms = permutations([0, 1, 2]);
  const names = perms.map((_, i) => `agent${i + 1}`);
  const csv = (n: string) => join(dir, `${n}.csv`);
  const agents: Record<string, Proc> = {};
  let sentinels = 0;

  /** Sends a ban on a fresh address and waits until the agent logs it: everything sent before is applied. */
  const settle = async (name: string) => {
    const n = ++sentinels;
    const ip = `198.51.100.${n}`;
    assert.ok(n < 255, "out of sentinel addresses");
    const now = Date.now();
    hub.send(name, [{ kind: "ban", ip, origin: "sentinel", jail: "sshd", until: now + 600_000, detectedAt: now, id: `sentinel-${n}` }]);
    await waitFor(() => rows(csv(name), "BLOCK", ip).length, `${name} to apply the events sent before sentinel ${ip}`);
  };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-order-"));
    hub = await FakeHub.start();
    await Promise.all(
      names.map(async (n) => {
        await writeFile(join(dir, `${n}.token`), `${n}.${"t".repeat(24)}\n`, { mode: 0o600 });
        agents[n] = await startAgentProc(n, ["--hub", hub.url, "--token-file", join(dir, `${n}.token`), "--backend", "dry-run", "--csv", csv(n), "--heartbeat", "5"]);
      }),
    );
  });

  after(async () => {
    await stopAll();
    await hub?.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** Sends `order` one event at a time, each applied before the next; returns the agent's CSV row count just before `b` went out. */
  const deliverOneByOne = async (name: string, order: Claim[], b: Claim): Promise<number> => {
    let mark = 0;
    for (const e of order) {
      if (e === b) mark = readCsv(csv(name)).length;
      hub.send(name, [e]);
      await settle(name);
    }
    return mark;
  };
  /** Rows about `ip` from row `from` of the agent's CSV on. */
  const rowsSince = (name: string, ip: string, from: number) => readCsv(csv(name)).slice(from).filter((r) => r.ip === ip);
  /** In orders where A's unban comes after A's ban but before B's ban, the agent rightly lifts the block until B's ban arrives. */
  const liftedBeforeB = (order: Claim[], [aBan, bBan, aUnban]: Claim[]) => order.indexOf(aBan) < order.indexOf(aUnban) && order.indexOf(aUnban) < order.indexOf(bBan);

  test("A's unban does not lift B's ban in any of the 6 orders, with replays and a reconnect; the block ends when B's ban does", async () => {
    const ip = "203.0.113.10";
    const t0 = Date.now();
    const aUntil = t0 + 60_000;
    // Long enough for every step below to be delivered before it ends (a few hundred ms normally).
    const bUntil = t0 + 8_000;
    const aBan: Claim = { kind: "ban", ip, origin: "nodeA", jail: "sshd", until: aUntil, detectedAt: t0 - 3000, id: "a-ban" };
    const bBan: Claim = { kind: "ban", ip, origin: "nodeB", jail: "sshd", until: bUntil, detectedAt: t0 - 2000, id: "b-ban" };
    // The hub keeps A's tombstone until A's ban would have ended, so an older A ban cannot revive.
    const aUnban: Claim = { kind: "unban", ip, origin: "nodeA", jail: "sshd", until: aUntil, detectedAt: t0 - 1000, id: "a-unban" };
    const events = [aBan, bBan, aUnban];
    const orders = perms.map((p) => p.map((k) => events[k]));
    const marks: Record<string, number> = {};

    await Promise.all(
      names.map(async (n, i) => {
        marks[n] = await deliverOneByOne(n, orders[i], bBan);
        // Replays: the same events again, newest first, in one relayed burst with a duplicate.
        hub.send(n, [...orders[i]].reverse().concat(orders[i][0]), "burst");
        await settle(n);
        // A reconnect: the full sync replays the whole history shuffled, twice over, in chunks.
        const syncs = agents[n].lines().filter((l) => /synced: /.test(l)).length;
        hub.disconnect(n);
        await waitFor(() => agents[n].lines().filter((l) => /synced: /.test(l)).length > syncs, `${n} to reconnect and apply the full sync`);
        await settle(n);
      }),
    );
    assert.ok(Date.now() < bUntil, `delivering the events took longer than B's ban (${bUntil - t0} ms): the orders were not tested while B's claim was active`);

    const blocks: Record<string, number> = {};
    for (const [i, n] of names.entries()) {
      const what = `${n} (order ${orders[i].map((e) => e.id).join(", ")})`;
      blocks[n] = rows(csv(n), "BLOCK", ip).length;
      assert.equal(blocks[n], liftedBeforeB(orders[i], events) ? 2 : 1, `${what}: BLOCK rows of ${ip}`);
      assert.deepEqual(rowsSince(n, ip, marks[n]).filter((r) => r.action === "UNBLOCK"), [], `${what} unblocked ${ip} while B's claim was active`);
      const state = readCsv(csv(n)).filter((r) => r.ip === ip && (r.action === "BLOCK" || r.action === "UNBLOCK"));
      assert.equal(state.at(-1)?.action, "BLOCK", `${what}: ${ip} is not blocked`);
      assert.equal(untilRows(csv(n), ip).at(-1)!.until, t(bUntil), `${what}: blocked until B's claim ends, not A's`);
    }

    // B's claim ends: every agent lifts the block by itself, not before.
    for (const n of names) {
      const row = await waitFor(() => rowsSince(n, ip, marks[n]).find((r) => r.action === "UNBLOCK"), `${n} to unblock ${ip} when B's ban ends`, bUntil - Date.now() + 15_000);
      assert.equal(row.detail, "ban ended", n);
      assert.ok(timeOf(row) >= bUntil, `${n} unblocked ${ip} at ${row.time}, before B's ban ended at ${t(bUntil)}`);
    }

    // Late replays of the ended claims change nothing.
    await Promise.all(
      names.map(async (n, i) => {
        hub.send(n, shuffle(events, i), "burst");
        for (const e of events) hub.send(n, [e]);
        await settle(n);
      }),
    );
    for (const n of names) {
      assert.equal(rows(csv(n), "BLOCK", ip).length, blocks[n], `${n}: a replay of ended claims blocked ${ip} again`);
      assert.equal(rowsSince(n, ip, marks[n]).filter((r) => r.action === "UNBLOCK").length, 1, n);
    }
  });

  test("B's permanent ban survives A's unban in every order and ends with B's own unban", async () => {
    const ip = "203.0.113.20";
    const t0 = Date.now();
    const aUntil = t0 + 60_000;
    const aBan: Claim = { kind: "ban", ip, origin: "nodeA", jail: "sshd", until: aUntil, detectedAt: t0 - 3000, id: "a-ban-2" };
    const bBan: Claim = { kind: "ban", ip, origin: "nodeB", jail: "sshd", until: null, detectedAt: t0 - 2000, id: "b-ban-2" };
    const aUnban: Claim = { kind: "unban", ip, origin: "nodeA", jail: "sshd", until: aUntil, detectedAt: t0 - 1000, id: "a-unban-2" };
    const events = [aBan, bBan, aUnban];
    const orders = perms.map((p) => p.map((k) => events[k]));
    const marks: Record<string, number> = {};

    await Promise.all(
      names.map(async (n, i) => {
        marks[n] = await deliverOneByOne(n, orders[i], bBan);
        hub.send(n, [...orders[i], ...orders[i]].reverse(), "burst");
        await settle(n);
      }),
    );
    const blocks: Record<string, number> = {};
    for (const [i, n] of names.entries()) {
      const what = `${n} (order ${orders[i].map((e) => e.id).join(", ")})`;
      blocks[n] = rows(csv(n), "BLOCK", ip).length;
      assert.equal(blocks[n], liftedBeforeB(orders[i], events) ? 2 : 1, `${what}: BLOCK rows of ${ip}`);
      assert.deepEqual(rowsSince(n, ip, marks[n]).filter((r) => r.action === "UNBLOCK"), [], `${what} unblocked ${ip} although B bans it for good`);
      assert.equal(untilRows(csv(n), ip).at(-1)!.until, "never", `${what}: the log does not say ${ip} is blocked for good`);
    }

    // B unbans: now nothing holds the address.
    const unbanAt = Date.now();
    const bUnban: Claim = { kind: "unban", ip, origin: "nodeB", jail: "sshd", until: unbanAt + 30 * 24 * 3600_000, detectedAt: unbanAt, id: "b-unban-2" };
    await Promise.all(
      names.map(async (n) => {
        hub.send(n, [bUnban]);
        await settle(n);
      }),
    );
    for (const n of names) {
      const [row, ...more] = rowsSince(n, ip, marks[n]).filter((r) => r.action === "UNBLOCK");
      assert.ok(row, `${n} did not unblock ${ip} after B's unban`);
      assert.equal(more.length, 0, n);
      assert.match(row.detail, /unbanned by nodeB/, n);
      assert.ok(timeOf(row) >= unbanAt, `${n} unblocked ${ip} before B's unban was sent`);
    }

    // Replays of the older events, in any order, do not bring the block back.
    await Promise.all(
      names.map(async (n, i) => {
        hub.send(n, shuffle([...events, bUnban, ...events], i + 7), "burst");
        await settle(n);
      }),
    );
    for (const n of names) assert.equal(rows(csv(n), "BLOCK", ip).length, blocks[n], `${n}: a replay of older events blocked ${ip} again`);
  });
});

describe("the same race through a real hub, with ban.ts for A and B", () => {
  let dir: string;
  let tokens: Record<string, string>;
  const agents: Record<string, Proc> = {};
  const csv = (n: string) => join(dir, `${n}.csv`);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-order-hub-"));
  });

  after(async () => {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
  });

  test("A and B ban, A unbans: the address stays blocked on every agent, B's own included, until B unbans", async () => {
    tokens = await enrol(dir, [["nodeA", "node"], ["nodeB", "node"], ["nodeC", "node"], ["nodeD", "node"]]);
    const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--csv", join(dir, "hub.csv"), "--listen", "127.0.0.1:0", "--heartbeat", "5"]);
    await Promise.all(
      ["nodeB", "nodeC", "nodeD"].map(async (n) => {
        agents[n] = await startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--backend", "dry-run", "--csv", csv(n), "--heartbeat", "5"]);
      }),
    );
    const ban = (node: string, ...args: string[]) => runBan([...args, "--jail", "sshd", "--hub", hub.url, "--token-file", tokens[node], "--spool", join(dir, `${node}-spool`), "--timeout", "10"]);
    const ip = "203.0.113.30";

    // Both bans at once: the hub receives them in whichever order they arrive.
    const [a, b] = await Promise.all([ban("nodeA", "ban", ip, "--bantime", "600"), ban("nodeB", "ban", ip, "--bantime", "300")]);
    assert.equal(a.code, 0, a.output);
    assert.equal(b.code, 0, b.output);
    const received = (origin: string, kind: string) => rows(join(dir, "hub.csv"), "RECEIVE", ip).find((r) => r.origin === origin && r.detail.startsWith(kind));
    const bUntil = await waitFor(() => received("nodeB", "ban")?.until, "the hub's RECEIVE row of B's ban");
    const aUntil = await waitFor(() => received("nodeA", "ban")?.until, "the hub's RECEIVE row of A's ban");
    assert.ok(aUntil > bUntil);

    for (const n of ["nodeB", "nodeC", "nodeD"]) await waitFor(() => untilRows(csv(n), ip).at(-1)?.until === aUntil, `${n} to block ${ip} until A's ban ends (${aUntil})`);

    const u = await ban("nodeA", "unban", ip);
    assert.equal(u.code, 0, u.output);
    // B's agent holds B's own claim too: like every other node's, its block moves to B's end.
    for (const n of ["nodeB", "nodeC", "nodeD"]) {
      // A's unban moves the end of the block from A's ban to B's, and lifts nothing.
      await waitFor(() => untilRows(csv(n), ip).at(-1)?.until === bUntil, `${n} to keep ${ip} blocked until B's ban ends (${bUntil})`);
      assert.equal(rows(csv(n), "BLOCK", ip).length, 1, n);
      assert.equal(rows(csv(n), "UNBLOCK", ip).length, 0, `${n} unblocked ${ip} although B still bans it`);
    }

    const unbanAt = Date.now();
    const v = await ban("nodeB", "unban", ip);
    assert.equal(v.code, 0, v.output);
    for (const n of ["nodeB", "nodeC", "nodeD"]) {
      const row = await waitFor(() => rows(csv(n), "UNBLOCK", ip)[0], `${n} to unblock ${ip} after B's unban`);
      assert.match(row.detail, /unbanned by nodeB/);
      assert.ok(timeOf(row) >= unbanAt, `${n} unblocked ${ip} before B unbanned it`);
    }
  });
});
