/**
 * Issue 4, "Trust nobody you did not enrol": hostile input against real processes.
 *
 * - In network namespaces (hub, two ipset agents, a fuzzer, a legitimate sender, an admin host
 *   and an ops host): thousands of seeded, invalid-by-construction frames from an enrolled node,
 *   crafted WebSocket frames, unauthenticated upgrades and odd HTTP requests, while another node's
 *   bans keep flowing to the agents' kernel sets; bans of protected, allowlisted and over-broad
 *   networks; addresses that try shell or argv injection.
 * - On loopback: the per-node rate limit, the reader role, token revocation on SIGHUP, the
 *   per-node connection limit and oversized frames; TLS with gen-cert (right CA, wrong CA, plain
 *   ws:// against the TLS port).
 *
 * The fuzzer's seed is FUZZ_SEED (default below; not BANSHARE_*, which the hub would take for a
 * flag); a failure prints it.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { request as httpsRequest } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { enrol, readCsv, rows, runBan, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, startTcpListener, tcpProbe, type Topology } from "./lib/netns.ts";
import { REPO_ROOT, spawnProc, stopAll, tsx, type Proc } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

const SEED = Number(process.env.FUZZ_SEED ?? 0x5ec0de);
const FUZZ_SESSIONS = 8;
const FRAMES_PER_SESSION = 500;
const MAX_FRAME = 16 * 1024;
const MAX_BANTIME_S = 10 * 365 * 24 * 3600;
/** The protocol's rules for ids and names (README), used to keep generated values invalid. */
const ID_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
const INJECTIONS = ["1.2.3.4; rm -rf /", "-F", "--flush", "1.2.3.4\n5.6.7.8", "$(reboot)", "`reboot`", "1.2.3.4 && reboot", "1.2.3.4|nc 10.0.0.1 9", `1.2.3.${"4".repeat(70_000)}`];

// ---------------------------------------------------------------------------------------------
// Seeded fuzzer: every frame it makes is invalid by construction (or out of order), so none may
// change the hub's state; `expect` is the error code when the construction decides it.

/** A frame as the driver sends it: text, or bytes (base64) sent as a binary or a text frame. */
interface Wire {
  text?: string;
  b64?: string;
  binary?: boolean;
  cat: string;
  expect?: string;
}

/** A JSON token JSON.stringify cannot produce (NaN, 0x10, ...), spliced in by `encode`. */
class Raw {
  constructor(readonly text: string) {}
}

function encode(v: unknown): string {
  const raws: string[] = [];
  const s = JSON.stringify(v, (_k, x) => (x instanceof Raw ? `__RAW_${raws.push(x.text) - 1}__` : x));
  return s.replace(/"__RAW_(\d+)__"/g, (_, i: string) => raws[Number(i)]);
}

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface FuzzContext {
  now: number;
  hubId: string;
  self: string;
  /** Addresses the hub protects: a ban of one is refused, an unban of one is valid. */
  protectedIps: string[];
}

