/**
 * Security, part 2 of 3 (with security-fuzz and security-tls), on a loopback hub: the per-node
 * rate limit, the reader role, token revocation on SIGHUP (a raw client that ignores the close
 * frame gets no further frame in), the per-node connection limit (HTTP requests in flight
 * included) and oversized frames. security-load.test.ts has the socket-level attacks.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { request } from "node:http";
import { connectNode, upgradeStatus } from "./lib/client.ts";
import { rawWs } from "./lib/rawws.ts";
import { delta, readCsv, refusedByReason, rows, startFleet, waitFor, type Fleet, type HubProc } from "./lib/fleet.ts";
import type { Proc } from "./lib/proc.ts";

const MAX_FRAME = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// Loopback: limits, roles, revocation

/** An authenticated raw client that has said hello. */
const connect = (url: string, token: string) => connectNode(url, token, { hello: true });

const banFrame = (id: string, ip: string, extra: Record<string, unknown> = {}) => JSON.stringify({ type: "ban", id, ip, jail: "sshd", bantime: 600, detectedAt: Date.now(), ...extra });

describe("security: a node is held to its rate, role, connection and frame-size limits, and a revoked token is cut off, while other nodes are served", () => {
  let fleet: Fleet;
  let dir: string;
  let hub: HubProc;
  let agents: Record<string, Proc>;
  const csv = (n: string) => fleet.csv(n);
  const token = (n: string) => fleet.token(n);
  const metrics = async () => refusedByReason(await (await fetch(`http://127.0.0.1:${hub.port}/metrics`, { headers: { authorization: `Bearer ${token("peek")}` } })).text());
  const ban = (node: string, ...args: string[]) => fleet.ban(node, ...args);
  const blocked = (n: string, ip: string) => waitFor(() => rows(csv(n), "BLOCK", ip).length, `${n} to block ${ip}`);

  before(async () => {
    fleet = await startFleet({
      nodes: [["flood", "node"], ["calm", "node"], ["watch", "node"], ["peek", "reader"], ["gone", "node"], ["many", "node"], ["big", "node"], ["rogue", "node"], ["posty", "node"]],
      agents: ["watch", "gone"],
      heartbeat: 5,
      hubArgs: ["--rate", "5", "--burst", "10", "--max-conns-per-node", "3"],
    });
    ({ dir, hub, agents } = fleet);
  });

  after(() => fleet?.stop());

  test("a node over its rate limit is refused with rate_limited; other nodes' bans are still acked", async () => {
    const before = await metrics();
    const flood = await connect(hub.url, token("flood"));
    const calm = await connect(hub.url, token("calm"));
    const N = 40;
    for (let i = 0; i < N; i++) flood.ws.send(banFrame(`f${i}`, `203.0.113.${i + 1}`));
    calm.ws.send(banFrame("c1", "198.51.100.1"));
    const answered = () => flood.frames.filter((f) => (f.type === "ack" || f.type === "error") && /^f\d+$/.test(f.id));
    await waitFor(() => answered().length === N, "an answer to each of the flood's bans");
    const acked = new Set(flood.frames.filter((f) => f.type === "ack").map((f) => f.id));
    const refused = flood.frames.filter((f) => f.type === "error");
    for (let i = 0; i < 10; i++) assert.ok(acked.has(`f${i}`), `the burst of 10 was not honoured: f${i} refused`);
    assert.ok(refused.length > 0, "nothing was rate limited");
    for (const e of refused) {
      assert.equal(e.code, "rate_limited");
      assert.match(e.message, /^Node flood is over its limit of 5 events\/s \(burst 10\)/);
    }
    // The other node is not affected.
    assert.equal((await calm.next((f) => f.id === "c1", "calm's answer")).type, "ack");
    const r = await ban("calm", "ban", "198.51.100.2");
    assert.equal(r.code, 0, r.output);
    await blocked("watch", "198.51.100.1");
    await blocked("watch", "198.51.100.2");
    const grew = delta(await metrics(), before);
    assert.equal(grew.rate_limited, refused.length);
    await waitFor(() => readCsv(csv("hub")).filter((row) => row.action === "REJECT" && row.origin === "flood" && /^rate_limited: /.test(row.detail)).length === refused.length, "a REJECT row for each rate-limited ban");
    // The refusal is temporary: the bucket refills.
    let k = 0;
    await waitFor(async () => {
      flood.ws.send(banFrame(`retry${++k}`, "203.0.113.200"));
      return (await flood.next((f) => f.id === `retry${k}`, "an answer to the retry")).type === "ack";
    }, "a retry of the flood to be acked");
    flood.ws.close();
    calm.ws.close();
  });

  test("a reader token cannot publish: forbidden over the wire, and ban.ts exits 1 without spooling", async () => {
    const reader = await connect(hub.url, token("peek"));
    reader.ws.send(banFrame("r1", "203.0.113.201"));
    const e = await reader.next((f) => f.id === "r1", "the answer to the reader's ban");
    assert.equal(e.type, "error");
    assert.equal(e.code, "forbidden");
    assert.match(e.message, /reader role and cannot publish/);
    reader.ws.close();
    const r = await ban("peek", "ban", "203.0.113.202");
    assert.equal(r.code, 1, r.output);
    assert.match(r.output, /forbidden: Node peek has the reader role/);
    assert.equal(existsSync(join(dir, "peek-spool")), false);
    assert.equal(rows(csv("hub"), "RECEIVE", "203.0.113.202").length, 0);
  });

  test("SIGHUP after removing a token's line closes that node's connections and refuses it from then on", async () => {
    const gone = await connect(hub.url, token("gone"));
    const calm = await connect(hub.url, token("calm"));
    const tokensFile = join(dir, "tokens");
    const text = readFileSync(tokensFile, "utf8");
    await writeFile(tokensFile, text.split("\n").filter((l) => !l.startsWith("gone ")).join("\n"));
    hub.proc.signal("SIGHUP");
    assert.deepEqual(await gone.closed, { code: 1008, reason: "token revoked" });
    await agents.gone.waitForLine(/refused the connection: HTTP 401/, 15_000);
    assert.equal(await upgradeStatus(hub.url, token("gone")), 401);
    const r = await ban("gone", "ban", "203.0.113.203");
    assert.equal(r.code, 1, r.output);
    assert.match(r.output, /refused the token \(HTTP 401\)/);
    assert.equal(existsSync(join(dir, "gone-spool")), false, "a ban with a revoked token was spooled");
    // Everyone else keeps their connection and is still served.
    calm.ws.send(banFrame("after-hup", "198.51.100.3"));
    assert.equal((await calm.next((f) => f.id === "after-hup", "calm's answer")).type, "ack");
    await blocked("watch", "198.51.100.3");
    assert.doesNotMatch(agents.watch.output(), /disconnected/);
    calm.ws.close();
  });

  test("a node may hold --max-conns-per-node connections; the next one gets HTTP 429", async () => {
    const before = await metrics();
    const open = [await connect(hub.url, token("many")), await connect(hub.url, token("many")), await connect(hub.url, token("many"))];
    assert.equal(await upgradeStatus(hub.url, token("many")), 429);
    // ban.ts treats 429 like an unreachable hub: it spools (README: exit 0 with a warning).
    const r = await ban("many", "ban", "203.0.113.204");
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /warning: could not send \(.*HTTP 429[^)]*\); spooled/);
    assert.equal((await readdir(join(dir, "many-spool"))).filter((f) => f.endsWith(".json")).length, 1);
    assert.equal(delta(await metrics(), before).too_many_connections, 2);
    // Other nodes are not affected; a slot freed is usable again.
    assert.equal((await ban("calm", "ban", "198.51.100.4")).code, 0);
    open[0].ws.close();
    await waitFor(async () => (await upgradeStatus(hub.url, token("many"))) === 101, "a connection once one closed");
    for (const c of open) c.ws.close();
  });

  test("a revoked token's connection takes no further frame, even from a client that ignores the close frame, and is cut within seconds", async () => {
    const rogue = await rawWs(hub.port, token("rogue"));
    rogue.sendText(JSON.stringify({ type: "hello", v: 1 }));
    await waitFor(() => rogue.frames.some((f) => f.op === 1 && /"type":"welcome"/.test(f.data.toString())), "rogue's welcome");
    rogue.sendText(banFrame("before", "203.0.113.150"));
    await waitFor(() => rogue.frames.some((f) => f.op === 1 && /"id":"before"/.test(f.data.toString())), "the ack before the revocation");
    const tokensFile = join(dir, "tokens");
    await writeFile(tokensFile, readFileSync(tokensFile, "utf8").split("\n").filter((l) => !l.startsWith("rogue ")).join("\n"));
    hub.proc.signal("SIGHUP");
    await waitFor(() => rogue.frames.some((f) => f.op === 8), "the hub's close frame");
    // The client answers nothing and keeps publishing, as a compromised node would.
    let n = 0;
    let ended = false;
    void rogue.ended.then(() => (ended = true));
    const cutAt = Date.now();
    while (!ended && Date.now() - cutAt < 35_000) {
      rogue.sendText(banFrame(`after-${n}`, `203.0.113.${160 + (n % 40)}`));
      n++;
      await new Promise((r) => setTimeout(r, 50));
    }
    const cutMs = Date.now() - cutAt;
    assert.ok(ended, "the hub never closed the revoked connection");
    assert.ok(cutMs < 10_000, `the revoked connection stayed open ${cutMs} ms after the close frame (ws's close timeout is 30 s)`);
    assert.ok(n > 0);
    assert.equal(rogue.frames.filter((f) => f.op === 1 && /"id":"after-/.test(f.data.toString())).length, 0, "a frame sent after the revocation was answered");
    await waitFor(() => hub.proc.lines().some((l) => /rogue .*frame\(s\) after its token was revoked dropped unread/.test(l)), "the hub to say it dropped the frames");
    assert.equal(readCsv(csv("hub")).filter((r) => r.action === "RECEIVE" && r.origin === "rogue" && /^203\.0\.113\.(1[6-9]\d)$/.test(r.ip)).length, 0, "a ban sent after the revocation was accepted");
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(rows(csv("watch"), "BLOCK", "203.0.113.160").length, 0, "a ban sent after the revocation was relayed");
  });

  test("HTTP requests in flight count towards --max-conns-per-node: the next POST gets 429, and once they end it is acked", async () => {
    // Three POSTs whose bodies never finish arriving hold the node's three slots.
    const held = await Promise.all(
      [0, 1, 2].map(
        (i) =>
          new Promise<ReturnType<typeof request>>((resolve) => {
            const req = request({ host: "127.0.0.1", port: hub.port, method: "POST", path: "/v1/events", headers: { authorization: `Bearer ${token("posty")}`, "content-length": "300" } });
            req.on("error", () => {});
            req.write(`{"type":"ban","id":"held${i}",`);
            req.flushHeaders();
            setTimeout(() => resolve(req), 300);
          }),
      ),
    );
    const post = async (id: string, ip: string) => {
      const r = await fetch(`http://127.0.0.1:${hub.port}/v1/events`, { method: "POST", headers: { authorization: `Bearer ${token("posty")}` }, body: banFrame(id, ip) });
      await r.arrayBuffer();
      return r.status;
    };
    assert.equal(await post("fourth", "198.51.100.40"), 429);
    for (const r of held) r.destroy();
    await waitFor(async () => (await post("later", "198.51.100.41")) === 200, "a POST to be acked once the held ones ended");
  });

  test("frames over 16 KiB are refused with too_big; the connection keeps serving; over 1 MiB it is closed", async () => {
    const before = await metrics();
    const c = await connect(hub.url, token("big"));
    const exact = (id: string, ip: string, size: number) => {
      const base = banFrame(id, ip, { pad: "" });
      return base.replace('"pad":""', `"pad":"${"p".repeat(size - base.length)}"`);
    };
    const at = exact("at-limit", "203.0.113.205", MAX_FRAME);
    const over = exact("over-limit", "203.0.113.206", MAX_FRAME + 1);
    assert.equal(Buffer.byteLength(at), MAX_FRAME);
    c.ws.send(over);
    const e = await c.next((f) => f.type === "error", "the too_big error");
    assert.equal(e.code, "too_big");
    assert.match(e.message, new RegExp(`at most ${MAX_FRAME} bytes, got ${MAX_FRAME + 1}$`));
    c.ws.send(at);
    assert.equal((await c.next((f) => f.id === "at-limit", "the answer at the limit")).type, "ack");
    await blocked("watch", "203.0.113.205");
    assert.equal(rows(csv("hub"), "RECEIVE", "203.0.113.206").length, 0);
    c.ws.send("x".repeat(2 << 20));
    assert.equal((await c.closed).code, 1009);
    const grew = delta(await metrics(), before);
    assert.equal(grew.too_big, 2, `the frame the WebSocket layer refused is not counted: ${JSON.stringify(grew)}`);
    assert.equal((await fetch(`http://127.0.0.1:${hub.port}/healthz`)).status, 200);
    assert.equal(hub.proc.exitInfo(), undefined);
  });
});
