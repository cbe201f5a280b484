/**
 * banshare agent: keeps a connection to the hub and applies the fleet's bans to this server's
 * kernel firewall.
 *
 *   node --import tsx agent.ts --hub wss://hub.example:7700 --token-file /etc/banshare/token
 *   node --import tsx agent.ts --cleanup            # remove everything the agent created
 *
 * Backends: ipset (default: sets banshare-v4/-v6 with per-entry kernel timeouts, one DROP rule
 * each), nftables (table inet banshare), iptables (one rule per address, the paper's way),
 * dry-run (changes nothing, logs what it would do). Bans expire in the kernel, so they end on
 * time even when the agent is down; start never flushes, so bans keep enforcing while the hub
 * is unreachable. After each sync the kernel is reconciled to the fleet state in one command.
 *
 * Parts, in file order, data flowing one way (hub -> kernel):
 * - backend plans: pure functions and one `BACKENDS` table entry per firewall (setup, change,
 *   reconcile, session, cleanup, count); `makeBackend` runs an entry, `KernelSession` is the
 *   long-lived `ipset restore` / `nft -i` a batch goes to.
 * - `desiredState` / `changesFor`: pure, what the kernel should hold and the diff to get there.
 * - `Applier`: owns the claims and what was applied; batches changes into the backend, one
 *   kernel command at a time, reconciles after a sync, writes BLOCK/UNBLOCK/REJECT rows.
 * - `StateFile` (--state), `CsvLog` (--csv), `Spool` (--spool forwarding, per connection).
 * - `HubLink`: connects and reconnects; each connection is a `Session`, made on open and thrown
 *   away on close, that turns the hub's frames into calls on the applier.
 * - `startAgent` wires these together; `parseArgs` and `main` are the command line.
 *
 * @module
 */

import { spawn, type ChildProcess } from "node:child_process";
import { lookup } from "node:dns/promises";
import { once } from "node:events";
import { createServer, type Server } from "node:http";
import { createWriteStream, existsSync, readFileSync, realpathSync, statSync, type WriteStream } from "node:fs";
import { appendFile, mkdir, open, readdir, readFile, rename, unlink } from "node:fs/promises";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { execa } from "execa";
import WebSocket from "ws";
import yargs from "yargs";
import {
  CSV_HEADER,
  MAX_APPLIED_BATCH,
  MAX_ENFORCEMENT_HOOKS,
  MAX_ENFORCEMENT_TEXT,
  MAX_APPLIED_RT_MS,
  MAX_CLOCK_SKEW_MS,
  MAX_HUB_FRAME_BYTES,
  PROTOCOL_VERSION,
  blockedUntil,
  csvRow,
  mergeClaim,
  overlaps,
  parseAddress,
  parseHubFrame,
  parseNodeFrame,
  pruneClaims,
  type AckFrame,
  type Address,
  type AppliedRecord,
  type BanFrame,
  type Claims,
  type CsvRecord,
  type Cursor,
  type EnforcementFrame,
  type ErrorFrame,
  type FleetEvent,
  type SyncFrame,
  type UnbanFrame,
  type WelcomeFrame,
} from "./messages.ts";

/** Everything `startAgent` needs; `parseArgs` turns flags into this. */
export interface AgentOptions {
  hubs: string[];
  tokenFile: string;
  node?: string;
  backend: BackendName;
  allow: string[];
  ports: number[];
  csvPath?: string;
  spoolDir?: string;
  /** File keeping the cursor and claims across restarts, so a restart resumes instead of a full sync. */
  statePath?: string;
  ca?: string;
  heartbeatMs: number;
  /** Name of the sets, chain and table the agent owns. */
  prefix: string;
  /** `HOST:PORT` to serve the agent's own Prometheus metrics on (`--metrics`); off when absent. */
  metrics?: string;
  log: (line: string) => void;
}

/** One change to the kernel: block `ip` until `until` (null: for good), or unblock it (`until` undefined). */
export interface Change {
  ip: string;
  until: number | null | undefined;
}

/** What the backends need to know to write their commands. */
export interface FirewallConfig {
  prefix: string;
  ports: number[];
  allow: Address[];
}

/** A command to run: argv, and what to write to its stdin; with `unless`, only when that check command fails. */
export interface Command {
  argv: string[];
  input?: string;
  unless?: string[];
}

/** One step of a backend's plan: a command, or (dry-run) a line for the log. */
export type Step = Command | { log: string };

/** A running agent. */
export interface Agent {
  claims: Claims;
  cursor(): Cursor | undefined;
  close(): Promise<void>;
}

/** What the agent's CSV rows say; time and node are added by `CsvLog`. */
export type Row = Omit<CsvRecord, "time" | "node">;

/** Largest timeout ipset accepts, in seconds; longer bans are capped and renewed by each reconcile. */
export const IPSET_MAX_TIMEOUT_S = 2147483;
const MAX_ELEMENTS = 2_097_152;
const CMD_TIMEOUT_MS = 60_000;
/** Response-time reports (`applied`): gathered this long before one frame goes, at most this many waiting. */
const APPLIED_FLUSH_MS = 250;
const MAX_APPLIED_QUEUE = 1000;
/** Batches larger than this go to a one-shot process (a burst: its start is small next to it). */
const SESSION_MAX_BYTES = 256 * 1024;
const AGENT_FLAGS = ["config", "hub", "token-file", "node", "backend", "allow", "ports", "csv", "spool", "state", "ca", "heartbeat", "prefix", "cleanup", "metrics"];
/** Enforcement reports (`enforcement`): the snapshot is compared this often, and sent when it changed. */
const ENFORCEMENT_REPORT_MS = 1000;
/** How often the stand-in `KernelLook` counts the kernel's entries and checks the hooks. */
const KERNEL_LOOK_MS = 2000;

// ---------------------------------------------------------------------------------------------
// Pure helpers and the backends' plans

/** Delay before reconnect attempt `attempt` (0-based): exponential from `baseMs`, capped, with jitter in [50%, 100%]. */
export function nextDelay(attempt: number, baseMs = 500, capMs = 30_000, random = Math.random): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/** Seconds left until `until`, rounded up; 0 means permanent, negative means already over. */
export function remainingSeconds(until: number | null, now: number): number {
  if (until === null) return 0;
  const left = Math.ceil((until - now) / 1000);
  return left <= 0 ? -1 : left;
}

function family(ip: string): 4 | 6 {
  return ip.includes(":") ? 6 : 4;
}

function portMatch(ports: number[]): string[] {
  return ports.length ? ["-p", "tcp", "-m", "multiport", "--dports", ports.join(",")] : [];
}

/** iptables-restore input that (re)writes the agent's chain atomically: allowlist RETURNs, then `rules`. */
function chainRestore(cfg: FirewallConfig, fam: 4 | 6, rules: string[][]): string {
  const lines = ["*filter", `:${cfg.prefix} - [0:0]`];
  for (const a of cfg.allow) if (a.family === fam) lines.push(`-A ${cfg.prefix} -s ${a.text} -j RETURN`);
  for (const r of rules) lines.push(`-A ${cfg.prefix} ${r.join(" ")}`);
  lines.push("COMMIT", "");
  return lines.join("\n");
}

function iptablesFor(fam: 4 | 6): string {
  return fam === 4 ? "iptables" : "ip6tables";
}

/** ipset backend: set names. */
export function ipsetNames(prefix: string): { v4: string; v6: string } {
  return { v4: `${prefix}-v4`, v6: `${prefix}-v6` };
}

function ipsetCreate(name: string, fam: 4 | 6): string {
  return `create ${name} hash:net family ${fam === 4 ? "inet" : "inet6"} hashsize 1024 maxelem ${MAX_ELEMENTS} timeout 0`;
}

function ipsetAddLine(set: string, ip: string, until: number | null, now: number): string | undefined {
  const left = remainingSeconds(until, now);
  if (left < 0) return undefined;
  return `add ${set} ${ip} timeout ${Math.min(left, IPSET_MAX_TIMEOUT_S)}`;
}

/** ipset backend: `ipset restore` input for a batch of changes (idempotent: run with -exist). */
export function ipsetChangeScript(prefix: string, changes: Change[], now: number): string {
  const names = ipsetNames(prefix);
  const lines: string[] = [];
  for (const c of changes) {
    const set = family(c.ip) === 4 ? names.v4 : names.v6;
    const add = c.until === undefined ? undefined : ipsetAddLine(set, c.ip, c.until, now);
    lines.push(add ?? `del ${set} ${c.ip}`);
  }
  return lines.join("\n") + "\n";
}

/**
 * ipset backend: `ipset restore` input that makes each set hold exactly `desired`, atomically:
 * fill a scratch set, swap it with the live one, destroy the scratch. No moment without bans.
 */
export function ipsetReconcileScript(prefix: string, desired: Map<string, number | null>, now: number): string {
  const names = ipsetNames(prefix);
  const lines: string[] = [];
  for (const fam of [4, 6] as const) {
    const live = fam === 4 ? names.v4 : names.v6;
    const tmp = `${live}-tmp`;
    lines.push(ipsetCreate(tmp, fam), `flush ${tmp}`);
    for (const [ip, until] of desired) {
      if (family(ip) !== fam) continue;
      const add = ipsetAddLine(tmp, ip, until, now);
      if (add) lines.push(add);
    }
    lines.push(`swap ${tmp} ${live}`, `destroy ${tmp}`);
  }
  return lines.join("\n") + "\n";
}

/** ipset backend: commands that create the sets and the DROP rules if missing. Never flushes a set. */
export function ipsetSetupCommands(cfg: FirewallConfig): Command[] {
  const names = ipsetNames(cfg.prefix);
  const cmds: Command[] = [{ argv: ["ipset", "-exist", "restore"], input: `${ipsetCreate(names.v4, 4)}\n${ipsetCreate(names.v6, 6)}\n` }];
  for (const fam of [4, 6] as const) {
    const rule = [...portMatch(cfg.ports), "-m", "set", "--match-set", fam === 4 ? names.v4 : names.v6, "src", "-j", "DROP"];
    cmds.push({ argv: [`${iptablesFor(fam)}-restore`, "--noflush"], input: chainRestore(cfg, fam, [rule]) });
  }
  return cmds;
}