function makeFuzzer(seed: number, ctx: FuzzContext) {
  const rnd = mulberry32(seed);
  const int = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1));
  const pick = <T>(a: readonly T[]): T => a[Math.floor(rnd() * a.length)];
  const chance = (p: number) => rnd() < p;
  const { now } = ctx;
  const id = () => `fz-${int(0, 2 ** 30).toString(36)}`;
  const publicIp = () => pick([`203.0.113.${int(1, 254)}`, `198.51.100.${int(1, 254)}`, `2001:db8:${int(0, 65535).toString(16)}::${int(1, 65535).toString(16)}`, `192.0.2.${int(0, 255)}/32`]);
  const deep = (d: number) => new Raw(chance(0.5) ? "[".repeat(d) + "]".repeat(d) : '{"a":'.repeat(d) + "1" + "}".repeat(d));
  const nonString = () => pick<unknown>([null, true, false, [], {}, ["x"], { x: 1 }, new Raw("NaN"), new Raw("Infinity"), new Raw("-Infinity"), new Raw("undefined"), new Raw("0x10"), new Raw("+1"), new Raw("01"), new Raw(".5"), new Raw("'x'"), deep(int(2, 3000))]);
  const junk = () =>
    pick([
      "", " ", "\t", "\u0000", "\n", "\r\n", "\ud800", "\udfff\ud800", "\u202e", "１２３", "ｓｓｈｄ", "𝟙.𝟚.𝟛.𝟜", "🙂", "é", "a\u00a0b",
      "a".repeat(int(65, 3000)), "%s%s%n", "${jndi:ldap://x/a}", "'; DROP TABLE bans; --", "<script>alert(1)</script>", "../../../etc/passwd",
      "\\", '"', "'", "a b", "$(reboot)", "`reboot`", "; rm -rf /", "| nc 1.2.3.4 9", "&& reboot", "-F", "--flush", "-", "__proto__", "null", "NaN", "0", "-1",
    ]);
  /** A string the rule `re` refuses, or a value that is not a string at all. */
  const badString = (re: RegExp): unknown => {
    if (chance(0.35)) return nonString();
    for (;;) {
      const s = junk();
      if (!re.test(s)) return s;
    }
  };
  const BAD_IPS = [
    "", " ", "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n", ...INJECTIONS.slice(0, 8), "-X", "1.2.3.4,5.6.7.8", "1.2.3.4/33", "1.2.3.4/-1", "1.2.3.4/", "1.2.3.4/24/24", "1.2.3.4/0x18",
    "1.2.3.256", "1.2.3", "1.2.3.4.5", "01.2.3.4", "0x7f.1", "2130706433", "::g", "1::2::3", "fe80::1%eth0", "1.2.3.4%eth0", "127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1",
    "0.0.0.0", "0.0.0.0/0", "::", "::/0", "224.0.0.1", "ff02::1", "169.254.169.254", "fe80::1", "255.255.255.255", "10.0.0.0/8", "128.0.0.0/1", "2001:db8::/32", "2000::/3",
    "１.２.３.４", "𝟙.𝟚.𝟛.𝟜", "1.2.3.4\u0000", "localhost", "example.com", "1".repeat(int(65, 5000)),
  ];
  const badIp = (kind: string): { v: unknown; expect?: string } => {
    if (kind === "ban" && chance(0.15)) return { v: pick(ctx.protectedIps), expect: "protected" };
    return chance(0.2) ? { v: nonString() } : { v: pick(BAD_IPS) };
  };
  const badType = () => pick<unknown>(["BAN", "Ban", " ban", "ban ", "bans", "", "event", "ack", "welcome", "error", "sync", "unban\u0000", "hello\n", "__proto__", "constructor", null, 1, true, ["ban"], { $eq: "ban" }]);

  const templates = {
    ban: () => ({ type: "ban", id: id(), ip: publicIp(), jail: pick(["sshd", "recidive", "nginx-http-auth"]), bantime: pick([60, 600, 3600, -1]), detectedAt: now - int(0, 3_600_000) }),
    unban: () => ({ type: "unban", id: id(), ip: publicIp(), jail: "sshd", detectedAt: now - int(0, 3_600_000) }),
    hello: () => ({ type: "hello", v: 1, node: ctx.self, ...(chance(0.5) ? { want: "events" } : {}) }),
  };
  type Frame = Record<string, unknown>;
  /** One invalid value (or a deletion) for `field` of a `kind` frame. */
  const badField = (kind: string, field: string): { v: unknown; del?: boolean; expect?: string } => {
    switch (field) {
      case "type":
        return chance(0.2) ? { v: undefined, del: true } : { v: badType() };
      case "id":
        return chance(0.15) ? { v: undefined, del: true } : { v: badString(ID_RE) };
      case "ip":
        return chance(0.1) ? { v: undefined, del: true } : badIp(kind);
      case "jail":
      case "node":
        return field === "jail" && chance(0.15) ? { v: undefined, del: true } : { v: badString(NAME_RE) };
      case "bantime":
        if (chance(0.15)) return { v: undefined, del: true };
        return { v: chance(0.25) ? pick<unknown>(["600", "-1", "1e3", nonString()]) : pick([0, -2, -3600, 0.5, 599.5, MAX_BANTIME_S + 1, 2 ** 53, 1e21, -1e21, Number.MAX_VALUE, new Raw("1e999")]) };
      case "detectedAt":
        if (chance(0.15)) return { v: undefined, del: true };
        return { v: chance(0.25) ? pick<unknown>([String(now), "1700000000000", nonString()]) : pick([0, -1, -now, now + 3_600_000, now + 1e9, now + 0.5, 1.5, 2 ** 53, 1e21, Number.MAX_VALUE, new Raw("1e999")]) };
      case "all": {
        const v = pick<unknown>([null, 0, 1, "true", "false", "yes", [], {}, [true], true]);
        return { v, expect: v === true ? "forbidden" : "bad_frame" };
      }
      case "v":
        return chance(0.2) ? { v: undefined, del: true } : { v: pick<unknown>([0, 2, -1, 1.5, 100, 2 ** 53, "1", null, true, [1], {}, new Raw("1e999")]) };
      case "want":
        return { v: chance(0.4) ? nonString() : pick(["event", "Events", "EVENTS", "", "all", "events "]) };
      case "cursor":
        return { v: pick<unknown>([null, "x", 1, true, [], {}, { hub: 1, seq: "1" }, { hub: "x", seq: 1 }, { hub: "x".repeat(65), seq: "1" }, { hub: "x", seq: "1".repeat(65) }, { hub: "x" }, { seq: "1" }, [{ hub: "x", seq: "1" }]]) };
    }
    throw new Error(`no mutation for ${field}`);
  };
  /** Fields whose invalid value (or absence) makes a frame of that kind invalid. */
  const FIELDS: Record<string, string[]> = {
    ban: ["type", "id", "ip", "jail", "bantime", "detectedAt"],
    unban: ["type", "id", "ip", "jail", "detectedAt", "all"],
    hello: ["type", "v", "node", "want", "cursor"],
  };
  const mutateFields = (): { frame: Frame; expect?: string } => {
    const kind = pick(["ban", "ban", "unban", "hello"] as const);
    const frame: Frame = templates[kind]();
    const fields = [...FIELDS[kind]].sort(() => rnd() - 0.5).slice(0, int(1, 3));
    let expect: string | undefined;
    for (const f of fields) {
      const m = badField(kind, f);
      if (m.del) delete frame[f];
      else frame[f] = m.v;
      // Only a single mutation decides the code; with several, which one is reported first is the hub's business.
      if (fields.length === 1 && m.expect) expect = m.expect;
    }
    if (fields.includes("type")) expect = undefined;
    if (kind === "hello" && fields.length === 1 && fields[0] === "v") expect = "version";
    return { frame, expect };
  };
  const anyTemplate = () => pick(["ban", "unban", "hello"] as const);

  /** One invalid frame. */
  const fuzzFrame = (): Wire => {
    const r = rnd();
    if (r < 0.34) {
      const { frame, expect } = mutateFields();
      return { text: encode(frame), cat: "field", expect };
    }
    if (r < 0.44) {
      const t = encode(templates[anyTemplate()]());
      return { text: t.slice(0, int(0, t.length - 1)), cat: "truncated", expect: "bad_frame" };
    }
    if (r < 0.5) {
      const t = encode(templates[anyTemplate()]());
      return chance(0.5)
        ? { text: t + pick(["x", "}", "]", ",", "{", '"', "\u0000", "/*", ",{}", "{}", "null"]), cat: "trailing", expect: "bad_frame" }
        : { text: pick(["x", "\ufeff", ")]}'\n", "[", ",", "\u0000", "//\n"]) + t, cat: "leading", expect: "bad_frame" };
    }
    if (r < 0.57) {
      const t = encode(templates[anyTemplate()]());
      const d = int(1, 4000);
      return { text: pick([`[${t}]`, JSON.stringify(t), "null", "true", "false", "0", "-1", "1e999", '"ban"', "[]", "[".repeat(d) + t + "]".repeat(d), `"${"x".repeat(int(1, 3000))}"`]), cat: "not-object", expect: "bad_frame" };
    }
    if (r < 0.62) {
      const frame: Frame = templates[anyTemplate()]();
      const m = badField(String(frame.type), "type");
      if (m.del) delete frame.type;
      else frame.type = m.v;
      return { text: encode(frame), cat: "type", expect: "bad_frame" };
    }
    if (r < 0.7) {
      // A duplicated key: JSON.parse keeps the last one, which is invalid.
      const kind = pick(["ban", "unban", "hello"] as const);
      const t = encode(templates[kind]());
      const field = pick(FIELDS[kind].filter((f) => f !== "all" && f !== "cursor" && f !== "want"));
      const m = badField(kind, field);
      return { text: `${t.slice(0, -1)},${JSON.stringify(field)}:${m.del ? "null" : encode(m.v === undefined ? null : m.v)}}`, cat: "duplicate-key" };
    }
    if (r < 0.76) {
      const bytes = chance(0.5) ? Buffer.from(encode(templates[anyTemplate()]())) : randomBytesFrom(rnd, int(0, 2000));
      return { b64: bytes.toString("base64"), binary: true, cat: "binary", expect: "bad_frame" };
    }
    if (r < 0.8) {
      const frame: Frame = templates[anyTemplate()]();
      const pad = "x".repeat(int(MAX_FRAME + 1, 60_000));
      if (chance(0.5)) frame.pad = pad;
      else frame[pick(["id", "ip", "jail"])] = pad;
      return { text: encode(frame), cat: "oversized", expect: "too_big" };
    }
    if (r < 0.9) {
      // Noise the hub must ignore (unknown fields, __proto__) around an invalid frame.
      const { frame, expect } = mutateFields();
      const t = encode(frame);
      const noise = pick(['"__proto__":{"type":"ban","role":"admin"},', '"constructor":{"prototype":{"admin":true}},', '"role":"admin","node":"web",', '"all":false,"x":[1,2,3],']);
      return { text: `{${noise}${t.slice(1)}`, cat: "noise", expect: t.startsWith('{"type"') ? expect : undefined };
    }
    let s = "";
    const n = int(0, 400);
    for (let i = 0; i < n; i++) s += String.fromCodePoint(pick([int(0x20, 0x7e), int(0, 0x1f), int(0xa0, 0x2fff), int(0x1f300, 0x1f6ff)]));
    return { text: s.trimStart().startsWith("{") ? "x" + s : s, cat: "garbage", expect: "bad_frame" };
  };

  /** A valid ban or unban, sent before hello: refused as not_hello. */
  const early = (): Wire => ({ text: encode(templates[pick(["ban", "unban"] as const)]()), cat: "before-hello", expect: "not_hello" });
  /** A valid hello after the first one: refused. */
  const secondHello = (): Wire => ({ text: encode(templates.hello()), cat: "second-hello", expect: "bad_frame" });
  /** A valid first hello, plain or odd (cursors that resume from nowhere, unknown fields): accepted. */
  const hello = (i: number): Wire => {
    const odd: Frame[] = [
      { type: "hello", v: 1 },
      { type: "hello", v: 1, node: ctx.self, want: "events" },
      { type: "hello", v: 1, want: "events", cursor: { hub: "x".repeat(64), seq: "9".repeat(64) } },
      { type: "hello", v: 1, want: "events", cursor: { hub: ctx.hubId, seq: "0000000000000000000000000001" } },
      { type: "hello", v: 1, want: "events", cursor: { hub: ctx.hubId, seq: "99999999999999999999" } },
      { type: "hello", v: 1, want: "events", cursor: { hub: ctx.hubId, seq: "-5" } },
      { type: "hello", v: 1, want: "events", cursor: { hub: "", seq: "" }, extra: { nested: [1, { a: null }] } },
      { type: "hello", v: 1, id: "<script>", ip: "0.0.0.0/0", role: "admin", all: true },
    ];
    return { text: encode(odd[i % odd.length]), cat: "hello" };
  };
  return { fuzzFrame, early, secondHello, hello, int, chance };
}

