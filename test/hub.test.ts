/**
 * The hub's own suite: its pure helpers one by one, and the hub itself started in this process
 * (`startHub({ port: 0 })` on loopback) with real `ws` clients and real HTTP requests, no
 * spawning: refusals, resume by cursor, --quorum, --escalate and /metrics.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ALL_ORIGINS, DEFAULT_MAX_PREFIX, ESCALATION_ORIGIN, type BanFrame, type Claims, type FleetEvent, type UnbanFrame } from "../messages.ts";
import {
  FleetState,
  FloodSummary,
  Metrics,
  blockedAddresses,
  defaultMaxPending,
  RateLimiter,
  Recorder,
  Refusals,
  UsageError,
  bearerToken,
  comparePositions,
  countBlocked,
  decideRules,
  escalatedSeconds,
  findToken,
  hashToken,
  isLoopback,
  isPosition,
  liveClaims,
  mergeHubClaim,
  parseArgs,
  parseListen,
  parseTokens,
  quorumClaimers,
  readJournal,
  requestToken,
  startHub,
  statusBans,
  syncEvents,
  toEvent,
  type Hub,
  type HubOptions,
} from "../hub.ts";
import { connectNode, type HubClient } from "./lib/client.ts";
import { enrol, waitFor } from "./lib/fleet.ts";
import { startRedis } from "./lib/redis.ts";

const HASH = "a".repeat(64);
const NOW = 1_700_000_000_000;

/** A claim as the hub stores it; fields not given take plain defaults. */
function claim(p: Partial<FleetEvent> & Pick<FleetEvent, "ip" | "origin">): FleetEvent {
  return { seq: "1", kind: "ban", jail: "sshd", until: NOW + 60_000, detectedAt: NOW - 1000, id: `${p.origin}-${p.ip}`, relayedAt: NOW - 1000, ...p };
}
function claimsOf(...events: FleetEvent[]): Claims {
  const claims: Claims = new Map();
  for (const e of events) mergeHubClaim(claims, e);
  return claims;
}