/** nftables backend: the table's definition, sets created if missing, chain rules rewritten atomically. */
export function nftSetupScript(cfg: FirewallConfig): string {
  const t = `inet ${cfg.prefix}`;
  const ports = cfg.ports.length ? `tcp dport { ${cfg.ports.join(", ")} } ` : "";
  const allow4 = cfg.allow.filter((a) => a.family === 4).map((a) => a.text);
  const allow6 = cfg.allow.filter((a) => a.family === 6).map((a) => a.text);
  const lines = [
    `add table ${t}`,
    `add set ${t} v4 { type ipv4_addr; flags interval, timeout; size ${MAX_ELEMENTS}; }`,
    `add set ${t} v6 { type ipv6_addr; flags interval, timeout; size ${MAX_ELEMENTS}; }`,
    // Priority just before the usual filter chains, so a ban wins over their ACCEPT rules.
    `add chain ${t} input { type filter hook input priority filter - 10; policy accept; }`,
    `flush chain ${t} input`,
  ];
  if (allow4.length) lines.push(`add rule ${t} input ip saddr { ${allow4.join(", ")} } return`);
  if (allow6.length) lines.push(`add rule ${t} input ip6 saddr { ${allow6.join(", ")} } return`);
  lines.push(`add rule ${t} input ${ports}ip saddr @v4 drop`, `add rule ${t} input ${ports}ip6 saddr @v6 drop`);
  return lines.join("\n") + "\n";
}

function nftElement(ip: string, until: number | null, now: number): string | undefined {
  const left = remainingSeconds(until, now);
  if (left < 0) return undefined;
  return left === 0 ? ip : `${ip} timeout ${left}s`;
}

/**
 * nftables backend: one transaction for a batch of changes. An element's timeout cannot be
 * changed in place, and deleting a missing element fails the transaction, so each address
 * is first added (a no-op when present), then deleted, then added with its new timeout.
 */
export function nftChangeScript(prefix: string, changes: Change[], now: number): string {
  const lines: string[] = [];
  for (const c of changes) {
    const set = `inet ${prefix} ${family(c.ip) === 4 ? "v4" : "v6"}`;
    lines.push(`add element ${set} { ${c.ip} }`, `delete element ${set} { ${c.ip} }`);
    const el = c.until === undefined ? undefined : nftElement(c.ip, c.until, now);
    if (el) lines.push(`add element ${set} { ${el} }`);
  }
  return lines.join("\n") + "\n";
}

/** nftables backend: one atomic transaction that makes the sets hold exactly `desired`. */
export function nftReconcileScript(prefix: string, desired: Map<string, number | null>, now: number): string {
  const lines = [`flush set inet ${prefix} v4`, `flush set inet ${prefix} v6`];
  const els: Record<4 | 6, string[]> = { 4: [], 6: [] };
  for (const [ip, until] of desired) {
    const el = nftElement(ip, until, now);
    if (el) els[family(ip)].push(el);
  }
  for (const fam of [4, 6] as const) {
    for (let i = 0; i < els[fam].length; i += 1000) lines.push(`add element inet ${prefix} v${fam} { ${els[fam].slice(i, i + 1000).join(", ")} }`);
  }
  return lines.join("\n") + "\n";
}

/** iptables backend: the chain rewritten atomically with one DROP rule per blocked address. */
export function iptablesReconcileCommands(cfg: FirewallConfig, blocked: Iterable<string>): Command[] {
  const rules: Record<4 | 6, string[][]> = { 4: [], 6: [] };
  for (const ip of blocked) rules[family(ip)].push(["-s", ip, ...portMatch(cfg.ports), "-j", "DROP"]);
  return ([4, 6] as const).map((fam) => ({ argv: [`${iptablesFor(fam)}-restore`, "--noflush"], input: chainRestore(cfg, fam, rules[fam]) }));
}

/** iptables backend: one `-A`/`-D` per change, in one iptables-restore per family. `present` is what the chain holds now. */
export function iptablesChangeCommands(cfg: FirewallConfig, changes: Change[], present: Set<string>): Command[] {
  const lines: Record<4 | 6, string[]> = { 4: [], 6: [] };
  for (const c of changes) {
    const has = present.has(c.ip);
    const want = c.until !== undefined;
    if (has === want) continue;
    lines[family(c.ip)].push(`${want ? "-A" : "-D"} ${cfg.prefix} -s ${c.ip} ${[...portMatch(cfg.ports), "-j", "DROP"].join(" ")}`);
  }
  return ([4, 6] as const)
    .filter((fam) => lines[fam].length)
    .map((fam) => ({ argv: [`${iptablesFor(fam)}-restore`, "--noflush"], input: ["*filter", ...lines[fam], "COMMIT", ""].join("\n") }));
}


/** How to talk to one long-lived firewall process (`KernelSession`). */
export interface SessionKind {
  argv: string[];
  /** The input for one batch, its acknowledging command included. */
  frame(script: string): string;
  /** True for the output line that acknowledges a batch. */
  isAck(line: string): boolean;
}

/**
 * ipset: `ipset -exist restore` reads commands line by line and aggregates consecutive adds
 * until another command comes; `list -n SET` ends the batch (flushing it into the kernel) and
 * prints the set's name, the acknowledgement. Any error ends the process.
 */
export function ipsetSession(ackSet: string): SessionKind {
  return {
    argv: ["stdbuf", "-oL", "ipset", "-exist", "restore"],
    frame: (script) => `${script}${script.endsWith("\n") || !script ? "" : "\n"}list -n ${ackSet}\n`,
    isAck: (line) => line === ackSet,
  };
}

/**
 * nftables: `nft -i` runs each input line as one transaction, so a batch goes on one line, its
 * commands joined by `;` (atomic, as with `nft -f`); `list chain` of the agent's small input
 * chain answers with the table's closing `}` at the start of a line, the acknowledgement. An
 * error does not end the process: it is a line on stderr, written before the answer.
 */
export function nftSession(prefix: string): SessionKind {
  return {
    argv: ["stdbuf", "-oL", "nft", "-i"],
    frame: (script) => `${script.split("\n").filter(Boolean).join("; ")}\nlist chain inet ${prefix} input\n`,
    isAck: (line) => line === "}",
  };
}

/** Steps that hook the agent's chain into INPUT unless it is already (ipset and iptables backends). */
function jumpSteps(prefix: string): Command[] {
  return (["iptables", "ip6tables"] as const).map((bin) => ({
    unless: [bin, "-w", "-C", "INPUT", "-j", prefix],
    // -I, not -A: the ban must come before any ACCEPT rule already in INPUT.
    argv: [bin, "-w", "-I", "INPUT", "1", "-j", prefix],
  }));
}

/** Commands that remove the agent's chain and its jump from INPUT, for both families. */
function chainCleanup(prefix: string): string[][] {
  return ["iptables", "ip6tables"].flatMap((bin) => [[bin, "-w", "-D", "INPUT", "-j", prefix], [bin, "-w", "-F", prefix], [bin, "-w", "-X", prefix]]);
}

/** The agent's DROP rules in `iptables -S` output (one per address): the addresses they block. */
function iptablesListed(output: string): string[] {
  const out: string[] = [];
  for (const m of output.matchAll(/^-A \S+ -s (\S+) .*-j DROP$/gm)) {
    const a = parseAddress(m[1].replace(/\/(32|128)$/, ""));
    if (a) out.push(a.text);
  }
  return out;
}

/**
 * Everything the agent does with one firewall, as pure plans that `makeBackend` runs. A new
 * firewall is one new entry of `BACKENDS`; the flag's choices and help come from the table.
 */
export interface BackendPlan {
  /** How this backend blocks, for --help. */
  describe: string;
  /** Creates the firewall objects where missing, at every start; never flushes a set (bans keep enforcing). */
  setup(cfg: FirewallConfig): Step[];
  /** One batch of changes. `present`: what the kernel holds, kept for backends with `listed`. */
  change(cfg: FirewallConfig, changes: Change[], now: number, present: Set<string>): Step[];
  /** Makes the kernel hold exactly `desired`, atomically: run after each sync. */
  reconcile(cfg: FirewallConfig, desired: Map<string, number | null>, now: number): Step[];
  /** The long-lived process a batch goes to first (`KernelSession`); `change` is then one command, run one-shot when the session fails. */
  session?(prefix: string): SessionKind;
  /** Removes every object the agent created, and nothing else (each command may fail when absent). */
  cleanup(prefix: string): string[][];
  /** Commands whose output tells how many addresses the kernel holds (`ban.ts status` keeps a copy, kept in step by a test). */
  count(prefix: string): string[][];
  /** The addresses in `count`'s output, for a backend whose changes depend on what the kernel holds. */
  listed?(output: string): string[];
}