function randomBytesFrom(rnd: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rnd() * 256);
  return b;
}

// ---------------------------------------------------------------------------------------------
// The driver: a dumb player that runs inside the fuzzer's namespace, plays a plan of sessions
// (WebSocket ones, raw TCP ones with crafted WebSocket frames or HTTP requests) and writes what
// came back. A second connection publishes legitimate bans between the sessions.

const DRIVER_JS = String.raw`
const fs = require('node:fs');
const net = require('node:net');
const crypto = require('node:crypto');
const { createRequire } = require('node:module');
const plan = JSON.parse(fs.readFileSync(process.argv[1], 'utf8'));
const WebSocket = createRequire(plan.repo + '/package.json')('ws');
const url = 'ws://' + plan.host + ':' + plan.port;
const bytes = (f) => (f.b64 !== undefined ? Buffer.from(f.b64, 'base64') : f.text);

function wsSession(s) {
  return new Promise((resolve) => {
    const r = { name: s.name, kind: 'ws', sent: 0, errors: [], acks: 0, welcomes: 0, other: [], close: null, status: null, error: null, end: null };
    const headers = s.auth === undefined ? {} : { authorization: s.auth };
    const ws = new WebSocket(url, { headers, perMessageDeflate: false, maxPayload: 256 << 20, handshakeTimeout: 10000 });
    let done = false;
    // A snapshot: what arrives after the end (the close that terminate() causes) is not part of the answer.
    const finish = (why) => { if (done) return; done = true; clearTimeout(timer); r.end = why; resolve(JSON.parse(JSON.stringify(r))); ws.terminate(); };
    const timer = setTimeout(() => finish('timeout'), 30000);
    const check = () => { if (s.until === 'errors' && r.errors.length >= s.frames.length - 1) finish('answered'); };
    ws.on('unexpected-response', (_q, res) => { r.status = res.statusCode; finish('status'); });
    ws.on('error', (e) => { r.error = e.message; });
    ws.on('close', (code, reason) => { r.close = { code, reason: String(reason) }; finish('closed'); });
    ws.on('message', (d) => {
      let f;
      try { f = JSON.parse(String(d)); } catch { r.other.push('not-json'); return; }
      if (f.type === 'error') r.errors.push([f.code, f.message]);
      else if (f.type === 'ack') r.acks++;
      else if (f.type === 'welcome') r.welcomes++;
      else r.other.push(f.type);
      check();
    });
    ws.on('open', () => {
      if (s.until === 'open') { r.status = 101; return finish('open'); }
      for (const f of s.frames) { ws.send(bytes(f), { binary: !!f.binary }); r.sent++; }
      check();
    });
  });
}

function wsFrame(f) {
  const p = f.b64 !== undefined ? Buffer.from(f.b64, 'base64') : Buffer.from(f.text || '');
  const n = f.len !== undefined ? f.len : p.length;
  const mask = f.mask !== false;
  const head = [((f.fin === false ? 0 : 0x80) | ((f.rsv || 0) << 4) | f.op)];
  let ext = Buffer.alloc(0);
  if (n < 126) head.push((mask ? 0x80 : 0) | n);
  else if (n < 65536) { head.push((mask ? 0x80 : 0) | 126); ext = Buffer.alloc(2); ext.writeUInt16BE(n); }
  else { head.push((mask ? 0x80 : 0) | 127); ext = Buffer.alloc(8); ext.writeBigUInt64BE(BigInt(n)); }
  const key = mask ? crypto.randomBytes(4) : Buffer.alloc(0);
  const body = mask ? Buffer.from(p.map((b, i) => b ^ key[i % 4])) : p;
  return Buffer.concat([Buffer.from(head), ext, key, body]);
}

function serverFrames(buf) {
  const out = [];
  let i = 0;
  while (i + 2 <= buf.length) {
    const op = buf[i] & 0x0f;
    let n = buf[i + 1] & 0x7f;
    let j = i + 2;
    if (n === 126) { if (j + 2 > buf.length) break; n = buf.readUInt16BE(j); j += 2; }
    else if (n === 127) { if (j + 8 > buf.length) break; n = Number(buf.readBigUInt64BE(j)); j += 8; }
    if (j + n > buf.length) break;
    const p = buf.subarray(j, j + n);
    out.push(op === 8 ? { op, code: p.length >= 2 ? p.readUInt16BE(0) : null } : { op, text: p.toString('utf8').slice(0, 300) });
    i = j + n;
  }
  return out;
}

function rawSession(s) {
  return new Promise((resolve) => {
    const r = { name: s.name, kind: 'raw', statusLine: null, head: '', frames: [], end: null, error: null };
    let buf = Buffer.alloc(0);
    let upgraded = false;
    const sock = net.connect({ host: plan.host, port: plan.port });
    let done = false;
    const finish = (why) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      r.end = why;
      const text = buf.toString('latin1');
      r.statusLine = text.length ? text.split('\r\n')[0] : null;
      const h = text.indexOf('\r\n\r\n');
      r.head = text.slice(0, h < 0 ? 300 : Math.min(h, 300));
      if (upgraded && h >= 0) r.frames = serverFrames(buf.subarray(h + 4));
      sock.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => finish('timeout'), 15000);
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (buf.length > 1 << 20) return finish('too-much');
      const text = buf.toString('latin1');
      if (s.frames && !upgraded && /^HTTP\/1\.1 101 /.test(text) && text.includes('\r\n\r\n')) {
        upgraded = true;
        for (const f of s.frames) sock.write(wsFrame(f));
      }
      if (upgraded && s.until === 'error') {
        const h = text.indexOf('\r\n\r\n');
        if (serverFrames(buf.subarray(h + 4)).some((f) => f.op === 1 && /"type":"error"/.test(f.text))) finish('answered');
      }
    });
    sock.on('error', (e) => { r.error = e.code || e.message; });
    sock.on('close', () => finish('closed'));
    sock.on('connect', () => {
      const req = Buffer.from(s.request, s.requestEncoding || 'latin1');
      if (s.frames) sock.write(req);
      else sock.end(req);
    });
  });
}

function legitClient() {
  const ws = new WebSocket(url, { headers: { authorization: 'Bearer ' + plan.legitToken }, perMessageDeflate: false });
  const res = { sent: [], acked: [], errors: [] };
  let ready;
  const welcomed = new Promise((r) => (ready = r));
  ws.on('open', () => ws.send(JSON.stringify({ type: 'hello', v: 1 })));
  ws.on('error', (e) => res.errors.push('socket: ' + e.message));
  ws.on('message', (d) => {
    const f = JSON.parse(String(d));
    if (f.type === 'welcome') ready();
    else if (f.type === 'ack') res.acked.push(f.id);
    else if (f.type === 'error') res.errors.push(f.code + ': ' + f.message);
  });
  return {
    welcomed,
    res,
    ban(ip) {
      const id = 'legit-' + res.sent.length;
      res.sent.push(ip);
      ws.send(JSON.stringify({ type: 'ban', id, ip, jail: 'sshd', bantime: 3600, detectedAt: Date.now() }));
    },
    async settle() {
      const end = Date.now() + 20000;
      while (res.acked.length + res.errors.length < res.sent.length && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      ws.close();
    },
  };
}

(async () => {
  const legit = legitClient();
  await legit.welcomed;
  console.log('storm');
  const results = [];
  const every = Math.max(1, Math.floor(plan.sessions.length / Math.max(1, plan.legitIps.length)));
  let next = 0;
  for (let i = 0; i < plan.sessions.length; i++) {
    if (i % every === 0 && next < plan.legitIps.length) legit.ban(plan.legitIps[next++]);
    const s = plan.sessions[i];
    results.push(s.kind === 'raw' ? await rawSession(s) : await wsSession(s));
  }
  while (next < plan.legitIps.length) legit.ban(plan.legitIps[next++]);
  await legit.settle();
  fs.writeFileSync(plan.out, JSON.stringify({ sessions: results, legit: legit.res }));
  console.log('done');
})().catch((e) => { console.error(e.stack); process.exit(1); });
`;

