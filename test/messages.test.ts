import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  ALL_ORIGINS,
  CSV_HEADER,
  DEFAULT_MAX_PREFIX,
  MAX_APPLIED_BATCH,
  MAX_DROPPED_REASONS,
  blockedUntil,
  checkBannable,
  contains,
  csvRow,
  enforcementVerdict,
  eventUntil,
  mergeClaim,
  parseAddress,
  parseHubFrame,
  parseHandoffAnswer,
  parseNodeFrame,
  pruneClaims,
  tlsProblem,
  type Claims,
  type FleetEvent,
} from "../messages.ts";

const NOW = 1_800_000_000_000;

function ev(p: Partial<FleetEvent> & Pick<FleetEvent, "origin" | "detectedAt">): FleetEvent {
  return { seq: "1", kind: "ban", ip: "203.0.113.7", jail: "sshd", until: p.detectedAt + 600_000, id: `id${p.detectedAt}`, relayedAt: p.detectedAt, ...p };
}

describe("parseAddress(): only addresses and networks pass, canonicalised", () => {
  test("canonicalises IPv4, IPv6, CIDR and IPv4-mapped forms", () => {
    assert.equal(parseAddress("192.0.2.1")?.text, "192.0.2.1");
    assert.equal(parseAddress("2001:DB8:0:0:0:0:0:1")?.text, "2001:db8::1");
    assert.equal(parseAddress("2001:db8:0:1:0:0:0:0")?.text, "2001:db8:0:1::");
    assert.equal(parseAddress("2001:db8::1:0:0:1")?.text, "2001:db8::1:0:0:1");
    assert.equal(parseAddress("::ffff:192.0.2.9")?.text, "192.0.2.9");
    assert.equal(parseAddress("198.51.100.77/24")?.text, "198.51.100.0/24");
    assert.equal(parseAddress("192.0.2.1/32")?.text, "192.0.2.1");
    assert.equal(parseAddress("2001:db8::1/64")?.text, "2001:db8::/64");
  });

  test("refuses everything that is not an address, including argv and shell tricks", () => {
    for (const s of ["", "1.2.3", "1.2.3.4.5", "256.1.1.1", "1.2.3.4; rm -rf /", "-F", "--flush", "1.2.3.4\n5.6.7.8", "1.2.3.4/33", "1.2.3.4/-1", "1.2.3.4/", "fe80::1%eth0", "example.com", " 1.2.3.4", 1234, null, {}]) {
      assert.equal(parseAddress(s), undefined, `accepted ${JSON.stringify(s)}`);
    }
  });

  test("contains() compares networks bit by bit", () => {
    assert.ok(contains(parseAddress("10.0.0.0/8")!, parseAddress("10.200.3.4")!));
    assert.ok(!contains(parseAddress("10.0.0.0/8")!, parseAddress("11.0.0.1")!));
    assert.ok(contains(parseAddress("2001:db8::/32")!, parseAddress("2001:db8:ffff::1")!));
    assert.ok(!contains(parseAddress("192.0.2.0/25")!, parseAddress("192.0.2.0/24")!));
  });
});

describe("checkBannable(): special-purpose and too-broad ranges are never banned", () => {
  test("refuses loopback, unspecified, link-local, multicast and broadcast, keeps private ranges", () => {
    for (const s of ["127.0.0.1", "0.0.0.0", "0.0.0.0/0", "169.254.1.1", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "ff02::1"]) {
      const r = checkBannable(s);
      assert.equal(r.ok, false, s);
      assert.match((r as { message: string }).message, /Refusing|Expected/);
    }
    for (const s of ["10.1.2.3", "192.168.1.1", "172.16.0.9", "203.0.113.7", "2001:db8::7"]) assert.equal(checkBannable(s).ok, true, s);
  });

  test("refuses networks broader than the prefix limits", () => {
    const limits = { v4: 32, v6: 64 };
    assert.equal(checkBannable("198.51.100.0/24", limits).ok, false);
    assert.equal(checkBannable("198.51.100.0/24", { v4: 24, v6: 64 }).ok, true);
    assert.equal(checkBannable("2001:db8::/48", limits).ok, false);
    assert.equal(checkBannable("2001:db8::/64", limits).ok, true);
    assert.equal(checkBannable("2001:db8::5", limits).ok, true);
  });
});