const BACKEND_TABLE = {
  ipset: {
    describe: "ipset sets",
    setup: (cfg) => [...ipsetSetupCommands(cfg), ...jumpSteps(cfg.prefix)],
    change: (cfg, changes, now) => [{ argv: ["ipset", "-exist", "restore"], input: ipsetChangeScript(cfg.prefix, changes, now) }],
    reconcile: (cfg, desired, now) => [{ argv: ["ipset", "-exist", "restore"], input: ipsetReconcileScript(cfg.prefix, desired, now) }],
    session: (prefix) => ipsetSession(ipsetNames(prefix).v4),
    cleanup: (prefix) => [...chainCleanup(prefix), ...Object.values(ipsetNames(prefix)).map((set) => ["ipset", "destroy", set])],
    count: (prefix) => Object.values(ipsetNames(prefix)).map((set) => ["ipset", "list", "-terse", set]),
  },
  nftables: {
    describe: "an nftables table",
    setup: (cfg) => [{ argv: ["nft", "-f", "-"], input: nftSetupScript(cfg) }],
    change: (cfg, changes, now) => [{ argv: ["nft", "-f", "-"], input: nftChangeScript(cfg.prefix, changes, now) }],
    reconcile: (cfg, desired, now) => [{ argv: ["nft", "-f", "-"], input: nftReconcileScript(cfg.prefix, desired, now) }],
    session: nftSession,
    cleanup: (prefix) => [["nft", "delete", "table", "inet", prefix]],
    count: (prefix) => ["v4", "v6"].map((set) => ["nft", "-j", "list", "set", "inet", prefix, set]),
  },
  iptables: {
    describe: "one iptables rule per address",
    // The chain is created when `iptables -S` cannot list it; the rules a previous run left stay (see `listed`).
    setup: (cfg) => [...(["iptables", "ip6tables"] as const).map((bin) => ({ unless: [bin, "-w", "-S", cfg.prefix], argv: [bin, "-w", "-N", cfg.prefix] })), ...jumpSteps(cfg.prefix)],
    change: (cfg, changes, _now, present) => iptablesChangeCommands(cfg, changes, present),
    reconcile: (cfg, desired) => iptablesReconcileCommands(cfg, desired.keys()),
    cleanup: chainCleanup,
    count: (prefix) => ["iptables", "ip6tables"].map((bin) => [bin, "-w", "-S", prefix]),
    listed: iptablesListed,
  },
  "dry-run": {
    describe: "log only",
    setup: (cfg) => [{ log: `dry-run: would create the ${cfg.prefix} firewall objects` }],
    change: (_cfg, changes) => changes.map((c) => ({ log: `dry-run: would ${c.until === undefined ? `unblock ${c.ip}` : `block ${c.ip} until ${c.until === null ? "never" : new Date(c.until).toISOString()}`}` })),
    reconcile: (_cfg, desired) => [{ log: `dry-run: would make the kernel hold exactly ${desired.size} address(es)` }],
    cleanup: () => [],
    count: () => [],
  },
} satisfies Record<string, BackendPlan>;

/** A firewall backend's name: a key of `BACKENDS`. */
export type BackendName = keyof typeof BACKEND_TABLE;

/** The plan of each firewall backend. */
export const BACKENDS: Readonly<Record<BackendName, BackendPlan>> = BACKEND_TABLE;

/** The backends' names, in table order (the --backend choices). */
export const BACKEND_NAMES = Object.keys(BACKENDS) as BackendName[];

/** Commands that remove every object the agent created, and nothing else (each may fail when absent). */
export function cleanupCommands(backend: BackendName, prefix: string): string[][] {
  return BACKENDS[backend].cleanup(prefix);
}

/** The commands whose output tells how many addresses the kernel holds for `backend` (ban.ts's `kernelCountCommands` is a copy). */
export function countCommands(backend: BackendName, prefix: string): string[][] {
  return BACKENDS[backend].count(prefix);
}

// ---------------------------------------------------------------------------------------------
// What the kernel should hold: pure

/**
 * Why an address must never be blocked (an allowlisted range, or not an address at all), decided
 * once per address: the allowlist is fixed for the agent's life, and a sync of 100k addresses
 * asks twice per address (merge, then reconcile). The cache is cleared past `limit()` entries.
 */
export class Allowlist {
  private readonly cache = new Map<string, string | undefined>();

  constructor(
    readonly entries: Address[],
    private readonly limit: () => number = () => 10_000,
  ) {}

  /** Why `ip` is never blocked, or undefined when it may be. */
  reason(ip: string): string | undefined {
    if (this.cache.has(ip)) return this.cache.get(ip);
    const a = parseAddress(ip);
    const hit = a && this.entries.find((x) => overlaps(x, a));
    const why = !a ? "not an address" : hit ? `allowlisted (${hit.text})` : undefined;
    if (this.cache.size >= this.limit()) this.cache.clear();
    this.cache.set(ip, why);
    return why;
  }
}

/**
 * What the kernel should hold: address -> until (null: for good), for each of `ips` (default:
 * every claimed address) that the claims block at `now` and the allowlist does not protect.
 */
export function desiredState(claims: Claims, allow: Allowlist, now: number, ips: Iterable<string> = claims.keys()): Map<string, number | null> {
  const desired = new Map<string, number | null>();
  for (const ip of ips) {
    if (allow.reason(ip)) continue;
    const until = blockedUntil(claims.get(ip), now);
    if (until !== undefined) desired.set(ip, until);
  }
  return desired;
}

/**
 * The changes that take the kernel from `applied` to `desired`. With `ips`, only those addresses
 * are compared (`desired` need hold no others); without, both maps in full: unblocks first,
 * then new blocks and changed ends.
 */
export function changesFor(desired: Map<string, number | null>, applied: Map<string, number | null>, ips?: Iterable<string>): Change[] {
  const changes: Change[] = [];
  if (ips) {
    for (const ip of ips) {
      const until = desired.get(ip);
      if (until !== applied.get(ip)) changes.push({ ip, until });
    }
    return changes;
  }
  for (const ip of applied.keys()) if (!desired.has(ip)) changes.push({ ip, until: undefined });
  for (const [ip, until] of desired) if (applied.get(ip) !== until) changes.push({ ip, until });
  return changes;
}

// ---------------------------------------------------------------------------------------------
// Backends: thin execution of the plans above


/**
 * A long-lived firewall process that takes batches on its stdin, so a ban costs a pipe write
 * instead of a process start (on a busy machine the start is most of the latency). stdbuf
 * makes its stdout line-buffered so the acknowledgement arrives at once. A batch fails when the
 * process ends, or writes to stderr, before acknowledging it; the caller then runs the batch as
 * a one-shot command, whose error message is exact, and the next batch starts a new process.
 */
export class KernelSession {
  private child: ChildProcess | undefined;
  private out = "";
  private err = "";
  private failedBatch = false;
  /** After an error line, how long to wait for the acknowledgement (the acknowledging command may have failed too). */
  private errTimer: NodeJS.Timeout | undefined;
  private waiting: Array<{ resolve: () => void; reject: (e: Error) => void; timer: NodeJS.Timeout }> = [];

  constructor(private readonly kind: SessionKind) {}

  send(script: string): Promise<void> {
    if (script.length > SESSION_MAX_BYTES) return Promise.reject(new Error("batch too large for the session"));
    const child = this.child ?? this.start();
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new Error(`${this.kind.argv[2]} gave no answer in ${CMD_TIMEOUT_MS} ms`)), CMD_TIMEOUT_MS);
      this.waiting.push({ resolve, reject, timer });
      child.stdin!.write(this.kind.frame(script));
    });
  }

  close(): void {
    this.fail(new Error("closed"));
  }

  private start(): ChildProcess {
    const child = spawn(this.kind.argv[0], this.kind.argv.slice(1), { stdio: ["pipe", "pipe", "pipe"] });
    this.child = child;
    this.out = "";
    this.err = "";
    this.failedBatch = false;
    child.stdout!.setEncoding("utf8").on("data", (d: string) => {
      if (child !== this.child) return;
      this.out += d;
      let nl: number;
      while ((nl = this.out.indexOf("\n")) >= 0) {
        const line = this.out.slice(0, nl);
        this.out = this.out.slice(nl + 1);
        if (!this.kind.isAck(line)) continue;
        // stderr was written before this answer: its data, if any, is delivered in this same
        // poll phase, so decide once the phase is over.
        setImmediate(() => {
          clearTimeout(this.errTimer);
          this.errTimer = undefined;
          const w = this.waiting.shift();
          if (!w) return;
          clearTimeout(w.timer);
          if (!this.failedBatch) return w.resolve();
          this.failedBatch = false;
          w.reject(new Error(this.err.trim().split("\n").slice(0, 3).join(" / ")));
        });
      }
    });
    child.stderr!.setEncoding("utf8").on("data", (d: string) => {
      this.err = (this.err + d).slice(-2000);
      this.failedBatch = true;
      this.errTimer ??= setTimeout(() => this.fail(new Error(this.err.trim().split("\n").slice(0, 3).join(" / "))), 1000);
    });
    child.stdin!.on("error", () => {}); // EPIPE when the process has exited: reported by "exit" below
    child.on("error", (e) => child === this.child && this.fail(e));
    child.on("exit", (code, sig) => child === this.child && this.fail(new Error(`${this.kind.argv[2]} ended (${sig ?? `exit ${code}`}): ${this.err.trim().split("\n").slice(0, 3).join(" / ")}`)));
    return child;
  }

  private fail(e: Error): void {
    clearTimeout(this.errTimer);
    this.errTimer = undefined;
    const child = this.child;
    this.child = undefined;
    if (child && child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    for (const w of this.waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(e);
    }
  }
}

/** A firewall command that failed: the message names it and says why, in one line. */
export class CommandError extends Error {}

async function run(cmd: Command): Promise<void> {
  const r = await execa(cmd.argv[0], cmd.argv.slice(1), { input: cmd.input ?? "", timeout: CMD_TIMEOUT_MS, reject: false, stripFinalNewline: true });
  if (r.exitCode !== 0) {
    const why = String(r.stderr || r.stdout || r.shortMessage || "").split("\n").slice(0, 3).join(" / ");
    throw new CommandError(`${cmd.argv.join(" ")} failed (${r.timedOut ? "timed out" : `exit ${r.exitCode}`}): ${why}`);
  }
}

/** Runs one step of a plan: logs it, or runs its command (unless its check command succeeds). */
async function runStep(step: Step, log: (s: string) => void): Promise<void> {
  if ("log" in step) return log(step.log);
  if (step.unless && (await execa(step.unless[0], step.unless.slice(1), { timeout: CMD_TIMEOUT_MS, reject: false })).exitCode === 0) return;
  await run(step);
}