interface WsResult {
  name: string;
  kind: "ws";
  sent: number;
  errors: Array<[string, string]>;
  acks: number;
  welcomes: number;
  other: string[];
  close: { code: number; reason: string } | null;
  status: number | null;
  error: string | null;
  end: string;
}
interface RawResult {
  name: string;
  kind: "raw";
  statusLine: string | null;
  head: string;
  frames: Array<{ op: number; code?: number | null; text?: string }>;
  end: string;
  error: string | null;
}
type SessionResult = WsResult | RawResult;

/** What a test expects of a session, checked after the run. */
interface Session {
  name: string;
  kind: "ws" | "raw";
  /** ws: the Authorization header (undefined: none). */
  auth?: string;
  frames?: Array<Wire | Record<string, unknown>>;
  /** ws: finish when every frame but the hello got an error, on close, or once open. raw: on an error frame. */
  until?: "errors" | "close" | "open" | "error";
  request?: string;
  check: (r: any) => void;
}

/** Plays `sessions` from the fuzzer's namespace while `legitIps` are banned by node web; returns the results. */
async function runDriver(topo: Topology, dir: string, hubIp: string, tokens: { legit: string }, sessions: Session[], legitIps: string[], onStorm?: () => void): Promise<{ results: SessionResult[]; legit: { sent: string[]; acked: string[]; errors: string[] } }> {
  const planFile = join(dir, `plan-${randomBytes(3).toString("hex")}.json`);
  const out = `${planFile}.out`;
  const plain = sessions.map(({ check: _c, ...s }) => s);
  await writeFile(planFile, JSON.stringify({ repo: REPO_ROOT, host: hubIp, port: 7700, legitToken: tokens.legit, legitIps, sessions: plain, out }), { mode: 0o600 });
  const p = spawnProc(process.execPath, ["-e", DRIVER_JS, planFile], { netns: topo.ns("fuzzer"), name: "fuzz-driver" });
  await p.waitForLine(/^storm$/, 20_000);
  onStorm?.();
  await p.waitForLine(/^done$/, 120_000);
  await p.closed;
  const parsed = JSON.parse(readFileSync(out, "utf8"));
  for (let i = 0; i < sessions.length; i++) {
    try {
      sessions[i].check(parsed.sessions[i]);
    } catch (e) {
      (e as Error).message += `\nsession ${sessions[i].name} (seed ${SEED}): ${JSON.stringify(parsed.sessions[i]).slice(0, 3000)}`;
      throw e;
    }
  }
  return { results: parsed.sessions, legit: parsed.legit };
}

/** Refusals by reason from the hub's /metrics text. */
function refusedByReason(metrics: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const m of metrics.matchAll(/^banshare_refused_total\{reason="([^"]+)"\} (\d+)$/gm)) out[m[1]] = Number(m[2]);
  return out;
}

function delta(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of new Set([...Object.keys(after), ...Object.keys(before)])) {
    const d = (after[k] ?? 0) - (before[k] ?? 0);
    if (d) out[k] = d;
  }
  return out;
}

function countBy<T>(items: T[], key: (t: T) => string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const i of items) out[key(i)] = (out[key(i)] ?? 0) + 1;
  return out;
}

const oneLine = (s: string) => assert.doesNotMatch(s, /[\r\n]/, `not one line: ${JSON.stringify(s).slice(0, 200)}`);

// ---------------------------------------------------------------------------------------------