describe("parseNodeFrame(): a node's frame is accepted only well-formed, and refused with a code and a sentence", () => {
  const ok = (o: unknown) => parseNodeFrame(JSON.stringify(o), NOW);
  const ban = { type: "ban", id: "a1", ip: "203.0.113.7", jail: "sshd", bantime: 600, detectedAt: NOW - 5 };

  test("accepts well-formed hello, ban and unban frames", () => {
    assert.deepEqual(ok({ type: "hello", v: 1, want: "events", cursor: { hub: "h", seq: "3" } }), { ok: true, value: { type: "hello", v: 1, node: undefined, want: "events", cursor: { hub: "h", seq: "3" } } });
    assert.deepEqual(ok(ban), { ok: true, value: ban });
    assert.equal(ok({ ...ban, bantime: -1 }).ok, true);
    const un = ok({ type: "unban", id: "b", ip: "2001:DB8::7", jail: "sshd", detectedAt: NOW });
    assert.ok(un.ok && un.value.type === "unban" && un.value.ip === "2001:db8::7");
  });

  test("refuses each malformed frame with a code, a sentence and the frame's id", () => {
    const cases: Array<[unknown, string, RegExp]> = [
      ["not json", "bad_frame", /JSON/],
      [[1, 2], "bad_frame", /array/],
      [{ type: "hello", v: 2 }, "version", /version 1/],
      [{ type: "hello", v: 1, want: "everything" }, "bad_frame", /want/],
      [{ type: "hello", v: 1, cursor: "x" }, "bad_frame", /cursor/],
      [{ type: "nope", id: "x" }, "bad_frame", /hello, ban, unban, applied or enforcement/],
      [{ id: "x" }, "bad_frame", /type/],
      [{ ...ban, id: undefined }, "bad_frame", /"id"/],
      [{ ...ban, id: "has space" }, "bad_frame", /"id"/],
      [{ ...ban, ip: "1.2.3.4; rm" }, "bad_ip", /address/],
      [{ ...ban, ip: "127.0.0.1" }, "bad_ip", /loopback/],
      [{ ...ban, jail: "-F" }, "bad_frame", /jail/],
      [{ ...ban, jail: 7 }, "bad_frame", /jail/],
      [{ ...ban, bantime: 0 }, "bad_frame", /bantime/],
      [{ ...ban, bantime: "600" }, "bad_frame", /bantime/],
      [{ ...ban, bantime: 1.5 }, "bad_frame", /bantime/],
      [{ ...ban, detectedAt: "now" }, "bad_frame", /detectedAt/],
      [{ ...ban, sentAt: "now" }, "bad_frame", /sentAt/],
      [{ ...ban, sentAt: -1 }, "bad_frame", /sentAt/],
      [{ type: "hello", v: 1, sentAt: 1.5 }, "bad_frame", /sentAt/],
      [{ type: "unban", id: "u", ip: "203.0.113.7", jail: "sshd", detectedAt: NOW, all: "yes" }, "bad_frame", /all/],
    ];
    for (const [frame, code, re] of cases) {
      const r = parseNodeFrame(typeof frame === "string" ? frame : JSON.stringify(frame), NOW);
      assert.equal(r.ok, false, JSON.stringify(frame));
      if (r.ok) continue;
      assert.equal(r.code, code, JSON.stringify(frame));
      assert.match(r.message, re);
      assert.doesNotMatch(r.message, /\n/);
    }
    const withId = parseNodeFrame(JSON.stringify({ ...ban, ip: "x" }), NOW);
    assert.equal(!withId.ok && withId.id, "a1");
  });

  test("takes a sender's times whatever its clock says: an hour ahead is placed by the hub, not refused", () => {
    const r = parseNodeFrame(JSON.stringify({ type: "ban", id: "a1", ip: "203.0.113.7", jail: "sshd", bantime: 600, detectedAt: NOW + 3_600_000, sentAt: NOW + 3_600_010 }), NOW);
    assert.ok(r.ok && r.value.type === "ban" && r.value.sentAt === NOW + 3_600_010);
  });

  test("accepts want \"status\" (a status page) and refuses other wants", () => {
    const r = ok({ type: "hello", v: 1, want: "status" });
    assert.ok(r.ok && r.value.type === "hello" && r.value.want === "status");
    for (const want of ["Status", "status ", "", 1, null]) assert.equal(ok({ type: "hello", v: 1, want }).ok, false, JSON.stringify(want));
  });

  test("accepts an applied frame and keeps only the known fields of each record", () => {
    const rec = { seq: "42", ip: "192.0.2.10", rtMs: 12, at: NOW - 3 };
    assert.deepEqual(ok({ type: "applied", events: [{ ...rec, extra: "<b>x</b>" }, { ...rec, seq: "43", rtMs: -5 }] }), {
      ok: true,
      value: { type: "applied", events: [rec, { ...rec, seq: "43", rtMs: -5 }] },
    });
    assert.equal(ok({ type: "applied", events: Array.from({ length: MAX_APPLIED_BATCH }, () => rec) }).ok, true);
  });

  test("refuses each malformed applied frame with a sentence", () => {
    const rec = { seq: "42", ip: "192.0.2.10", rtMs: 12, at: NOW - 3 };
    const cases: Array<[unknown, RegExp]> = [
      [{ type: "applied" }, /"events"/],
      [{ type: "applied", events: [] }, /"events"/],
      [{ type: "applied", events: "x" }, /"events"/],
      [{ type: "applied", events: Array.from({ length: MAX_APPLIED_BATCH + 1 }, () => rec) }, /1-100 records, got 101/],
      [{ type: "applied", events: [null] }, /\[0\] to be an object/],
      [{ type: "applied", events: [[rec]] }, /an array/],
      [{ type: "applied", events: [rec, { ...rec, seq: 42 }] }, /\[1\]\.seq/],
      [{ type: "applied", events: [{ ...rec, seq: "-1" }] }, /seq/],
      [{ type: "applied", events: [{ ...rec, seq: "1".repeat(21) }] }, /seq/],
      [{ type: "applied", events: [{ ...rec, ip: "192.0.2.010" }] }, /ip/],
      [{ type: "applied", events: [{ ...rec, ip: "<script>" }] }, /ip/],
      [{ type: "applied", events: [{ ...rec, rtMs: 1.5 }] }, /rtMs/],
      [{ type: "applied", events: [{ ...rec, rtMs: "12" }] }, /rtMs/],
      [{ type: "applied", events: [{ ...rec, rtMs: 2 * 24 * 3600 * 1000 }] }, /rtMs/],
      [{ type: "applied", events: [{ ...rec, rtMs: -3_600_000 }] }, /rtMs/],
      [{ type: "applied", events: [{ ...rec, at: NOW + 3_600_000 }] }, /at/],
      [{ type: "applied", events: [{ ...rec, at: 0 }] }, /at/],
    ];
    for (const [frame, re] of cases) {
      const r = ok(frame);
      assert.equal(r.ok, false, JSON.stringify(frame).slice(0, 200));
      if (r.ok) continue;
      assert.equal(r.code, "bad_frame");
      assert.match(r.message, re);
      assert.doesNotMatch(r.message, /\n/);
    }
  });

  test("applies the hub's prefix limits", () => {
    const r = parseNodeFrame(JSON.stringify({ ...ban, ip: "198.51.100.0/24" }), NOW, { v4: 32, v6: 64 });
    assert.equal(r.ok, false);
  });
});

