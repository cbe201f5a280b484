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
 * @module
 */

import { spawn, type ChildProcess } from "node:child_process";
import { lookup } from "node:dns/promises";
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
  type Address,
  type AppliedRecord,
  type BanFrame,
  type Claims,
  type CsvRecord,
  type Cursor,
  type FleetEvent,
  type UnbanFrame,
} from "./messages.ts";

export type BackendName = "ipset" | "nftables" | "iptables" | "dry-run";

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

/** A command to run: argv, and what to write to its stdin. */
export interface Command {
  argv: string[];
  input?: string;
}

/** A running agent. */
export interface Agent {
  claims: Claims;
  cursor(): Cursor | undefined;
  close(): Promise<void>;
}

/** Largest timeout ipset accepts, in seconds; longer bans are capped and renewed by each reconcile. */
export const IPSET_MAX_TIMEOUT_S = 2147483;
const MAX_ELEMENTS = 2_097_152;
const CMD_TIMEOUT_MS = 60_000;
/** Response-time reports (`applied`): gathered this long before one frame goes, at most this many waiting. */
const APPLIED_FLUSH_MS = 250;
const MAX_APPLIED_QUEUE = 1000;
const AGENT_FLAGS = ["config", "hub", "token-file", "node", "backend", "allow", "ports", "csv", "spool", "state", "ca", "heartbeat", "prefix", "cleanup"];

// ---------------------------------------------------------------------------------------------
// Pure helpers

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

/** Commands that hook the agent's chain into INPUT if it is not yet (ipset and iptables backends). */
function jumpCommands(prefix: string): Array<{ check: string[]; insert: string[] }> {
  return (["iptables", "ip6tables"] as const).map((bin) => ({
    check: [bin, "-w", "-C", "INPUT", "-j", prefix],
    // -I, not -A: the ban must come before any ACCEPT rule already in INPUT.
    insert: [bin, "-w", "-I", "INPUT", "1", "-j", prefix],
  }));
}

/** Commands that remove every object the agent created, and nothing else (each may fail when absent). */
export function cleanupCommands(backend: BackendName, prefix: string): string[][] {
  if (backend === "nftables") return [["nft", "delete", "table", "inet", prefix]];
  if (backend === "dry-run") return [];
  const cmds: string[][] = [];
  for (const bin of ["iptables", "ip6tables"]) cmds.push([bin, "-w", "-D", "INPUT", "-j", prefix], [bin, "-w", "-F", prefix], [bin, "-w", "-X", prefix]);
  if (backend === "ipset") {
    const names = ipsetNames(prefix);
    cmds.push(["ipset", "destroy", names.v4], ["ipset", "destroy", names.v6]);
  }
  return cmds;
}

// ---------------------------------------------------------------------------------------------
// Backends: thin execution of the plans above