describe("tokens: the token file is read strictly, and a request's token comes only from a well-formed header or subprotocol", () => {
  test("parseTokens() reads names, hashes and roles, skipping comments and blank lines", () => {
    const text = `# fleet\nweb1 ${HASH}\n\n  web2 ${"b".repeat(64)} reader # the dashboard\nops ${"c".repeat(64)} admin\n`;
    assert.deepEqual(parseTokens(text), [
      { name: "web1", hash: HASH, role: "node" },
      { name: "web2", hash: "b".repeat(64), role: "reader" },
      { name: "ops", hash: "c".repeat(64), role: "admin" },
    ]);
  });

  test("parseTokens() refuses a duplicate name, naming the file and line", () => {
    assert.throws(() => parseTokens(`web1 ${HASH}\nweb1 ${"b".repeat(64)}\n`, "/etc/t"), /^UsageError: \/etc\/t:2: node web1 is listed twice$/);
  });

  test("parseTokens() refuses a bad hash, a bad name, an unknown role and extra fields", () => {
    assert.throws(() => parseTokens(`web1 ${HASH.toUpperCase()}`), /tokens:1: expected a 64-digit lowercase SHA-256/);
    assert.throws(() => parseTokens(`we/b1 ${HASH}`), /tokens:1: expected a node name/);
    assert.throws(() => parseTokens(`web1 ${HASH} root`), /tokens:1: expected role node, reader or admin, got "root"/);
    assert.throws(() => parseTokens(`\nweb1 ${HASH} node extra`), /tokens:2: expected "NAME SHA256HEX \[ROLE\]", got 4 fields/);
  });

  test("findToken() finds the entry whose hash is the token's, and nothing for an unknown token", () => {
    const entries = parseTokens(`web1 ${hashToken("one")}\nweb2 ${hashToken("two")} reader\n`);
    assert.equal(findToken(entries, "two")?.name, "web2");
    assert.equal(findToken(entries, "three"), undefined);
    assert.equal(findToken([], "one"), undefined);
  });

  test("bearerToken() takes only a well-formed Bearer header", () => {
    assert.equal(bearerToken({ headers: { authorization: "Bearer abc-123_x" } }), "abc-123_x");
    assert.equal(bearerToken({ headers: { authorization: "bearer abc" } }), undefined);
    assert.equal(bearerToken({ headers: { authorization: "Bearer " } }), undefined);
    assert.equal(bearerToken({ headers: { authorization: `Bearer ${"x".repeat(513)}` } }), undefined);
    assert.equal(bearerToken({ headers: {} }), undefined);
  });

  test("requestToken() takes a banshare.token. subprotocol on an upgrade only, the bearer token first", () => {
    const proto = { "sec-websocket-protocol": "banshare.v1, banshare.token.s3cret" };
    assert.equal(requestToken({ headers: { upgrade: "websocket", ...proto } }), "s3cret");
    assert.equal(requestToken({ headers: { ...proto } }), undefined, "a plain request's subprotocol header is not a credential");
    assert.equal(requestToken({ headers: { upgrade: "websocket", authorization: "Bearer b", ...proto } }), "b");
    assert.equal(requestToken({ headers: { upgrade: "websocket", "sec-websocket-protocol": "banshare.v1" } }), undefined);
  });

  test("isLoopback() knows 127/8, ::1 and localhost, and nothing else", () => {
    for (const h of ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"]) assert.equal(isLoopback(h), true, h);
    for (const h of ["0.0.0.0", "::", "10.0.0.1", "192.0.2.1", "example.org", "128.0.0.1"]) assert.equal(isLoopback(h), false, h);
  });
});

describe("positions and listen addresses: --listen takes the documented forms, and positions order numerically", () => {
  test("parseListen() takes HOST:PORT, [V6]:PORT and PORT, and refuses the rest in one sentence", () => {
    assert.deepEqual(parseListen("0.0.0.0:7700"), { host: "0.0.0.0", port: 7700 });
    assert.deepEqual(parseListen("[::1]:80"), { host: "::1", port: 80 });
    assert.deepEqual(parseListen("7701"), { host: "127.0.0.1", port: 7701 });
    assert.deepEqual(parseListen(":9"), { host: "127.0.0.1", port: 9 });
    for (const bad of ["::1:80", "host:70000", "host", "[::1]", ""]) assert.throws(() => parseListen(bad), /^UsageError: Expected --listen as HOST:PORT or \[IPV6\]:PORT, got /, bad);
  });

  test("comparePositions() orders journal seqs and stream IDs numerically, not as text", () => {
    assert.ok(comparePositions("999-0", "1000-0") < 0);
    assert.ok(comparePositions("9", "10") < 0);
    assert.equal(comparePositions("5", "5-0"), 0);
    assert.ok(comparePositions("7-2", "7-10") < 0);
    assert.equal(isPosition("1718000000000-3"), true);
    assert.equal(isPosition("-1"), false);
    assert.throws(() => comparePositions("x", "1"), /Expected positions as N or MS-N, got "x"/);
  });
});

describe("claims: events, syncs and listings say what the fleet blocks, leaving out ended, lifted and own claims", () => {
  const ban: BanFrame = { type: "ban", id: "b1", ip: "192.0.2.1", jail: "sshd", bantime: 600, detectedAt: NOW - 1000 };

  test("toEvent() turns a ban into a claim by its sender, ending bantime after detection", () => {
    assert.deepEqual(toEvent(ban, "web1", 7, new Map(), NOW), { seq: "7", kind: "ban", ip: ban.ip, origin: "web1", jail: "sshd", until: NOW - 1000 + 600_000, detectedAt: NOW - 1000, id: "b1", relayedAt: NOW });
  });

  test("toEvent() gives an unban a tombstone as long as the claim it cancels, and an admin unban the origin *", () => {
    const claims = claimsOf(claim({ ip: ban.ip, origin: "web1", until: NOW + 3_600_000 }), claim({ ip: ban.ip, origin: "web2", until: NOW + 7_200_000 }));
    const unban: UnbanFrame = { type: "unban", id: "u1", ip: ban.ip, jail: "sshd", detectedAt: NOW };
    assert.equal(toEvent(unban, "web1", 8, claims, NOW).until, NOW + 3_600_000);
    const all = toEvent({ ...unban, all: true }, "ops", 9, claims, NOW);
    assert.equal(all.origin, ALL_ORIGINS);
    assert.equal(all.until, NOW + 7_200_000, "an admin unban lives as long as the longest claim it lifts");
  });

  test("syncEvents() sends every live claim, the agent's own node's included, in seq order, and after a cursor only newer ones", () => {
    const claims = claimsOf(
      claim({ ip: "192.0.2.1", origin: "web1", seq: "3" }),
      claim({ ip: "192.0.2.1", origin: "web2", seq: "10" }),
      claim({ ip: "192.0.2.2", origin: "web2", seq: "2" }),
      claim({ ip: "192.0.2.3", origin: "web2", seq: "4", until: NOW - 1 }),
      claim({ ip: "192.0.2.4", origin: "web2", seq: "5", held: true }),
    );
    assert.deepEqual(syncEvents(claims, undefined, NOW).map((e) => e.seq), ["2", "3", "10"], "web1's own claim (seq 3) too");
    assert.deepEqual(syncEvents(claims, "3", NOW).map((e) => e.seq), ["10"], "9 < 10 as positions, not as text");
  });

  test("liveClaims() leaves out ended claims, unbans and claims lifted by a newer admin unban", () => {
    const byOrigin = claimsOf(
      claim({ ip: "192.0.2.1", origin: "web1", detectedAt: NOW - 5000 }),
      claim({ ip: "192.0.2.1", origin: "web2", detectedAt: NOW - 500, held: true }),
      claim({ ip: "192.0.2.1", origin: "web3", until: NOW }),
      claim({ ip: "192.0.2.1", origin: "web4", kind: "unban" }),
      claim({ ip: "192.0.2.1", origin: ALL_ORIGINS, kind: "unban", detectedAt: NOW - 1000 }),
    ).get("192.0.2.1")!;
    assert.deepEqual(liveClaims(byOrigin, NOW), [{ origin: "web2", jail: "sshd", until: NOW + 60_000, detectedAt: NOW - 500, seq: "1", held: true }]);
  });

  test("countBlocked() counts the addresses relayed live claims block, and the claims", () => {
    const claims = claimsOf(
      claim({ ip: "192.0.2.1", origin: "web1" }),
      claim({ ip: "192.0.2.1", origin: "web2" }),
      claim({ ip: "192.0.2.2", origin: "web1" }),
      claim({ ip: "192.0.2.3", origin: "web2", held: true }),
      claim({ ip: "192.0.2.4", origin: "web2", kind: "unban" }),
    );
    assert.deepEqual(countBlocked(claims, NOW), { blocked: 2, claims: 3 });
  });

  test("statusBans() shows the newest blocked addresses first with their claim counts, held claims not counted", () => {
    const claims = claimsOf(
      claim({ ip: "192.0.2.1", origin: "web1", detectedAt: NOW - 3000 }),
      claim({ ip: "192.0.2.1", origin: "web2", detectedAt: NOW - 2000 }),
      claim({ ip: "192.0.2.2", origin: "web1", detectedAt: NOW - 1000 }),
      claim({ ip: "192.0.2.3", origin: "web1", detectedAt: NOW - 500, held: true }),
      claim({ ip: "192.0.2.4", origin: "web1", detectedAt: NOW - 100, kind: "unban" }),
    );
    const { bans, total } = statusBans(claims, NOW, 10);
    assert.equal(total, 2);
    assert.deepEqual(bans.map((b) => [b.ip, b.origin, b.claims]), [["192.0.2.2", "web1", 1], ["192.0.2.1", "web2", 2]]);
    assert.deepEqual(statusBans(claims, NOW, 1).bans.map((b) => b.ip), ["192.0.2.2"], "only the newest `limit`, total still all");
  });

  test("escalatedSeconds() multiplies per earlier ban, capped, never below the ban itself", () => {
    assert.equal(escalatedSeconds(600, 2, 2, 604800), 2400);
    assert.equal(escalatedSeconds(600, 100, 2, 3600), 3600);
    assert.equal(escalatedSeconds(7200, 1, 2, 3600), 7200);
  });
});

describe("hub parseArgs(): the documented defaults, and unsafe or contradictory flags refused", () => {
  const serve = (...a: string[]) => {
    const r = parseArgs(["--tokens", "/t", ...a]);
    assert.equal(r.command, "serve");
    return r.command === "serve" ? r.options : assert.fail();
  };

  test("parseArgs() defaults to serve on loopback port 7700 with the documented limits", () => {
    const o = serve();
    assert.equal(o.host, "127.0.0.1");
    assert.equal(o.port, 7700);
    assert.equal(o.heartbeatMs, 15_000);
    assert.equal(o.quorum, 1);
    assert.equal(o.escalate, undefined);
  });

  test("parseArgs() refuses plain ws:// off loopback without --insecure, and half a TLS pair", () => {
    assert.throws(() => serve("--listen", "0.0.0.0:7700"), /^UsageError: Expected --tls-cert and --tls-key to listen on 0\.0\.0\.0/);
    assert.equal(serve("--listen", "0.0.0.0:7700", "--insecure").host, "0.0.0.0");
    assert.throws(() => serve("--tls-cert", "/c"), /Expected --tls-cert and --tls-key together/);
  });

  test("parseArgs() refuses a one-value flag given twice in one line; --protect and --trust repeat", () => {
    assert.throws(() => serve("--listen", "127.0.0.1:1", "--listen", "127.0.0.1:2"), (e: Error) => e instanceof UsageError && e.message === 'Expected --listen once, got it 2 times: "127.0.0.1:1", "127.0.0.1:2"');
    assert.throws(() => parseArgs(["--tokens", "/a", "--tokens", "/b"]), /^UsageError: Expected --tokens once, got it 2 times/);
    assert.throws(() => parseArgs(["add-node", "web1", "--tokens", "/t", "--role", "node", "--role", "admin"]), /Expected --role once/);
    assert.deepEqual(serve("--protect", "192.0.2.0/24", "--protect", "198.51.100.0/24").protect, ["192.0.2.0/24", "198.51.100.0/24"]);
    assert.deepEqual(serve("--trust", "a", "--trust", "b").trusted, ["a", "b"]);
  });

  test("parseArgs() refuses --state with --store, and --quorum or --escalate with --store", () => {
    assert.throws(() => serve("--state", "/j", "--store", "redis://127.0.0.1:6379/0"), /got both/);
    assert.throws(() => serve("--store", "redis://127.0.0.1:6379/0", "--quorum", "2"), /not supported yet/);
    assert.throws(() => serve("--store", "http://x"), /Expected --store as redis:/);
  });

  test("parseArgs() checks numbers: heartbeat, quorum, escalate factor, rate, protect", () => {
    assert.throws(() => serve("--heartbeat", "0"), /Expected --heartbeat to be an integer up to 86400, got 0/);
    assert.throws(() => serve("--quorum", "0"), /Expected --quorum to be a whole number from 1 to 1000/);
    assert.throws(() => serve("--escalate", "1"), /Expected --escalate to be a factor above 1/);
    assert.throws(() => serve("--rate", "0"), /Expected --rate > 0/);
    assert.throws(() => serve("--protect", "nonsense"), /Expected --protect to be an address or CIDR/);
    assert.deepEqual(serve("--escalate", "2", "--escalate-max", "60").escalate, { factor: 2, maxSeconds: 60 });
  });

  test("parseArgs() needs --tokens, and reads add-node and gen-cert", () => {
    assert.throws(() => parseArgs([]), /Expected --tokens FILE/);
    assert.deepEqual(parseArgs(["add-node", "web1", "--tokens", "/t", "--role", "reader"]), { command: "add-node", name: "web1", tokensFile: "/t", role: "reader" });
    assert.deepEqual(parseArgs(["gen-cert", "--host", "hub.example", "--dir", "/d"]), { command: "gen-cert", dir: "/d", hosts: ["hub.example"], days: 3650 });
  });
});

describe("fleet rules: pure decisions for --quorum and --escalate", () => {
  const rules = { quorum: 2, trusted: ["ids"] };
  const ip = "192.0.2.90";

  test("quorumClaimers() counts nodes with a live ban claim, held ones too, not the escalation or lifted ones", () => {
    const byOrigin = claimsOf(
      claim({ ip, origin: "web1", detectedAt: NOW - 100, held: true }),
      claim({ ip, origin: "web2", detectedAt: NOW - 5000 }),
      claim({ ip, origin: ESCALATION_ORIGIN }),
      claim({ ip, origin: ALL_ORIGINS, kind: "unban", detectedAt: NOW - 1000 }),
    ).get(ip)!;
    assert.equal(quorumClaimers(byOrigin, NOW), 1);
  });

  test("decideRules() holds a lone ban under --quorum, but not a trusted node's nor an unban", () => {
    const e = claim({ ip, origin: "web1" });
    const byOrigin = claimsOf(e).get(ip)!;
    assert.deepEqual(decideRules(rules, "web1", e, byOrigin, [], NOW), { hold: { claimers: 1, quorum: 2 }, release: [] });
    assert.deepEqual(decideRules(rules, "ids", e, byOrigin, [], NOW), { release: [] });
    const u = claim({ ip, origin: "web1", kind: "unban" });
    assert.deepEqual(decideRules(rules, "web1", u, claimsOf(u).get(ip)!, [], NOW), { release: [] });
  });

  test("decideRules() releases the held claims once the quorum is reached, as copies to be given new seqs", () => {
    const held = claim({ ip, origin: "web1", seq: "4", held: true });
    const e = claim({ ip, origin: "web2", seq: "" });
    const d = decideRules(rules, "web2", e, claimsOf(held, e).get(ip)!, [], NOW);
    assert.equal(d.hold, undefined);
    assert.deepEqual(d.release, [{ ...held, seq: "", held: undefined }]);
    assert.equal(held.held, true, "the decision changed the claim it was given");
  });

  test("decideRules() does not release a held claim an admin unban lifted", () => {
    const held = claim({ ip, origin: "web1", detectedAt: NOW - 5000, held: true });
    const admin = claim({ ip, origin: ALL_ORIGINS, kind: "unban", detectedAt: NOW - 3000 });
    const e = claim({ ip, origin: "ids", detectedAt: NOW - 100 });
    assert.deepEqual(decideRules(rules, "ids", e, claimsOf(held, admin, e).get(ip)!, [], NOW).release, []);
  });

  test("decideRules() escalates a repeat offender by the bans within --escalate-max, and holds the escalation with a held ban", () => {
    const escalate = { factor: 2, maxSeconds: 3600 };
    const e = claim({ ip, origin: "web1", detectedAt: NOW, until: NOW + 600_000 });
    const byOrigin = claimsOf(e).get(ip)!;
    const offenses = [NOW - 7_200_000, NOW - 60_000, NOW - 30_000, NOW];
    const d = decideRules({ quorum: 1, trusted: [], escalate }, "web1", e, byOrigin, offenses, NOW);
    assert.deepEqual([d.escalation?.priors, d.escalation?.bantime, d.escalation?.seconds], [2, 600, 2400]);
    assert.deepEqual([d.escalation?.event.origin, d.escalation?.event.until, d.escalation?.event.escalation, d.escalation?.event.held], [ESCALATION_ORIGIN, NOW + 2_400_000, 4, undefined]);
    assert.equal(decideRules({ quorum: 2, trusted: [], escalate }, "web1", e, byOrigin, offenses, NOW).escalation?.event.held, true);
    assert.equal(decideRules({ quorum: 1, trusted: [], escalate }, "web1", e, byOrigin, [NOW], NOW).escalation, undefined, "a first offence is not escalated");
  });
});

describe("FleetState: the claims, pending until durable", () => {
  const ban = (ip: string, detectedAt = NOW): BanFrame => ({ type: "ban", id: `f-${ip}-${detectedAt}`, ip, jail: "sshd", bantime: 600, detectedAt });

  test("decide() sees staged events, commit() makes them claims, a replay gives the claim that stands", () => {
    const fleet = new FleetState({ quorum: 1, trusted: [] });
    const d = fleet.decide("web1", ban("192.0.2.80"), NOW);
    assert.ok("batch" in d);
    d.batch[0].seq = "1";
    fleet.stage(d.batch);
    assert.equal(fleet.claims.size, 0, "a staged event is no claim yet");
    const again = fleet.decide("web1", ban("192.0.2.80"), NOW);
    assert.ok("standing" in again && again.standing === d.event, "a replay of a staged event is decided against it");
    fleet.commit(d.batch);
    assert.equal(fleet.durable, "1");
    assert.equal(fleet.claims.get("192.0.2.80")?.get("web1"), d.event);
    assert.equal(fleet.blockedCount(NOW), 1);
  });

  test("totals() keeps the counts countBlocked() walks for: as claims change, end, are lifted by an admin and pruned", () => {
    const fleet = new FleetState({ quorum: 1, trusted: [] });
    let seq = 0;
    const ev = (ip: string, origin: string, kind: "ban" | "unban", detectedAt: number, until: number | null, held?: boolean): FleetEvent => ({ seq: String(++seq), kind, ip, origin, jail: "sshd", until, detectedAt, id: `e${seq}`, relayedAt: detectedAt, ...(held ? { held } : {}) });
    const same = (at: number, what: string) => {
      const t = fleet.totals(at);
      assert.deepEqual({ blocked: t.blocked, claims: t.claims }, countBlocked(fleet.claims, at), what);
      let sum = 0;
      for (const n of t.byOrigin.values()) sum += n;
      assert.equal(sum, t.claims, `${what}: the per-origin counts add up`);
      return t;
    };
    const events: FleetEvent[] = [];
    for (let i = 0; i < 300; i++) {
      const ip = `192.0.2.${i % 60}`;
      const origin = `web${i % 4}`;
      const until = i % 7 === 0 ? null : NOW + (i % 13) * 60_000 + 1000;
      events.push(i % 11 === 5 ? ev(ip, origin, "unban", NOW - 500 + i, until) : ev(ip, origin, "ban", NOW - 1000 + i, until, i % 17 === 3));
    }
    fleet.commit(events);
    const first = same(NOW, "after a commit");
    assert.ok(first.blocked > 0 && first.held > 0);
    assert.equal(first.byOrigin.get("web1") !== undefined, true);
    for (const later of [2 * 60_000, 5 * 60_000, 9 * 60_000, 13 * 60_000]) same(NOW + later, `${later / 60_000} min later, as claims end`);
    fleet.commit([ev("192.0.2.7", ALL_ORIGINS, "unban", NOW + 14 * 60_000, NOW + 20 * 60_000)]);
    same(NOW + 14 * 60_000 + 1, "after an admin unban");
    assert.deepEqual(fleet.blockedAddresses(NOW + 14 * 60_000 + 1).sort(), blockedAddresses(fleet.claims, NOW + 14 * 60_000 + 1).sort(), "the kept blocked addresses are the walked ones");
    fleet.prune(NOW + 30 * 60_000);
    const end = same(NOW + 30 * 60_000, "after a prune");
    assert.equal(end.held, 0);
  });

  test("FloodSummary tells the first refusals of a source one by one and counts the rest for one line per window", () => {
    const f = new FloodSummary();
    const told = Array.from({ length: 8 }, (_, i) => f.note("192.0.2.1", undefined, "unauthorized", i % 2 ? "unknown token" : "unknown token"));
    assert.deepEqual(told, [true, true, true, true, true, false, false, false]);
    assert.equal(f.note("192.0.2.2", undefined, "unauthorized", "unknown token"), true, "another source has its own share");
    assert.equal(f.note("192.0.2.1", "web1", "forbidden", "Only an admin can list the fleet's bans; web1 is a node"), true, "another node or reason too");
    assert.equal(f.note("192.0.2.1", undefined, "unauthorized", "no bearer token"), true, "and another kind of refusal");
    assert.deepEqual(f.flush(), [{ from: "192.0.2.1", why: "unauthorized: unknown token", more: 3 }]);
    assert.equal(f.note("192.0.2.1", undefined, "unauthorized", "unknown token"), true, "a new window starts afresh");
    for (let i = 0; i < 300; i++) f.note(`198.51.100.${i % 250}`, `n${i}`, "unauthorized", "unknown token");
    const told2 = Array.from({ length: 1000 }, (_, i) => f.note(`203.0.113.${i % 250}`, `m${i}`, "unauthorized", "unknown token")).filter(Boolean).length;
    assert.equal(told2, 0, "past the budget of a window nothing more is told one by one");
    assert.ok(f.flush().some((x) => x.from === "other addresses"), "sources past the limit are summed as one");
    f.note("192.0.2.3", undefined, "too_many_pending", "sockets not yet authenticated: 40 from 192.0.2.3, the limit is 32 per address");
    for (let i = 0; i < 9; i++) f.note("192.0.2.3", undefined, "too_many_pending", `sockets not yet authenticated: ${i} in all, the limit is 50; closing the one waiting longest`);
    assert.deepEqual(f.flush(), [{ from: "192.0.2.3", why: "too_many_pending: sockets not yet authenticated", more: 5 }], "numbers and details after the first colon do not make another kind");
  });

  test("defaultMaxPending() is a quarter of the open-file limit, 16 to 1024", () => {
    assert.deepEqual([defaultMaxPending(200), defaultMaxPending(1024), defaultMaxPending(1 << 20), defaultMaxPending(20)], [50, 256, 1024, 16]);
  });

  test("unstage() forgets an event the store did not take", () => {
    const fleet = new FleetState({ quorum: 1, trusted: [] });
    const d = fleet.decide("web1", ban("192.0.2.81"), NOW);
    assert.ok("batch" in d);
    fleet.stage(d.batch);
    fleet.unstage(d.batch);
    assert.ok("batch" in fleet.decide("web1", ban("192.0.2.81"), NOW), "the forgotten event still counted as a replay");
  });

  test("live() leaves out ended claims without changing the claims; prune() forgets them", () => {
    const fleet = new FleetState({ quorum: 1, trusted: [] });
    fleet.load(claim({ ip: "192.0.2.82", origin: "web1", until: NOW - 1 }));
    fleet.load(claim({ ip: "192.0.2.83", origin: "web1" }));
    assert.deepEqual([...fleet.live(NOW)].map((e) => e.ip), ["192.0.2.83"]);
    assert.equal(fleet.size(), 2);
    fleet.prune(NOW);
    assert.equal(fleet.size(), 1);
  });
});

describe("the hub's small parts: the rate limit holds, a refusal is counted, logged and answered in one place, a journal reads as the hub reads it, usage errors are typed", () => {
  test("RateLimiter.take() allows the burst at once, then the rate", () => {
    const limit = new RateLimiter(2, 3);
    assert.deepEqual([1, 2, 3, 4].map(() => limit.take("web1", NOW)), [true, true, true, false]);
    assert.equal(limit.take("web2", NOW), true, "each node has its own bucket");
    assert.equal(limit.take("web1", NOW + 500), true, "half a second at 2/s is one more");
    assert.equal(limit.take("web1", NOW + 500), false);
  });

  test("Refusals.refuse() counts, logs, writes one CSV row and answers with the error frame and its HTTP status", async (t) => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-hub-parts-"));
    t.after(() => rm(dir, { recursive: true, force: true }));
    const lines: string[] = [];
    const metrics = new Metrics();
    const recorder = await Recorder.open(join(dir, "hub.csv"), (l) => lines.push(l));
    const refusals = new Refusals(metrics, recorder, (l) => lines.push(l));
    const answers: unknown[] = [];
    refusals.refuse({ code: "rate_limited", message: "slow down", node: "web1", remote: "192.0.2.1:5", id: "x", ip: "192.0.2.9" }, (status, f) => answers.push([status, f]));
    refusals.refuse({ code: "unauthorized", message: "unknown token", remote: "192.0.2.2:6", connection: true }, (status, f) => answers.push([status, f]), 401);
    await recorder.close();
    assert.deepEqual(answers, [[429, { type: "error", code: "rate_limited", message: "slow down", id: "x" }], [401, undefined]]);
    assert.deepEqual(lines, ["refused from web1 (192.0.2.1:5): slow down", "refused connection from 192.0.2.2:6: unknown token"]);
    const csv = (await readFile(join(dir, "hub.csv"), "utf8")).trim().split("\n");
    assert.equal(csv.length, 3);
    assert.match(csv[1], /,REJECT,192\.0\.2\.9,web1,.*rate_limited: slow down/);
    assert.match(csv[2], /,REJECT,,,.*unauthorized: unknown token from 192\.0\.2\.2:6/);
    const text = metrics.text({ roles: { node: 0, reader: 0, admin: 0 }, agents: 0, held: 0, blocked: 0, byOrigin: new Map(), pending: 0, seq: 0, store: [], enforcement: new Map() });
    assert.match(text, /^banshare_refused_total\{reason="rate_limited"\} 1$/m);
    assert.match(text, /^banshare_refused_total\{reason="unauthorized"\} 1$/m);
  });

  test("readJournal() reads a journal as the hub does: torn lines skipped and counted, a stranger's file refused", async (t) => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-hub-journal-"));
    t.after(() => rm(dir, { recursive: true, force: true }));
    const e = claim({ ip: "192.0.2.95", origin: "web1", seq: "7" });
    await writeFile(join(dir, "j"), `${JSON.stringify({ journal: "banshare-journal", v: 1, hub: "h1", seq: 5 })}\n${JSON.stringify(e)}\n{"torn\n`);
    assert.deepEqual(await readJournal(join(dir, "j")), { hubId: "h1", seq: 7, skipped: 1, events: [e] });
    await writeFile(join(dir, "empty"), "");
    assert.equal(await readJournal(join(dir, "empty")), undefined);
    await writeFile(join(dir, "other"), "not a journal\n");
    await assert.rejects(readJournal(join(dir, "other")), (err: Error) => err instanceof UsageError && /is not a banshare journal: refusing to overwrite it/.test(err.message));
  });

  test("usage errors are UsageErrors, so main() exits 2 with one line", () => {
    assert.throws(() => parseArgs(["--tokens", "/t", "--bogus"]), UsageError);
    assert.throws(() => parseTokens("x y"), UsageError);
    assert.throws(() => parseArgs(["--tokens", "/t", "--store", "redis://127.0.0.1:6379/0", "--escalate", "2"]), UsageError);
  });
});