describe("parseHubFrame(): an agent accepts only well-formed frames from the hub", () => {
  test("accepts the hub's frames and refuses malformed events", () => {
    const e = ev({ origin: "web1", detectedAt: NOW });
    assert.equal(parseHubFrame(JSON.stringify({ type: "event", ...e })).ok, true);
    assert.equal(parseHubFrame(JSON.stringify({ type: "sync", full: true, seq: "4", events: [e] })).ok, true);
    assert.equal(parseHubFrame(JSON.stringify({ type: "ack", id: "x", seq: "4" })).ok, true);
    assert.equal(parseHubFrame(JSON.stringify({ type: "event", ...e, ip: "-F" })).ok, false);
    assert.equal(parseHubFrame(JSON.stringify({ type: "event", ...e, ip: "203.0.113.07" })).ok, false);
    assert.equal(parseHubFrame(JSON.stringify({ type: "sync", full: true, seq: "4".repeat(65), events: [e] })).ok, false, "a seq the hub would refuse in our hello");
    assert.equal(parseHubFrame("{").ok, false);
    assert.equal(parseHubFrame(JSON.stringify({ type: "surprise" })).ok, false);
  });
});

describe("parseHubFrame(): a damaged sync entry costs only itself", () => {
  test("a sync frame keeps its valid events and says how many it dropped, and why", () => {
    const good = [ev({ origin: "web1", detectedAt: NOW }), ev({ origin: "web2", detectedAt: NOW, ip: "2001:db8::7" })];
    const bad = [{ ...good[0], kind: "drop" }, { ...good[0], ip: "-F" }, null, [1], { ...good[0], seq: 7 }, { ...good[0], until: "never" }];
    const r = parseHubFrame(JSON.stringify({ type: "sync", full: true, seq: "4", more: true, events: [bad[0], good[0], ...bad.slice(1), good[1]] }));
    assert.equal(r.ok, true);
    if (!r.ok || r.value.type !== "sync") return;
    assert.deepEqual(r.value.events, good);
    assert.equal(r.value.more, true);
    assert.equal(r.value.dropped?.count, bad.length);
    assert.match(r.value.dropped!.reasons.join("; "), /event kind "drop"; event ip "-F"; an event is not an object/);
    const clean = parseHubFrame(JSON.stringify({ type: "sync", full: false, seq: "4", events: good }));
    assert.ok(clean.ok && clean.value.type === "sync" && clean.value.dropped === undefined);
  });

  test("keeps at most MAX_DROPPED_REASONS reasons however many entries are dropped", () => {
    const r = parseHubFrame(JSON.stringify({ type: "sync", full: true, seq: "4", events: Array.from({ length: 1000 }, () => ({ kind: "x" })) }));
    assert.ok(r.ok && r.value.type === "sync");
    if (!r.ok || r.value.type !== "sync") return;
    assert.equal(r.value.events.length, 0);
    assert.equal(r.value.dropped?.count, 1000);
    assert.equal(r.value.dropped?.reasons.length, MAX_DROPPED_REASONS);
  });
});

