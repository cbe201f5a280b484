/**
 * The hub's fleet rules over real sockets: `--quorum` (a ban reaches the fleet only once enough
 * nodes claim the address, trusted nodes excepted), `--escalate` (repeat offenders get longer
 * bans on every node, the origin's included), and the /metrics they show in. Real hub, real
 * dry-run agents, real ban.ts processes on loopback.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ESCALATION_ORIGIN, type FleetEvent } from "../messages.ts";
import { escalatedSeconds, mergeHubClaim } from "../hub.ts";
import { enrol, readCsv, rows, runBan, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { stopAll, type Proc } from "./lib/proc.ts";

const untilMs = (row: { until: string }) => Date.parse(row.until);

/** /metrics as a reader reads it (`viewer`: its token file). */
async function metricsText(hub: HubProc, viewer: string): Promise<string> {
  return (await fetch(`${hub.url.replace(/^ws/, "http")}/metrics`, { headers: { authorization: `Bearer ${readFileSync(viewer, "utf8").trim()}` } })).text();
}

async function metric(hub: HubProc, viewer: string, name: string): Promise<number> {
  const text = await metricsText(hub, viewer);
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  assert.ok(line, `${name} missing from /metrics:\n${text}`);
  return Number(line.split(" ")[1]);
}

describe("escalation is capped and never shortens a ban, and a released copy replaces its held claim", () => {
  test("each earlier ban multiplies the ban, capped, never shortened", () => {
    assert.equal(escalatedSeconds(600, 0, 2, 604800), 600);
    assert.equal(escalatedSeconds(600, 1, 2, 604800), 1200);
    assert.equal(escalatedSeconds(600, 3, 2, 604800), 4800);
    assert.equal(escalatedSeconds(600, 30, 2, 604800), 604800);
    assert.equal(escalatedSeconds(600, 10_000, 3, 86400), 86400, "huge counts do not overflow to Infinity or NaN");
    assert.equal(escalatedSeconds(900_000, 2, 2, 604800), 900_000, "a ban already longer than the cap stays as it was");
  });

  test("a released copy replaces its held claim; nothing else can replace a claim with an equal one", () => {
    const held: FleetEvent = { seq: "5", kind: "ban", ip: "192.0.2.1", origin: "web1", jail: "sshd", until: 2000, detectedAt: 1000, id: "a", relayedAt: 1000, held: true };
    const claims = new Map([[held.ip, new Map([[held.origin, held]])]]);
    assert.equal(mergeHubClaim(claims, { ...held, seq: "9", held: undefined }), true);
    assert.equal(claims.get(held.ip)!.get("web1")!.seq, "9");
    assert.equal(mergeHubClaim(claims, { ...held, seq: "12" }), false, "a replay of the held event must not hold the claim again");
    assert.equal(claims.get(held.ip)!.get("web1")!.held, undefined);
  });
});