describe("hostile input against a hub and two ipset agents in network namespaces", needs(["root", "netns", "ipv6", "ipset", "iptables", "ip6tables"], "security: namespaces"), () => {
  const PORT = 2222;
  const AGENTS = ["a1", "a2"];
  let topo: Topology;
  let dir: string;
  let hub: HubProc;
  let tokens: Record<string, string>;
  const agents: Record<string, Proc> = {};
  const csv = (n: string) => join(dir, `${n}.csv`);
  const token = (n: string) => readFileSync(tokens[n], "utf8").trim();
  const hubUrl = () => `ws://${topo.ip("hub")}:7700`;

  /** GET a path of the hub from inside the fuzzer's namespace. */
  const hubGet = async (path: string) => {
    const r = await topo.exec("fuzzer", process.execPath, ["-e", "fetch(process.argv[1]).then(async (r) => process.stdout.write(await r.text()))", `http://${topo.ip("hub")}:7700${path}`]);
    return String(r.stdout);
  };
  const healthz = async () => JSON.parse(await hubGet("/healthz")) as { hub: string; seq: string; claims: number; nodes: number };
  /** The addresses in an agent's ipset sets. */
  const members = async (n: string) => {
    const out: string[] = [];
    for (const set of ["banshare-v4", "banshare-v6"]) {
      const r = await topo.exec(n, "ipset", ["list", set, "-output", "save"]);
      for (const line of String(r.stdout).split("\n")) {
        const m = /^add \S+ (\S+)/.exec(line);
        if (m) out.push(m[1]);
      }
    }
    return out.sort();
  };
  const kernel = async () => Object.fromEntries(await Promise.all(AGENTS.map(async (n) => [n, await members(n)] as const)));
  /** ban.ts as node web, from web's namespace. */
  const ban = async (...args: string[]) => {
    const p = tsx("ban.ts", [...args, "--hub", hubUrl(), "--token-file", tokens.web, "--spool", join(dir, "web-spool"), "--timeout", "5"], { netns: topo.ns("web"), name: `ban ${args[1]}` });
    const info = await p.closed;
    return { code: info.code, output: p.output() };
  };
  const reachable = (from: string, to: string) => tcpProbe(topo, from, to, PORT, 2000);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-security-"));
    topo = await createTopology(["hub", ...AGENTS, "fuzzer", "web", "admin", "ops"], { prefix: "bssec", subnet: 91 });
    tokens = await enrol(dir, [["fuzz", "node"], ["web", "node"], ["a1", "node"], ["a2", "node"]]);
    hub = await startHubProc(
      ["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--csv", csv("hub"), "--listen", `${topo.ip("hub")}:7700`, "--heartbeat", "5", "--max-prefix-v4", "24", "--protect", `${topo.ip("admin")}/32`, "--protect", "192.0.2.0/24"],
      { netns: topo.ns("hub") },
    );
    for (const n of AGENTS) {
      await startTcpListener(topo, n, PORT);
      agents[n] = await startAgentProc(n, ["--hub", hubUrl(), "--token-file", tokens[n], "--backend", "ipset", "--csv", csv(n), "--allow", `${topo.ip("ops")}/32`, "--heartbeat", "5"], { netns: topo.ns(n) });
    }
    // Something in the sets already, so "unchanged" means something.
    const seeded = await ban("ban", "198.51.100.77", "--bantime", "3600");
    assert.equal(seeded.code, 0, seeded.output);
    for (const n of AGENTS) await waitFor(async () => (await members(n)).includes("198.51.100.77"), `the seed ban in ${n}'s set`);
  });

  after(async () => {
    for (const p of Object.values(agents)) await p.stop("SIGTERM", 5000);
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("a storm of invalid frames, crafted WebSocket frames and unauthenticated requests changes nothing, while another node's bans keep flowing", async (t) => {
    const fuzz = makeFuzzer(SEED, { now: Date.now(), hubId: (await healthz()).hub, self: "fuzz", protectedIps: [topo.ip("hub"), topo.ip6("hub"), topo.ip("admin"), `::ffff:${topo.ip("hub")}`, `${topo.ip("admin")}/30`, `10.91.0.0/24`, "192.0.2.9", "192.0.2.128/25"] });
    const fuzzAuth = `Bearer ${token("fuzz")}`;
    const sessions: Session[] = [];
    const fuzzed: Wire[] = [];

    // Sessions of pipelined invalid frames: some before hello, the hello, then the rest.
    for (let i = 0; i < FUZZ_SESSIONS; i++) {
      // Before hello, a frame that parses is refused as not_hello whatever else is wrong with it.
      const pre = Array.from({ length: fuzz.int(5, 60) }, () => (fuzz.chance(0.3) ? fuzz.early() : fuzz.fuzzFrame())).map((w) => (w.expect === "protected" || w.expect === "forbidden" ? { ...w, expect: "not_hello" } : w));
      const post = Array.from({ length: FRAMES_PER_SESSION - pre.length }, () => (fuzz.chance(0.03) ? fuzz.secondHello() : fuzz.fuzzFrame()));
      const frames = [...pre, fuzz.hello(i), ...post];
      const sent = [...pre, ...post];
      fuzzed.push(...sent);
      sessions.push({
        name: `fuzz-${i}`,
        kind: "ws",
        auth: fuzzAuth,
        frames,
        until: "errors",
        check: (r: WsResult) => {
          assert.equal(r.end, "answered", "the hub closed the connection or stopped answering");
          assert.equal(r.welcomes, 1);
          assert.equal(r.acks, 0, "an invalid frame was acked");
          assert.equal(r.errors.length, sent.length, "not one error frame per invalid frame");
          assert.deepEqual(r.other.filter((o) => o !== "sync" && o !== "event"), []);
          r.errors.forEach(([code, message], k) => {
            const w = sent[k];
            if (w.expect) assert.equal(code, w.expect, `frame ${k} (${w.cat}): ${(w.text ?? w.b64 ?? "").slice(0, 200)} -> ${message}`);
            assert.ok(["bad_frame", "bad_ip", "version", "not_hello", "forbidden", "protected", "too_big"].includes(code), code);
            oneLine(message);
            assert.ok(message.length > 10 && message.length < 400, `unclear or unbounded message: ${message.slice(0, 500)}`);
          });
        },
      });
    }

    // Frames that end the connection.
    const text = (s: string): Wire => ({ text: s, cat: "close" });
    const hello = JSON.stringify({ type: "hello", v: 1 });
    const closers: Array<[string, Wire[], number, string?]> = [
      ["hello as another node (web)", [text(JSON.stringify({ type: "hello", v: 1, node: "web" }))], 1008, "forbidden"],
      ["hello as another node (a1)", [text(JSON.stringify({ type: "hello", v: 1, node: "a1", want: "events" }))], 1008, "forbidden"],
      ["text frame over 1 MiB", [text(hello), text(JSON.stringify({ type: "ban", pad: "x".repeat(1_200_000) }))], 1009],
      ["binary frame over 1 MiB", [text(hello), { b64: Buffer.alloc(3 << 20, 7).toString("base64"), binary: true, cat: "close" }], 1009],
      ["invalid UTF-8 after hello", [text(hello), { b64: Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0xc0, 0xaf, 0x22, 0x7d]).toString("base64"), cat: "close" }], 1007],
      ["invalid UTF-8 before hello", [{ b64: Buffer.from([0xed, 0xa0, 0x80]).toString("base64"), cat: "close" }], 1007],
    ];
    for (const [name, frames, code, error] of closers) {
      fuzzed.push(...frames.filter((f) => f.text !== hello));
      sessions.push({
        name,
        kind: "ws",
        auth: fuzzAuth,
        frames,
        until: "close",
        check: (r: WsResult) => {
          assert.equal(r.end, "closed");
          assert.equal(r.close?.code, code);
          assert.equal(r.acks, 0);
          if (error) assert.deepEqual(r.errors.map((e) => e[0]), [error]);
        },
      });
    }

    // Hand-made WebSocket frames over a raw socket, after a proper upgrade and hello.
    const upgrade = (auth?: string, extra = "") =>
      `GET / HTTP/1.1\r\nHost: ${topo.ip("hub")}:7700\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${randomBytes(16).toString("base64")}\r\nSec-WebSocket-Version: 13\r\n${auth ? `Authorization: ${auth}\r\n` : ""}${extra}\r\n`;
    const helloFrame = { op: 1, text: hello };
    const padded = JSON.stringify({ type: "ban", id: "frag", ip: "203.0.113.250", jail: "sshd", bantime: 60, detectedAt: Date.now(), pad: "y".repeat(20_000) });
    const crafted: Array<[string, Array<Record<string, unknown>>, number | "too_big"]> = [
      ["unmasked client frame", [{ op: 1, text: hello, mask: false }], 1002],
      ["reserved opcode 3", [helloFrame, { op: 3, text: "x" }], 1002],
      ["RSV1 set without an extension", [helloFrame, { op: 1, text: "{}", rsv: 4 }], 1002],
      ["ping with a 126-byte payload", [helloFrame, { op: 9, text: "p".repeat(126) }], 1002],
      ["fragmented ping", [helloFrame, { op: 9, text: "p", fin: false }], 1002],
      ["continuation without a start", [helloFrame, { op: 0, text: "{}" }], 1002],
      ["close with code 999", [helloFrame, { op: 8, b64: Buffer.from([0x03, 0xe7]).toString("base64") }], 1002],
      ["claimed length 2^40", [helloFrame, { op: 1, len: 2 ** 40, text: "" }], 1009],
      ["claimed length 2^62", [helloFrame, { op: 2, len: 2 ** 62, text: "" }], 1009],
      ["text fragments adding up to over 16 KiB", [helloFrame, { op: 1, fin: false, text: padded.slice(0, 8000) }, { op: 0, fin: false, text: padded.slice(8000, 16000) }, { op: 0, text: padded.slice(16000) }], "too_big"],
    ];
    for (const [name, frames, want] of crafted) {
      fuzzed.push(...frames.filter((f) => f !== helloFrame).map((f) => ({ ...f, cat: "crafted" }) as Wire));
      sessions.push({
        name,
        kind: "raw",
        request: upgrade(fuzzAuth),
        frames,
        until: want === "too_big" ? "error" : undefined,
        check: (r: RawResult) => {
          assert.match(r.statusLine ?? "", /^HTTP\/1\.1 101 /);
          if (want === "too_big") {
            assert.equal(r.end, "answered");
            assert.ok(r.frames.some((f) => f.op === 1 && /"code":"too_big"/.test(f.text ?? "")), "no too_big error");
          } else {
            assert.equal(r.end, "closed", "the hub left a broken connection open");
            assert.equal(r.frames.find((f) => f.op === 8)?.code, want);
          }
          assert.ok(!r.frames.some((f) => /"type":"ack"/.test(f.text ?? "")));
        },
      });
    }

    // Upgrades without a valid token: 401 before any WebSocket exists.
    const hashOfFuzz = readFileSync(join(dir, "tokens"), "utf8").split("\n").find((l) => l.startsWith("fuzz "))!.split(" ")[1];
    const unauth: Array<[string, string | undefined]> = [
      ["no token", undefined],
      ["wrong token", `Bearer ${randomBytes(32).toString("base64url")}`],
      ["the token file's hash as the token", `Bearer ${hashOfFuzz}`],
      ["valid token minus its last character", fuzzAuth.slice(0, -1)],
      ["valid token plus a character", `${fuzzAuth}x`],
      ["Basic credentials", `Basic ${Buffer.from("fuzz:" + token("fuzz")).toString("base64")}`],
      ["a 600-character token", `Bearer ${"A".repeat(600)}`],
      ["empty bearer", "Bearer "],
    ];
    for (const [name, auth] of unauth) {
      sessions.push({ name: `unauthenticated: ${name}`, kind: "ws", auth, frames: [], until: "open", check: (r: WsResult) => assert.equal(r.status, 401) });
    }
    const http = (line: string, headers = `Host: ${topo.ip("hub")}\r\n`, body = "") => `${line}\r\n${headers}\r\n${body}`;
    const odd: Array<[string, string, RegExp]> = [
      ["an upgrade with no token and no key", upgrade(undefined).replace(/Sec-WebSocket-Key: \S+\r\n/, ""), /^HTTP\/1\.1 401 /],
      ["an upgrade with a wrong token", upgrade("Bearer x"), /^HTTP\/1\.1 401 /],
      ["an upgrade with a token but no key", upgrade(fuzzAuth).replace(/Sec-WebSocket-Key: \S+\r\n/, ""), /^HTTP\/1\.1 400 /],
      ["an upgrade with a token but version 7", upgrade(fuzzAuth).replace("Version: 13", "Version: 7"), /^HTTP\/1\.1 4\d\d /],
      ["an h2c upgrade with a token", upgrade(fuzzAuth).replace("Upgrade: websocket", "Upgrade: h2c"), /^HTTP\/1\.1 400 /],
      ["dot-dot path", http("GET /healthz/../metrics HTTP/1.1"), /^HTTP\/1\.1 404 /],
      ["encoded traversal", http("GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1"), /^HTTP\/1\.1 404 /],
      ["absolute URI", http("GET http://evil.example/admin HTTP/1.1", "Host: evil.example\r\n"), /^HTTP\/1\.1 404 /],
      ["OPTIONS *", http("OPTIONS * HTTP/1.1"), /^HTTP\/1\.1 404 /],
      ["TRACE", http("TRACE / HTTP/1.1"), /^HTTP\/1\.1 404 /],
      ["a 20 KB header", http("GET / HTTP/1.1", `Host: x\r\nX-A: ${"a".repeat(20_000)}\r\n`), /^HTTP\/1\.1 431 /],
      ["a 20 KB URL", http(`GET /${"a".repeat(20_000)} HTTP/1.1`), /^HTTP\/1\.1 4\d\d /],
      ["Content-Length with chunked", http("POST /healthz HTTP/1.1", "Host: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), /^HTTP\/1\.1 400 /],
      ["a TLS ClientHello on the plain port", "\x16\x03\x01\x00\x05hello", /^HTTP\/1\.1 400 /],
      ["binary garbage", "\x00" + randomBytesFrom(mulberry32(SEED), 2000).toString("latin1"), /^HTTP\/1\.1 400 /],
      ["a request line with NUL", http("GET /\x00 HTTP/1.1"), /^HTTP\/1\.1 400 /],
      ["nothing at all", "", /^$/],
    ];
    for (const [name, request, status] of odd) {
      sessions.push({
        name: `raw: ${name}`,
        kind: "raw",
        request,
        check: (r: RawResult) => {
          assert.notEqual(r.end, "timeout", "no answer and no close");
          assert.match(r.statusLine ?? "", status);
        },
      });
    }

    // Legitimate bans during the storm: a raw client of node web between the sessions, plus ban.ts.
    const legitIps = Array.from({ length: 12 }, (_, i) => `203.0.113.${101 + i}`);
    const banTsIps = ["198.51.100.201", "198.51.100.202", "2001:db8:5ec::1"];
    const legitAll = [...legitIps, ...banTsIps];

    const kernelBefore = await kernel();
    const before = await healthz();
    const refusedBefore = refusedByReason(await hubGet("/metrics"));
    const rejectsBefore = readCsv(csv("hub")).filter((r) => r.action === "REJECT").length;
    assert.ok(kernelBefore.a1.includes("198.51.100.77"));

    let banTs: Promise<Array<{ code: number | null; output: string }>> | undefined;
    const started = Date.now();
    const { results, legit } = await runDriver(topo, dir, topo.ip("hub"), { legit: token("web") }, sessions, legitIps, () => {
      banTs = Promise.all(banTsIps.map((ip) => ban("ban", ip, "--bantime", "3600")));
    });
    const stormMs = Date.now() - started;
    for (const r of await banTs!) assert.equal(r.code, 0, r.output);
    assert.deepEqual(legit.errors, [], "a legitimate ban was refused during the storm");
    assert.equal(legit.acked.length, legitIps.length, "not every legitimate ban was acked");

    // The hub: same process, answering, state changed by exactly the legitimate bans.
    assert.equal(hub.proc.exitInfo(), undefined, `the hub exited:\n${hub.proc.output().slice(-3000)}`);
    process.kill(hub.proc.pid, 0);
    const afterStorm = await healthz();
    assert.equal(afterStorm.hub, before.hub);
    assert.equal(Number(afterStorm.seq), Number(before.seq) + legitAll.length, "the hub's seq moved by more than the legitimate bans");
    assert.equal(afterStorm.claims, before.claims + legitAll.length, "the hub's claims changed by more than the legitimate bans");

    // The kernels: the seed plus the legitimate bans, nothing else.
    for (const n of AGENTS) {
      const want = [...new Set([...kernelBefore[n], ...legitAll])].sort();
      await waitFor(async () => JSON.stringify(await members(n)) === JSON.stringify(want), `${n}'s set to hold exactly the legitimate bans`);
      assert.equal(agents[n].exitInfo(), undefined, `${n} exited`);
    }
    assert.equal(await reachable("fuzzer", "a1"), true, "the fuzzer's own host got blocked");

    // Metrics and the CSV account for the refusals.
    const wsResults = results.filter((r): r is WsResult => r.kind === "ws");
    const errorFrames = wsResults.flatMap((r) => r.errors.map((e) => e[0]));
    const rawErrors = results.filter((r): r is RawResult => r.kind === "raw").flatMap((r) => r.frames.filter((f) => f.op === 1 && /"type":"error"/.test(f.text ?? "")).map((f) => JSON.parse(f.text!).code as string));
    const refusedAfter = refusedByReason(await hubGet("/metrics"));
    const grew = delta(refusedAfter, refusedBefore);
    const received = countBy([...errorFrames, ...rawErrors], (c) => c);
    const unauthorized = wsResults.filter((r) => r.status === 401).length + results.filter((r) => r.kind === "raw" && /^HTTP\/1\.1 401/.test(r.statusLine ?? "")).length;
    // Frames the WebSocket layer refused end the connection with a close code instead of an error frame.
    const closeCodes = [
      ...wsResults.filter((r) => r.close && r.errors.length === 0).map((r) => r.close!.code),
      ...results.filter((r): r is RawResult => r.kind === "raw").flatMap((r) => r.frames.filter((f) => f.op === 8).map((f) => f.code!)),
    ];
    const expected = { ...received };
    for (const code of closeCodes) {
      const reason = code === 1009 ? "too_big" : "bad_frame";
      expected[reason] = (expected[reason] ?? 0) + 1;
    }
    expected.unauthorized = unauthorized;
    assert.deepEqual(grew, expected, "banshare_refused_total does not match the refusals the clients saw");
    const refusedTotal = Object.values(grew).reduce((a, b) => a + b, 0);
    const rejects = () => readCsv(csv("hub")).filter((r) => r.action === "REJECT").length - rejectsBefore;
    await waitFor(() => rejects() === refusedTotal, `one REJECT row in the hub's CSV per refusal (${refusedTotal})`).catch((e: Error) => assert.fail(`${e.message}: ${rejects()} rows`));

    const summary = {
      seed: SEED,
      framesFuzzed: fuzzed.length,
      byCategory: countBy(fuzzed, (w) => w.cat),
      errorFramesByCode: received,
      refusedTotalGrew: grew,
      sessions: sessions.length,
      legitimateBans: legitAll.length,
      stormMs,
    };
    t.diagnostic(JSON.stringify(summary));
    assert.ok(fuzzed.length >= 3000);
  });

  test("bans of the hub, protected and allowlisted ranges and 0.0.0.0/0 are never applied and are refused with clear errors", async () => {
    const kernelBefore = await kernel();
    const before = await healthz();
    const hub4 = topo.ip("hub");
    const admin = topo.ip("admin");

    // Refused by the hub: its own addresses and its --protect networks.
    const protectedIps = [hub4, topo.ip6("hub"), `::ffff:${hub4}`, admin, `${admin}/31`, "10.91.0.0/24", "192.0.2.9"];
    const refusals = await Promise.all(protectedIps.map((ip) => ban("ban", ip, "--bantime", "600")));
    for (const [i, r] of refusals.entries()) {
      const ip = protectedIps[i];
      assert.equal(r.code, 1, `${ip}: ${r.output}`);
      assert.match(r.output, /hub refused the ban: protected: Refusing to ban \S+: it overlaps the protected network \S+/, ip);
      assert.equal(r.output.trim().split("\n").length, 1, r.output);
    }
    // Broader than the hub's prefix limit: refused by the hub.
    const broad = await ban("ban", "10.0.0.0/8");
    assert.equal(broad.code, 1, broad.output);
    assert.match(broad.output, /bad_ip: Refusing to ban 10\.0\.0\.0\/8: networks broader than \/24 are not accepted/);
    // Every address at once: refused by ban.ts before it sends anything.
    const everything = ["0.0.0.0/0", "::/0", "0.0.0.0/1"];
    for (const [i, r] of (await Promise.all(everything.map((ip) => ban("ban", ip)))).entries()) {
      const ip = everything[i];
      assert.notEqual(r.code, 0, `${ip}: ${r.output}`);
      assert.match(r.output, /Refusing to ban/, `${ip}: ${r.output}`);
    }
    assert.equal(existsSync(join(dir, "web-spool")), false, "a refused ban was spooled");

    // The same, straight over the wire (the hub must not rely on ban.ts checking).
    const wire = ["0.0.0.0/0", "::/0", "0.0.0.0/1", "128.0.0.0/1", hub4, admin];
    const frames = wire.map((ip, i) => ({ text: JSON.stringify({ type: "ban", id: `p${i}`, ip, jail: "sshd", bantime: 600, detectedAt: Date.now() }), cat: "protected" }));
    await runDriver(topo, dir, hub4, { legit: token("web") }, [
      {
        name: "protected over the wire",
        kind: "ws",
        auth: `Bearer ${token("fuzz")}`,
        frames: [{ text: JSON.stringify({ type: "hello", v: 1 }), cat: "hello" }, ...frames],
        until: "errors",
        check: (r: WsResult) => {
          assert.deepEqual(r.errors.map((e) => e[0]), ["bad_ip", "bad_ip", "bad_ip", "bad_ip", "protected", "protected"]);
          assert.match(r.errors[0][1], /^Refusing to ban 0\.0\.0\.0\/0: /);
          assert.match(r.errors[4][1], new RegExp(`^Refusing to ban ${hub4.replace(/\./g, "\\.")}: it overlaps the protected network ${hub4.replace(/\./g, "\\.")}`));
        },
      },
    ], []);

    // Allowlisted on the agents only: the hub accepts it, both agents refuse to apply it.
    const ops = topo.ip("ops");
    const r = await ban("ban", ops, "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    for (const n of AGENTS) await waitFor(() => rows(csv(n), "REJECT", ops).some((row) => /allowlisted/.test(row.detail)), `the REJECT row for ${ops} on ${n}`);

    const kernelAfter = await kernel();
    assert.deepEqual(kernelAfter, kernelBefore, "a refused ban reached a kernel set");
    for (const n of AGENTS) {
      assert.equal(rows(csv(n), "BLOCK", ops).length, 0);
      for (const from of ["hub", "admin", "ops", "web"]) assert.equal(await reachable(from, n), true, `${from} can no longer reach ${n}`);
    }
    assert.equal(Number((await healthz()).seq), Number(before.seq) + 1, "only the allowlisted ban was accepted");
    assert.equal((await ban("unban", ops)).code, 0);
  });

  test("addresses that try shell or argv injection are refused by ban.ts (exit 2, one line) and by the hub (bad_ip)", async () => {
    const kernelBefore = await kernel();
    const before = await healthz();
    const spool = join(dir, "inject-spool");
    const results = await Promise.all(
      INJECTIONS.map((ip, i) => runBan([i % 3 ? "ban" : "unban", ip, "--hub", hubUrl(), "--token-file", tokens.web, "--spool", spool])),
    );
    results.forEach((r, i) => {
      const what = JSON.stringify(INJECTIONS[i]).slice(0, 60);
      assert.equal(r.code, 2, `${what}: ${r.output}`);
      assert.equal(r.output.split("\n").filter(Boolean).length, 1, `${what}: ${r.output.slice(0, 300)}`);
      assert.match(r.output, /^ban\.ts: (Expected an IPv4 or IPv6 address|Unknown option)/);
      assert.ok(r.output.length < 300, "the refusal echoes the whole input");
    });
    assert.equal(existsSync(spool), false, "an invalid address was spooled");

    const frames = INJECTIONS.flatMap((ip, i) => [
      { text: JSON.stringify({ type: "ban", id: `i${i}`, ip, jail: "sshd", bantime: 600, detectedAt: Date.now() }), cat: "injection" },
      { text: JSON.stringify({ type: "unban", id: `u${i}`, ip, jail: "sshd", detectedAt: Date.now() }), cat: "injection" },
    ]);
    await runDriver(topo, dir, topo.ip("hub"), { legit: token("web") }, [
      {
        name: "injection over the wire",
        kind: "ws",
        auth: `Bearer ${token("fuzz")}`,
        frames: [{ text: JSON.stringify({ type: "hello", v: 1 }), cat: "hello" }, ...frames],
        until: "errors",
        check: (r: WsResult) => {
          // The longest one is over 16 KiB: refused for its size before anyone looks at it.
          assert.deepEqual(r.errors.map((e) => e[0]), frames.map((f) => (f.text.length > MAX_FRAME ? "too_big" : "bad_ip")));
          for (const [, m] of r.errors) oneLine(m);
        },
      },
    ], []);
    assert.deepEqual(await kernel(), kernelBefore);
    assert.equal((await healthz()).seq, before.seq);
    for (const n of AGENTS) assert.doesNotMatch(agents[n].output(), /reboot|rm -rf|--flush/, `${n} saw an injection attempt`);
  });
});

// ---------------------------------------------------------------------------------------------
// Loopback: limits, roles, revocation

interface Client {
  ws: WebSocket;
  frames: any[];
  closed: Promise<{ code: number; reason: string }>;
  next(pred: (f: any) => boolean, what: string): Promise<any>;
}

/** The HTTP status of an upgrade with `token` (101 when it succeeds; the socket is closed again). */
function upgradeStatus(url: string, token: string | undefined, ca?: string): Promise<number> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers: token ? { authorization: `Bearer ${token}` } : {}, ca });
    ws.on("unexpected-response", (_req, res) => resolve(res.statusCode ?? 0));
    ws.on("open", () => {
      resolve(101);
      ws.close();
    });
    ws.on("error", () => resolve(-1));
  });
}

