/**
 * Security, part 1 of 3 (with security-limits and security-tls): hostile input against real
 * processes in network namespaces (hub, two ipset agents, a fuzzer, a legitimate sender, an admin
 * host and an ops host): thousands of seeded, invalid-by-construction frames from an enrolled
 * node, crafted WebSocket frames, unauthenticated upgrades and odd HTTP requests, while another
 * node's bans keep flowing to the agents' kernel sets; bans of protected, allowlisted and
 * over-broad networks; addresses that try shell or argv injection.
 *
 * The fuzzer's seed is FUZZ_SEED (default below; not BANSHARE_*, which the hub would take for a
 * flag); a failure prints it. The driver that plays the sessions is test/fixtures/fuzz-driver.cjs.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { delta, enrol, readCsv, refusedByReason, rows, runBan, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, startTcpListener, tcpProbe, type Topology } from "./lib/netns.ts";
import { REPO_ROOT, spawnProc, tsx, type Proc } from "./lib/proc.ts";
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
        return { v: chance(0.25) ? pick<unknown>([String(now), "1700000000000", nonString()]) : pick([0, -1, -now, now + 0.5, 1.5, 2 ** 53, 1e21, Number.MAX_VALUE, new Raw("1e999")]) };
      case "sentAt":
        // Optional: absent is valid, so it is never deleted; present, it must be a time in ms.
        return { v: pick<unknown>([0, -1, 1.5, "1700000000000", null, true, [], {}, 2 ** 53, 1e21, new Raw("1e999")]) };
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
    ban: ["type", "id", "ip", "jail", "bantime", "detectedAt", "sentAt"],
    unban: ["type", "id", "ip", "jail", "detectedAt", "all", "sentAt"],
    hello: ["type", "v", "node", "want", "cursor", "sentAt"],
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
// The driver (test/fixtures/fuzz-driver.cjs) plays the sessions from the fuzzer's namespace.

const DRIVER = join(REPO_ROOT, "test", "fixtures", "fuzz-driver.cjs");

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
  const p = spawnProc(process.execPath, [DRIVER, planFile], { netns: topo.ns("fuzzer"), name: "fuzz-driver" });
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
function countBy<T>(items: T[], key: (t: T) => string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const i of items) out[key(i)] = (out[key(i)] ?? 0) + 1;
  return out;
}

const oneLine = (s: string) => assert.doesNotMatch(s, /[\r\n]/, `not one line: ${JSON.stringify(s).slice(0, 200)}`);

// ---------------------------------------------------------------------------------------------

describe("security: hostile frames, crafted WebSocket frames and bans of protected ranges change nothing on a hub and two ipset agents, and the hub keeps serving", needs(["root", "netns", "ipv6", "ipset", "iptables", "ip6tables"], "security: namespaces"), () => {
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

  /** GET a path of the hub from inside the fuzzer's namespace, as the reader `viewer` (a stranger is told only whether the hub is up). */
  const hubGet = async (path: string) => {
    const r = await topo.exec("fuzzer", process.execPath, ["-e", "fetch(process.argv[1], { headers: { authorization: process.argv[2] } }).then(async (r) => process.stdout.write(await r.text()))", `http://${topo.ip("hub")}:7700${path}`, `Bearer ${token("viewer")}`]);
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
    tokens = await enrol(dir, [["fuzz", "node"], ["web", "node"], ["a1", "node"], ["a2", "node"], ["viewer", "reader"]]);
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
    // Refusals before a token was accepted are summarised per source: a row "N more from ADDRESS" stands for N.
    const rejects = () => readCsv(csv("hub")).filter((r) => r.action === "REJECT").reduce((n, r) => n + (Number(/: (\d+) more from /.exec(r.detail)?.[1]) || 1), 0) - rejectsBefore;
    await waitFor(() => rejects() === refusedTotal, `a REJECT row in the hub's CSV per refusal, or a summary row counting it (${refusedTotal})`, 30_000).catch((e: Error) => assert.fail(`${e.message}: ${rejects()} rows`));

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
      INJECTIONS.map((ip, i) => runBan([i % 3 ? "ban" : "unban", ip, "--hub", hubUrl(), "--token-file", tokens.web, "--spool", spool, "--insecure"])),
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
