/**
 * Security under load, on loopback hubs: what a stranger with sockets, or a reader with a
 * token, can do to an honest node's service. The hub holds 200,000 claims while 32 clients
 * hammer its reader and unauthenticated endpoints; silent, trickling and never-reading sockets
 * pile up; a stranger floods refusals. Each case measures or checks that the honest ban is
 * still served, never a speed: the bounds are generous correctness timeouts.
 */
import assert from "node:assert/strict";
import { open } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { freePort, startFleet, waitFor, type Fleet } from "./lib/fleet.ts";
import { tsx, type Proc } from "./lib/proc.ts";

/** ban.ts spools after this long: an ack slower than this is a ban the fleet did not get in time. */
const SPOOL_TIMEOUT_MS = 5000;
/** The bound on an honest ack under load: a fifth of that, and a hundred times an idle ack (2-10 ms). */
const LOADED_ACK_BOUND_MS = SPOOL_TIMEOUT_MS / 5;

/** Writes a journal holding `count` live ban claims of node `origin` (an hour left each). */
async function seedJournal(dir: string, count: number, origin = "seed"): Promise<void> {
  const fh = await open(join(dir, "journal.jsonl"), "w", 0o600);
  const now = Date.now();
  let chunk = JSON.stringify({ journal: "banshare-journal", v: 1, hub: "loadhub", seq: count }) + "\n";
  for (let i = 0; i < count; i++) {
    const ip = `11.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`;
    chunk += JSON.stringify({ seq: String(i + 1), kind: "ban", ip, origin, jail: "sshd", until: now + 3_600_000, detectedAt: now - 1000, id: `seed-${i}`, relayedAt: now - 1000 }) + "\n";
    if (chunk.length > 1 << 20) {
      await fh.write(chunk);
      chunk = "";
    }
  }
  await fh.write(chunk);
  await fh.close();
}

/** Sends one ban as ban.ts does (POST /v1/events) and resolves with the ms until its ack, or throws. */
async function timedBan(http: string, token: string, id: string, ip: string): Promise<number> {
  const t0 = performance.now();
  const res = await fetch(`${http}/v1/events`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ type: "ban", id, ip, jail: "sshd", bantime: 600, detectedAt: Date.now() }),
    signal: AbortSignal.timeout(60_000),
  });
  const body = (await res.json()) as { type: string };
  assert.equal(res.status, 200, JSON.stringify(body));
  assert.equal(body.type, "ack");
  return performance.now() - t0;
}

/** Starts the hammer worker: `conns` clients cycling through `paths` until stopped. */
async function hammer(http: string, token: string, conns: number, paths: string[]): Promise<Proc> {
  const p = tsx("test/bench/hammer-worker.ts", [String(conns), http, token, "127.0.0.2", ...paths], { name: "hammer" });
  await p.waitForLine(/hammering/, 20_000);
  return p;
}

describe("security: 32 clients hammering every reader and unauthenticated endpoint of a hub holding 200,000 claims do not stall an honest ban", () => {
  let fleet: Fleet;

  before(async () => {
    fleet = await startFleet({ nodes: [["web1", "node"], ["seed", "node"], ["viewer", "reader"]], journal: true, csv: false, prepare: (dir) => seedJournal(dir, 200_000) });
  });

  after(() => fleet?.stop());

  test("an honest ban is acked, within ban.ts's spool timeout, while /metrics, /v1/whoami and /healthz are hammered", async () => {
    const idle = [];
    for (let i = 0; i < 5; i++) idle.push(await timedBan(fleet.http, fleet.token("web1"), `idle-${i}`, `203.0.113.${i + 1}`));
    const h = await hammer(fleet.http, fleet.token("viewer"), 32, ["/metrics@auth", "/v1/whoami@auth", "/healthz", "/healthz@auth", "/metrics", "/v1/whoami@auth", "/"]);
    try {
      await new Promise((r) => setTimeout(r, 1000));
      const loaded = [];
      for (let i = 0; i < 10; i++) loaded.push(await timedBan(fleet.http, fleet.token("web1"), `load-${i}`, `203.0.113.${i + 100}`));
      const worst = Math.max(...loaded);
      console.log(`ack ms idle ${idle.map((x) => x.toFixed(1)).join(" ")}; hammered ${loaded.map((x) => x.toFixed(1)).join(" ")}`);
      assert.ok(worst < LOADED_ACK_BOUND_MS, `an honest ban took ${worst.toFixed(0)} ms to be acked while the hub was hammered (ban.ts spools after ${SPOOL_TIMEOUT_MS} ms)`);
    } finally {
      await h.stop("SIGTERM", 5000);
      console.log(h.output().trim().split("\n").pop());
    }
  });
});