describe("--quorum: a ban reaches the fleet once enough nodes claim the address", () => {
  let dir: string;
  let tokens: Record<string, string>;
  let hub: HubProc;
  const agents: Record<string, Proc> = {};
  const csv = (n: string) => join(dir, `${n}.csv`);
  const ban = (node: string, ip: string, bantime: number) => runBan(["ban", ip, "--jail", "sshd", "--bantime", String(bantime), "--hub", hub.url, "--token-file", tokens[node], "--spool", join(dir, `${node}-spool`), "--timeout", "5"]);
  const startAgent = (n: string) => startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--backend", "dry-run", "--csv", csv(n), "--heartbeat", "2", "--state", join(dir, `${n}.state`)]);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-quorum-"));
    tokens = await enrol(dir, [["web1", "node"], ["web2", "node"], ["web3", "node"], ["ids", "node"], ["viewer", "reader"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--csv", csv("hub"), "--listen", "127.0.0.1:0", "--heartbeat", "2", "--quorum", "2", "--trust", "ids"]);
    for (const n of ["web1", "web2", "web3"]) agents[n] = await startAgent(n);
  });

  after(async () => {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
  });

  test("one node's ban is acked and held; a second node's releases both claims to every agent, a resuming one too", async () => {
    const ip = "198.51.100.20";
    const r1 = await ban("web1", ip, 6000);
    assert.equal(r1.code, 0, r1.output);
    assert.equal(rows(csv("hub"), "HOLD", ip).length, 1, "no HOLD row for the first claim");
    assert.equal(await metric(hub, tokens.viewer, "banshare_held_claims"), 1);
    // A trusted node's ban goes out at once; relays keep their order, so once it has arrived
    // everywhere, a relay of the held ban would have arrived before it.
    const marker = "198.51.100.21";
    assert.equal((await ban("ids", marker, 600)).code, 0);
    for (const n of ["web2", "web3"]) await waitFor(() => rows(csv(n), "BLOCK", marker).length, `trusted ban on ${n}`);
    for (const n of ["web2", "web3"]) assert.equal(rows(csv(n), "BLOCK", ip).length, 0, `${n} applied a ban below the quorum`);

    // web3 goes away before the quorum is reached, and resumes by cursor afterwards.
    await agents.web3.stop("SIGTERM", 5000);
    const r2 = await ban("web2", ip, 600);
    assert.equal(r2.code, 0, r2.output);
    // Both claims go to every agent, their origins' included: web1's (6000 s) is the longer, so
    // an agent blocks until it ends once it holds web1's released claim.
    const holdsWeb1 = (n: string) => rows(csv(n), "SCHEDULE_UNBLOCK", ip).some((r) => untilMs(r) - Date.now() > 3000_000);
    for (const n of ["web1", "web2"]) await waitFor(() => holdsWeb1(n), `${n}'s agent to get web1's released claim`);
    assert.equal(rows(csv("web2"), "BLOCK", ip).length, 1);
    assert.equal(await metric(hub, tokens.viewer, "banshare_held_claims"), 0);

    agents.web3 = await startAgent("web3");
    assert.match(agents.web3.output(), /resumed after seq/, "web3 did a full sync instead of resuming");
    const row = await waitFor(() => rows(csv("web3"), "BLOCK", ip)[0], "web3 to block after resuming");
    // Blocked until web1's longer claim ends: the released copy reached the resuming agent.
    assert.ok(untilMs(row) - Date.now() > 3000_000, `web3 blocks until ${row.until}, not until web1's claim ends`);
  });
});