/** A firewall backend at work: a `BACKENDS` entry run against the kernel. */
export interface Backend {
  setup(): Promise<void>;
  apply(changes: Change[], now: number): Promise<void>;
  reconcile(desired: Map<string, number | null>, now: number): Promise<void>;
  close(): void;
}

/** Creates the backend for `name`: runs its plan, batches through its session if it has one; `log` receives dry-run plans. */
export function makeBackend(name: BackendName, cfg: FirewallConfig, log: (s: string) => void): Backend {
  const plan = BACKENDS[name];
  const kind = plan.session?.(cfg.prefix);
  const session = kind && new KernelSession(kind);
  /** What the kernel holds, for a backend whose changes depend on it (`listed`). */
  const present = new Set<string>();
  const runAll = async (steps: Step[]) => {
    for (const s of steps) await runStep(s, log);
  };
  return {
    async setup() {
      await runAll(plan.setup(cfg));
      if (plan.listed) {
        // Learn what a previous run left, without touching it.
        for (const argv of plan.count(cfg.prefix)) {
          const r = await execa(argv[0], argv.slice(1), { timeout: CMD_TIMEOUT_MS, reject: false });
          if (r.exitCode === 0) for (const ip of plan.listed(r.stdout)) present.add(ip);
        }
      }
      // Start the long-lived process now, so the first ban does not pay for it.
      if (session) await session.send("").catch((e: Error) => log(`warning: ${e.message}; each batch will start its own ${kind.argv[2]}`));
    },
    async apply(changes, now) {
      for (const step of plan.change(cfg, changes, now, present)) {
        if (session && "argv" in step) await session.send(step.input ?? "").catch(() => run(step));
        else await runStep(step, log);
      }
      if (plan.listed) for (const c of changes) c.until === undefined ? present.delete(c.ip) : present.add(c.ip);
    },
    async reconcile(desired, now) {
      await runAll(plan.reconcile(cfg, desired, now));
      if (plan.listed) {
        present.clear();
        for (const ip of desired.keys()) present.add(ip);
      }
    },
    close: () => session?.close(),
  };
}

/** Removes every firewall object the agent created (sets, chain, jump rules, table); missing ones are fine. */
export async function cleanup(backend: BackendName, prefix: string, log: (s: string) => void): Promise<void> {
  for (const argv of cleanupCommands(backend, prefix)) {
    const r = await execa(argv[0], argv.slice(1), { timeout: CMD_TIMEOUT_MS, reject: false });
    if (r.exitCode === 0) log(`removed: ${argv.join(" ")}`);
  }
}

// ---------------------------------------------------------------------------------------------
// State file (--state): cursor and claims

/** The agent's state file: where it is in the hub's stream, and the claims it holds. */
export interface AgentState {
  v: 1;
  cursor: Cursor;
  claims: FleetEvent[];
}

/** Serialises the state file's content. */
export function stateText(cursor: Cursor, claims: Claims): string {
  const events: FleetEvent[] = [];
  for (const byOrigin of claims.values()) for (const e of byOrigin.values()) events.push(e);
  return JSON.stringify({ v: 1, cursor, claims: events } satisfies AgentState) + "\n";
}

/** Parses a state file; undefined when it is not one (the agent then starts with a full sync). */
export function parseState(text: string): AgentState | undefined {
  try {
    const s = JSON.parse(text) as AgentState;
    if (s?.v !== 1 || typeof s.cursor?.hub !== "string" || typeof s.cursor?.seq !== "string" || !Array.isArray(s.claims)) return undefined;
    const frame = parseHubFrame(JSON.stringify({ type: "sync", full: true, seq: s.cursor.seq, events: s.claims }));
    return frame.ok ? s : undefined;
  } catch {
    return undefined;
  }
}