describe("checkBannable(): the address rules the hub and the agent both run", () => {
  test("refuses the reserved 240.0.0.0/4 and every network around the special ranges, e.g. 128.0.0.0/1", () => {
    for (const s of ["240.0.0.1", "250.1.2.3", "240.0.0.0/4", "255.255.255.254", "128.0.0.0/1", "0.0.0.0/1", "0.1.2.3", "127.0.0.53", "ff00::/8", "ff05::2", "::/0", "fe80::/64"]) {
      assert.equal(checkBannable(s).ok, false, s);
    }
    assert.match((checkBannable("240.0.0.1") as { message: string }).message, /reserved range 240\.0\.0\.0\/4/);
    assert.match((checkBannable("255.255.255.255") as { message: string }).message, /broadcast/);
    assert.match((checkBannable("128.0.0.0/1", DEFAULT_MAX_PREFIX) as { message: string }).message, /overlaps the link-local range/);
    assert.match((checkBannable("100.0.0.0/8", DEFAULT_MAX_PREFIX) as { message: string }).message, /broader than \/32/);
  });

  test("NAT64 64:ff9b::/96: never the prefix or a network around it; inside, only what the embedded IPv4 ban would be", () => {
    for (const s of ["64:ff9b::/96", "64:ff9b::/64", "64:ff9b::/32", "::/1"]) {
      const r = checkBannable(s);
      assert.equal(r.ok, false, s);
    }
    assert.match((checkBannable("64:ff9b::/96") as { message: string }).message, /NAT64 prefix 64:ff9b::\/96, all of IPv4/);
    // 127.0.0.53, 224.0.0.1, 255.255.255.255 and 240.0.0.1 through the gateway.
    for (const s of ["64:ff9b::7f00:35", "64:ff9b::e000:1", "64:ff9b::ffff:ffff", "64:ff9b::f000:1"]) {
      const r = checkBannable(s, DEFAULT_MAX_PREFIX);
      assert.equal(r.ok, false, s);
      assert.match((r as { message: string }).message, /as the NAT64 form of/);
    }
    assert.equal(checkBannable("64:ff9b::cb00:7107", DEFAULT_MAX_PREFIX).ok, true, "203.0.113.7 through the gateway");
    assert.equal(checkBannable("64:ff9b::cb00:7100/120", DEFAULT_MAX_PREFIX).ok, false, "a /24 of IPv4 where IPv4 allows /32 only");
    assert.equal(checkBannable("64:ff9b::cb00:7100/120", { v4: 24, v6: 64 }).ok, true);
  });

  test("the hub refuses the same addresses in a node's ban frame", () => {
    for (const ip of ["240.0.0.1", "64:ff9b::/96", "64:ff9b::7f00:1", "128.0.0.0/1"]) {
      const r = parseNodeFrame(JSON.stringify({ type: "ban", id: "b1", ip, jail: "sshd", bantime: 60, detectedAt: NOW }), NOW, DEFAULT_MAX_PREFIX);
      assert.equal(r.ok, false, ip);
      assert.equal((r as { code: string }).code, "bad_ip");
    }
  });
});

