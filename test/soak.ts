/**
 * The soak (issue 14): a hub, and three nodes each with a real agent (ipset backend, --state,
 * --spool) in a network namespace of its own, run for minutes while each node's Fail2Ban sends
 * a steady stream of bans and unbans (test/fixtures/soak-sender.ts: ban.ts's own send and spool,
 * on a shared pool of addresses as well as the node's own), and the hub and the agents are
 * killed (SIGKILL) and started again on a schedule. At the end every agent's kernel set is
 * compared with the hub's claims and with what the senders were acked (or spooled: exit 0 from
 * ban.ts means durable somewhere that will deliver): 0 differences expected.
 *
 *   npm run soak                          # 240 s of traffic, a kill every 15 s (journal store)
 *   npm run soak -- --short               # 60 s, a kill every 10 s: what test/soak.test.ts runs
 *   npm run soak -- --seconds 600 --store redis   # two hubs on a Redis (appendfsync always) in
 *                                         # their namespace; Redis too is killed and started
 *                                         # again empty, in turn with the hubs and the agents
 *   npm run soak -- --short --store none  # hub without --state: forgets at every kill, so the
 *                                         # soak must report differences (it checks the soak)
 *
 * Needs root, network namespaces, ipset and iptables (and redis-server for --store redis). It
 * prints the counts as it ends, then one line `soak result {JSON}`; exit 0 when there is no
 * difference and nothing was refused, 1 otherwise, 2 on bad flags or missing requirements.
 */