/** An authenticated raw client that has said hello. */
async function connect(url: string, token: string): Promise<Client> {
  const ws = new WebSocket(url, { headers: { authorization: `Bearer ${token}` }, perMessageDeflate: false });
  const frames: any[] = [];
  ws.on("message", (d) => frames.push(JSON.parse(String(d))));
  ws.on("error", () => {});
  const closed = new Promise<{ code: number; reason: string }>((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: String(reason) })));
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("unexpected-response", (_q, res) => reject(new Error(`HTTP ${res.statusCode}`)));
  });
  const next = (pred: (f: any) => boolean, what: string) => waitFor(() => frames.find(pred), what, 10_000);
  ws.send(JSON.stringify({ type: "hello", v: 1 }));
  await next((f) => f.type === "welcome", "welcome");
  return { ws, frames, closed, next };
}

const banFrame = (id: string, ip: string, extra: Record<string, unknown> = {}) => JSON.stringify({ type: "ban", id, ip, jail: "sshd", bantime: 600, detectedAt: Date.now(), ...extra });

describe("rate limits, roles, revocation and size limits on a loopback hub", () => {
  let dir: string;
  let hub: HubProc;
  let tokens: Record<string, string>;
  const agents: Record<string, Proc> = {};
  const csv = (n: string) => join(dir, `${n}.csv`);
  const token = (n: string) => readFileSync(tokens[n], "utf8").trim();
  const metrics = async () => refusedByReason(await (await fetch(`http://127.0.0.1:${hub.port}/metrics`)).text());
  const ban = (node: string, ...args: string[]) => runBan([...args, "--hub", hub.url, "--token-file", tokens[node], "--spool", join(dir, `${node}-spool`), "--timeout", "5"]);
  const blocked = (n: string, ip: string) => waitFor(() => rows(csv(n), "BLOCK", ip).length, `${n} to block ${ip}`);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-limits-"));
    tokens = await enrol(dir, [["flood", "node"], ["calm", "node"], ["watch", "node"], ["peek", "reader"], ["gone", "node"], ["many", "node"], ["big", "node"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--csv", csv("hub"), "--listen", "127.0.0.1:0", "--rate", "5", "--burst", "10", "--max-conns-per-node", "3", "--heartbeat", "5"]);
    for (const n of ["watch", "gone"]) agents[n] = await startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--backend", "dry-run", "--csv", csv(n), "--heartbeat", "5"]);
  });

  after(async () => {
    await stopAll();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

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

// ---------------------------------------------------------------------------------------------
// TLS

/** GET over https with a private CA. */
function httpsGet(url: string, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(url, { ca }, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve(body));
    });
    req.on("error", reject);
    req.end();
  });
}

describe("TLS: gen-cert, the right CA, a wrong CA and plain ws:// against the TLS port", needs(["openssl"], "security: TLS"), () => {
  let dir: string;
  let hub: HubProc;
  let tokens: Record<string, string>;
  let ca: string;
  const csv = (n: string) => join(dir, `${n}.csv`);
  const metrics = async () => refusedByReason(await httpsGet(`https://127.0.0.1:${hub.port}/metrics`, ca));
  const healthz = async () => JSON.parse(await httpsGet(`https://127.0.0.1:${hub.port}/healthz`, ca));
  const ban = (args: string[], spool: string) => runBan([...args, "--token-file", tokens.web, "--spool", join(dir, spool), "--timeout", "5"]);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-tls-"));
    tokens = await enrol(dir, [["web", "node"], ["good", "node"], ["wrongca", "node"], ["plain", "node"]]);
    for (const d of ["tls", "other"]) {
      const p = tsx("hub.ts", ["gen-cert", "--dir", join(dir, d), "--host", "127.0.0.1", "--host", "localhost", "--days", "2"], { name: `gen-cert ${d}` });
      assert.equal((await p.closed).code, 0, p.output());
    }
    ca = readFileSync(join(dir, "tls", "ca.pem"), "utf8");
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--csv", csv("hub"), "--listen", "127.0.0.1:0", "--tls-cert", join(dir, "tls", "hub.pem"), "--tls-key", join(dir, "tls", "hub.key"), "--heartbeat", "5"]);
    assert.match(hub.url, /^wss:\/\//);
  });

  after(async () => {
    await stopAll();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("an agent and ban.ts with --ca work end to end over wss://", async () => {
    await startAgentProc("good", ["--hub", hub.url, "--token-file", tokens.good, "--ca", join(dir, "tls", "ca.pem"), "--backend", "dry-run", "--csv", csv("good"), "--heartbeat", "5"]);
    const r = await ban(["ban", "203.0.113.10", "--hub", hub.url, "--ca", join(dir, "tls", "ca.pem")], "good-spool");
    assert.equal(r.code, 0, r.output);
    assert.equal(r.output, "");
    await waitFor(() => rows(csv("good"), "BLOCK", "203.0.113.10").length, "the agent to block the ban it got over wss://");
  });

  test("with another CA's certificate the agent logs a certificate error and gets nothing; ban.ts spools", async () => {
    const before = await healthz();
    const agent = tsx("agent.ts", ["--hub", hub.url, "--token-file", tokens.wrongca, "--ca", join(dir, "other", "ca.pem"), "--backend", "dry-run", "--csv", csv("wrongca"), "--heartbeat", "5"], { name: "wrongca" });
    await agent.waitForLine(/certificate/i, 15_000);
    // Documented: a hub that cannot be reached (here: cannot be verified) makes ban.ts spool and exit 0 with a warning.
    for (const extra of [["--ca", join(dir, "other", "ca.pem")], []]) {
      const spool = `wrong-ca-spool-${extra.length}`;
      const r = await ban(["ban", "203.0.113.11", "--hub", hub.url, ...extra], spool);
      assert.equal(r.code, 0, r.output);
      assert.match(r.output, /^ban\.ts: warning: could not send \(wss:\/\/127\.0\.0\.1:\d+: [^)]*certificate[^)]*\); spooled the ban of 203\.0\.113\.11/);
      assert.equal((await readdir(join(dir, spool))).filter((f) => f.endsWith(".json")).length, 1);
    }
    // A ban from a node that does trust the hub: the wrong-CA agent never receives it.
    assert.equal((await ban(["ban", "203.0.113.12", "--hub", hub.url, "--ca", join(dir, "tls", "ca.pem")], "ok-spool")).code, 0);
    await waitFor(() => rows(csv("good"), "BLOCK", "203.0.113.12").length, "the trusting agent to get the ban");
    const after = await healthz();
    assert.equal(Number(after.seq), Number(before.seq) + 1, "the unverified ban.ts reached the hub");
    assert.doesNotMatch(agent.output(), /connected to|synced/);
    assert.equal(rows(csv("wrongca"), "BLOCK", "203.0.113.12").length, 0);
    await waitFor(() => hub.proc.lines().some((l) => /refused connection from 127\.0\.0\.1:\d+: TLS handshake failed: /.test(l)), "the hub to log the failed handshake");
    await agent.stop("SIGTERM", 5000);
  });

  test("a plain ws:// client to the TLS port is refused with an error that says to use wss://", async () => {
    const before = await metrics();
    const plainUrl = hub.url.replace(/^wss:/, "ws:");
    const r = await ban(["ban", "203.0.113.13", "--hub", plainUrl], "plain-spool");
    assert.equal(r.code, 1, r.output);
    assert.match(r.output, /^ban\.ts: .*HTTP 400.*wss:\/\//);
    assert.equal(r.output.trim().split("\n").length, 1);
    assert.equal(existsSync(join(dir, "plain-spool")), false, "a ban sent to the wrong scheme was spooled");
    const agent = tsx("agent.ts", ["--hub", plainUrl, "--token-file", tokens.plain, "--backend", "dry-run", "--heartbeat", "5"], { name: "plain" });
    await agent.waitForLine(/refused the connection: HTTP 400 .*wss:\/\//, 15_000);
    await agent.stop("SIGTERM", 5000);
    await waitFor(() => hub.proc.lines().some((l) => /refused connection from 127\.0\.0\.1:\d+: plain HTTP/.test(l)), "the hub to log the plain request");
    assert.ok((delta(await metrics(), before).tls ?? 0) >= 2, "plain requests on the TLS port are not counted");
    assert.equal(hub.proc.exitInfo(), undefined);
  });

  test("a hub refuses to serve plain ws:// off loopback without --insecure", async () => {
    const p = tsx("hub.ts", ["--tokens", join(dir, "tokens"), "--listen", "0.0.0.0:0"], { name: "hub-plain" });
    const info = await p.closed;
    assert.equal(info.code, 2, p.output());
    assert.equal(p.output().trim().split("\n").length, 1, p.output());
    assert.match(p.output(), /^hub\.ts: Expected --tls-cert and --tls-key to listen on 0\.0\.0\.0 .*--insecure/);
  });
});