describe("mergeClaim() and blockedUntil(): claims converge whatever the delivery order, and the latest live claim decides", () => {
  test("newest event per (ip, origin) wins whatever the delivery order; replays change nothing", () => {
    const events = [
      ev({ origin: "a", detectedAt: NOW }),
      ev({ origin: "a", detectedAt: NOW + 10, kind: "unban" }),
      ev({ origin: "b", detectedAt: NOW + 5, until: NOW + 900_000 }),
    ];
    const orders = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0, 0, 1]];
    for (const order of orders) {
      const claims: Claims = new Map();
      for (const i of order) mergeClaim(claims, events[i]);
      assert.equal(claims.get("203.0.113.7")!.get("a")!.kind, "unban", `order ${order}`);
      // a unbanned, b's claim still holds the address.
      assert.equal(blockedUntil(claims.get("203.0.113.7"), NOW + 20), NOW + 900_000, `order ${order}`);
    }
  });

  test("returns false for duplicates and older events, true for newer ones", () => {
    const claims: Claims = new Map();
    const first = ev({ origin: "a", detectedAt: NOW });
    assert.equal(mergeClaim(claims, first), true);
    assert.equal(mergeClaim(claims, first), false);
    assert.equal(mergeClaim(claims, ev({ origin: "a", detectedAt: NOW - 1, kind: "unban" })), false);
    assert.equal(mergeClaim(claims, { ...first, id: "zzz" }), true, "same time: the larger id wins");
  });

  test("the latest until among active claims decides; permanent beats any time", () => {
    const claims: Claims = new Map();
    mergeClaim(claims, ev({ origin: "a", detectedAt: NOW, until: NOW + 1000 }));
    mergeClaim(claims, ev({ origin: "b", detectedAt: NOW, until: NOW + 5000 }));
    assert.equal(blockedUntil(claims.get("203.0.113.7"), NOW), NOW + 5000);
    assert.equal(blockedUntil(claims.get("203.0.113.7"), NOW + 5000), undefined, "both expired");
    mergeClaim(claims, ev({ origin: "c", detectedAt: NOW, until: null }));
    assert.equal(blockedUntil(claims.get("203.0.113.7"), NOW + 10_000), null);
  });

  test("an admin unban lifts every older claim but not a newer one", () => {
    const claims: Claims = new Map();
    mergeClaim(claims, ev({ origin: "a", detectedAt: NOW }));
    mergeClaim(claims, ev({ origin: "b", detectedAt: NOW + 1 }));
    mergeClaim(claims, ev({ origin: ALL_ORIGINS, kind: "unban", detectedAt: NOW + 2 }));
    assert.equal(blockedUntil(claims.get("203.0.113.7"), NOW + 3), undefined);
    mergeClaim(claims, ev({ origin: "a", detectedAt: NOW + 3 }));
    assert.equal(blockedUntil(claims.get("203.0.113.7"), NOW + 4), NOW + 3 + 600_000);
  });

  test("a tombstone outlives the ban it cancels, so a late older ban cannot revive it", () => {
    const banUntil = NOW + 600_000;
    const tomb = eventUntil("unban", NOW + 10, undefined, banUntil);
    assert.equal(tomb, banUntil);
    assert.equal(eventUntil("unban", NOW, undefined, null)! > NOW + 86_400_000, true);
    assert.equal(eventUntil("ban", NOW, -1, undefined), null);
    assert.equal(eventUntil("ban", NOW, 60, undefined), NOW + 60_000);
    const claims: Claims = new Map();
    mergeClaim(claims, ev({ origin: "a", detectedAt: NOW + 10, kind: "unban", until: tomb }));
    pruneClaims(claims, NOW + 300_000);
    mergeClaim(claims, ev({ origin: "a", detectedAt: NOW }));
    assert.equal(blockedUntil(claims.get("203.0.113.7"), NOW + 300_000), undefined);
  });

  test("pruneClaims() drops ended bans and served tombstones and reports their addresses", () => {
    const claims: Claims = new Map();
    mergeClaim(claims, ev({ origin: "a", detectedAt: NOW, until: NOW + 1000 }));
    mergeClaim(claims, ev({ origin: "a", ip: "198.51.100.1", detectedAt: NOW, until: null }));
    assert.deepEqual(pruneClaims(claims, NOW + 1000), ["203.0.113.7"]);
    assert.deepEqual([...claims.keys()], ["198.51.100.1"]);
  });
});