// ---------------------------------------------------------------------------------------------
// The hub in this process

let frameNo = 0;
function banFrame(ip: string, detectedAt = Date.now(), bantime = 600): BanFrame {
  return { type: "ban", id: `t${++frameNo}`, ip, jail: "sshd", bantime, detectedAt };
}

/** A hub on 127.0.0.1:0 over `dir`'s token file; options a test does not give are the flags' defaults or generous limits. */
function hubOptions(dir: string, extra: Partial<HubOptions> = {}): HubOptions {
  return { host: "127.0.0.1", port: 0, tokensFile: join(dir, "tokens"), heartbeatMs: 60_000, maxPrefix: DEFAULT_MAX_PREFIX, syncChunk: 5000, maxBufferedBytes: 64 << 20, rate: 1000, burst: 1000, maxConnsPerNode: 8, protect: [], streamMaxLen: 100_000, streamMaxAgeMs: 3_600_000, log: () => {}, ...extra };
}

/** A hub with nodes web1..web3, a reader and an admin; `t` the helpers every in-process test uses. */
async function fleet(extra: Partial<HubOptions> = {}) {
  const dir = await mkdtemp(join(tmpdir(), "banshare-hub-test-"));
  const files = await enrol(dir, [["web1", "node"], ["web2", "node"], ["web3", "node"], ["dash", "reader"], ["ops", "admin"]]);
  const token = async (n: string) => (await readFile(files[n], "utf8")).trim();
  const hub: Hub = await startHub(hubOptions(dir, extra));
  const http = `http://127.0.0.1:${hub.port}`;
  const url = `ws://127.0.0.1:${hub.port}/`;
  const clients: HubClient[] = [];
  return {
    dir,
    hub,
    /** A connected client of node `n` that said hello (an agent when `want` is "events"). */
    async connect(n: string, hello: Record<string, unknown> = {}): Promise<HubClient> {
      const c = await this.open(n);
      await c.hello(hello);
      return c;
    },
    /** A connected client of node `n` that has not said hello yet. */
    async open(n: string): Promise<HubClient> {
      const c = await connectNode(url, await token(n), { timeoutMs: 5000 });
      clients.push(c);
      return c;
    },
    async agent(n: string, cursor?: { hub: string; seq: string }): Promise<{ c: HubClient; sync: Record<string, any> }> {
      const c = await this.connect(n, { want: "events", cursor });
      return { c, sync: await c.next((f) => f.type === "sync", "sync") };
    },
    /** Publishes by POST /v1/events, as ban.ts does; resolves with the status and answer. */
    async post(n: string, f: object): Promise<{ status: number; body: Record<string, any> }> {
      const r = await fetch(`${http}/v1/events`, { method: "POST", headers: { authorization: `Bearer ${await token(n)}` }, body: JSON.stringify(f) });
      return { status: r.status, body: (await r.json()) as Record<string, any> };
    },
    async get(path: string, n?: string): Promise<Response> {
      return fetch(`${http}${path}`, { headers: n ? { authorization: `Bearer ${await token(n)}` } : {} });
    },
    async metric(name: string): Promise<number> {
      const text = await (await fetch(`${http}/metrics`, { headers: { authorization: `Bearer ${await token("dash")}` } })).text();
      const line = text.split("\n").find((l) => l.startsWith(`${name} `));
      assert.ok(line, `${name} missing from /metrics:\n${text}`);
      return Number(line.split(" ")[1]);
    },
    async stop() {
      for (const c of clients) c.close();
      await hub.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
type Fleet = Awaited<ReturnType<typeof fleet>>;

describe("the hub refuses what a node may not do, over WebSocket and POST alike", () => {
  let f: Fleet;
  before(async () => (f = await fleet({ protect: ["198.51.100.0/24"], rate: 1, burst: 2 })));
  after(() => f.stop());

  test("a reader cannot publish: error frame on the socket, 403 on POST", async () => {
    const c = await f.connect("dash");
    const b = banFrame("192.0.2.10");
    c.send(b);
    const err = await c.next((x) => x.type === "error", "error frame");
    assert.equal(err.code, "forbidden");
    assert.equal(err.id, b.id);
    const r = await f.post("dash", banFrame("192.0.2.10"));
    assert.equal(r.status, 403);
    assert.equal(r.body.code, "forbidden");
  });

  test("a ban on a protected network is refused with its network named", async () => {
    const r = await f.post("web1", banFrame("198.51.100.7"));
    assert.equal(r.status, 403);
    assert.equal(r.body.code, "protected");
    assert.match(r.body.message, /198\.51\.100\.0\/24/);
  });

  test("only an admin may unban for every node", async () => {
    const r = await f.post("web1", { type: "unban", id: "u-all", ip: "192.0.2.11", jail: "sshd", detectedAt: Date.now(), all: true });
    assert.equal(r.status, 403);
    assert.match(r.body.message, /Only an admin can unban for every node; web1 is a node/);
  });

  test("a frame before hello is refused, and a node over its rate gets rate_limited", async () => {
    const c = await f.open("web2");
    c.send(banFrame("192.0.2.12"));
    assert.equal((await c.next((x) => x.type === "error", "not_hello")).code, "not_hello");
    c.close();
    const answers = [];
    for (let i = 0; i < 4; i++) answers.push((await f.post("web3", banFrame(`192.0.2.${20 + i}`))).status);
    assert.deepEqual(answers.slice(0, 2), [200, 200], "the burst passes");
    assert.ok(answers.includes(429), `expected a 429 after the burst of 2, got ${answers}`);
  });

  test("a bad token gets 401, and /v1/bans needs an admin", async () => {
    const r = await fetch(`http://127.0.0.1:${f.hub.port}/v1/events`, { method: "POST", headers: { authorization: "Bearer nope" }, body: "{}" });
    assert.equal(r.status, 401);
    assert.equal((await f.get("/v1/bans", "web1")).status, 403);
    assert.equal((await f.get("/v1/bans", "ops")).status, 200);
  });

  test("every refusal is counted by reason in /metrics", async () => {
    assert.ok((await f.metric('banshare_refused_total{reason="forbidden"}')) >= 4);
    assert.equal(await f.metric('banshare_refused_total{reason="protected"}'), 1);
    assert.equal(await f.metric('banshare_refused_total{reason="not_hello"}'), 1);
    assert.ok((await f.metric('banshare_refused_total{reason="rate_limited"}')) >= 1);
    assert.equal(await f.metric('banshare_refused_total{reason="unauthorized"}'), 1);
  });
});

describe("the hub relays, acks and resumes by cursor", () => {
  let f: Fleet;
  before(async () => (f = await fleet()));
  after(() => f.stop());

  test("an accepted ban is acked with its seq and relayed to every agent, its origin's included", async () => {
    const { c: a2 } = await f.agent("web2");
    const { c: a1 } = await f.agent("web1");
    const sender = await f.connect("web1");
    const b = banFrame("192.0.2.30");
    sender.send(b);
    const ack = await sender.next((x) => x.type === "ack", "ack");
    assert.equal(ack.id, b.id);
    const ev = await a2.next((x) => x.type === "event", "relayed event");
    assert.deepEqual([ev.ip, ev.origin, ev.seq], [b.ip, "web1", ack.seq]);
    sender.send(banFrame("192.0.2.31"));
    await a2.next((x) => x.type === "event" && x.ip === "192.0.2.31", "second event");
    const own = await a1.next((x) => x.type === "event" && x.ip === "192.0.2.31", "web1's agent gets its own node's ban");
    assert.equal(own.origin, "web1");
    assert.ok(a1.frames.some((x) => x.type === "event" && x.ip === b.ip), "web1's agent holds its node's first ban too");
  });

  test("a replayed ban is acked again with the seq it first got, and changes nothing", async () => {
    const b = banFrame("192.0.2.32");
    const first = await f.post("web2", b);
    const again = await f.post("web2", b);
    assert.equal(first.status, 200);
    assert.deepEqual(again.body, first.body);
  });

  test("an agent resuming from a cursor gets only what came after it; a stranger's cursor gets a full sync", async () => {
    const { sync: first } = await f.agent("web3");
    assert.equal(first.full, true);
    const cursor = { hub: f.hub.hubId, seq: first.seq as string };
    const later = await f.post("web1", banFrame("192.0.2.33"));
    const { sync } = await f.agent("web3", cursor);
    assert.equal(sync.full, false);
    assert.deepEqual(sync.events.map((e: FleetEvent) => e.seq), [later.body.seq]);
    const { sync: other } = await f.agent("web3", { hub: "elsewhere", seq: first.seq });
    assert.equal(other.full, true);
    assert.ok(other.events.length >= 4);
  });

  test("/healthz and /v1/whoami tell the hub id and its seq", async () => {
    assert.deepEqual(await (await f.get("/healthz")).json(), { ok: true }, "a stranger is told only that the hub is up");
    const health = (await (await f.get("/healthz", "dash")).json()) as Record<string, any>;
    assert.equal(health.ok, true);
    assert.equal(health.hub, f.hub.hubId);
    assert.equal(health.seq, String(f.hub.seq()));
    const who = (await (await f.get("/v1/whoami", "web1")).json()) as Record<string, any>;
    assert.equal(who.node, "web1");
    assert.equal(who.seq, health.seq);
    assert.equal(who.blocked, 4, "every blocked address, web1's own three included");
    assert.equal(who.blockedByOthers, undefined);
  });
});

describe("enforcement reports: the hub keeps each agent's latest and shows it", () => {
  let f: Fleet;
  before(async () => (f = await fleet()));
  after(() => f.stop());
  const report = (over: object = {}) => ({ type: "enforcement", backend: "ipset", hooks: [{ name: "iptables INPUT", state: "present", since: Date.now() - 60_000 }, { name: "ip6tables INPUT", state: "present", since: Date.now() - 60_000 }], entries: 5, claims: 5, drift: 0, missing: [], repairs: 0, ...over });

  test("the welcome lists enforcement; an agent's report is in /v1/nodes (admin), the status frame and /metrics; a newer one replaces it", async () => {
    const { c: agent } = await f.agent("web1");
    const welcome = agent.frames.find((x) => x.type === "welcome")!;
    assert.deepEqual(welcome.accepts, ["applied", "enforcement"]);
    agent.send(report());
    const nodes = async () => (await (await f.get("/v1/nodes", "ops")).json()) as Record<string, any>;
    const one = await waitFor(async () => (await nodes()).nodes.find((n: any) => n.node === "web1" && n.enforcement), "web1's report in /v1/nodes");
    assert.deepEqual(one.verdict, { ok: true, text: "enforcing" });
    assert.deepEqual([one.enforcement.entries, one.enforcement.claims, one.enforcement.backend], [5, 5, "ipset"]);
    assert.equal(await f.metric('banshare_node_enforcing{node="web1"}'), 1);
    assert.equal(await f.metric('banshare_node_entries{node="web1"}'), 5);

    const since = Date.now() - 3000;
    agent.send(report({ hooks: [{ name: "iptables INPUT", state: "missing", since }], entries: 2, drift: 3, missing: ["iptables INPUT hook"], missingSince: since, repairs: 2, lastRepair: { at: since, what: "ipset flush" } }));
    const two = await waitFor(async () => (await nodes()).nodes.find((n: any) => n.node === "web1" && n.enforcement?.repairs === 2), "web1's newer report");
    assert.deepEqual(two.verdict, { ok: false, text: `hook missing since ${new Date(since).toISOString()} (iptables INPUT)` });
    assert.equal(await f.metric('banshare_node_enforcing{node="web1"}'), 0);
    assert.equal(await f.metric('banshare_node_drift{node="web1"}'), 3);
    assert.equal(await f.metric('banshare_node_hooks_missing{node="web1"}'), 1);
    assert.equal(await f.metric('banshare_node_repairs_total{node="web1"}'), 2);
    agent.send(report({ entries: 2, drift: 3 }));
    const three = await waitFor(async () => (await nodes()).nodes.find((n: any) => n.node === "web1" && n.enforcement?.drift === 3 && !n.enforcement.missing.length), "web1's drift report");
    assert.deepEqual(three.verdict, { ok: false, text: "drift 3" });

    const watch = await f.connect("dash", { want: "status" });
    const status = await watch.next((x) => x.type === "status" && x.conns.some((c: any) => c.name === "web1" && c.verdict), "a status frame with web1's verdict");
    assert.deepEqual(status.conns.find((c: any) => c.name === "web1").verdict, { ok: false, text: "drift 3" });
    watch.close();
    agent.close();
    await waitFor(async () => !(await nodes()).nodes.some((n: any) => n.node === "web1"), "web1 gone from /v1/nodes once disconnected");
  });

  test("a report is refused from a sender or status page, when malformed or too big, and /v1/nodes is for admins only", async () => {
    const sender = await f.connect("web2");
    sender.send(report());
    assert.equal((await sender.next((x) => x.type === "error", "error")).code, "forbidden");
    const { c: agent } = await f.agent("web3");
    const bad: object[] = [
      report({ hooks: Array.from({ length: 17 }, (_, i) => ({ name: `h${i}`, state: "present" })) }),
      report({ hooks: [{ name: "INPUT; rm -rf /", state: "present" }] }),
      report({ hooks: [{ name: "INPUT", state: "gone" }] }),
      report({ drift: -1 }),
      report({ entries: 1.5 }),
      report({ missing: ["x\ny"] }),
      report({ lastRepair: { at: Date.now() + 3_600_000, what: "later" } }),
      report({ backend: "" }),
    ];
    for (const b of bad) agent.send(b);
    await waitFor(() => agent.frames.filter((x) => x.type === "error").length >= bad.length, "an error for each bad report");
    assert.ok(agent.frames.filter((x) => x.type === "error").every((x) => x.code === "bad_frame"));
    const nodes = (await (await f.get("/v1/nodes", "ops")).json()) as Record<string, any>;
    assert.equal(nodes.nodes.find((n: any) => n.node === "web3").enforcement, null, "a refused report was kept");
    assert.equal((await f.get("/v1/nodes", "web3")).status, 403);
    assert.equal((await f.get("/v1/nodes", "dash")).status, 403);
    assert.equal((await f.get("/v1/nodes")).status, 401);
    assert.equal((await f.post("web3", report())).status, 400, "a report in a POST");
  });
});

describe("--quorum holds a ban until enough nodes claim the address", () => {
  let f: Fleet;
  before(async () => (f = await fleet({ quorum: 2, trusted: ["web3"] })));
  after(() => f.stop());

  test("one node's ban is held; a second node's releases both to the fleet", async () => {
    const { c: agent } = await f.agent("web3");
    await f.post("web1", banFrame("192.0.2.40"));
    assert.equal(await f.metric("banshare_held_claims"), 1);
    await f.post("web2", banFrame("192.0.2.40"));
    const got = new Set<string>();
    await waitFor(() => {
      for (const x of agent.frames) for (const e of x.type === "event" ? [x] : x.type === "sync" ? x.events : []) if (e.ip === "192.0.2.40") got.add(e.origin);
      return got.size === 2;
    }, "both claims relayed");
    assert.equal(await f.metric("banshare_held_claims"), 0);
  });

  test("a trusted node's ban is relayed at once", async () => {
    const { c: agent } = await f.agent("web1");
    await f.post("web3", banFrame("192.0.2.41"));
    await agent.next((x) => x.type === "event" && x.ip === "192.0.2.41", "trusted ban relayed");
  });

  test("after an admin unban, one node alone does not ban the address again for the whole fleet", async () => {
    const ip = "192.0.2.42";
    const t = Date.now();
    await f.post("web1", banFrame(ip, t));
    await f.post("web2", banFrame(ip, t + 1));
    assert.equal((await f.post("ops", { type: "unban", id: "lift-42", ip, jail: "sshd", detectedAt: t + 2, all: true })).status, 200);
    await f.post("web1", banFrame(ip, t + 3));
    assert.equal(await f.metric("banshare_held_claims"), 1, "web1's new ban counted web2's lifted claim towards the quorum");
    const { sync } = await f.agent("web3");
    assert.equal(sync.events.some((e: FleetEvent) => e.ip === ip && e.origin === "web1"), false, "web1's new ban went to the fleet alone");
  });
});

describe("--escalate lengthens a repeat offender's ban on every node", () => {
  let f: Fleet;
  before(async () => (f = await fleet({ escalate: { factor: 2, maxSeconds: 86_400 } })));
  after(() => f.stop());

  test("a second ban of an address adds an escalation claim twice as long", async () => {
    const ip = "192.0.2.50";
    const t = Date.now() - 10_000;
    await f.post("web1", banFrame(ip, t, 60));
    await f.post("web1", { type: "unban", id: "u50", ip, jail: "sshd", detectedAt: t + 1000 });
    await f.post("web2", banFrame(ip, t + 2000, 60));
    assert.equal(await f.metric("banshare_escalations_total"), 1);
    const { sync } = await f.agent("web3");
    const esc = sync.events.find((e: FleetEvent) => e.ip === ip && e.origin === ESCALATION_ORIGIN);
    assert.ok(esc, "no escalation claim in the sync");
    assert.equal(esc.escalation, 2);
    assert.equal(esc.until, t + 2000 + 120_000);
  });
});

describe("/metrics: banshare_claims counts addresses with a live relayed ban claim", () => {
  let f: Fleet;
  before(async () => (f = await fleet({ quorum: 2 })));
  after(() => f.stop());

  test("banshare_claims counts addresses with a live relayed ban claim: not tombstones, not held claims, each address once", async () => {
    const t = Date.now();
    await f.post("web1", banFrame("192.0.2.60", t));
    await f.post("web2", banFrame("192.0.2.60", t));
    await f.post("web3", banFrame("192.0.2.60", t));
    await f.post("web1", banFrame("192.0.2.61", t));
    assert.equal(await f.metric("banshare_claims"), 1, "a held claim or a second claim on one address counted");
    await f.post("web1", { type: "unban", id: "u60a", ip: "192.0.2.60", jail: "sshd", detectedAt: t + 1 });
    await f.post("web2", { type: "unban", id: "u60b", ip: "192.0.2.60", jail: "sshd", detectedAt: t + 1 });
    assert.equal(await f.metric("banshare_claims"), 1, "web3 still holds 192.0.2.60");
    await f.post("web3", { type: "unban", id: "u60c", ip: "192.0.2.60", jail: "sshd", detectedAt: t + 1 });
    assert.equal(await f.metric("banshare_claims"), 0, "tombstones counted as claims");
  });
});

describe("/metrics with a shared store (Redis): banshare_seq counts the stream entries read", () => {
  test("banshare_seq counts the stream entries this hub read, not a stream ID's milliseconds", async (t) => {
    const redis = await startRedis(t);
    const f = await fleet({ store: redis.url });
    t.after(() => f.stop());
    assert.equal(await f.metric("banshare_seq"), 0);
    for (const ip of ["192.0.2.70", "192.0.2.71", "192.0.2.72"]) assert.equal((await f.post("web1", banFrame(ip))).status, 200);
    await waitFor(async () => (await f.metric("banshare_seq")) === 3, "banshare_seq 3");
    assert.equal(f.hub.seq(), 3);
    const health = (await (await f.get("/healthz", "dash")).json()) as Record<string, any>;
    assert.match(health.seq, /^\d+-\d+$/, "/healthz still tells the stream position");
    assert.equal(await f.metric("banshare_claims"), 3);
  });
});

describe("startHub() fails fast on a port in use and on a file that is not a journal, leaving it untouched", () => {
  test("startHub() rejects with EADDRINUSE on a port in use, and a journal that is not one with a UsageError", async (t) => {
    const f = await fleet();
    t.after(() => f.stop());
    await assert.rejects(startHub(hubOptions(f.dir, { port: f.hub.port, statePath: join(f.dir, "second.jsonl") })), (e: NodeJS.ErrnoException) => e.code === "EADDRINUSE");
    await writeFile(join(f.dir, "notes.txt"), "my notes\n");
    await assert.rejects(startHub(hubOptions(f.dir, { statePath: join(f.dir, "notes.txt") })), UsageError);
    assert.equal(await readFile(join(f.dir, "notes.txt"), "utf8"), "my notes\n");
  });
});