import { mkdir, mkdtemp, readFile, readdir, rm } from "node:fs/promises";
import { existsSync, realpathSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { enrol, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, type Topology } from "./lib/netns.ts";
import { runCleanupNow, spawnProc, stopAll, tsx, type Proc } from "./lib/proc.ts";
import { missing } from "./lib/skip.ts";

const NODES = ["n1", "n2", "n3"] as const;
/** The hubs' ports: one hub on its journal, two on a Redis. */
const PORTS = [7700, 7701];
const BANTIME = 3600;

/** How long and how hard. */
export interface SoakOptions {
  seconds: number;
  /** Seconds between two kills (they alternate: hub, agent n1, hub, agent n2, ...). */
  period: number;
  /** Events per second each node sends. */
  perSecond: number;
  /** `none`: a hub without --state, which forgets everything at each kill: the soak must report differences (a check of the soak itself). */
  store: "journal" | "redis" | "none";
  log: (line: string) => void;
}

/** What the soak saw: the counts it prints, and the differences (0 expected). */
export interface SoakResult {
  seconds: number;
  store: string;
  bans: { sent: number; acked: number; spooled: number };
  unbans: { sent: number; acked: number; spooled: number };
  refused: number;
  hubRestarts: number;
  agentRestarts: number;
  /** Redis killed and started again empty (--store redis): the hubs must write the fleet state back. */
  storeLosses: number;
  /** Addresses the senders' acked and spooled events leave blocked; each hub's blocked addresses; each agent's kernel set. */
  expected: number;
  hubs: number[];
  agents: Record<string, number>;
  spoolLeft: number;
  differences: number;
  details: string[];
}

/** One sender line: `ack|spooled|refused KIND IP ID DETECTED_AT`. */
interface Sent {
  how: string;
  kind: "ban" | "unban";
  ip: string;
  id: string;
  detectedAt: number;
  origin: string;
}

/** The addresses node `i` (0-based) may ban: 150 of its own and 50 every node shares. */
function addressesOf(i: number): string[] {
  const own = Array.from({ length: 150 }, (_, n) => `10.230.${1 + i}.${1 + n}`);
  const shared = Array.from({ length: 50 }, (_, n) => `10.230.9.${1 + n}`);
  return [...own, ...shared];
}

/** Parses sender output into the events it sent. */
function sentBy(origin: string, p: Proc): Sent[] {
  const out: Sent[] = [];
  for (const l of p.lines()) {
    const m = /^(ack|spooled|refused) (ban|unban) (\S+) (\S+) (\d+)$/.exec(l);
    if (m) out.push({ how: m[1], kind: m[2] as Sent["kind"], ip: m[3], id: m[4], detectedAt: Number(m[5]), origin });
  }
  return out;
}

/** What the acked and spooled events leave blocked: per (address, origin) the newest event wins; blocked while any origin's is a ban. */
export function expectedBlocked(events: Sent[]): Set<string> {
  const newest = new Map<string, Sent>();
  for (const e of events) {
    if (e.how === "refused") continue;
    const key = `${e.ip}|${e.origin}`;
    const old = newest.get(key);
    if (!old || e.detectedAt > old.detectedAt || (e.detectedAt === old.detectedAt && e.id > old.id)) newest.set(key, e);
  }
  return new Set([...newest.values()].filter((e) => e.kind === "ban").map((e) => e.ip));
}

function symmetric(a: Set<string>, b: Set<string>): string[] {
  return [...[...a].filter((x) => !b.has(x)).map((x) => `-${x}`), ...[...b].filter((x) => !a.has(x)).map((x) => `+${x}`)];
}

/** A soak world: topology, scratch folder, tokens, the hub and the agents as they are now. */
class World {
  readonly hubs: HubProc[] = [];
  readonly agents: Record<string, Proc> = {};
  redis?: Proc;
  hubRestarts = 0;
  agentRestarts = 0;
  storeLosses = 0;

  private constructor(
    readonly topo: Topology,
    readonly dir: string,
    readonly tokens: Record<string, string>,
    readonly opts: SoakOptions,
  ) {}

  static async create(opts: SoakOptions): Promise<World> {
    const dir = await mkdtemp(join(tmpdir(), "banshare-soak-"));
    const topo = await createTopology(["hub", ...NODES], { prefix: "soak" });
    const tokens = await enrol(dir, [...NODES.map((n) => [n, "node"] as [string, "node"]), ["admin", "admin"]]);
    return new World(topo, dir, tokens, opts);
  }

  /** How many hubs: two sharing the Redis, else one. */
  get hubCount(): number {
    return this.opts.store === "redis" ? 2 : 1;
  }

  url(k: number): string {
    return `ws://${this.topo.ip("hub")}:${PORTS[k]}`;
  }

  /** Every hub, node `i`'s first (ban.ts and agents list them all, each node in its own order). */
  urls(i: number): string {
    return Array.from({ length: this.hubCount }, (_, k) => this.url((i + k) % this.hubCount)).join(",");
  }

  spoolOf(n: string): string {
    return join(this.dir, `${n}-spool`);
  }

  async startRedis(): Promise<void> {
    const dir = join(this.dir, "redis");
    await mkdir(dir, { recursive: true });
    this.redis = spawnProc("redis-server", ["--port", "6379", "--bind", "127.0.0.1", "--dir", dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"], { netns: this.topo.ns("hub"), name: "redis" });
    await this.redis.waitForLine(/Ready to accept connections/, 20_000);
  }

  async startHub(k: number): Promise<void> {
    const store = { redis: ["--store", "redis://127.0.0.1:6379/0"], journal: ["--state", join(this.dir, "journal.jsonl")], none: [] }[this.opts.store];
    this.hubs[k] = await startHubProc(["--tokens", join(this.dir, "tokens"), "--listen", `${this.topo.ip("hub")}:${PORTS[k]}`, "--heartbeat", "2", ...store], { netns: this.topo.ns("hub"), name: `hub${k + 1}` });
  }

  async startAgent(n: string): Promise<void> {
    const args = ["--hub", this.urls(NODES.indexOf(n as (typeof NODES)[number])), "--token-file", this.tokens[n], "--node", n, "--backend", "ipset", "--state", join(this.dir, `${n}.state.json`), "--spool", this.spoolOf(n), "--heartbeat", "2"];
    this.agents[n] = await startAgentProc(n, args, { netns: this.topo.ns(n) });
  }

  startSender(i: number, seconds: number): Proc {
    const n = NODES[i];
    const plan = { seconds, perSecond: this.opts.perSecond, addresses: addressesOf(i), seed: 1000 + i, bantime: BANTIME };
    return tsx("test/fixtures/soak-sender.ts", [n, this.urls(i), this.tokens[n], this.spoolOf(n), JSON.stringify(plan)], { netns: this.topo.ns(n), name: `sender ${n}` });
  }

  /**
   * The next fault of the schedule, in turn: a hub killed (SIGKILL) and started again, an agent
   * the same, and with a Redis, Redis killed and started again empty (its append-only file gone).
   */
  async fault(step: number): Promise<void> {
    const kinds = this.opts.store === "redis" ? ["hub", "agent", "redis"] : ["hub", "agent"];
    const kind = kinds[step % kinds.length];
    const turn = Math.floor(step / kinds.length);
    if (kind === "hub") {
      const k = turn % this.hubCount;
      await this.hubs[k].proc.kill9();
      await sleep(1500);
      await this.startHub(k);
      this.hubRestarts++;
      this.opts.log(`soak: ${elapsed()} hub${k + 1} killed (SIGKILL) and started again`);
    } else if (kind === "agent") {
      const n = NODES[turn % NODES.length];
      await this.agents[n].kill9();
      await sleep(1000);
      await this.startAgent(n);
      this.agentRestarts++;
      this.opts.log(`soak: ${elapsed()} agent ${n} killed (SIGKILL) and started again`);
    } else {
      await this.redis!.kill9();
      await rm(join(this.dir, "redis"), { recursive: true, force: true });
      await sleep(1000);
      await this.startRedis();
      this.storeLosses++;
      this.opts.log(`soak: ${elapsed()} Redis killed (SIGKILL) and started again empty`);
    }
  }

  async kernelSet(n: string): Promise<Set<string>> {
    const r = await this.topo.exec(n, "ipset", ["list", "banshare-v4", "-output", "save"], { reject: false });
    return r.exitCode === 0 ? new Set([...String(r.stdout).matchAll(/^add banshare-v4 (\S+)/gm)].map((m) => m[1])) : new Set();
  }

  /** The addresses hub `k` lists as blocked (GET /v1/bans, as the admin, from inside the hubs' namespace). */
  async hubBlocked(k: number): Promise<Set<string>> {
    const r = await this.topo.exec("hub", "curl", ["-sS", "--max-time", "20", "-H", `Authorization: Bearer ${await token(this.tokens.admin)}`, `${this.url(k).replace(/^ws/, "http")}/v1/bans`]);
    const list = JSON.parse(String(r.stdout)) as { bans: Array<{ ip: string }> };
    return new Set(list.bans.map((b) => b.ip));
  }

  async spoolLeft(): Promise<number> {
    let n = 0;
    for (const node of NODES) if (existsSync(this.spoolOf(node))) n += (await readdir(this.spoolOf(node))).filter((f) => f.endsWith(".json")).length;
    return n;
  }

  async destroy(): Promise<void> {
    await stopAll(5000);
    await this.topo.destroy();
    await rm(this.dir, { recursive: true, force: true });
  }
}

async function token(file: string): Promise<string> {
  return (await readFile(file, "utf8")).trim();
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

const started = Date.now();
function elapsed(): string {
  return `${((Date.now() - started) / 1000).toFixed(1)} s`;
}

/** Compares the senders, the hub and every agent's kernel; `final` adds the details of each difference. */
async function compare(w: World, want: Set<string>): Promise<{ hubs: Array<Set<string>>; kernels: Record<string, Set<string>>; diffs: string[] }> {
  const hubs: Array<Set<string>> = [];
  const diffs: string[] = [];
  for (let k = 0; k < w.hubCount; k++) {
    hubs.push(await w.hubBlocked(k));
    for (const d of symmetric(want, hubs[k])) diffs.push(`hub${k + 1} vs senders: ${d}`);
  }
  const hub = hubs[0];
  const kernels: Record<string, Set<string>> = {};
  for (const n of NODES) {
    kernels[n] = await w.kernelSet(n);
    for (const d of symmetric(hub, kernels[n])) diffs.push(`${n} vs hub: ${d}`);
    for (const d of symmetric(want, kernels[n])) diffs.push(`${n} vs senders: ${d}`);
  }
  return { hubs, kernels, diffs };
}

/** Runs the soak; always removes what it made. */
export async function runSoak(opts: SoakOptions): Promise<SoakResult> {
  const w = await World.create(opts);
  try {
    if (opts.store === "redis") await w.startRedis();
    for (let k = 0; k < w.hubCount; k++) await w.startHub(k);
    for (const n of NODES) await w.startAgent(n);
    opts.log(`soak: ${elapsed()} ${w.hubCount} hub(s) (${opts.store}) and ${NODES.length} agents up; ${opts.seconds} s of traffic, a kill every ${opts.period} s`);
    const senders = NODES.map((_, i) => w.startSender(i, opts.seconds));
    const end = Date.now() + opts.seconds * 1000;
    for (let step = 0; Date.now() + opts.period * 1000 < end; step++) {
      await sleep(opts.period * 1000);
      await w.fault(step);
    }
    await Promise.all(senders.map((s) => s.closed));
    const sent = NODES.flatMap((n, i) => sentBy(n, senders[i]));
    const want = expectedBlocked(sent);
    // Settle: the spools delivered and every kernel equal to the hub (bounded).
    let last = await compare(w, want);
    await waitFor(async () => (await w.spoolLeft()) === 0 && (last = await compare(w, want)).diffs.length === 0, "the fleet to settle", 90_000).catch(() => {});
    const count = (kind: string, how?: string) => sent.filter((e) => e.kind === kind && (!how || e.how === how)).length;
    return {
      seconds: opts.seconds,
      store: opts.store,
      bans: { sent: count("ban"), acked: count("ban", "ack"), spooled: count("ban", "spooled") },
      unbans: { sent: count("unban"), acked: count("unban", "ack"), spooled: count("unban", "spooled") },
      refused: sent.filter((e) => e.how === "refused").length,
      hubRestarts: w.hubRestarts,
      agentRestarts: w.agentRestarts,
      storeLosses: w.storeLosses,
      expected: want.size,
      hubs: last.hubs.map((h) => h.size),
      agents: Object.fromEntries(NODES.map((n) => [n, last.kernels[n].size])),
      spoolLeft: await w.spoolLeft(),
      differences: last.diffs.length,
      details: last.diffs.slice(0, 20),
    };
  } finally {
    await w.destroy();
  }
}

/** Reads the flags: `--short`, `--seconds N`, `--period N`, `--rate N`, `--store journal|redis`. */
export function parseSoakArgs(argv: string[]): Omit<SoakOptions, "log"> {
  const o = { seconds: 240, period: 15, perSecond: 4, store: "journal" as SoakOptions["store"] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const num = () => {
      const v = Number(argv[++i]);
      if (!Number.isFinite(v) || v <= 0) throw new Error(`Expected a positive number after ${a}, got ${JSON.stringify(argv[i])}`);
      return v;
    };
    if (a === "--short") Object.assign(o, { seconds: 60, period: 10 });
    else if (a === "--seconds") o.seconds = num();
    else if (a === "--period") o.period = num();
    else if (a === "--rate") o.perSecond = num();
    else if (a === "--store" && ["journal", "redis", "none"].includes(argv[i + 1])) o.store = argv[++i] as SoakOptions["store"];
    else throw new Error(`Expected --short, --seconds N, --period N, --rate N or --store journal|redis|none, got ${JSON.stringify(a)}`);
  }
  return o;
}

function report(r: SoakResult): string {
  return [
    `soak: ${r.seconds} s, store ${r.store}, ${NODES.length} nodes`,
    `  bans sent ${r.bans.sent} (acked ${r.bans.acked}, spooled ${r.bans.spooled}), unbans sent ${r.unbans.sent} (acked ${r.unbans.acked}, spooled ${r.unbans.spooled}), refused ${r.refused}`,
    `  restarts: hubs ${r.hubRestarts}, agents ${r.agentRestarts} (each after SIGKILL)${r.store === "redis" ? `, Redis emptied ${r.storeLosses}` : ""}`,
    `  blocked at the end: senders ${r.expected}, ${r.hubs.map((h, k) => `hub${k + 1} ${h}`).join(", ")}, ${NODES.map((n) => `${n} ${r.agents[n]}`).join(", ")}; spool left ${r.spoolLeft}`,
    `  differences: ${r.differences}${r.details.length ? `\n    ${r.details.join("\n    ")}` : ""}`,
  ].join("\n");
}

async function main(argv: string[]): Promise<void> {
  let opts: Omit<SoakOptions, "log">;
  try {
    opts = parseSoakArgs(argv);
  } catch (e) {
    process.stderr.write(`soak: ${(e as Error).message}\n`);
    process.exitCode = 2;
    return;
  }
  const lacking = missing(["root", "netns", "ipset", "iptables", "ip6tables", "curl", ...(opts.store === "redis" ? ["redis-server"] : [])]);
  if (lacking) {
    process.stderr.write(`soak: cannot run here: ${lacking}\n`);
    process.exitCode = 2;
    return;
  }
  const r = await runSoak({ ...opts, log: (l) => process.stderr.write(`${l}\n`) });
  process.stdout.write(`${report(r)}\nsoak result ${JSON.stringify(r)}\n`);
  process.exitCode = r.differences === 0 && r.refused === 0 && r.spoolLeft === 0 ? 0 : 1;
}

if (process.argv[1] && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).catch((e: Error) => {
    process.stderr.write(`${e.stack ?? e.message}\n`);
    process.exitCode = 1;
    runCleanupNow();
  });
}