describe("csvRow(): log rows have the documented columns, quoted where needed", () => {
  test("writes the documented columns with ISO times and quotes what needs it", () => {
    assert.equal(CSV_HEADER.split(",").length, 9);
    const row = csvRow({ time: NOW, node: "web2", action: "BLOCK", ip: "203.0.113.7", origin: "web1", jail: "sshd", until: null, rtMs: 12, detail: 'said "hi", twice' });
    assert.equal(row, `${new Date(NOW).toISOString()},web2,BLOCK,203.0.113.7,web1,sshd,never,12,"said ""hi"", twice"\n`);
  });
});

describe("enforcement frames", () => {
  const frame = { type: "enforcement", backend: "ipset", hooks: [{ name: "iptables INPUT", state: "present", since: NOW - 1000 }], entries: 3, claims: 3, drift: 0, missing: [], repairs: 1, lastRepair: { at: NOW - 500, what: "ipset flush" }, extra: "dropped" };

  test("parseNodeFrame() keeps only the known fields of a valid report", () => {
    const r = parseNodeFrame(JSON.stringify(frame), NOW);
    assert.ok(r.ok);
    const { extra: _extra, ...known } = frame;
    assert.deepEqual(r.value, known);
  });

  test("parseNodeFrame() refuses a report with unbounded or mistyped fields, in one sentence each", () => {
    const cases: Array<[object, RegExp]> = [
      [{ hooks: "INPUT" }, /"hooks"/],
      [{ hooks: Array.from({ length: 17 }, () => frame.hooks[0]) }, /at most 16 hooks/],
      [{ hooks: [{ name: "$(reboot)", state: "present" }] }, /name/],
      [{ hooks: [{ name: "INPUT", state: "on" }] }, /present, missing or absent/],
      [{ hooks: [{ name: "INPUT", state: "present", since: NOW + 3_600_000 }] }, /since/],
      [{ claims: -1 }, /"claims"/],
      [{ drift: 2e9 }, /"drift"/],
      [{ repairs: "1" }, /"repairs"/],
      [{ entries: null }, /"entries"/],
      [{ missing: ["x".repeat(201)] }, /"missing"/],
      [{ missing: "hook" }, /"missing"/],
      [{ lastRepair: { at: NOW, what: "" } }, /"lastRepair"/],
      [{ backend: "ip set" }, /"backend"/],
    ];
    for (const [over, re] of cases) {
      const r = parseNodeFrame(JSON.stringify({ ...frame, ...over }), NOW);
      assert.equal(r.ok, false, JSON.stringify(over));
      if (r.ok) continue;
      assert.equal(r.code, "bad_frame");
      assert.match(r.message, re);
      assert.doesNotMatch(r.message, /\n/);
    }
  });

  test("enforcementVerdict() says enforcing, hook missing since (the oldest), drift N, what is missing, or dry-run", () => {
    const base = { backend: "ipset", hooks: [], claims: 3, drift: 0, missing: [], repairs: 0 };
    assert.deepEqual(enforcementVerdict(base), { ok: true, text: "enforcing" });
    const hooks = [{ name: "ip6tables INPUT", state: "missing" as const, since: NOW }, { name: "iptables INPUT", state: "missing" as const, since: NOW - 1000 }, { name: "DOCKER-USER", state: "absent" as const }];
    assert.deepEqual(enforcementVerdict({ ...base, hooks, drift: 3 }), { ok: false, text: `hook missing since ${new Date(NOW - 1000).toISOString()} (iptables INPUT)` });
    assert.deepEqual(enforcementVerdict({ ...base, drift: 3 }), { ok: false, text: "drift 3" });
    assert.deepEqual(enforcementVerdict({ ...base, missing: ["banshare-v4 set"], missingSince: NOW }), { ok: false, text: `banshare-v4 set missing since ${new Date(NOW).toISOString()}` });
    assert.deepEqual(enforcementVerdict({ ...base, hooks: [hooks[2]] }), { ok: true, text: "enforcing" }, "an absent hook (no Docker) is no problem");
    assert.equal(enforcementVerdict({ ...base, backend: "dry-run" }).ok, false);
  });
});