/** Writes a file so that a crash leaves the old or the new content, never a torn one. */
async function writeAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp`;
  const fh = await open(tmp, "w", 0o600);
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
}

/**
 * The --state file: loaded once at start, written at most once a second while events arrive,
 * and once more on close. Without a path, or before the first cursor, it does nothing.
 */
export class StateFile {
  private timer: NodeJS.Timeout | undefined;
  private saving: Promise<void> = Promise.resolve();

  constructor(
    readonly path: string | undefined,
    private readonly log: (line: string) => void,
    /** What to save, read when the write happens. */
    private readonly snapshot: () => { cursor: Cursor | undefined; claims: Claims },
  ) {}

  /** The saved state, or undefined (no file; or not a state file, with a warning: a full sync follows). */
  async load(): Promise<AgentState | undefined> {
    if (!this.path || !existsSync(this.path)) return undefined;
    const saved = parseState(await readFile(this.path, "utf8"));
    if (!saved) this.log(`warning: ${this.path} is not a banshare agent state file; starting with a full sync`);
    return saved;
  }

  /** Saves within a second; more calls meanwhile add nothing. */
  schedule(): void {
    if (!this.path || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.save();
    }, 1000);
  }

  /** Saves now, after any write under way. */
  save(): Promise<void> {
    const { cursor, claims } = this.snapshot();
    const path = this.path;
    if (!path || !cursor) return this.saving;
    const text = stateText(cursor, claims);
    this.saving = this.saving.then(() => writeAtomic(path, text)).catch((e: Error) => this.log(`warning: cannot save ${path}: ${e.message}`));
    return this.saving;
  }

  /** The last save. */
  close(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    return this.save();
  }
}

// ---------------------------------------------------------------------------------------------
// CSV log (--csv)

/** The structured log: one row per BLOCK, SCHEDULE_UNBLOCK, UNBLOCK, REJECT; a no-op without a path. */
export class CsvLog {
  /** The node name the rows carry: the hub's name for this node once welcomed. */
  node: string;

  private constructor(
    private readonly out: WriteStream | undefined,
    node: string,
  ) {
    this.node = node;
  }

  /** Opens `path` for appending, writing the header first when the file is new. */
  static async open(path: string | undefined, node: string, log: (line: string) => void): Promise<CsvLog> {
    if (!path) return new CsvLog(undefined, node);
    if (!existsSync(path)) await appendFile(path, CSV_HEADER + "\n");
    const out = createWriteStream(path, { flags: "a" });
    out.on("error", (e) => log(`warning: cannot write ${path}: ${e.message}`));
    return new CsvLog(out, node);
  }

  /** Rows recorded and not yet written. */
  private pending = "";

  record(r: Row): void {
    if (!this.out) return;
    // The rows of one batch (a BLOCK and its SCHEDULE_UNBLOCK) go in one write, so that a reader
    // of the file never sees one without the other.
    if (!this.pending) queueMicrotask(() => this.flush());
    this.pending += csvRow({ time: Date.now(), node: this.node, ...r });
  }

  close(): Promise<void> {
    const out = this.out;
    this.flush();
    return out ? new Promise<void>((resolve) => out.end(resolve)) : Promise.resolve();
  }

  private flush(): void {
    if (this.pending) this.out?.write(this.pending);
    this.pending = "";
  }
}

// ---------------------------------------------------------------------------------------------
// The applier: claims in, kernel changes out

/** What an `Applier` is given. */
export interface ApplierOptions {
  backend: Backend;
  /** The backend's name, for the log. */
  backendName: string;
  allow: Allowlist;
  record: (r: Row) => void;
  log: (line: string) => void;
  /** Told after each batch, with the live events (relayed, not synced) it applied: the hub's response-time reports. */
  onApplied?: (changes: Change[], live: Map<string, FleetEvent>) => void;
}

/**
 * Owns the fleet's claims as this agent knows them and what it applied to the kernel. Events
 * mark addresses dirty; one kernel command runs at a time, and changes that arrive meanwhile
 * wait and go in the next batch. After a sync the kernel is reconciled to the claims in one
 * command. A sweep each second ends what expired.
 */
export class Applier {
  readonly claims: Claims = new Map();
  /** What the kernel holds, as far as the agent applied it: address -> until. */
  private applied = new Map<string, number | null>();
  private readonly dirty = new Set<string>();
  /** Events relayed live (not in a sync), by address, until the batch that applies them. */
  private readonly arrived = new Map<string, FleetEvent>();
  private pendingReconcile = false;
  /** The kernel command under way. */
  private working: Promise<void> | undefined;
  private readonly sweeper: NodeJS.Timeout;
  private retryTimer: NodeJS.Timeout | undefined;

  constructor(private readonly opts: ApplierOptions) {
    // The kernel drops expired entries by itself; the sweep keeps memory and the log in step
    // (and does the expiring for the iptables backend, whose rules have no timeout).
    this.sweeper = setInterval(() => this.sweep(Date.now()), 1000);
    this.sweeper.unref();
  }

  /** Takes the claims of a saved state, as what the kernel held then: the next reconcile logs only real changes. */
  restore(events: FleetEvent[], now: number): void {
    for (const e of events) mergeClaim(this.claims, e);
    this.applied = desiredState(this.claims, this.opts.allow, now);
  }

  /** Merges events (a REJECT row for an allowlisted ban) and applies what changed; `live`: remember them for `onApplied`. */
  take(events: FleetEvent[], live = false): void {
    for (const e of events) {
      const why = this.opts.allow.reason(e.ip);
      if (why && e.kind === "ban") this.opts.record({ action: "REJECT", ip: e.ip, origin: e.origin, jail: e.jail, until: e.until, detail: why });
      if (mergeClaim(this.claims, e)) this.dirty.add(e.ip);
      if (live && (this.arrived.size < MAX_APPLIED_QUEUE * 10 || this.arrived.has(e.ip))) this.arrived.set(e.ip, e);
    }
    this.kick();
  }

  /** The answer to a hello: the full state (`full`) or the events missed; the kernel is then reconciled. */
  sync(events: FleetEvent[], full: boolean): void {
    if (full) this.claims.clear();
    this.pendingReconcile = true;
    this.take(events);
  }

  /** Addresses the agent applied to the kernel: what it should hold. */
  appliedCount(): number {
    return this.applied.size;
  }

  /** Forgets the live events not yet applied (their connection closed: nobody to report to). */
  forgetLive(): void {
    this.arrived.clear();
  }

  /** Marks what ended by `now` (claims and applied entries) and applies it. */
  sweep(now: number): void {
    for (const ip of pruneClaims(this.claims, now)) this.dirty.add(ip);
    for (const [ip, until] of this.applied) if (until !== null && until <= now) this.dirty.add(ip);
    if (this.dirty.size) this.kick();
  }

  /** Stops the sweep, waits for the kernel command under way (and those it queued), then closes the backend. */
  async close(): Promise<void> {
    clearInterval(this.sweeper);
    clearTimeout(this.retryTimer);
    while (this.working) await this.working.catch(() => {});
    this.opts.backend.close();
  }

  private kick(): void {
    if (!this.working) void this.work().catch((e: Error) => this.opts.log(`error: ${e.stack}`));
  }

  private async work(): Promise<void> {
    while ((this.dirty.size || this.pendingReconcile) && !this.working) {
      const now = Date.now();
      if (this.pendingReconcile) await this.reconcile(now);
      else await this.applyDirty(now);
    }
  }

  private async reconcile(now: number): Promise<void> {
    const { backend, allow, log } = this.opts;
    this.pendingReconcile = false;
    this.dirty.clear();
    this.arrived.clear();
    const desired = desiredState(this.claims, allow, now);
    this.working = backend.reconcile(desired, now);
    try {
      await this.working;
      for (const c of changesFor(desired, this.applied)) this.logApplied(c.ip, this.applied.get(c.ip), c.until, now, "sync");
      this.applied = desired;
      log(`synced: ${desired.size} address(es) blocked (${this.opts.backendName})`);
    } catch (e) {
      log(`error: reconcile failed, retrying in 5 s: ${(e as Error).message}`);
      this.retryTimer = setTimeout(() => {
        this.pendingReconcile = true;
        this.kick();
      }, 5000);
      this.retryTimer.unref();
    } finally {
      this.working = undefined;
    }
  }

  private async applyDirty(now: number): Promise<void> {
    const { backend, record, log } = this.opts;
    const changes = changesFor(desiredState(this.claims, this.opts.allow, now, this.dirty), this.applied, this.dirty);
    const live = new Map<string, FleetEvent>();
    if (this.arrived.size) {
      for (const ip of this.dirty) {
        const e = this.arrived.get(ip);
        if (e) {
          live.set(ip, e);
          this.arrived.delete(ip);
        }
      }
    }
    this.dirty.clear();
    if (!changes.length) return;
    this.working = backend.apply(changes, now).catch(async (e: Error) => {
      // One bad element must not hold back the rest: retry one by one and report each failure.
      log(`warning: batch of ${changes.length} failed (${e.message}); applying one by one`);
      for (const c of [...changes]) {
        try {
          await backend.apply([c], now);
        } catch (err) {
          changes.splice(changes.indexOf(c), 1);
          record({ action: "REJECT", ip: c.ip, detail: `kernel refused: ${(err as Error).message}` });
          log(`error: ${(err as Error).message}`);
        }
      }
    });
    try {
      await this.working;
    } finally {
      this.working = undefined;
    }
    for (const c of changes) {
      this.logApplied(c.ip, this.applied.get(c.ip), c.until, Date.now(), "event");
      if (c.until === undefined) this.applied.delete(c.ip);
      else this.applied.set(c.ip, c.until);
    }
    if (live.size) this.opts.onApplied?.(changes, live);
    if (changes.length <= 20) {
      for (const c of changes) log(`${c.until === undefined ? "unblocked" : "blocked"} ${c.ip}${c.until === undefined ? "" : ` until ${c.until === null ? "never" : new Date(c.until).toISOString()}`}`);
    } else log(`applied ${changes.length} change(s)`);
  }

  /** The claim that makes `ip` blocked: the newest active ban, for the log. */
  private cause(ip: string): FleetEvent | undefined {
    let best: FleetEvent | undefined;
    for (const c of this.claims.get(ip)?.values() ?? []) if (c.kind === "ban" && (!best || c.detectedAt > best.detectedAt)) best = c;
    return best;
  }

  /** The CSV rows for one address whose kernel entry went from `before` to `after`. */
  private logApplied(ip: string, before: number | null | undefined, after: number | null | undefined, now: number, via: string): void {
    const record = this.opts.record;
    if (after === undefined) {
      if (before === undefined) return;
      const last = [...(this.claims.get(ip)?.values() ?? [])].sort((a, b) => b.detectedAt - a.detectedAt)[0];
      const expired = before !== null && before <= now;
      record({ action: "UNBLOCK", ip, origin: last?.origin, jail: last?.jail, detail: expired ? "ban ended" : `${via}: unbanned by ${last?.origin ?? "the fleet"}` });
      return;
    }
    const c = this.cause(ip);
    if (before === undefined) record({ action: "BLOCK", ip, origin: c?.origin, jail: c?.jail, until: after, rtMs: c ? now - c.detectedAt : undefined, detail: `${via}: banned by ${c?.origin ?? "?"}` });
    // A timed block that becomes permanent cancels its scheduled unblock: say so (until "never").
    if (after !== before && (after !== null || before !== undefined)) record({ action: "SCHEDULE_UNBLOCK", ip, origin: c?.origin, jail: c?.jail, until: after, detail: after === null ? "none: blocked for good" : `in ${Math.round((after - now) / 1000)} s` });
  }
}

// ---------------------------------------------------------------------------------------------
// Spool (--spool): events ban.ts could not deliver, forwarded over one connection

/**
 * Forwards the spool directory's events over one connection, now and every 5 s; a file is
 * deleted once the hub acks its event, moved to `rejected/` when the hub refuses it for good.
 * One per connection: what was sent and not yet answered is forgotten with it.
 */
export class Spool {
  /** Event id -> its file, sent and not yet answered. */
  private readonly sent = new Map<string, string>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    readonly dir: string,
    private readonly send: (frame: BanFrame | UnbanFrame) => void,
    private readonly log: (line: string) => void,
  ) {}

  start(): void {
    const round = () => void this.forward().catch((e: Error) => this.log(`warning: spool: ${e.message}`));
    round();
    this.timer = setInterval(round, 5000);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** Sends each spooled event not sent yet on this connection; moves unreadable files aside. */
  async forward(): Promise<void> {
    const files = (await readdir(this.dir).catch(() => [] as string[])).filter((f) => f.endsWith(".json")).sort();
    for (const f of files) {
      const path = join(this.dir, f);
      if ([...this.sent.values()].includes(path)) continue;
      const text = await readFile(path, "utf8").catch(() => "");
      if (!text) continue;
      const parsed = parseNodeFrame(text, Date.now());
      if (!parsed.ok || (parsed.value.type !== "ban" && parsed.value.type !== "unban")) {
        this.log(`warning: moving unreadable spool file ${f} aside: ${parsed.ok ? "not an event" : parsed.message}`);
        await this.reject(path);
        continue;
      }
      const frame = parsed.value as BanFrame | UnbanFrame;
      this.sent.set(frame.id, path);
      this.send(frame);
    }
  }

  /** The hub has the event `id` in its journal: its file goes. */
  acked(id: string): void {
    const path = this.sent.get(id);
    if (!path) return;
    this.sent.delete(id);
    void unlink(path).then(() => this.log(`delivered spooled event ${id}`)).catch(() => {});
  }

  /** The hub refused the event `id`: over the rate limit or a hub-side write error it stays for the next round, otherwise it is moved aside. */
  refused(id: string, code: ErrorFrame["code"]): void {
    const path = this.sent.get(id);
    if (!path) return;
    this.sent.delete(id);
    if (code !== "rate_limited" && code !== "internal") void this.reject(path).catch(() => {});
  }

  private async reject(path: string): Promise<void> {
    await mkdir(join(this.dir, "rejected"), { recursive: true });
    await rename(path, join(this.dir, "rejected", path.split("/").pop()!)).catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------
// Enforcement: what the agent reports to the hub, and serves on --metrics

/**
 * How the agent enforces now, as a snapshot: the hooks its DROP rules are reached from, the
 * entries its kernel sets hold against what it applied, and its repairs. The shape of the
 * Guard's `snapshot()`, so the Guard can stand in for `KernelLook` behind `enforcementSnapshot`.
 */
export interface EnforcementState {
  backend: string;
  hooks: Array<{ hook: string; state: "present" | "missing" | "absent"; since: number }>;
  /** What the last look found missing or wrong; empty while enforcing. */
  missing: string[];
  missingSince?: number;
  /** Entries in the kernel's sets (or rules) at the last count; undefined where not counted. */
  entries?: number;
  /** Addresses the agent applied. */
  expected: number;
  repairs: number;
  lastRepair?: { at: number; what: string };
}

/** The `enforcement` frame of a snapshot, cut to what messages.ts accepts (pure). */
export function enforcementFrame(s: EnforcementState): EnforcementFrame {
  const text = (t: string) => t.replace(/[^\x20-\x7e]/g, "?").slice(0, MAX_ENFORCEMENT_TEXT) || "?";
  const frame: EnforcementFrame = {
    type: "enforcement",
    backend: s.backend,
    hooks: s.hooks.slice(0, MAX_ENFORCEMENT_HOOKS).map((h) => ({ name: h.hook.slice(0, 64), state: h.state, since: h.since })),
    claims: s.expected,
    drift: s.entries === undefined ? 0 : Math.abs(s.entries - s.expected),
    missing: s.missing.slice(0, MAX_ENFORCEMENT_HOOKS).map(text),
    repairs: s.repairs,
  };
  if (s.entries !== undefined) frame.entries = s.entries;
  if (s.missingSince !== undefined) frame.missingSince = s.missingSince;
  if (s.lastRepair) frame.lastRepair = { at: s.lastRepair.at, what: text(s.lastRepair.what) };
  return frame;
}

/** The commands that tell whether each hook is in place: name -> check command (exit 0: present). */
function hookChecks(backend: BackendName, prefix: string): Array<[string, string[]]> {
  if (backend === "nftables") return [["nft input", ["nft", "list", "chain", "inet", prefix, "input"]]];
  if (backend === "dry-run") return [];
  return jumpSteps(prefix).map((s): [string, string[]] => [`${s.unless![0]} INPUT`, s.unless!]);
}

/** The entries one `count` command's output shows, for `backend`. */
function countedEntries(backend: BackendName, output: string): number {
  if (backend === "ipset") return Number(/^Number of entries: (\d+)/m.exec(output)?.[1] ?? 0);
  if (backend === "iptables") return iptablesListed(output).length;
  if (backend === "nftables") {
    const set = (JSON.parse(output) as { nftables?: Array<{ set?: { elem?: unknown[] } }> }).nftables?.find((o) => o.set)?.set;
    return set?.elem?.length ?? 0;
  }
  return 0;
}

/**
 * A stand-in for the Guard: every KERNEL_LOOK_MS it checks the hooks (`iptables -C`, `nft list
 * chain`) and counts the entries (the backend's `count` commands, set headers only for ipset),
 * and never repairs. `snapshot()` answers from the last look, without touching the kernel.
 */
export class KernelLook {
  private readonly hooks = new Map<string, { state: "present" | "missing" | "absent"; since: number }>();
  private missing: string[] = [];
  private missingSince: number | undefined;
  private entries: number | undefined;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;

  constructor(
    private readonly backend: BackendName,
    private readonly prefix: string,
    private readonly applier: Applier,
  ) {}

  start(): void {
    if (this.backend === "dry-run") return;
    void this.look();
    this.timer = setInterval(() => void this.look(), KERNEL_LOOK_MS);
    this.timer.unref();
  }

  snapshot(): EnforcementState {
    return { backend: this.backend, hooks: [...this.hooks].map(([hook, h]) => ({ hook, ...h })), missing: [...this.missing], missingSince: this.missingSince, entries: this.entries, expected: this.applier.appliedCount(), repairs: 0 };
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.running;
  }

  private look(): Promise<void> {
    this.running ??= this.check().catch(() => {}).finally(() => (this.running = undefined));
    return this.running;
  }

  private async check(): Promise<void> {
    const quiet = { timeout: CMD_TIMEOUT_MS, reject: false } as const;
    const [hooks, counts] = await Promise.all([
      Promise.all(hookChecks(this.backend, this.prefix).map(async ([name, argv]) => [name, (await execa(argv[0], argv.slice(1), quiet)).exitCode === 0] as const)),
      Promise.all(countCommands(this.backend, this.prefix).map((argv) => execa(argv[0], argv.slice(1), quiet))),
    ]);
    const now = Date.now();
    const missing: string[] = [];
    for (const [name, present] of hooks) {
      const state = present ? "present" : "missing";
      if (this.hooks.get(name)?.state !== state) this.hooks.set(name, { state, since: now });
      if (!present) missing.push(`${name} hook`);
    }
    let entries = 0;
    for (const [i, r] of counts.entries()) {
      if (r.exitCode === 0) entries += countedEntries(this.backend, r.stdout);
      else missing.push(`${countCommands(this.backend, this.prefix)[i].slice(-1)[0]} set`);
    }
    this.entries = entries;
    this.missing = missing;
    this.missingSince = missing.length ? (this.missingSince ?? now) : undefined;
  }
}

/** The agent's DROP rules' packet and byte counters (`iptables -L -v -x`, `nft list chain` with counters), read on request. */
async function dropCounters(backend: BackendName, prefix: string): Promise<{ packets: number; bytes: number } | undefined> {
  if (backend !== "ipset" && backend !== "iptables") return undefined;
  let packets = 0;
  let bytes = 0;
  for (const bin of ["iptables", "ip6tables"]) {
    const r = await execa(bin, ["-w", "-L", prefix, "-v", "-x", "-n"], { timeout: CMD_TIMEOUT_MS, reject: false });
    if (r.exitCode !== 0) continue;
    for (const m of r.stdout.matchAll(/^\s*(\d+)\s+(\d+)\s+DROP\b/gm)) {
      packets += Number(m[1]);
      bytes += Number(m[2]);
    }
  }
  return { packets, bytes };
}

/** The agent's own metrics in the Prometheus text format, from a snapshot and the DROP counters. */
export function agentMetricsText(s: EnforcementState, drops: { packets: number; bytes: number } | undefined): string {
  const f = enforcementFrame(s);
  const line = (name: string, type: string, help: string, v: number | undefined) => (v === undefined ? [] : [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, `${name} ${v}`]);
  return [
    ...line("banshare_agent_entries", "gauge", "Entries in the agent's kernel sets (or rules) at its last count.", f.entries),
    ...line("banshare_agent_claims", "gauge", "Addresses the agent applied: what the kernel should hold.", f.claims),
    ...line("banshare_agent_drift", "gauge", "Entries the kernel lacks or has too many.", f.drift),
    ...line("banshare_agent_hooks_missing", "gauge", "Hooks (jumps, chains, nftables hooks) missing.", f.hooks.filter((h) => h.state === "missing").length),
    ...line("banshare_agent_repairs_total", "counter", "Repairs since the agent started.", f.repairs),
    ...line("banshare_agent_dropped_packets_total", "counter", "Packets the agent's DROP rules dropped (their kernel counters).", drops?.packets),
    ...line("banshare_agent_dropped_bytes_total", "counter", "Bytes the agent's DROP rules dropped (their kernel counters).", drops?.bytes),
  ].join("\n") + "\n";
}

/** Serves `GET /metrics` on `listen` (`HOST:PORT`); the DROP counters are read from the kernel on each request only. */
export async function serveMetrics(listen: string, backend: BackendName, prefix: string, snapshot: () => EnforcementState, log: (line: string) => void): Promise<Server> {
  const m = /^(.*):(\d{1,5})$/.exec(listen)!;
  const server = createServer((req, res) => {
    if ((req.url ?? "").split("?")[0] !== "/metrics") {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end("banshare agent: see /metrics\n");
    }
    dropCounters(backend, prefix)
      .catch(() => undefined)
      .then((drops) => {
        res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
        res.end(agentMetricsText(snapshot(), drops));
      });
  });
  server.on("error", (e) => log(`warning: --metrics ${listen}: ${e.message}`));
  server.listen(Number(m[2]), m[1].replace(/^\[|\]$/g, ""));
  await once(server, "listening");
  log(`metrics on http://${listen}/metrics`);
  return server;
}