describe("--escalate: repeat offenders get longer bans on every node", () => {
  let dir: string;
  let tokens: Record<string, string>;
  let hub: HubProc;
  const csv = (n: string) => join(dir, `${n}.csv`);
  const send = (node: string, cmd: "ban" | "unban", ip: string) => runBan([cmd, ip, "--jail", "sshd", ...(cmd === "ban" ? ["--bantime", "600"] : []), "--hub", hub.url, "--token-file", tokens[node], "--spool", join(dir, `${node}-spool`), "--timeout", "5"]);
  const lastUntil = (n: string, ip: string) => {
    const r = readCsv(csv(n)).filter((x) => x.ip === ip && (x.action === "BLOCK" || x.action === "SCHEDULE_UNBLOCK")).pop();
    return r ? untilMs(r) : undefined;
  };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-escalate-"));
    tokens = await enrol(dir, [["web1", "node"], ["web2", "node"], ["web3", "node"], ["viewer", "reader"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--csv", csv("hub"), "--listen", "127.0.0.1:0", "--heartbeat", "2", "--escalate", "2", "--escalate-max", "3600"]);
    for (const n of ["web1", "web2", "web3"]) await startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--backend", "dry-run", "--csv", csv(n), "--heartbeat", "2"]);
  });

  after(async () => {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
  });

  test("a first ban is as Fail2Ban made it; each later one doubles, up to the cap, and outlives the origin's unban", async () => {
    const ip = "203.0.113.50";
    assert.equal((await send("web1", "ban", ip)).code, 0);
    const first = await waitFor(() => lastUntil("web2", ip), "the first ban on web2");
    assert.ok(Math.abs(first - Date.now() - 600_000) < 60_000, `first ban not 600 s: until ${new Date(first).toISOString()}`);
    assert.equal(rows(csv("hub"), "ESCALATE", ip).length, 0);
    // Fail2Ban on web1 lifts its ban; the address comes back later and is banned again.
    assert.equal((await send("web1", "unban", ip)).code, 0);
    await waitFor(() => rows(csv("web2"), "UNBLOCK", ip).length, "the unban on web2");
    assert.equal((await send("web1", "ban", ip)).code, 0);
    const esc = await waitFor(() => rows(csv("hub"), "ESCALATE", ip)[0], "an ESCALATE row");
    assert.match(esc.detail, /1200 s/);
    for (const n of ["web1", "web2", "web3"]) {
      // web1 too: the escalation is the hub's claim, and reaches the origin's agent, which blocks
      // until the escalation ends, not until its own 600 s claim does.
      const b = await waitFor(() => {
        const u = lastUntil(n, ip);
        return u !== undefined && u - Date.now() > 1000_000 ? u : undefined;
      }, `the escalated ban on ${n}`);
      assert.ok(Math.abs(b - Date.now() - 1200_000) < 60_000, `${n} blocks until ${new Date(b).toISOString()}, expected about 1200 s`);
    }
    assert.ok(rows(csv("hub"), "RELAY", ip).some((r) => r.origin === ESCALATION_ORIGIN && /to 3 agent\(s\)$/.test(r.detail)), "the hub's escalation claim went to every agent, web1's included");
    // web1's Fail2Ban ends its own (600 s) ban: the escalation keeps the address blocked.
    const unblocksBefore = rows(csv("web2"), "UNBLOCK", ip).length;
    assert.equal((await send("web1", "unban", ip)).code, 0);
    // Another node's ban, relayed after the unban, marks the point where that unban has arrived.
    assert.equal((await send("web2", "ban", ip)).code, 0);
    await waitFor(() => rows(csv("hub"), "ESCALATE", ip).length === 2, "a second ESCALATE row");
    assert.match(rows(csv("hub"), "ESCALATE", ip)[1].detail, /2400 s/);
    await waitFor(() => (lastUntil("web3", ip) ?? 0) - Date.now() > 2000_000, "web3 to extend to 2400 s");
    assert.equal(rows(csv("web2"), "UNBLOCK", ip).length, unblocksBefore, "the origin's unban lifted the escalated ban");
    // Two more: 4800 s would pass the 3600 s cap.
    assert.equal((await send("web3", "ban", ip)).code, 0);
    await waitFor(() => rows(csv("hub"), "ESCALATE", ip).length === 3, "a third ESCALATE row");
    assert.match(rows(csv("hub"), "ESCALATE", ip)[2].detail, /= 3600 s/);
    assert.equal(await metric(hub, tokens.viewer, "banshare_escalations_total"), 3);
  });

  test("/metrics counts relays in a histogram and events out by kind", async () => {
    const count = await metric(hub, tokens.viewer, "banshare_relay_seconds_count");
    assert.ok(count > 0);
    const text = await metricsText(hub, tokens.viewer);
    const inf = Number(/banshare_relay_seconds_bucket\{le="\+Inf"\} (\d+)/.exec(text)![1]);
    assert.equal(inf, count);
    const buckets = [...text.matchAll(/banshare_relay_seconds_bucket\{le="([\d.]+)"\} (\d+)/g)].map((m) => Number(m[2]));
    assert.deepEqual([...buckets].sort((a, b) => a - b), buckets, "histogram buckets are not cumulative");
    assert.ok(Number(/banshare_events_out_total\{kind="ban"\} (\d+)/.exec(text)![1]) >= 2);
    assert.ok(Number(/banshare_journal_bytes (\d+)/.exec(text)![1]) > 0);
    assert.equal(Number(/banshare_agents (\d+)/.exec(text)![1]), 3);
  });
});