describe("tlsProblem() and parseHandoffAnswer(): what ban.ts and the agent tell the operator", () => {
  test("a TLS failure names its cause and the option that fixes it; a network failure is none", () => {
    const url = "wss://127.0.0.1:7700";
    assert.match(tlsProblem({ code: "UNABLE_TO_VERIFY_LEAF_SIGNATURE", message: "unable to verify the first certificate" }, url)!, /not signed by a CA this side trusts \(UNABLE_TO_VERIFY_LEAF_SIGNATURE\): give --ca/);
    assert.match(tlsProblem({ code: "DEPTH_ZERO_SELF_SIGNED_CERT", message: "self-signed certificate" }, url)!, /give --ca/);
    assert.match(tlsProblem({ code: "ERR_TLS_CERT_ALTNAME_INVALID", message: "Hostname/IP does not match certificate's altnames: IP: 127.0.0.1 is not in the cert's list: " }, url)!, /does not cover 127\.0\.0\.1 .*gen-cert --host 127\.0\.0\.1/);
    assert.match(tlsProblem({ code: "CERT_HAS_EXPIRED", message: "certificate has expired" }, url)!, /expired/);
    assert.match(tlsProblem({ code: "ERR_SSL_WRONG_VERSION_NUMBER", message: "wrong version number" }, url)!, /does not speak TLS/);
    assert.equal(tlsProblem({ code: "ECONNREFUSED", message: "connect ECONNREFUSED 127.0.0.1:7700" }, url), undefined);
    assert.equal(tlsProblem({ code: "ETIMEDOUT", message: "timeout" }, url), undefined);
  });

  test("an agent's answer is taken only well-formed", () => {
    assert.deepEqual(parseHandoffAnswer('{"type":"queued","id":"a1","via":"spool","problem":"x"}'), { ok: true, value: { type: "queued", id: "a1", via: "spool", problem: "x" } });
    assert.deepEqual(parseHandoffAnswer('{"type":"queued","id":"a1","via":"hub","seq":"42"}'), { ok: true, value: { type: "queued", id: "a1", via: "hub", seq: "42" } });
    assert.deepEqual(parseHandoffAnswer('{"type":"error","id":"a1","code":"protected","message":"no"}'), { ok: true, value: { type: "error", id: "a1", code: "protected", message: "no" } });
    for (const bad of ["", "null", "[]", '{"type":"queued","id":"a 1","via":"hub"}', '{"type":"queued","id":"a1","via":"disk"}', '{"type":"queued","id":"a1","via":"hub","seq":"x"}', '{"type":"error","code":"NOT OK","message":"m"}', `{"type":"error","code":"x","message":"${"m".repeat(1001)}"}`]) {
      assert.equal(parseHandoffAnswer(bad).ok, false, bad);
    }
  });
});