// ---------------------------------------------------------------------------------------------
// The hub link: one connection at a time, each a Session

/** What a `HubLink` is given. */
export interface HubLinkOptions extends Pick<AgentOptions, "hubs" | "node" | "spoolDir" | "heartbeatMs" | "ca" | "log"> {
  token: string;
  applier: Applier;
  state: StateFile;
  csv: CsvLog;
  /** How the agent enforces now, for the hub's `enforcement` reports (`enforcementSnapshot` in startAgent). */
  enforcement?: () => EnforcementState;
}

/** What a `Session` is given by its `HubLink`. */
interface SessionHost {
  /** Where the agent is in the hub's stream; a session moves it on. */
  cursor: Cursor | undefined;
  readonly opts: HubLinkOptions;
  /** The hub welcomed this session: the reconnect backoff starts over. */
  welcomed(): void;
}

/**
 * One connection to the hub, from open to close: the hello and heartbeat, the sync answering
 * the hello (maybe in chunks), live events, acks for the spool, and the response-time reports
 * for the hub. Made on each connection and thrown away when it closes.
 */
export class Session {
  /** The hub welcomed us (a connection refused before that makes the link try the next hub). */
  welcomed = false;
  private alive = true;
  private hubId = "";
  private awaitingSync = false;
  private syncBuffer: FleetEvent[] = [];
  private hubTakesApplied = false;
  private hubTakesEnforcement = false;
  private reportTimer: NodeJS.Timeout | undefined;
  private lastReport = "";
  private appliedQueue: AppliedRecord[] = [];
  private appliedTimer: NodeJS.Timeout | undefined;
  private pingTimer: NodeJS.Timeout | undefined;
  private spool: Spool | undefined;

  constructor(
    private readonly sock: WebSocket,
    readonly url: string,
    private readonly host: SessionHost,
  ) {}

  /** Says hello from our cursor, and pings every heartbeat: a silently dead path is noticed within one interval. */
  open(): void {
    const { opts } = this.host;
    this.send({ type: "hello", v: PROTOCOL_VERSION, node: opts.node, want: "events", cursor: this.host.cursor });
    this.pingTimer = setInterval(() => {
      if (!this.alive) {
        opts.log(`no answer from ${this.url} within ${opts.heartbeatMs} ms; reconnecting`);
        this.sock.terminate();
        return;
      }
      this.alive = false;
      this.sock.ping();
    }, opts.heartbeatMs);
  }

  /** A pong or a frame: the path is alive. */
  heard(): void {
    this.alive = true;
  }

  receive(data: Buffer): void {
    this.alive = true;
    const parsed = parseHubFrame(data.toString("utf8"));
    if (!parsed.ok) return this.host.opts.log(`warning: ignoring a frame from the hub: ${parsed.message}`);
    const f = parsed.value;
    if (f.type === "welcome") this.onWelcome(f);
    else if (f.type === "sync") this.onSync(f);
    else if (f.type === "event") this.onEvents([f], f.seq);
    else if (f.type === "ack") this.onAck(f);
    else if (f.type === "error") this.onError(f);
  }

