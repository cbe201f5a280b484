/**
 * Integration over real sockets: a hub and three dry-run agents as real processes, ban.ts as a
 * real process, raw WebSocket clients for the hostile cases.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { connectNode, upgradeStatus } from "./lib/client.ts";
import { rows, runBan, startAgentProc, startFleet, startHubProc, waitFor, type Fleet, type HubProc } from "./lib/fleet.ts";
import type { Proc } from "./lib/proc.ts";

describe("fleet: over real sockets a ban reaches every other agent, bad input and tokens are refused, and bans survive a hub restart and wait in the spool while the hub is down", () => {
  let fleet: Fleet;
  let dir: string;
  let tokens: Record<string, string>;
  let hub: HubProc;
  const agents: Record<string, Proc> = {};
  const csv = (n: string) => fleet.csv(n);
  const hubArgs = () => fleet.hubArgs;
  const ban = (node: string, ...args: string[]) => runBan([...args, "--hub", hub.url, "--token-file", tokens[node], "--spool", join(dir, `${node}-spool`), "--timeout", "5"]);
  const startAgent = (n: string) => startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--backend", "dry-run", "--csv", csv(n), "--heartbeat", "2"]);

  before(async () => {
    fleet = await startFleet({ nodes: [["web1", "node"], ["web2", "node"], ["web3", "node"], ["watcher", "reader"], ["root", "admin"]], journal: true, heartbeat: 2 });
    ({ dir, hub, tokenFiles: tokens } = fleet);
    for (const n of ["web1", "web2", "web3"]) agents[n] = await startAgent(n);
  });

  after(() => fleet.stop());

  test("a ban reaches every agent, its origin's included (the paper's Client 1 BLOCK rows); the unban follows it", async () => {
    const ip = "203.0.113.7";
    const r = await ban("web1", "ban", ip, "--jail", "sshd", "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    for (const n of ["web1", "web2", "web3"]) {
      const row = await waitFor(() => rows(csv(n), "BLOCK", ip)[0], `BLOCK of ${ip} on ${n}`);
      assert.equal(row.origin, "web1");
      assert.equal(row.jail, "sshd");
      assert.match(row.rt_ms, /^\d+$/, "rt_ms is filled on every BLOCK");
      assert.equal(rows(csv(n), "SCHEDULE_UNBLOCK", ip).length, 1);
    }
    const u = await ban("web1", "unban", ip, "--jail", "sshd");
    assert.equal(u.code, 0, u.output);
    for (const n of ["web1", "web2", "web3"]) await waitFor(() => rows(csv(n), "UNBLOCK", ip).length, `UNBLOCK of ${ip} on ${n}`);
    const hubRows = rows(join(dir, "hub.csv"), "RELAY", ip);
    assert.equal(hubRows.length, 2);
    assert.match(hubRows[0].detail, /to 3 agent\(s\)$/);
  });

  test("two nodes ban one address; one unbans; the address stays blocked everywhere by the other's claim", async () => {
    const ip = "198.51.100.23";
    const marker = "198.51.100.24";
    assert.equal((await ban("web1", "ban", ip, "--bantime", "600")).code, 0);
    assert.equal((await ban("web2", "ban", ip, "--bantime", "1200")).code, 0);
    assert.equal((await ban("web1", "unban", ip)).code, 0);
    for (const n of ["web1", "web2", "web3"]) await waitFor(() => rows(csv(n), "SCHEDULE_UNBLOCK", ip).length >= 2, `${n} extends the ban to web2's claim`);
    // Relayed in order: once the next ban is applied everywhere, so is web1's unban.
    assert.equal((await ban("web1", "ban", marker, "--bantime", "600")).code, 0);
    for (const n of ["web1", "web2", "web3"]) await waitFor(() => rows(csv(n), "BLOCK", marker).length, `${n} applies the ban after the unban`);
    // web2's own claim holds the address on every node, web2's own agent included.
    for (const n of ["web1", "web2", "web3"]) assert.equal(rows(csv(n), "UNBLOCK", ip).length, 0, `${n} unblocked although web2 still bans it`);
  });

  test("invalid input to ban.ts exits 2 with one line and sends nothing", async () => {
    for (const bad of ["1.2.3.4; rm -rf /", "300.1.1.1", "127.0.0.1"]) {
      const r = await ban("web1", "ban", bad);
      assert.equal(r.code, 2, r.output);
      assert.equal(r.output.trim().split("\n").length, 1, r.output);
      assert.match(r.output, /^ban\.ts: /);
    }
    assert.equal(rows(join(dir, "hub.csv"), "RECEIVE", "300.1.1.1").length, 0);
  });

  test("a wrong token gets 401 before the upgrade, and ban.ts exits 1 without spooling", async () => {
    assert.equal(await upgradeStatus(hub.url, "not-a-real-token-at-all"), 401);
    assert.equal(await upgradeStatus(hub.url, undefined), 401);
    const r = await runBan(["ban", "203.0.113.50", "--hub", hub.url, "--token-file", join(dir, "watcher.token.missing"), "--spool", join(dir, "bad-spool")]);
    assert.equal(r.code, 1, r.output);
    const { writeFile } = await import("node:fs/promises");
    await writeFile(join(dir, "wrong.token"), "x".repeat(43));
    const w = await runBan(["ban", "203.0.113.50", "--hub", hub.url, "--token-file", join(dir, "wrong.token"), "--spool", join(dir, "wrong-spool")]);
    assert.equal(w.code, 1, w.output);
    assert.match(w.output, /401/);
    const { existsSync } = await import("node:fs");
    assert.equal(existsSync(join(dir, "wrong-spool")), false, "a refused ban was spooled");
  });

  test("hostile frames get error frames, change nothing, and the hub keeps serving everyone", async () => {
    const { ws, frames, next } = await connectNode(hub.url, { file: tokens.web3 });
    ws.send(JSON.stringify({ type: "ban", id: "early", ip: "203.0.113.60", jail: "sshd", bantime: 60, detectedAt: Date.now() }));
    assert.equal((await next((f) => f.type === "error" && f.id === "early")).code, "not_hello");
    ws.send(JSON.stringify({ type: "hello", v: 1, node: "web3" }));
    await next((f) => f.type === "welcome");
    const hostile: Array<[string | Buffer, string]> = [
      ["{not json", "bad_frame"],
      [JSON.stringify({ type: "launch", id: "t1" }), "bad_frame"],
      [JSON.stringify({ type: "ban", id: "t2", ip: "203.0.113.61", jail: "sshd", detectedAt: Date.now() }), "bad_frame"],
      [JSON.stringify({ type: "ban", id: "t3", ip: "0.0.0.0/0", jail: "sshd", bantime: 60, detectedAt: Date.now() }), "bad_ip"],
      [JSON.stringify({ type: "ban", id: "t4", ip: "198.51.100.0/24", jail: "sshd", bantime: 60, detectedAt: Date.now() }), "bad_ip"],
      [JSON.stringify({ type: "ban", id: "t5", ip: "-F", jail: "sshd", bantime: 60, detectedAt: Date.now() }), "bad_ip"],
      [JSON.stringify({ type: "ban", id: "t6", ip: "203.0.113.62", jail: "sshd", bantime: "60", detectedAt: Date.now() }), "bad_frame"],
      [JSON.stringify({ type: "unban", id: "t7", ip: "203.0.113.62", jail: "sshd", detectedAt: Date.now(), all: true }), "forbidden"],
      [JSON.stringify({ type: "hello", v: 1 }), "bad_frame"],
      [JSON.stringify({ type: "ban", id: "t8", ip: "203.0.113.63", jail: "x".repeat(20_000), bantime: 60, detectedAt: Date.now() }), "too_big"],
      [Buffer.from([1, 2, 3]), "bad_frame"],
    ];
    const health = async () => (await fetch(hub.url.replace("ws", "http") + "/healthz", { headers: { authorization: `Bearer ${fleet.token("watcher")}` } })).json();
    const before = await health();
    for (const [frame, _code] of hostile) ws.send(frame, { binary: Buffer.isBuffer(frame) });
    await waitFor(() => frames.filter((f) => f.type === "error").length >= hostile.length + 1, "an error frame for each hostile frame");
    const codes = frames.filter((f) => f.type === "error").slice(1).map((f) => f.code);
    assert.deepEqual(codes, hostile.map(([, c]) => c));
    for (const f of frames.filter((x) => x.type === "error")) assert.doesNotMatch(f.message, /\n/);
    const afterStorm = await health();
    assert.equal(afterStorm.seq, before.seq, "refused frames changed the hub's state");

    // A reader cannot publish.
    const reader = await connectNode(hub.url, { file: tokens.watcher });
    reader.ws.send(JSON.stringify({ type: "hello", v: 1 }));
    await reader.next((f) => f.type === "welcome");
    reader.ws.send(JSON.stringify({ type: "ban", id: "r1", ip: "203.0.113.64", jail: "sshd", bantime: 60, detectedAt: Date.now() }));
    assert.equal((await reader.next((f) => f.type === "error" && f.id === "r1")).code, "forbidden");
    // A node cannot speak for another.
    const imp = await connectNode(hub.url, { file: tokens.web3 });
    imp.ws.send(JSON.stringify({ type: "hello", v: 1, node: "web1" }));
    assert.equal((await imp.next((f) => f.type === "error")).code, "forbidden");

    // Meanwhile everyone else is still served.
    assert.equal((await ban("web2", "ban", "203.0.113.65")).code, 0);
    await waitFor(() => rows(csv("web1"), "BLOCK", "203.0.113.65").length && rows(csv("web3"), "BLOCK", "203.0.113.65").length, "the next ban to reach web1 and web3");
    ws.close();
    reader.ws.close();
    imp.ws.close();
  });

  test("the hub restarts from its journal with the same id and state, and a new agent gets it in a full sync", async () => {
    const ip = "192.0.2.200";
    assert.equal((await ban("web1", "ban", ip, "--bantime", "-1")).code, 0);
    const healthz = async () => (await fetch(hub.url.replace("ws", "http") + "/healthz", { headers: { authorization: `Bearer ${fleet.token("watcher")}` } })).json();
    const before = await healthz();
    await hub.proc.stop("SIGTERM", 5000);
    hub = await startHubProc(hubArgs());
    const after = await healthz();
    assert.equal(after.hub, before.hub);
    assert.equal(after.seq, before.seq);
    assert.equal(after.claims, before.claims);
    // Existing agents reconnect by themselves; a restarted web3 with a fresh log gets the ban by sync.
    await agents.web3.stop("SIGTERM", 5000);
    const { rm: remove } = await import("node:fs/promises");
    await remove(csv("web3"));
    agents.web3 = await startAgent("web3");
    const row = await waitFor(() => rows(csv("web3"), "BLOCK", ip)[0], "web3 to block the journalled ban");
    assert.equal(row.until, "never");
    assert.match(row.detail, /^sync/);
    await waitFor(() => agents.web2.output().match(/connected to .* as web2[\s\S]*connected to .* as web2/), "web2 to reconnect by itself");
  });

  test("ban.ts spools when the hub is down and the agent delivers it once the hub is back", async () => {
    const ip = "203.0.113.99";
    await hub.proc.stop("SIGTERM", 5000);
    const spoolDir = join(dir, "web1-spool");
    const r = await runBan(["ban", ip, "--hub", hub.url, "--token-file", tokens.web1, "--spool", spoolDir, "--timeout", "1"]);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /spooled/);
    await agents.web1.stop("SIGTERM", 5000);
    agents.web1 = (await import("./lib/proc.ts")).tsx("agent.ts", ["--hub", hub.url, "--token-file", tokens.web1, "--backend", "dry-run", "--csv", csv("web1"), "--spool", spoolDir, "--heartbeat", "2"], { name: "web1" });
    hub = await startHubProc(hubArgs());
    await waitFor(() => rows(csv("web2"), "BLOCK", ip).length && rows(csv("web3"), "BLOCK", ip).length, "the spooled ban on web2 and web3");
    const { readdir } = await import("node:fs/promises");
    await waitFor(async () => (await readdir(spoolDir)).filter((f) => f.endsWith(".json")).length === 0, "the spool to empty after the ack");
  });
});