interface Backend {
  setup(): Promise<void>;
  apply(changes: Change[], now: number): Promise<void>;
  reconcile(desired: Map<string, number | null>, now: number): Promise<void>;
  close(): void;
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

/** Batches larger than this go to a one-shot process (a burst: its start is small next to it). */
const SESSION_MAX_BYTES = 256 * 1024;

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

async function run(cmd: Command): Promise<void> {
  const r = await execa(cmd.argv[0], cmd.argv.slice(1), { input: cmd.input ?? "", timeout: CMD_TIMEOUT_MS, reject: false, stripFinalNewline: true });
  if (r.exitCode !== 0) {
    const why = String(r.stderr || r.stdout || r.shortMessage || "").split("\n").slice(0, 3).join(" / ");
    throw new Error(`${cmd.argv.join(" ")} failed (${r.timedOut ? "timed out" : `exit ${r.exitCode}`}): ${why}`);
  }
}

async function ensureJumps(prefix: string): Promise<void> {
  for (const j of jumpCommands(prefix)) {
    const r = await execa(j.check[0], j.check.slice(1), { timeout: CMD_TIMEOUT_MS, reject: false });
    if (r.exitCode !== 0) await run({ argv: j.insert });
  }
}

/** Creates the backend for `name`; `log` receives dry-run plans. */
function makeBackend(name: BackendName, cfg: FirewallConfig, log: (s: string) => void): Backend {
  switch (name) {
    case "ipset": {
      const session = new KernelSession(ipsetSession(ipsetNames(cfg.prefix).v4));
      return {
        async setup() {
          for (const c of ipsetSetupCommands(cfg)) await run(c);
          await ensureJumps(cfg.prefix);
          // Start the long-lived process now, so the first ban does not pay for it.
          await session.send("").catch((e: Error) => log(`warning: ${e.message}; each batch will start its own ipset restore`));
        },
        apply(changes, now) {
          const input = ipsetChangeScript(cfg.prefix, changes, now);
          return session.send(input).catch(() => run({ argv: ["ipset", "-exist", "restore"], input }));
        },
        reconcile: (desired, now) => run({ argv: ["ipset", "-exist", "restore"], input: ipsetReconcileScript(cfg.prefix, desired, now) }),
        close: () => session.close(),
      };
    }
    case "nftables": {
      const session = new KernelSession(nftSession(cfg.prefix));
      return {
        async setup() {
          await run({ argv: ["nft", "-f", "-"], input: nftSetupScript(cfg) });
          // Start the long-lived process now, so the first ban does not pay for it.
          await session.send("").catch((e: Error) => log(`warning: ${e.message}; each batch will start its own nft`));
        },
        apply(changes, now) {
          const input = nftChangeScript(cfg.prefix, changes, now);
          return session.send(input).catch(() => run({ argv: ["nft", "-f", "-"], input }));
        },
        reconcile: (desired, now) => run({ argv: ["nft", "-f", "-"], input: nftReconcileScript(cfg.prefix, desired, now) }),
        close: () => session.close(),
      };
    }
    case "iptables": {
      const present = new Set<string>();
      return {
        async setup() {
          // Learn the rules a previous run left, without touching them.
          for (const fam of [4, 6] as const) {
            const r = await execa(iptablesFor(fam), ["-w", "-S", cfg.prefix], { timeout: CMD_TIMEOUT_MS, reject: false });
            if (r.exitCode !== 0) {
              await run({ argv: [iptablesFor(fam), "-w", "-N", cfg.prefix] });
              continue;
            }
            for (const m of r.stdout.matchAll(/^-A \S+ -s (\S+) .*-j DROP$/gm)) {
              const a = parseAddress(m[1].replace(/\/(32|128)$/, ""));
              if (a) present.add(a.text);
            }
          }
          await ensureJumps(cfg.prefix);
        },
        async apply(changes) {
          for (const c of iptablesChangeCommands(cfg, changes, present)) await run(c);
          for (const c of changes) c.until === undefined ? present.delete(c.ip) : present.add(c.ip);
        },
        async reconcile(desired) {
          for (const c of iptablesReconcileCommands(cfg, desired.keys())) await run(c);
          present.clear();
          for (const ip of desired.keys()) present.add(ip);
        },
        close() {},
      };
    }
    case "dry-run":
      return {
        async setup() {
          log(`dry-run: would create the ${cfg.prefix} firewall objects`);
        },
        async apply(changes) {
          for (const c of changes) log(`dry-run: would ${c.until === undefined ? `unblock ${c.ip}` : `block ${c.ip} until ${c.until === null ? "never" : new Date(c.until).toISOString()}`}`);
        },
        async reconcile(desired) {
          log(`dry-run: would make the kernel hold exactly ${desired.size} address(es)`);
        },
        close() {},
      };
  }
}

// ---------------------------------------------------------------------------------------------
// State file: cursor and claims

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

// ---------------------------------------------------------------------------------------------
// The agent

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

async function hubAddresses(urls: string[]): Promise<Address[]> {
  const out: Address[] = [];
  for (const u of urls) {
    const host = new URL(u).hostname.replace(/^\[|\]$/g, "");
    const direct = parseAddress(host);
    if (direct) {
      out.push(direct);
      continue;
    }
    for (const r of await lookup(host, { all: true }).catch(() => [])) {
      const a = parseAddress(r.address);
      if (a) out.push(a);
    }
  }
  return out;
}

/** Reads a token file: the token alone, surrounding whitespace ignored. */
export async function readToken(file: string): Promise<string> {
  const token = (await readFile(file, "utf8")).trim();
  if (!/^[\x21-\x7e]{16,512}$/.test(token)) throw new Error(`Expected ${file} to hold one token of 16-512 printable characters, got something else`);
  return token;
}

/** Starts an agent: sets up the firewall objects, then connects and keeps connecting. */
export async function startAgent(opts: AgentOptions): Promise<Agent> {
  const log = opts.log;
  const token = await readToken(opts.tokenFile);
  try {
    if (statSync(opts.tokenFile).mode & 0o077) log(`warning: ${opts.tokenFile} is readable by other users; chmod 600 it`);
  } catch {
    /* already read above */
  }
  const allow = [...opts.allow.map((s) => parseAddress(s)!), ...ownAddresses(), ...(await hubAddresses(opts.hubs))];
  const cfg: FirewallConfig = { prefix: opts.prefix, ports: opts.ports, allow: opts.allow.map((s) => parseAddress(s)!) };
  for (const u of opts.hubs) {
    const host = new URL(u).hostname.replace(/^\[|\]$/g, "");
    if (u.startsWith("ws:") && host !== "localhost" && !parseAddress(host)?.text.match(/^(127\.|::1$)/)) log(`warning: ${u} is plain ws://: the token and the bans cross the network unencrypted; use wss:// with --ca`);
  }
  const backend = makeBackend(opts.backend, cfg, log);
  await backend.setup();

  let csv: WriteStream | undefined;
  if (opts.csvPath) {
    if (!existsSync(opts.csvPath)) await appendFile(opts.csvPath, CSV_HEADER + "\n");
    csv = createWriteStream(opts.csvPath, { flags: "a" });
    csv.on("error", (e) => log(`warning: cannot write ${opts.csvPath}: ${e.message}`));
  }
  let nodeName = opts.node ?? "agent";
  const record = (r: Omit<CsvRecord, "time" | "node">) => csv?.write(csvRow({ time: Date.now(), node: nodeName, ...r }));

  const claims: Claims = new Map();
  /** What the kernel holds, as far as the agent applied it: address -> until. */
  const applied = new Map<string, number | null>();
  const dirty = new Set<string>();
  let cursor: Cursor | undefined;
  let awaitingSync = false;
  let syncBuffer: FleetEvent[] = [];
  let working: Promise<void> | undefined;
  let pendingReconcile = false;
  let closing = false;
  // Response times for the hub's status page (`applied` frames): best effort and bounded, out of
  // the kernel path's way: records are queued after a batch is applied and go out in one frame.
  /** Events relayed live (not in a sync), by address, until the batch that applies them. */
  const arrived = new Map<string, FleetEvent>();
  let appliedQueue: AppliedRecord[] = [];
  let appliedTimer: NodeJS.Timeout | undefined;
  let hubTakesApplied = false;

  // Decided once per address: the allowlist is fixed for the agent's life, and a sync of 100k
  // addresses asks twice per address (merge, then reconcile). Bounded by the live claims.
  const allowCache = new Map<string, string | undefined>();
  const allowedReason = (ip: string): string | undefined => {
    if (allowCache.has(ip)) return allowCache.get(ip);
    const a = parseAddress(ip);
    const hit = a && allow.find((x) => overlaps(x, a));
    const why = !a ? "not an address" : hit ? `allowlisted (${hit.text})` : undefined;
    if (allowCache.size >= 2 * claims.size + 10_000) allowCache.clear();
    allowCache.set(ip, why);
    return why;
  };

  /** The claim that makes `ip` blocked: the newest active ban, for the log. */
  const cause = (ip: string): FleetEvent | undefined => {
    let best: FleetEvent | undefined;
    for (const c of claims.get(ip)?.values() ?? []) if (c.kind === "ban" && (!best || c.detectedAt > best.detectedAt)) best = c;
    return best;
  };

  const desiredFor = (ip: string, now: number) => (allowedReason(ip) ? undefined : blockedUntil(claims.get(ip), now));

  if (opts.statePath && existsSync(opts.statePath)) {
    const saved = parseState(await readFile(opts.statePath, "utf8"));
    if (!saved) log(`warning: ${opts.statePath} is not a banshare agent state file; starting with a full sync`);
    else {
      cursor = saved.cursor;
      for (const e of saved.claims) mergeClaim(claims, e);
      // What the kernel held when the state was saved: the reconcile after the next sync logs only real changes.
      const now = Date.now();
      for (const ip of claims.keys()) {
        const d = desiredFor(ip, now);
        if (d !== undefined) applied.set(ip, d);
      }
      log(`loaded ${claims.size} address(es) and cursor ${cursor.hub}:${cursor.seq} from ${opts.statePath}`);
    }
  }
  let saveTimer: NodeJS.Timeout | undefined;
  let saving: Promise<void> = Promise.resolve();
  const saveNow = () => {
    if (!opts.statePath || !cursor) return saving;
    const text = stateText(cursor, claims);
    saving = saving.then(() => writeAtomic(opts.statePath!, text)).catch((e: Error) => log(`warning: cannot save ${opts.statePath}: ${e.message}`));
    return saving;
  };
  // At most one write a second, however many events arrive.
  const scheduleSave = () => {
    if (!opts.statePath || saveTimer) return;
    saveTimer = setTimeout(() => {
      saveTimer = undefined;
      void saveNow();
    }, 1000);
  };

  const logApplied = (ip: string, before: number | null | undefined, after: number | null | undefined, now: number, via: string) => {
    if (after === undefined) {
      if (before === undefined) return;
      const last = [...(claims.get(ip)?.values() ?? [])].sort((a, b) => b.detectedAt - a.detectedAt)[0];
      const expired = before !== null && before <= now;
      record({ action: "UNBLOCK", ip, origin: last?.origin, jail: last?.jail, detail: expired ? "ban ended" : `${via}: unbanned by ${last?.origin ?? "the fleet"}` });
      return;
    }
    const c = cause(ip);
    if (before === undefined) record({ action: "BLOCK", ip, origin: c?.origin, jail: c?.jail, until: after, rtMs: c ? now - c.detectedAt : undefined, detail: `${via}: banned by ${c?.origin ?? "?"}` });
    // A timed block that becomes permanent cancels its scheduled unblock: say so (until "never").
    if (after !== before && (after !== null || before !== undefined)) record({ action: "SCHEDULE_UNBLOCK", ip, origin: c?.origin, jail: c?.jail, until: after, detail: after === null ? "none: blocked for good" : `in ${Math.round((after - now) / 1000)} s` });
  };

  // One kernel command at a time; changes that arrive meanwhile wait and go in the next batch.
  const work = async () => {
    while ((dirty.size || pendingReconcile) && !working) {
      const now = Date.now();
      if (pendingReconcile) {
        pendingReconcile = false;
        dirty.clear();
        arrived.clear();
        const desired = new Map<string, number | null>();
        for (const ip of claims.keys()) {
          const d = desiredFor(ip, now);
          if (d !== undefined) desired.set(ip, d);
        }
        working = backend.reconcile(desired, now);
        try {
          await working;
          for (const [ip, before] of applied) if (!desired.has(ip)) logApplied(ip, before, undefined, now, "sync");
          for (const [ip, after] of desired) if (applied.get(ip) !== after) logApplied(ip, applied.get(ip), after, now, "sync");
          applied.clear();
          for (const [ip, u] of desired) applied.set(ip, u);
          log(`synced: ${desired.size} address(es) blocked (${opts.backend})`);
        } catch (e) {
          log(`error: reconcile failed, retrying in 5 s: ${(e as Error).message}`);
          setTimeout(() => {
            pendingReconcile = true;
            kick();
          }, 5000).unref();
        } finally {
          working = undefined;
        }
        continue;
      }
      const changes: Change[] = [];
      const live = new Map<string, FleetEvent>();
      for (const ip of dirty) {
        const d = desiredFor(ip, now);
        if (d !== applied.get(ip)) changes.push({ ip, until: d });
        const e = arrived.get(ip);
        if (e) {
          live.set(ip, e);
          arrived.delete(ip);
        }
      }
      dirty.clear();
      if (!changes.length) continue;
      working = backend.apply(changes, now).catch(async (e: Error) => {
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
        await working;
      } finally {
        working = undefined;
      }
      for (const c of changes) {
        logApplied(c.ip, applied.get(c.ip), c.until, Date.now(), "event");
        if (c.until === undefined) applied.delete(c.ip);
        else applied.set(c.ip, c.until);
      }
      reportApplied(changes, live);
      if (changes.length <= 20) {
        for (const c of changes) log(`${c.until === undefined ? "unblocked" : "blocked"} ${c.ip}${c.until === undefined ? "" : ` until ${c.until === null ? "never" : new Date(c.until).toISOString()}`}`);
      } else log(`applied ${changes.length} change(s)`);
    }
  };
  const kick = () => {
    if (!working) void work().catch((e: Error) => log(`error: ${e.stack}`));
  };

  /** Remembers live events, so the batch that applies them can report their response time. */
  const noteArrived = (events: FleetEvent[]) => {
    if (!hubTakesApplied) return;
    for (const e of events) if (arrived.size < MAX_APPLIED_QUEUE * 10 || arrived.has(e.ip)) arrived.set(e.ip, e);
  };
  /** Queues a response time for each applied change a live event caused; one frame goes out shortly. */
  const reportApplied = (changes: Change[], live: Map<string, FleetEvent>) => {
    if (!live.size) return;
    const at = Date.now();
    for (const c of changes) {
      const e = live.get(c.ip);
      if (!e || !/^\d{1,20}$/.test(e.seq)) continue;
      const rtMs = at - e.detectedAt;
      if (rtMs >= -MAX_CLOCK_SKEW_MS && rtMs <= MAX_APPLIED_RT_MS) appliedQueue.push({ seq: e.seq, ip: e.ip, rtMs, at });
    }
    if (appliedQueue.length > MAX_APPLIED_QUEUE) appliedQueue.splice(0, appliedQueue.length - MAX_APPLIED_QUEUE);
    if (appliedQueue.length && !appliedTimer) {
      appliedTimer = setTimeout(flushApplied, APPLIED_FLUSH_MS);
      appliedTimer.unref();
    }
  };
  const flushApplied = () => {
    appliedTimer = undefined;
    const batch = appliedQueue;
    appliedQueue = [];
    // Best effort: with the hub away or slow to read, the reports are dropped, never queued up.
    if (!hubTakesApplied || !ws || ws.readyState !== ws.OPEN || ws.bufferedAmount > 1 << 20) return;
    for (let i = 0; i < batch.length; i += MAX_APPLIED_BATCH) ws.send(JSON.stringify({ type: "applied", events: batch.slice(i, i + MAX_APPLIED_BATCH) }));
  };

  const takeEvents = (events: FleetEvent[]) => {
    for (const e of events) {
      const why = allowedReason(e.ip);
      if (why && e.kind === "ban") record({ action: "REJECT", ip: e.ip, origin: e.origin, jail: e.jail, until: e.until, detail: why });
      if (mergeClaim(claims, e)) dirty.add(e.ip);
    }
  };

  // Expiry: the kernel drops expired entries by itself; this keeps memory and the log in step
  // (and does the expiring for the iptables backend, whose rules have no timeout).
  const sweeper = setInterval(() => {
    const now = Date.now();
    for (const ip of pruneClaims(claims, now)) dirty.add(ip);
    for (const [ip, until] of applied) if (until !== null && until <= now) dirty.add(ip);
    if (dirty.size) kick();
  }, 1000);
  sweeper.unref();

  // Spool: events ban.ts could not deliver; forwarded over this connection, deleted on ack.
  const spoolSent = new Map<string, string>();
  const forwardSpool = async (ws: WebSocket) => {
    if (!opts.spoolDir) return;
    const files = (await readdir(opts.spoolDir).catch(() => [] as string[])).filter((f) => f.endsWith(".json")).sort();
    for (const f of files) {
      const path = join(opts.spoolDir, f);
      if ([...spoolSent.values()].includes(path)) continue;
      const text = await readFile(path, "utf8").catch(() => "");
      if (!text) continue;
      const parsed = parseNodeFrame(text, Date.now());
      if (!parsed.ok || (parsed.value.type !== "ban" && parsed.value.type !== "unban")) {
        log(`warning: moving unreadable spool file ${f} aside: ${parsed.ok ? "not an event" : parsed.message}`);
        await mkdir(join(opts.spoolDir, "rejected"), { recursive: true });
        await rename(path, join(opts.spoolDir, "rejected", f)).catch(() => {});
        continue;
      }
      const frame = parsed.value as BanFrame | UnbanFrame;
      spoolSent.set(frame.id, path);
      if (ws.readyState === ws.OPEN) ws.send(JSON.stringify(frame));
    }
  };

  let ws: WebSocket | undefined;
  let spoolTimer: NodeJS.Timeout | undefined;
  let hubId = "";
  let attempt = 0;
  let hubIndex = 0;
  let retryTimer: NodeJS.Timeout | undefined;
  let pingTimer: NodeJS.Timeout | undefined;

  const connect = () => {
    if (closing) return;
    const url = opts.hubs[hubIndex % opts.hubs.length];
    const sock = new WebSocket(url, {
      headers: { authorization: `Bearer ${token}` },
      maxPayload: MAX_HUB_FRAME_BYTES,
      perMessageDeflate: false,
      handshakeTimeout: 10_000,
      ca: opts.ca ? [readFileSync(opts.ca, "utf8")] : undefined,
    });
    ws = sock;
    let alive = true;
    let welcomed = false;
    sock.on("unexpected-response", (_req, res) => {
      log(`error: ${url} refused the connection: HTTP ${res.statusCode}${res.statusMessage ? ` ${res.statusMessage}` : ""}${res.statusCode === 401 ? " (token not accepted: check --token-file and the hub's token list)" : ""}`);
      sock.terminate();
    });
    sock.on("open", () => {
      sock.send(JSON.stringify({ type: "hello", v: PROTOCOL_VERSION, node: opts.node, want: "events", cursor }));
      // Heartbeat from this side too: a silently dead path is noticed within one interval.
      pingTimer = setInterval(() => {
        if (!alive) {
          log(`no answer from ${url} within ${opts.heartbeatMs} ms; reconnecting`);
          sock.terminate();
          return;
        }
        alive = false;
        sock.ping();
      }, opts.heartbeatMs);
    });
    sock.on("pong", () => (alive = true));
    sock.on("message", (data: Buffer) => {
      alive = true;
      const parsed = parseHubFrame(data.toString("utf8"));
      if (!parsed.ok) {
        log(`warning: ignoring a frame from the hub: ${parsed.message}`);
        return;
      }
      const f = parsed.value;
      switch (f.type) {
        case "welcome":
          welcomed = true;
          attempt = 0;
          nodeName = f.node;
          hubTakesApplied = Array.isArray(f.accepts) && f.accepts.includes("applied");
          log(`connected to ${url} as ${f.node} (${f.role}), hub ${f.hub} at seq ${f.seq}`);
          hubId = f.hub;
          awaitingSync = true;
          syncBuffer = [];
          void forwardSpool(sock).catch((e: Error) => log(`warning: spool: ${e.message}`));
          spoolTimer = setInterval(() => void forwardSpool(sock).catch((e: Error) => log(`warning: spool: ${e.message}`)), 5000);
          return;
        case "sync": {
          if (awaitingSync) {
            // The answer to our hello: the full state, or the events after our cursor, maybe in chunks.
            syncBuffer.push(...f.events);
            if (f.more) return;
            awaitingSync = false;
            const events = syncBuffer;
            syncBuffer = [];
            if (f.full) claims.clear();
            takeEvents(events);
            pendingReconcile = true;
            log(f.full ? `full sync: ${events.length} event(s) at seq ${f.seq}` : `resumed after seq ${cursor?.seq}: ${events.length} event(s) missed, now at seq ${f.seq}`);
            cursor = { hub: hubId, seq: f.seq };
          } else {
            // A burst the hub relayed in one frame.
            takeEvents(f.events);
            noteArrived(f.events);
            if (cursor) cursor = { hub: hubId, seq: f.seq };
          }
          scheduleSave();
          kick();
          return;
        }
        case "event":
          takeEvents([f]);
          noteArrived([f]);
          if (cursor) cursor = { hub: hubId, seq: f.seq };
          scheduleSave();
          kick();
          return;
        case "ack": {
          const path = spoolSent.get(f.id);
          if (path) {
            spoolSent.delete(f.id);
            void unlink(path).then(() => log(`delivered spooled event ${f.id}`)).catch(() => {});
          }
          return;
        }
        case "error": {
          const path = f.id ? spoolSent.get(f.id) : undefined;
          log(`hub refused${f.id ? ` ${f.id}` : ""}: ${f.code}: ${f.message}`);
          // Over the rate limit or a hub-side write error: the event stays spooled for the next round.
          if (path && (f.code === "rate_limited" || f.code === "internal")) spoolSent.delete(f.id!);
          else if (path && opts.spoolDir) {
            spoolSent.delete(f.id!);
            void mkdir(join(opts.spoolDir, "rejected"), { recursive: true }).then(() => rename(path, join(opts.spoolDir!, "rejected", path.split("/").pop()!))).catch(() => {});
          }
          return;
        }
      }
    });
    sock.on("error", (e) => log(`${url}: ${e.message}`));
    sock.on("close", (code, reason) => {
      clearInterval(pingTimer);
      clearInterval(spoolTimer);
      awaitingSync = false;
      syncBuffer = [];
      spoolSent.clear();
      hubTakesApplied = false;
      arrived.clear();
      appliedQueue = [];
      if (closing) return;
      if (!welcomed) hubIndex++;
      const delay = nextDelay(attempt++);
      log(`disconnected from ${url}${code ? ` (${code}${reason.length ? ` ${reason}` : ""})` : ""}; retrying ${opts.hubs[hubIndex % opts.hubs.length]} in ${delay} ms`);
      retryTimer = setTimeout(connect, delay);
    });
  };
  connect();

  let closed: Promise<void> | undefined;
  return {
    claims,
    cursor: () => cursor,
    close() {
      closed ??= (async () => {
        closing = true;
        clearTimeout(retryTimer);
        clearInterval(sweeper);
        clearInterval(pingTimer);
        clearInterval(spoolTimer);
        clearTimeout(saveTimer);
        clearTimeout(appliedTimer);
        ws?.terminate();
        while (working) await working.catch(() => {});
        backend.close();
        await saveNow();
        if (csv) await new Promise<void>((resolve) => csv!.end(resolve));
      })();
      return closed;
    },
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
// Command line

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
      .option("backend", { choices: ["ipset", "nftables", "iptables", "dry-run"] as const, default: "ipset" as BackendName, describe: "How to block: ipset sets, an nftables table, one iptables rule per address, or log only" })
      .option("allow", { type: "string", array: true, default: [] as string[], describe: "Address or CIDR never to block (repeatable); this host's and the hub's addresses are always allowed" })
      .option("ports", { type: "string", default: "", describe: "Block only these TCP ports, e.g. 22,2222 (default: all traffic from a banned address)" })
      .option("csv", { type: "string", describe: "Structured log: one CSV row per BLOCK, SCHEDULE_UNBLOCK, UNBLOCK, REJECT" })
      .option("spool", { type: "string", describe: "Spool directory of ban.ts: events it could not deliver are forwarded from here" })
      .option("state", { type: "string", describe: "State file (cursor and claims): a restarted agent resumes where it stopped instead of a full sync" })
      .option("ca", { type: "string", describe: "PEM CA certificate to verify a wss:// hub with (self-signed fleets)" })
      .option("heartbeat", { type: "number", default: 15, describe: "Seconds between pings to the hub; no answer within one interval means reconnect" })
      .option("prefix", { type: "string", default: "banshare", describe: "Name of the sets, chain and nftables table the agent owns" })
      .option("cleanup", { type: "boolean", default: false, describe: "Remove every firewall object the agent created, then exit" })
      .strict()
      .fail((msg, err) => {
        throw err ?? new Error(msg);
      })
      .help()
      .version(false)
      .wrap(null)
      .parseSync());
  if (!/^[a-z][a-z0-9_-]{0,20}$/.test(a.prefix)) throw new Error(`Expected --prefix to be 1-21 of a-z 0-9 _ - starting with a letter, got ${JSON.stringify(a.prefix)}`);
  if (a.cleanup) return { command: "cleanup", backend: a.backend, prefix: a.prefix };
  if (!a.hub) throw new Error("Expected --hub URL (or BANSHARE_HUB), got none");
  if (!a.tokenFile) throw new Error("Expected --token-file FILE (or BANSHARE_TOKEN_FILE), got none");
  const hubs = a.hub.split(",").map((s) => s.trim()).filter(Boolean);
  for (const h of hubs) {
    let u: URL | undefined;
    try {
      u = new URL(h);
    } catch {
      /* reported below */
    }
    if (!u || (u.protocol !== "ws:" && u.protocol !== "wss:")) throw new Error(`Expected --hub to be ws:// or wss:// URLs, got ${JSON.stringify(h)}`);
  }
  for (const s of a.allow) if (!parseAddress(s)) throw new Error(`Expected --allow to be an address or CIDR, got ${JSON.stringify(s)}`);
  const ports = a.ports ? a.ports.split(",").map((p) => Number(p.trim())) : [];
  for (const p of ports) if (!Number.isInteger(p) || p < 1 || p > 65535) throw new Error(`Expected --ports to be TCP ports 1-65535 separated by commas, got ${JSON.stringify(a.ports)}`);
  if (!(a.heartbeat >= 1 && a.heartbeat <= 86400)) throw new Error(`Expected --heartbeat to be 1-86400 seconds, got ${a.heartbeat}`);
  if (a.node !== undefined && !/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/.test(a.node)) throw new Error(`Expected --node to be a node name, got ${JSON.stringify(a.node)}`);
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
    process.stderr.write(`agent.ts: ${(e as Error).message}\n`);
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
    const err = e as NodeJS.ErrnoException;
    process.stderr.write(`agent.ts: ${err.code === "ENOENT" || /^Expected|failed/.test(err.message) ? err.message : err.stack}\n`);
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