  /** Queues a response time for each applied change a live event caused; one frame goes out shortly. */
  reportApplied(changes: Change[], live: Map<string, FleetEvent>): void {
    const at = Date.now();
    for (const c of changes) {
      const e = live.get(c.ip);
      if (!e || !/^\d{1,20}$/.test(e.seq)) continue;
      const rtMs = at - e.detectedAt;
      if (rtMs >= -MAX_CLOCK_SKEW_MS && rtMs <= MAX_APPLIED_RT_MS) this.appliedQueue.push({ seq: e.seq, ip: e.ip, rtMs, at });
    }
    if (this.appliedQueue.length > MAX_APPLIED_QUEUE) this.appliedQueue.splice(0, this.appliedQueue.length - MAX_APPLIED_QUEUE);
    if (this.appliedQueue.length && !this.appliedTimer) {
      this.appliedTimer = setTimeout(() => this.flushApplied(), APPLIED_FLUSH_MS);
      this.appliedTimer.unref();
    }
  }

  /** Stops the session's timers; what it had not sent is dropped. */
  close(): void {
    clearInterval(this.pingTimer);
    clearInterval(this.reportTimer);
    clearTimeout(this.appliedTimer);
    this.spool?.stop();
  }

  private send(frame: object): void {
    if (this.sock.readyState === WebSocket.OPEN) this.sock.send(JSON.stringify(frame));
  }

  private onWelcome(f: WelcomeFrame): void {
    this.welcomed = true;
    this.host.welcomed();
    this.host.opts.csv.node = f.node;
    this.hubTakesApplied = Array.isArray(f.accepts) && f.accepts.includes("applied");
    this.hubTakesEnforcement = Array.isArray(f.accepts) && f.accepts.includes("enforcement");
    this.host.opts.log(`connected to ${this.url} as ${f.node} (${f.role}), hub ${f.hub} at seq ${f.seq}`);
    this.hubId = f.hub;
    this.awaitingSync = true;
    this.syncBuffer = [];
    if (this.host.opts.spoolDir) {
      this.spool = new Spool(this.host.opts.spoolDir, (frame) => this.send(frame), this.host.opts.log);
      this.spool.start();
    }
  }

  private onSync(f: SyncFrame): void {
    // A sync not awaited is a burst the hub relayed in one frame.
    if (!this.awaitingSync) return this.onEvents(f.events, f.seq);
    // The answer to our hello: the full state, or the events after our cursor, maybe in chunks.
    this.syncBuffer.push(...f.events);
    if (f.more) return;
    const events = this.syncBuffer;
    this.awaitingSync = false;
    this.syncBuffer = [];
    this.host.opts.log(f.full ? `full sync: ${events.length} event(s) at seq ${f.seq}` : `resumed after seq ${this.host.cursor?.seq}: ${events.length} event(s) missed, now at seq ${f.seq}`);
    this.host.opts.applier.sync(events, f.full);
    this.host.cursor = { hub: this.hubId, seq: f.seq };
    this.host.opts.state.schedule();
    this.startReports();
  }

  /**
   * Once synced (the hub takes reports only from an agent that receives events): the enforcement
   * report now, then again each time it changed, at most once every ENFORCEMENT_REPORT_MS.
   */
  private startReports(): void {
    const snapshot = this.host.opts.enforcement;
    if (!snapshot || !this.hubTakesEnforcement || this.reportTimer) return;
    const report = () => {
      const frame = JSON.stringify(enforcementFrame(snapshot()));
      if (frame === this.lastReport || this.sock.readyState !== WebSocket.OPEN || this.sock.bufferedAmount > 1 << 20) return;
      this.lastReport = frame;
      this.sock.send(frame);
    };
    report();
    this.reportTimer = setInterval(report, ENFORCEMENT_REPORT_MS);
    this.reportTimer.unref();
  }

  /** Events relayed live: applied, remembered for the response-time report, and the cursor moves on (once there is one). */
  private onEvents(events: FleetEvent[], seq: string): void {
    this.host.opts.applier.take(events, this.hubTakesApplied);
    if (this.host.cursor) this.host.cursor = { hub: this.hubId, seq };
    this.host.opts.state.schedule();
  }

  private onAck(f: AckFrame): void {
    this.spool?.acked(f.id);
  }

  private onError(f: ErrorFrame): void {
    this.host.opts.log(`hub refused${f.id ? ` ${f.id}` : ""}: ${f.code}: ${f.message}`);
    if (f.id) this.spool?.refused(f.id, f.code);
  }

  private flushApplied(): void {
    this.appliedTimer = undefined;
    const batch = this.appliedQueue;
    this.appliedQueue = [];
    // Best effort: with the hub away or slow to read, the reports are dropped, never queued up.
    if (!this.hubTakesApplied || this.sock.readyState !== WebSocket.OPEN || this.sock.bufferedAmount > 1 << 20) return;
    for (let i = 0; i < batch.length; i += MAX_APPLIED_BATCH) this.sock.send(JSON.stringify({ type: "applied", events: batch.slice(i, i + MAX_APPLIED_BATCH) }));
  }
}

/**
 * Keeps one connection to the hub: tries the hubs in order (the next one when a hub refuses
 * before welcoming us), reconnects with `nextDelay` backoff, and makes a `Session` for each
 * connection. The cursor outlives the sessions.
 */
export class HubLink implements SessionHost {
  /** Where the agent is in the hub's stream: set from the state file, moved on by each session. */
  cursor: Cursor | undefined;
  private session: Session | undefined;
  private sock: WebSocket | undefined;
  private attempt = 0;
  private hubIndex = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private closing = false;

  constructor(readonly opts: HubLinkOptions) {}

  welcomed(): void {
    this.attempt = 0;
  }

  /** Passes a batch's response times to the current session, if any (best effort). */
  reportApplied(changes: Change[], live: Map<string, FleetEvent>): void {
    this.session?.reportApplied(changes, live);
  }

  connect(): void {
    if (this.closing) return;
    const { opts } = this;
    const url = opts.hubs[this.hubIndex % opts.hubs.length];
    const sock = new WebSocket(url, {
      headers: { authorization: `Bearer ${opts.token}` },
      maxPayload: MAX_HUB_FRAME_BYTES,
      perMessageDeflate: false,
      handshakeTimeout: 10_000,
      ca: opts.ca ? [readFileSync(opts.ca, "utf8")] : undefined,
    });
    const session = new Session(sock, url, this);
    this.sock = sock;
    this.session = session;
    sock.on("unexpected-response", (_req, res) => {
      opts.log(`error: ${url} refused the connection: HTTP ${res.statusCode}${res.statusMessage ? ` ${res.statusMessage}` : ""}${res.statusCode === 401 ? " (token not accepted: check --token-file and the hub's token list)" : ""}`);
      sock.terminate();
    });
    sock.on("open", () => session.open());
    sock.on("pong", () => session.heard());
    sock.on("message", (data: Buffer) => session.receive(data));
    sock.on("error", (e) => opts.log(`${url}: ${e.message}`));
    sock.on("close", (code, reason) => this.closed(session, code, reason));
  }

  /** Stops reconnecting and drops the connection. */
  close(): void {
    this.closing = true;
    clearTimeout(this.retryTimer);
    this.session?.close();
    this.sock?.terminate();
  }

  private closed(session: Session, code: number, reason: Buffer): void {
    session.close();
    if (this.session === session) this.session = undefined;
    this.opts.applier.forgetLive();
    if (this.closing) return;
    if (!session.welcomed) this.hubIndex++;
    const delay = nextDelay(this.attempt++);
    this.opts.log(`disconnected from ${session.url}${code ? ` (${code}${reason.length ? ` ${reason}` : ""})` : ""}; retrying ${this.opts.hubs[this.hubIndex % this.opts.hubs.length]} in ${delay} ms`);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }
}

// ---------------------------------------------------------------------------------------------
// Start-up: what the agent must never block, its token, and the wiring

/** The addresses of this host's interfaces, never to be blocked. */
function ownAddresses(): Address[] {
  const out: Address[] = [];
  for (const list of Object.values(networkInterfaces())) {
    for (const i of list ?? []) {
      const a = parseAddress(i.address);
      if (a) out.push(a);
    }
  }
  return out;
}

function hubHost(url: string): string {
  return new URL(url).hostname.replace(/^\[|\]$/g, "");
}

/** The hubs' addresses (resolved when names), never to be blocked. */
async function hubAddresses(urls: string[]): Promise<Address[]> {
  const out: Address[] = [];
  for (const u of urls) {
    const direct = parseAddress(hubHost(u));
    if (direct) {
      out.push(direct);
      continue;
    }
    for (const r of await lookup(hubHost(u), { all: true }).catch(() => [])) {
      const a = parseAddress(r.address);
      if (a) out.push(a);
    }
  }
  return out;
}

/** A problem the agent cannot start with, whose message says it all (a bad token file): one line, exit 1. */
export class StartError extends Error {}

/** Reads a token file: the token alone, surrounding whitespace ignored. */
export async function readToken(file: string): Promise<string> {
  const token = (await readFile(file, "utf8")).trim();
  if (!/^[\x21-\x7e]{16,512}$/.test(token)) throw new StartError(`Expected ${file} to hold one token of 16-512 printable characters, got something else`);
  return token;
}

/** Warnings about how the agent was set up: a token file others can read, a hub over plain ws:// off this host. */
function warnings(opts: AgentOptions): string[] {
  const out: string[] = [];
  try {
    if (statSync(opts.tokenFile).mode & 0o077) out.push(`warning: ${opts.tokenFile} is readable by other users; chmod 600 it`);
  } catch {
    /* already read by readToken */
  }
  for (const u of opts.hubs) {
    const host = hubHost(u);
    if (u.startsWith("ws:") && host !== "localhost" && !parseAddress(host)?.text.match(/^(127\.|::1$)/)) out.push(`warning: ${u} is plain ws://: the token and the bans cross the network unencrypted; use wss:// with --ca`);
  }
  return out;
}

