/**
 * A thundering herd (a power cut, the whole fleet booting at once): 200 agents' connections ask
 * one hub for a full sync of 50,000 bans in the same moment, and an honest ban is sent while
 * they do. A real hub process with its journal seeded by the test, 200 real WebSocket
 * connections in a worker process (test/fixtures/herd-clients.ts), with a sender's. What is
 * asserted is an order seen by the hub's own clock: the honest ban was relayed (and acked)
 * while most of the herd's syncs were still being sent, not after all of them.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { seedJournal } from "./bench/fleet.ts";
import { enrol, rows, startHubProc } from "./lib/fleet.ts";
import { stopAll, tsx } from "./lib/proc.ts";

const HERD = 200;
const BANS = 50_000;
const SLOW = 180_000;
/** Herd connections that parse every frame and check what their sync held. */
const VERIFY = 3;
const HONEST_IP = "10.250.0.1";

test(`a herd of ${HERD} full syncs of ${BANS.toLocaleString("en")} bans does not starve live traffic: an honest ban is acked and relayed while most syncs are still being sent, and every sync completes with every ban`, { timeout: 2 * SLOW }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "banshare-herd-"));
  t.after(async () => {
    await stopAll(5000);
    await rm(dir, { recursive: true, force: true });
  });
  const tokens = await enrol(dir, [["herd", "node"], ["s1", "node"]]);
  // 10.0.0.1 upwards: data only, no packet goes anywhere.
  await seedJournal(dir, BANS, 10);
  const csv = join(dir, "hub.csv");
  const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0", "--state", join(dir, "journal.jsonl"), "--csv", csv, "--heartbeat", "600", "--max-conns-per-node", String(HERD + 10), "--max-pending-per-address", String(HERD + 10)]);
  // The worker bans HONEST_IP from a sender's connection the moment the herd's first sync frame
  // is in: the herd is under way, and most of it is still to be sent.
  const herd = tsx("test/fixtures/herd-clients.ts", [hub.url, tokens.herd, String(HERD), String(VERIFY), HONEST_IP, tokens.s1], { name: "herd" });
  const ackedAt = Number((await herd.waitForLine(/^ACK /, SLOW)).split(" ")[1]);
  const done = await herd.waitForLine(/^ALLDONE /, SLOW);
  const firstAt = Number(/^FIRST (\d+)/.exec(herd.lines().find((l) => l.startsWith("FIRST "))!)![1]);
  t.diagnostic(`honest ban acked ${ackedAt - firstAt} ms after the herd's first sync frame; every sync complete ${Number(done.split(" ")[1]) - firstAt} ms after it (${(Number(done.split(" ")[2]) / 1e9).toFixed(2)} GB)`);

  // What the operator sees: one line as the herd begins, one as its last sync is sent (after
  // every connection's own line: the worker may have read the last frame before the hub logged it).
  await hub.proc.waitForLine(/more than \d+ agents want a sync at once: sending \d+ at a time, live traffic first/, SLOW);
  await hub.proc.waitForLine(new RegExp(`every sync sent: ${HERD} in [\\d.]+ s`), SLOW);

  // The hub's own clock: when it relayed the honest ban (just before its ack), and when it had
  // sent each herd connection its sync in full (one log line each).
  const relayed = rows(csv, "RELAY", HONEST_IP);
  assert.equal(relayed.length, 1, "the honest ban was relayed once");
  const relayedAt = Date.parse(relayed[0].time);
  const sentAt = hub.proc
    .lines()
    .filter((l) => /hub: herd \(\S+\) full sync: \d+ event\(s\)/.test(l))
    .map((l) => Date.parse(l.slice(0, l.indexOf(" "))));
  assert.equal(sentAt.length, HERD, "one full sync per herd connection");
  const sentBefore = sentAt.filter((at) => at <= relayedAt).length;
  t.diagnostic(`${sentBefore} of ${HERD} syncs were sent in full when the hub relayed the honest ban`);
  assert.ok(sentBefore < HERD / 2, `the honest ban waited for the herd: ${sentBefore} of ${HERD} syncs were sent in full before the hub relayed it`);

  // Every sync held every seeded ban, and the honest ban reached the herd too (in the sync's
  // last frames or relayed after it).
  for (let i = 0; i < VERIFY; i++) {
    const v = Number(/^VERIFIED \d+ (\d+)/.exec(await herd.waitForLine(new RegExp(`^VERIFIED ${i} `), SLOW))![1]);
    assert.ok(v === BANS || v === BANS + 1, `herd connection ${i}'s sync held ${v} addresses, want ${BANS} (or ${BANS + 1} with the honest ban)`);
    await herd.waitForLine(new RegExp(`^HAS ${i} `), SLOW);
  }
  assert.equal(herd.exitInfo(), undefined);
  assert.equal(hub.proc.exitInfo(), undefined);
});