/** Starts an agent: sets up the firewall objects, then connects and keeps connecting. */
export async function startAgent(opts: AgentOptions): Promise<Agent> {
  const log = opts.log;
  const token = await readToken(opts.tokenFile);
  const cfg: FirewallConfig = { prefix: opts.prefix, ports: opts.ports, allow: opts.allow.map((s) => parseAddress(s)!) };
  const never = [...cfg.allow, ...ownAddresses(), ...(await hubAddresses(opts.hubs))];
  for (const w of warnings(opts)) log(w);
  const backend = makeBackend(opts.backend, cfg, log);
  await backend.setup();
  const csv = await CsvLog.open(opts.csvPath, opts.node ?? "agent", log);

  const applier: Applier = new Applier({
    backend,
    backendName: opts.backend,
    allow: new Allowlist(never, () => 2 * applier.claims.size + 10_000),
    record: (r) => csv.record(r),
    log,
    onApplied: (changes, live) => link.reportApplied(changes, live),
  });
  const state: StateFile = new StateFile(opts.statePath, log, () => ({ cursor: link.cursor, claims: applier.claims }));
  // The seam of the enforcement reports (the hub's `enforcement` frames and --metrics).
  const look = new KernelLook(opts.backend, opts.prefix, applier);
  const enforcementSnapshot = (): EnforcementState => look.snapshot();
  const link: HubLink = new HubLink({ ...opts, token, applier, state, csv, enforcement: enforcementSnapshot });
  const saved = await state.load();
  if (saved) {
    applier.restore(saved.claims, Date.now());
    link.cursor = saved.cursor;
    log(`loaded ${applier.claims.size} address(es) and cursor ${saved.cursor.hub}:${saved.cursor.seq} from ${opts.statePath}`);
  }
  look.start();
  const metrics = opts.metrics ? await serveMetrics(opts.metrics, opts.backend, opts.prefix, enforcementSnapshot, log) : undefined;
  link.connect();

  let closed: Promise<void> | undefined;
  return {
    claims: applier.claims,
    cursor: () => link.cursor,
    close() {
      closed ??= (async () => {
        link.close();
        metrics?.close();
        await look.close();
        await applier.close();
        await state.close();
        await csv.close();
      })();
      return closed;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Command line

/** A command line that is not one: `main` prints its one-sentence message and exits 2. */
export class UsageError extends Error {}

export type ParsedArgs = { command: "run"; options: Omit<AgentOptions, "log"> } | { command: "cleanup"; backend: BackendName; prefix: string };

/**
 * Runs `parse` with only this script's own `BANSHARE_*` variables visible: yargs' strict mode
 * takes every `BANSHARE_*` variable as a flag, so an unrelated one would stop the script.
 */
function withOwnEnv<T>(flags: string[], parse: () => T): T {
  const own = new Set(flags.map((f) => `BANSHARE_${f.toUpperCase().replace(/-/g, "_")}`));
  const hidden: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith("BANSHARE_") && !own.has(k) && v !== undefined) {
      hidden[k] = v;
      delete process.env[k];
    }
  }
  try {
    return parse();
  } finally {
    Object.assign(process.env, hidden);
  }
}

/** Turns the command line (without `node agent.ts`) into a command. Throws with one sentence on bad usage. */
export function parseArgs(argv: string[]): ParsedArgs {
  const a = withOwnEnv(AGENT_FLAGS, () =>
    yargs(argv)
      .scriptName("agent.ts")
      .usage("Usage: node --import tsx agent.ts --hub URL[,URL...] --token-file FILE [options]\n       node --import tsx agent.ts --cleanup [--backend B]")
      .env("BANSHARE")
      .config("config", "JSON file with any of these options")
      .option("hub", { type: "string", describe: "Hub URL(s), ws:// or wss://, comma-separated: tried in order" })
      .option("token-file", { type: "string", describe: "File holding this node's token (from hub.ts add-node)" })
      .option("node", { type: "string", describe: "Expected node name: the hub refuses the token if it belongs to another node" })
      .option("backend", { choices: BACKEND_NAMES, default: "ipset" as BackendName, describe: `How to block: ${BACKEND_NAMES.slice(0, -1).map((b) => BACKENDS[b].describe).join(", ")}, or ${BACKENDS[BACKEND_NAMES.at(-1)!].describe}` })
      .option("allow", { type: "string", array: true, default: [] as string[], describe: "Address or CIDR never to block (repeatable); this host's and the hub's addresses are always allowed" })
      .option("ports", { type: "string", default: "", describe: "Block only these TCP ports, e.g. 22,2222 (default: all traffic from a banned address)" })
      .option("csv", { type: "string", describe: "Structured log: one CSV row per BLOCK, SCHEDULE_UNBLOCK, UNBLOCK, REJECT" })
      .option("spool", { type: "string", describe: "Spool directory of ban.ts: events it could not deliver are forwarded from here" })
      .option("state", { type: "string", describe: "State file (cursor and claims): a restarted agent resumes where it stopped instead of a full sync" })
      .option("ca", { type: "string", describe: "PEM CA certificate to verify a wss:// hub with (self-signed fleets)" })
      .option("heartbeat", { type: "number", default: 15, describe: "Seconds between pings to the hub; no answer within one interval means reconnect" })
      .option("prefix", { type: "string", default: "banshare", describe: "Name of the sets, chain and nftables table the agent owns" })
      .option("cleanup", { type: "boolean", default: false, describe: "Remove every firewall object the agent created, then exit" })
      .option("metrics", { type: "string", describe: "Serve the agent's own Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9101 (GET /metrics: entries, claims, drift, hooks missing, repairs, packets dropped by its DROP rules)" })
      .strict()
      .fail((msg, err) => {
        // One line: yargs spreads some messages over several.
        throw new UsageError((err?.message ?? msg).split("\n").map((l) => l.trim()).filter(Boolean).join(" "));
      })
      .help()
      .version(false)
      .wrap(null)
      .parseSync());
  if (!/^[a-z][a-z0-9_-]{0,20}$/.test(a.prefix)) throw new UsageError(`Expected --prefix to be 1-21 of a-z 0-9 _ - starting with a letter, got ${JSON.stringify(a.prefix)}`);
  if (a.cleanup) return { command: "cleanup", backend: a.backend, prefix: a.prefix };
  if (!a.hub) throw new UsageError("Expected --hub URL (or BANSHARE_HUB), got none");
  if (!a.tokenFile) throw new UsageError("Expected --token-file FILE (or BANSHARE_TOKEN_FILE), got none");
  const hubs = a.hub.split(",").map((s) => s.trim()).filter(Boolean);
  for (const h of hubs) {
    let u: URL | undefined;
    try {
      u = new URL(h);
    } catch {
      /* reported below */
    }
    if (!u || (u.protocol !== "ws:" && u.protocol !== "wss:")) throw new UsageError(`Expected --hub to be ws:// or wss:// URLs, got ${JSON.stringify(h)}`);
  }
  for (const s of a.allow) if (!parseAddress(s)) throw new UsageError(`Expected --allow to be an address or CIDR, got ${JSON.stringify(s)}`);
  const ports = a.ports ? a.ports.split(",").map((p) => Number(p.trim())) : [];
  for (const p of ports) if (!Number.isInteger(p) || p < 1 || p > 65535) throw new UsageError(`Expected --ports to be TCP ports 1-65535 separated by commas, got ${JSON.stringify(a.ports)}`);
  if (!(a.heartbeat >= 1 && a.heartbeat <= 86400)) throw new UsageError(`Expected --heartbeat to be 1-86400 seconds, got ${a.heartbeat}`);
  if (a.node !== undefined && !/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/.test(a.node)) throw new UsageError(`Expected --node to be a node name, got ${JSON.stringify(a.node)}`);
  const mp = a.metrics === undefined ? undefined : /^(.+):(\d{1,5})$/.exec(a.metrics);
  if (a.metrics !== undefined && (!mp || Number(mp[2]) < 1 || Number(mp[2]) > 65535)) throw new UsageError(`Expected --metrics to be HOST:PORT, e.g. 127.0.0.1:9101, got ${JSON.stringify(a.metrics)}`);
  return {
    command: "run",
    options: {
      hubs,
      tokenFile: a.tokenFile,
      node: a.node,
      backend: a.backend,
      allow: a.allow,
      ports,
      csvPath: a.csv,
      spoolDir: a.spool,
      statePath: a.state,
      ca: a.ca,
      heartbeatMs: a.heartbeat * 1000,
      prefix: a.prefix,
      metrics: a.metrics,
    },
  };
}

function logLine(line: string): void {
  process.stderr.write(`${new Date().toISOString()} agent: ${line}\n`);
}

/** Runs the agent from the command line. */
export async function main(argv = process.argv.slice(2)): Promise<void> {
  let args: ParsedArgs;
  try {
    args = parseArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`agent.ts: ${e.message}\n`);
    process.exitCode = 2;
    return;
  }
  if (args.command === "cleanup") {
    await cleanup(args.backend, args.prefix, logLine);
    return;
  }
  let agent: Agent;
  try {
    agent = await startAgent({ ...args.options, log: logLine });
  } catch (e) {
    // Expected failures (a bad token file, a firewall command that failed, a file the system
    // could not open) in one line; anything else is a bug: its stack.
    const err = e as NodeJS.ErrnoException;
    const known = err instanceof StartError || err instanceof CommandError || typeof err.syscall === "string";
    process.stderr.write(`agent.ts: ${known ? err.message : err.stack}\n`);
    process.exitCode = 1;
    return;
  }
  const stop = (sig: string) => {
    logLine(`${sig}: stopping; kernel bans stay in force and expire on time`);
    void agent.close().then(() => logLine("stopped"));
  };
  // `on`, not `once`: while a kernel command runs, execa's exit hook (signal-exit) listens too and
  // re-raises a signal no other listener is left for, killing the agent in the middle of close().
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}

function isMain(): boolean {
  try {
    return realpathSync(process.argv[1] ?? "") === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isMain()) await main();
