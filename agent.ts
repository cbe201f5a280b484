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
 * is unreachable, and the --state file's bans go back into the kernel before any hub answers
 * (a reboot). After each sync the kernel is reconciled to the fleet state in one command. The
 * DROP is hooked into INPUT, FORWARD and DOCKER-USER (nftables: input, forward), or nowhere
 * (--hook none: sets only), and put back whenever something else removes it.
 *
 * Parts, in file order, data flowing one way (hub -> kernel):
 * - backend plans: pure functions and one `BACKENDS` table entry per firewall (setup, change,
 *   reconcile, session, cleanup, count); `makeBackend` runs an entry, `KernelSession` is the
 *   long-lived `ipset restore` / `nft -i` a batch goes to.
 * - `desiredState` / `changesFor` / `resolveOverlaps`: pure, what the kernel should hold (a
 *   network covering an entry wins) and the diff to get there.
 * - `Applier`: owns the claims and what was applied; batches changes into the backend, one
 *   kernel command at a time, reconciles after a sync, writes BLOCK/UNBLOCK/REJECT rows.
 * - `Guard`: checks that the kernel still holds the hooks, chains, sets and entries (on `nft
 *   monitor` events from other programs, a quick set-header tick, a full tick) and repairs in
 *   one batch, with a REPAIR row; `snapshot()` is `Agent.enforcement()`.
 *   kernel command at a time, reconciles after a sync, renews capped timeouts, remembers the
 *   entries the kernel refused (`splitRefused` finds them), writes BLOCK/UNBLOCK/REJECT rows.
 * - `StateFile` (--state), `CsvLog` (--csv), `Spool` (--spool forwarding, per connection).
 * - `HubLink`: connects and reconnects; each connection is a `Session`, made on open and thrown
 *   away on close, that checks the hub's frames (`checkBannable` on every address, a bounded
 *   sync) and turns them into calls on the applier.
 * - `startAgent` wires these together; `parseArgs` and `main` are the command line.
 *
 * @module
 */

import { spawn, type ChildProcess } from "node:child_process";
import { lookup } from "node:dns/promises";
import { once } from "node:events";
import { createServer, type Server } from "node:http";
import { createServer as createLocalServer, type Server as LocalServer, type Socket } from "node:net";
import { existsSync, readFileSync, realpathSync, statSync } from "node:fs";
import { appendFile, chmod, lstat, mkdir, open, readdir, readFile, rename, unlink } from "node:fs/promises";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { execa } from "execa";
import WebSocket from "ws";
import yargs from "yargs";
import {
  CLOCK_TOLERANCE_MS,
  CSV_HEADER,
  HANDOFF_SOCKET,
  MAX_APPLIED_BATCH,
  MAX_ENFORCEMENT_HOOKS,
  MAX_ENFORCEMENT_TEXT,
  MAX_APPLIED_RT_MS,
  MAX_CLOCK_SKEW_MS,
  DEFAULT_MAX_PREFIX,
  MAX_HUB_FRAME_BYTES,
  MAX_NODE_FRAME_BYTES,
  PROTOCOL_VERSION,
  blockedUntil,
  checkBannable,
  checkEvent,
  contains,
  csvRow,
  printable,
  isLoopbackHost,
  spoolDirProblem,
  mergeClaim,
  overlaps,
  parseAddress,
  parseHubFrame,
  parseNodeFrame,
  pruneClaims,
  tlsProblem,
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
  type HandoffAnswer,
  type PrefixLimits,
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
  /** Where the DROP is hooked in (default `DEFAULT_HOOKS`; nftables: input and forward); empty: sets only. */
  hooks?: Hook[];
  /** Full enforcement checks this often (ms; default 10000); 0: the agent never looks again after start. */
  checkMs?: number;
  /** Broadest networks the agent takes from the hub (as the hub's --max-prefix-v4/-v6): anything broader is refused. Default: `DEFAULT_MAX_PREFIX`. */
  maxPrefix?: PrefixLimits;
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
  /** Where the DROP is hooked in (default `DEFAULT_HOOKS`); empty: the sets (or chain) only, for the user's own rules. */
  hooks?: Hook[];
}

/**
 * Where the agent hooks its DROP in: the iptables chains INPUT, FORWARD and DOCKER-USER (ipset and
 * iptables backends), or the nftables hooks input and forward of table `inet PREFIX` (nftables,
 * whose forward hook runs before Docker's FORWARD chain, so docker-user is not needed there).
 */
export type Hook = "input" | "forward" | "docker-user";

/** Every hook, in the order the agent sets them up. */
export const HOOKS: readonly Hook[] = ["input", "forward", "docker-user"];

/** The hooks when --hook is not given: INPUT and FORWARD, and DOCKER-USER whenever Docker made it. */
export const DEFAULT_HOOKS: readonly Hook[] = HOOKS;

/** The iptables chain of each hook. */
const HOOK_CHAIN: Record<Hook, string> = { input: "INPUT", forward: "FORWARD", "docker-user": "DOCKER-USER" };

function hooksOf(cfg: FirewallConfig): readonly Hook[] {
  return cfg.hooks ?? DEFAULT_HOOKS;
}

/** A command to run: argv, and what to write to its stdin; with `unless`, only when that check command fails; with `when`, only when it succeeds. */
export interface Command {
  argv: string[];
  input?: string;
  unless?: string[];
  when?: string[];
}

/** One step of a backend's plan: a command, or (dry-run) a line for the log. */
export type Step = Command | { log: string };

/** A running agent. */
export interface Agent {
  claims: Claims;
  cursor(): Cursor | undefined;
  /** How it enforces now: hooks, entries against what it applied, repairs. */
  enforcement(): Enforcement;
  close(): Promise<void>;
}

/** What the agent's CSV rows say; time and node are added by `CsvLog`. */
export type Row = Omit<CsvRecord, "time" | "node">;

/** Largest timeout ipset accepts, in seconds (2^31 ms, 24.8 days); longer bans are capped and renewed (`Applier`). */
export const IPSET_MAX_TIMEOUT_S = 2147483;
/**
 * Largest timeout the nftables backend writes, in seconds (3.17 years): nft 1.0.6 refuses a
 * timeout of 100,000,000 s or more written in seconds ("value too large"; the kernel itself takes
 * up to 2^64 ns, about 213,000 days). Longer bans are capped and renewed, as with ipset.
 */
export const NFT_MAX_TIMEOUT_S = 99_999_999;
const MAX_ELEMENTS = 2_097_152;
const CMD_TIMEOUT_MS = 60_000;
/** Response-time reports (`applied`): gathered this long before one frame goes, at most this many waiting. */
const APPLIED_FLUSH_MS = 250;
const MAX_APPLIED_QUEUE = 1000;
/** Batches larger than this go to a one-shot process (a burst: its start is small next to it). */
const SESSION_MAX_BYTES = 256 * 1024;
const AGENT_FLAGS = ["config", "hub", "token-file", "node", "backend", "allow", "ports", "csv", "spool", "state", "ca", "heartbeat", "prefix", "hook", "check-interval", "max-prefix-v4", "max-prefix-v6", "cleanup", "metrics", "insecure"];
/**
 * Most events one sync may bring (all chunks together): as many as one kernel set holds. The
 * agent keeps every claim in memory (about 0.5 KB each), so this bounds it near 1 GB, within
 * Node's default heap; a fleet state larger than a set cannot be enforced anyway.
 */
export const MAX_SYNC_EVENTS = MAX_ELEMENTS;
/** Most bytes one sync may bring (all chunks together): 512 per event, twice a real event's size, so endless small chunks end too. */
export const MAX_SYNC_BYTES = MAX_SYNC_EVENTS * 512;
/** Refused events of one frame logged one line each; the rest are counted in one more line (each has its REJECT row). */
const MAX_REFUSAL_LINES = 10;
/**
 * The ipset backend's quick check (its sets' headers) this often, ms: `ipset flush` and `ipset
 * destroy` make no nftables event, so this bounds how long they go unseen. At 1000 ms it cost
 * ~0.25% of a core (BENCHMARKS.md section 8); twice as often stays well under 1%.
 */
const QUICK_CHECK_MS = 500;
/** Enforcement reports (`enforcement`): the snapshot is compared this often, and sent when it changed. */
const ENFORCEMENT_REPORT_MS = 1000;

// ---------------------------------------------------------------------------------------------
// Pure helpers and the backends' plans

/** Exponential from `baseMs`, capped, with jitter in [50%, 100%]: attempt `attempt` (0-based) of a backoff that grows. */
export function growingDelay(attempt: number, baseMs = 500, capMs = 30_000, random = Math.random): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/** Reconnect attempts made at a hub restart's pace before the backoff grows: at 0.25-1 s apiece, about the first 20 s of an outage. */
export const FAST_RECONNECTS = 32;

/**
 * Delay before reconnect attempt `attempt` (0-based) of an outage. Most outages are a hub
 * restart of a few seconds, so the first FAST_RECONNECTS attempts come every 0.25-1 s, uniformly
 * jittered (a fleet that lost the hub at one instant comes back spread over a second, not in
 * lockstep), and an agent is back within a second of the hub listening again. A longer outage
 * then backs off from 1 s, doubling, to `capMs`.
 */
export function nextDelay(attempt: number, random = Math.random, capMs = 30_000): number {
  if (attempt < FAST_RECONNECTS) return Math.round(250 + random() * 750);
  return growingDelay(attempt - FAST_RECONNECTS + 1, 1000, capMs, random);
}

/** How long the opening handshake may take: a third of the heartbeat, 2-10 s (a frozen hub accepts TCP and never answers the upgrade). */
export function handshakeTimeoutMs(heartbeatMs: number): number {
  return Math.min(10_000, Math.max(2000, Math.round(heartbeatMs / 3)));
}

/** How long a hub that hung (a missed heartbeat, a handshake that timed out) is passed over: four heartbeats, at least 30 s. */
export function hungMemoryMs(heartbeatMs: number): number {
  return Math.max(30_000, 4 * heartbeatMs);
}

/**
 * The hub to try after hub `current` failed: the next one in the list, never the one that just
 * failed while there are others, passing over hubs that hung within `memoryMs` (each try of one
 * costs a handshake timeout). When every other hub hung that recently, `current` if it only
 * refused or closed (a fast answer: it is alive), else the hub that hung longest ago.
 */
export function nextHub(count: number, current: number, hungAt: ReadonlyMap<number, number>, now: number, memoryMs: number): number {
  if (count <= 1) return 0;
  const recent = (i: number) => (hungAt.get(i) ?? -Infinity) > now - memoryMs;
  for (let step = 1; step < count; step++) {
    const i = (current + step) % count;
    if (!recent(i)) return i;
  }
  if (!recent(current)) return current;
  let best = current;
  for (let i = 0; i < count; i++) if ((hungAt.get(i) ?? -Infinity) < (hungAt.get(best) ?? -Infinity)) best = i;
  return best;
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

/**
 * nftables backend: the set an entry goes to. Single addresses go to plain hash sets (`v4`, `v6`):
 * nft 1.0 reads every element of an interval set back from the kernel before each transaction
 * that touches it (about 0.7 s at 100,000 entries), while a hash set costs the same at any size.
 * Networks go to the interval sets `v4net`, `v6net`, which hold only the few networks.
 */
export function nftSetName(ip: string): string {
  return `v${family(ip)}${ip.includes("/") ? "net" : ""}`;
}

/** nftables backend: the four sets, in order: v4, v6 (addresses), v4net, v6net (networks). */
export const NFT_SETS = ["v4", "v6", "v4net", "v6net"] as const;

function nftSetDef(name: string): string {
  const type = name.startsWith("v4") || name.startsWith("test4") ? "ipv4_addr" : "ipv6_addr";
  return `{ type ${type}; flags ${name.endsWith("net") ? "interval, timeout" : "timeout"}; size ${MAX_ELEMENTS}; }`;
}

/** nftables backend: the table's definition, sets created if missing, each hook's chain rules rewritten atomically (the chain of a hook not wanted is removed). */
export function nftSetupScript(cfg: FirewallConfig): string {
  const t = `inet ${cfg.prefix}`;
  const ports = cfg.ports.length ? `tcp dport { ${cfg.ports.join(", ")} } ` : "";
  const allow4 = cfg.allow.filter((a) => a.family === 4).map((a) => a.text);
  const allow6 = cfg.allow.filter((a) => a.family === 6).map((a) => a.text);
  const lines = [`add table ${t}`, ...NFT_SETS.map((set) => `add set ${t} ${set} ${nftSetDef(set)}`)];
  for (const hook of NFT_HOOKS) {
    // Priority just before the usual filter chains (and iptables-nft's, Docker's FORWARD among
    // them), so a ban wins over their ACCEPT rules.
    lines.push(`add chain ${t} ${hook} { type filter hook ${hook} priority filter - 10; policy accept; }`, `flush chain ${t} ${hook}`);
    if (!hooksOf(cfg).includes(hook)) {
      lines.push(`delete chain ${t} ${hook}`);
      continue;
    }
    if (allow4.length) lines.push(`add rule ${t} ${hook} ip saddr { ${allow4.join(", ")} } return`);
    if (allow6.length) lines.push(`add rule ${t} ${hook} ip6 saddr { ${allow6.join(", ")} } return`);
    // The counters are the agent's --metrics drop figures.
    for (const set of NFT_SETS) lines.push(`add rule ${t} ${hook} ${ports}${set.startsWith("v4") ? "ip" : "ip6"} saddr @${set} counter drop`);
  }
  return lines.join("\n") + "\n";
}

/**
 * nftables backend's set-up plan. A table made by banshare before 0.2 has interval sets named
 * `v4`, `v6` that the hash sets cannot replace in place: such a table (no `v4net`) is deleted and
 * made anew in the same transaction, so its hooks never go missing; the entries come back from
 * the agent's claims right after (at start from its state file, then the sync; at a repair, the refill).
 */
export function nftSetupSteps(cfg: FirewallConfig): Step[] {
  const t = ["inet", cfg.prefix];
  return [
    { when: ["nft", "-t", "list", "table", ...t], unless: ["nft", "-t", "list", "set", ...t, "v4net"], argv: ["nft", "-f", "-"], input: `delete table inet ${cfg.prefix}\n${nftSetupScript(cfg)}` },
    { argv: ["nft", "-f", "-"], input: nftSetupScript(cfg) },
  ];
}

/** The nftables hooks the agent can own a chain in (named after them). */
const NFT_HOOKS = ["input", "forward"] as const;

function nftElement(ip: string, until: number | null, now: number): string | undefined {
  const left = remainingSeconds(until, now);
  if (left < 0) return undefined;
  return left === 0 ? ip : `${ip} timeout ${Math.min(left, NFT_MAX_TIMEOUT_S)}s`;
}

function nftElements(prefix: string, set: string, els: string[]): string[] {
  const lines: string[] = [];
  for (let i = 0; i < els.length; i += 1000) lines.push(`add element inet ${prefix} ${set} { ${els.slice(i, i + 1000).join(", ")} }`);
  return lines;
}

/** The elements of `entries` still to hold (`nftElement`), grouped by the set (`nftSetName`) each goes to. */
function nftElementsBySet(entries: Iterable<[string, number | null]>, now: number): Map<string, string[]> {
  const els = new Map<string, string[]>();
  for (const [ip, until] of entries) {
    const el = nftElement(ip, until, now);
    if (!el) continue;
    const set = nftSetName(ip);
    if (!els.has(set)) els.set(set, []);
    els.get(set)!.push(el);
  }
  return els;
}

/**
 * nftables backend: one transaction for a batch of changes. An element's timeout cannot be
 * changed in place, and deleting a missing element fails the transaction, so each address
 * is first added (a no-op when present), then deleted, then added with its new timeout.
 */
export function nftChangeScript(prefix: string, changes: Change[], now: number): string {
  const lines: string[] = [];
  for (const c of changes) {
    const set = `inet ${prefix} ${nftSetName(c.ip)}`;
    lines.push(`add element ${set} { ${c.ip} }`, `delete element ${set} { ${c.ip} }`);
    const el = c.until === undefined ? undefined : nftElement(c.ip, c.until, now);
    if (el) lines.push(`add element ${set} { ${el} }`);
  }
  return lines.join("\n") + "\n";
}

/** nftables backend: the additions that put `desired` into the sets (an element already there stays as it is). */
export function nftFillScript(prefix: string, desired: Map<string, number | null>, now: number): string {
  const lines: string[] = [];
  for (const [set, els] of nftElementsBySet(desired, now)) lines.push(...nftElements(prefix, set, els));
  return lines.join("\n") + "\n";
}

/** nftables backend: one atomic transaction that makes the sets hold exactly `desired`. */
export function nftReconcileScript(prefix: string, desired: Map<string, number | null>, now: number): string {
  return NFT_SETS.map((set) => `flush set inet ${prefix} ${set}\n`).join("") + nftFillScript(prefix, desired, now);
}

/**
 * nftables backend: one transaction that tries `entries` in scratch sets made and deleted in it,
 * so it changes nothing whether it succeeds or not: it tells which entries the kernel refuses
 * when a reconcile fails.
 */
export function nftTestScript(prefix: string, entries: Change[], now: number): string {
  const lines: string[] = [];
  const els = nftElementsBySet(entries.flatMap((c): Array<[string, number | null]> => (c.until === undefined ? [] : [[c.ip, c.until]])), now);
  for (const set of NFT_SETS) {
    if (!els.has(set)) continue;
    const scratch = `test${set.slice(1)}`;
    lines.push(`add set inet ${prefix} ${scratch} ${nftSetDef(scratch)}`, ...nftElements(prefix, scratch, els.get(set)!), `delete set inet ${prefix} ${scratch}`);
  }
  return lines.join("\n") + "\n";
}

/**
 * ipset backend: `ipset restore` input that tries `entries` in scratch sets, created, filled and
 * destroyed, never the live ones: it tells which entries the kernel refuses when a reconcile
 * fails. A refused entry stops the restore before the destroy; `ipsetTestCleanup` removes them.
 */
export function ipsetTestScript(prefix: string, entries: Change[], now: number): string {
  const names = ipsetNames(prefix);
  const lines: string[] = [];
  for (const fam of [4, 6] as const) {
    const set = `${fam === 4 ? names.v4 : names.v6}-test`;
    const start = lines.length;
    lines.push(ipsetCreate(set, fam), `flush ${set}`);
    for (const c of entries) {
      if (family(c.ip) !== fam || c.until === undefined) continue;
      const add = ipsetAddLine(set, c.ip, c.until, now);
      if (add) lines.push(add);
    }
    if (lines.length === start + 2) lines.length = start;
    else lines.push(`destroy ${set}`);
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
 * ipset: a second `ipset restore`, for the enforcement check alone: `list -t SET` prints the
 * set's header, whose last line (its number of entries) is the answer. Not the batch session:
 * after its `list -n`, every later list in that process prints names only.
 */
export function ipsetHeaderSession(): SessionKind {
  return {
    argv: ["stdbuf", "-oL", "ipset", "restore"],
    frame: (script) => script,
    isAck: (line) => line.startsWith("Number of entries:"),
  };
}

/**
 * nftables: `nft -i` runs each input line as one transaction, so a batch goes on one line, its
 * commands joined by `;` (atomic, as with `nft -f`); `describe meta length` answers with one line
 * without asking the kernel anything (any listing of the table makes nft 1.0 fetch every element
 * of its sets: about a second at 100,000), the acknowledgement. An error does not end the
 * process: it is a line on stderr, written before the answer.
 */
export function nftSession(_prefix: string): SessionKind {
  return {
    argv: ["stdbuf", "-oL", "nft", "-i"],
    frame: (script) => `${script.split("\n").filter(Boolean).join("; ")}\n${NFT_ACK}\n`,
    isAck: (line) => line.startsWith("meta expression"),
  };
}

const NFT_ACK = "describe meta length";

/**
 * Steps that hook the agent's chain into each wanted hook chain unless it is already there, and
 * take it out of the others (ipset and iptables backends). DOCKER-USER is Docker's: hooked when
 * it exists, never created.
 */
function jumpSteps(cfg: FirewallConfig): Command[] {
  const steps: Command[] = [];
  for (const bin of ["iptables", "ip6tables"] as const) {
    for (const hook of HOOKS) {
      const jump = [HOOK_CHAIN[hook], "-j", cfg.prefix];
      if (!hooksOf(cfg).includes(hook)) steps.push({ when: [bin, "-w", "-C", ...jump], argv: [bin, "-w", "-D", ...jump] });
      // -I, not -A: the ban must come before any ACCEPT rule already in the chain.
      else steps.push({ when: hook === "docker-user" ? [bin, "-w", "-S", HOOK_CHAIN[hook]] : undefined, unless: [bin, "-w", "-C", ...jump], argv: [bin, "-w", "-I", HOOK_CHAIN[hook], "1", "-j", cfg.prefix] });
    }
  }
  return steps;
}

/** Commands that remove the agent's chain and its jumps from every hook chain, for both families. */
function chainCleanup(prefix: string): string[][] {
  return ["iptables", "ip6tables"].flatMap((bin) => [...HOOKS.map((h) => [bin, "-w", "-D", HOOK_CHAIN[h], "-j", prefix]), [bin, "-w", "-F", prefix], [bin, "-w", "-X", prefix]]);
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
  /** Tries entries without touching the live sets (each step fails when the kernel refuses one): how a failed reconcile finds the entries to leave out. */
  test?(cfg: FirewallConfig, entries: Change[], now: number): Step[];
  /** Removes what a failed `test` left behind (each command may fail when absent). */
  testCleanup?(prefix: string): string[][];
  /** Longest kernel timeout this backend writes, seconds: longer bans are capped and renewed before it ends. */
  maxTimeoutS?: number;
  /** The long-lived process a batch goes to first (`KernelSession`); `change` is then one command, run one-shot when the session fails. */
  session?(prefix: string): SessionKind;
  /** Removes every object the agent created, and nothing else (each command may fail when absent). */
  cleanup(prefix: string): string[][];
  /** Commands whose output tells how many addresses the kernel holds (`ban.ts status` keeps a copy, kept in step by a test). */
  count(prefix: string): string[][];
  /** The addresses in `count`'s output, for a backend whose changes depend on what the kernel holds. */
  listed?(output: string): string[];
  /** Adds every entry of `desired` the kernel lacks, removing nothing (the state file restored at start). */
  fill(cfg: FirewallConfig, desired: Map<string, number | null>, now: number, present: Set<string>): Step[];
  /** The enforcement check (`Guard`): commands, by name, whose output shows the agent's objects without listing set contents. */
  inspect?(cfg: FirewallConfig): Record<string, string[]>;
  /** Reads `inspect`'s outputs (undefined where a command failed): pure. */
  read?(cfg: FirewallConfig, out: Record<string, string | undefined>): Inspection;
  /** Queries for a long-lived process of their own, answering some `inspect` commands (by name) with a pipe write instead of a process start: cheap enough for twice a second. */
  quick?(prefix: string): { session: SessionKind; queries: Record<string, string> };
  /** The kernel ends entries by their timeout itself: counts are compared with a margin around each entry's end. */
  expires?: boolean;
}

/** What an enforcement check found in the kernel. */
export interface Inspection {
  /** Each hook the agent should be in, e.g. "iptables INPUT", "nft forward": present, missing, or absent (Docker's chain does not exist: nothing to hook). */
  hooks: Map<string, "present" | "missing" | "absent">;
  /** What is missing (hooks, chains, rules, sets, the table), each in a few words. */
  missing: string[];
  /** The entries the kernel holds per family, where this backend counts them. */
  entries?: Record<4 | 6, number>;
}

/** `iptables-save` output as each chain's rules (the words after `-A CHAIN`); chains without rules map to []. */
export function parseIptablesSave(text: string): Map<string, string[]> {
  const chains = new Map<string, string[]>();
  for (const line of text.split("\n")) {
    const c = /^:(\S+) /.exec(line);
    if (c) chains.set(c[1], chains.get(c[1]) ?? []);
    const r = /^-A (\S+) (.*)$/.exec(line);
    if (r) chains.set(r[1], [...(chains.get(r[1]) ?? []), r[2]]);
  }
  return chains;
}

/**
 * Reads one family's `iptables-save -t filter` into `into`: the agent's chain (and in it the
 * rule `mustHave` matches, the ipset DROP), and the jump into it from each wanted hook chain.
 * Returns the chain's rules as `iptables -S` prints them.
 */
function readChains(cfg: FirewallConfig, fam: 4 | 6, saved: string | undefined, into: Inspection, mustHave?: { what: string; re: RegExp }): string {
  if (saved === undefined) return "";
  const bin = iptablesFor(fam);
  const chains = parseIptablesSave(saved);
  const own = chains.get(cfg.prefix);
  if (!own) into.missing.push(`${bin} chain ${cfg.prefix}`);
  else if (mustHave && !own.some((r) => mustHave.re.test(r))) into.missing.push(`${bin} ${mustHave.what}`);
  for (const hook of hooksOf(cfg)) {
    const chain = HOOK_CHAIN[hook];
    const rules = chains.get(chain);
    const state = !rules && hook === "docker-user" ? "absent" : rules?.includes(`-j ${cfg.prefix}`) ? "present" : "missing";
    into.hooks.set(`${bin} ${chain}`, state);
    if (state === "missing") into.missing.push(`${bin} ${chain} jump`);
  }
  return (own ?? []).map((r) => `-A ${cfg.prefix} ${r}`).join("\n");
}

/** `ipset list -t` output(s): entries per set name. */
export function ipsetHeaders(text: string): Map<string, number> {
  const out = new Map<string, number>();
  let name = "";
  for (const line of text.split("\n")) {
    const n = /^Name: (\S+)/.exec(line);
    if (n) name = n[1];
    const e = /^Number of entries: (\d+)/.exec(line);
    if (e && name) out.set(name, Number(e[1]));
  }
  return out;
}

/** ipset backend's check: the iptables hooks and chain (when hooked), and each set's header. */
function ipsetInspect(cfg: FirewallConfig): Record<string, string[]> {
  const names = ipsetNames(cfg.prefix);
  const cmds: Record<string, string[]> = { v4: ["ipset", "list", "-t", names.v4], v6: ["ipset", "list", "-t", names.v6] };
  if (hooksOf(cfg).length) Object.assign(cmds, { ipt4: ["iptables-save", "-t", "filter"], ipt6: ["ip6tables-save", "-t", "filter"] });
  return cmds;
}

function ipsetRead(cfg: FirewallConfig, out: Record<string, string | undefined>): Inspection {
  const names = ipsetNames(cfg.prefix);
  const r: Inspection = { hooks: new Map(), missing: [] };
  const counts = ipsetHeaders(`${out.v4 ?? ""}\n${out.v6 ?? ""}`);
  for (const set of [names.v4, names.v6]) if (!counts.has(set)) r.missing.push(`set ${set}`);
  if (counts.has(names.v4) && counts.has(names.v6)) r.entries = { 4: counts.get(names.v4)!, 6: counts.get(names.v6)! };
  if (hooksOf(cfg).length) {
    for (const fam of [4, 6] as const) {
      const set = fam === 4 ? names.v4 : names.v6;
      readChains(cfg, fam, out[`ipt${fam}`], r, { what: `DROP rule for ${set}`, re: new RegExp(`--match-set ${set} src -j DROP$`) });
    }
  }
  return r;
}

function iptablesRead(cfg: FirewallConfig, out: Record<string, string | undefined>): Inspection {
  const r: Inspection = { hooks: new Map(), missing: [] };
  const listed = ([4, 6] as const).map((fam) => iptablesListed(readChains(cfg, fam, out[`ipt${fam}`], r)).length);
  if (out.ipt4 !== undefined && out.ipt6 !== undefined) r.entries = { 4: listed[0], 6: listed[1] };
  return r;
}

/** nftables backend's check: `nft -t list ruleset` (no set elements: cheap at any size), our table's sets, chains and drops. */
function nftRead(cfg: FirewallConfig, out: Record<string, string | undefined>): Inspection {
  const r: Inspection = { hooks: new Map(), missing: [] };
  if (out.ruleset === undefined) return r;
  const lines = out.ruleset.split("\n");
  const start = lines.indexOf(`table inet ${cfg.prefix} {`);
  if (start < 0) {
    r.missing.push(`table inet ${cfg.prefix}`);
    for (const hook of NFT_HOOKS) if (hooksOf(cfg).includes(hook)) r.hooks.set(`nft ${hook}`, "missing");
    return r;
  }
  const end = lines.indexOf("}", start);
  const body = lines.slice(start + 1, end < 0 ? undefined : end);
  for (const set of NFT_SETS) if (!body.includes(`\tset ${set} {`)) r.missing.push(`set inet ${cfg.prefix} ${set}`);
  for (const hook of NFT_HOOKS) {
    if (!hooksOf(cfg).includes(hook)) continue;
    const at = body.indexOf(`\tchain ${hook} {`);
    const chain = at < 0 ? [] : body.slice(at + 1, body.indexOf("\t}", at));
    const ok = chain.some((l) => l.includes(`type filter hook ${hook} `)) && NFT_SETS.every((set) => chain.some((l) => new RegExp(` saddr @${set} counter packets \\d+ bytes \\d+ drop$`).test(l)));
    r.hooks.set(`nft ${hook}`, ok ? "present" : "missing");
    if (!ok) r.missing.push(`nft ${hook} chain`);
  }
  return r;
}

const BACKEND_TABLE = {
  ipset: {
    describe: "ipset sets",
    // Hooked: the sets, the chain and its jumps; set-only (no hooks): the sets alone.
    setup: (cfg) => [...ipsetSetupCommands(cfg).slice(0, hooksOf(cfg).length ? undefined : 1), ...jumpSteps(cfg)],
    change: (cfg, changes, now) => [{ argv: ["ipset", "-exist", "restore"], input: ipsetChangeScript(cfg.prefix, changes, now) }],
    reconcile: (cfg, desired, now) => [{ argv: ["ipset", "-exist", "restore"], input: ipsetReconcileScript(cfg.prefix, desired, now) }],
    test: (cfg, entries, now) => [{ argv: ["ipset", "-exist", "restore"], input: ipsetTestScript(cfg.prefix, entries, now) }],
    testCleanup: (prefix) => Object.values(ipsetNames(prefix)).map((set) => ["ipset", "destroy", `${set}-test`]),
    maxTimeoutS: IPSET_MAX_TIMEOUT_S,
    session: (prefix) => ipsetSession(ipsetNames(prefix).v4),
    cleanup: (prefix) => [...chainCleanup(prefix), ...Object.values(ipsetNames(prefix)).map((set) => ["ipset", "destroy", set])],
    count: (prefix) => Object.values(ipsetNames(prefix)).map((set) => ["ipset", "list", "-terse", set]),
    fill: (cfg, desired, now) => [{ argv: ["ipset", "-exist", "restore"], input: ipsetChangeScript(cfg.prefix, [...desired].filter(([, u]) => remainingSeconds(u, now) >= 0).map(([ip, until]) => ({ ip, until })), now) }],
    inspect: ipsetInspect,
    read: ipsetRead,
    quick: (prefix) => ({ session: ipsetHeaderSession(), queries: { v4: `list -t ${ipsetNames(prefix).v4}\n`, v6: `list -t ${ipsetNames(prefix).v6}\n` } }),
    expires: true,
  },
  nftables: {
    describe: "an nftables table",
    setup: nftSetupSteps,
    change: (cfg, changes, now) => [{ argv: ["nft", "-f", "-"], input: nftChangeScript(cfg.prefix, changes, now) }],
    reconcile: (cfg, desired, now) => [{ argv: ["nft", "-f", "-"], input: nftReconcileScript(cfg.prefix, desired, now) }],
    test: (cfg, entries, now) => [{ argv: ["nft", "-f", "-"], input: nftTestScript(cfg.prefix, entries, now) }],
    maxTimeoutS: NFT_MAX_TIMEOUT_S,
    session: nftSession,
    cleanup: (prefix) => [["nft", "delete", "table", "inet", prefix]],
    count: (prefix) => NFT_SETS.map((set) => ["nft", "-j", "list", "set", "inet", prefix, set]),
    fill: (cfg, desired, now) => [{ argv: ["nft", "-f", "-"], input: nftFillScript(cfg.prefix, desired, now) }],
    inspect: () => ({ ruleset: ["nft", "-t", "list", "ruleset"] }),
    read: nftRead,
    expires: true,
  },
  iptables: {
    describe: "one iptables rule per address",
    // The chain is created when `iptables -S` cannot list it; the rules a previous run left stay (see `listed`).
    setup: (cfg) => [...(["iptables", "ip6tables"] as const).map((bin) => ({ unless: [bin, "-w", "-S", cfg.prefix], argv: [bin, "-w", "-N", cfg.prefix] })), ...jumpSteps(cfg)],
    change: (cfg, changes, _now, present) => iptablesChangeCommands(cfg, changes, present),
    reconcile: (cfg, desired) => iptablesReconcileCommands(cfg, desired.keys()),
    cleanup: chainCleanup,
    count: (prefix) => ["iptables", "ip6tables"].map((bin) => [bin, "-w", "-S", prefix]),
    listed: iptablesListed,
    fill: (cfg, desired, _now, present) => iptablesChangeCommands(cfg, [...desired].map(([ip, until]) => ({ ip, until })), present),
    inspect: () => ({ ipt4: ["iptables-save", "-t", "filter"], ipt6: ["ip6tables-save", "-t", "filter"] }),
    read: iptablesRead,
  },
  "dry-run": {
    describe: "log only",
    setup: (cfg) => [{ log: `dry-run: would create the ${cfg.prefix} firewall objects` }],
    change: (_cfg, changes) => changes.map((c) => ({ log: `dry-run: would ${c.until === undefined ? `unblock ${c.ip}` : `block ${c.ip} until ${c.until === null ? "never" : new Date(c.until).toISOString()}`}` })),
    reconcile: (_cfg, desired) => [{ log: `dry-run: would make the kernel hold exactly ${desired.size} address(es)` }],
    fill: (_cfg, desired) => [{ log: `dry-run: would put ${desired.size} address(es) back into the kernel` }],
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

  /** Never blocks `a` from now on (a hub's new address); true when it was not covered yet. */
  add(a: Address): boolean {
    if (this.entries.some((x) => contains(x, a))) return false;
    this.entries.push(a);
    this.cache.clear();
    return true;
  }

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

/** The later of two ends, null (for good) winning. */
function laterEnd(a: number | null, b: number | null): number | null {
  return a === null || b === null ? null : Math.max(a, b);
}

/** The first `bits` bits of `bytes`, as a map key. */
function prefixKey(bytes: Uint8Array, bits: number): string {
  let key = "";
  for (let i = 0; i * 8 < bits; i++) key += String.fromCharCode(bits - i * 8 >= 8 ? bytes[i] : bytes[i] & ((0xff << (8 - (bits - i * 8))) & 0xff));
  return key;
}

/**
 * What the kernel can hold of `desired` when networks overlap: an nftables interval set refuses
 * a network together with an address or network inside it ("conflicting intervals"), so the
 * covering network wins. An entry inside a blocked network is left out while the network is
 * blocked, and the network's kernel entry lasts as long as the longest entry inside it, so the
 * kernel alone (an agent that is down) never ends a ban early. When the network's own claim
 * ends, the agent puts the entries inside back with their own ends, in one batch. The same rule
 * runs for every backend (ipset's hash:net would take both) so they hold the same. Without
 * networks in `desired`, `desired` itself is returned.
 */
export function resolveOverlaps(desired: Map<string, number | null>): Map<string, number | null> {
  const nets = new Map<string, Map<string, string>>(); // "family/bits" -> prefix key -> network
  const lengths: Record<4 | 6, number[]> = { 4: [], 6: [] };
  for (const ip of desired.keys()) {
    if (!ip.includes("/")) continue;
    const a = parseAddress(ip)!;
    const k = `${a.family}/${a.prefix}`;
    if (!nets.has(k)) {
      nets.set(k, new Map());
      lengths[a.family].push(a.prefix);
    }
    nets.get(k)!.set(prefixKey(a.bytes, a.prefix), ip);
  }
  if (!nets.size) return desired;
  lengths[4].sort((x, y) => x - y);
  lengths[6].sort((x, y) => x - y);
  const out = new Map(desired);
  for (const [ip, until] of desired) {
    const fam = family(ip);
    if (!lengths[fam].length) continue;
    const a = parseAddress(ip)!;
    // The broadest blocked network around it: the one the kernel holds.
    for (const bits of lengths[fam]) {
      if (bits >= a.prefix) break;
      const cover = nets.get(`${fam}/${bits}`)!.get(prefixKey(a.bytes, bits));
      if (cover === undefined) continue;
      out.delete(ip);
      out.set(cover, laterEnd(out.get(cover)!, until));
      break;
    }
  }
  return out;
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
  private waiting: Array<{ resolve: (lines: string[]) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }> = [];
  /** The output lines of the batch under way, up to its acknowledgement (a query's answer). */
  private lines: string[] = [];

  constructor(private readonly kind: SessionKind) {}

  /** The process's id, while it runs. */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  send(script: string): Promise<void> {
    return this.query(script).then(() => {});
  }

  /** Runs `script` like `send`, and resolves with what it printed, the acknowledgement last. */
  query(script: string): Promise<string[]> {
    if (script.length > SESSION_MAX_BYTES) return Promise.reject(new Error("batch too large for the session"));
    const child = this.child ?? this.start();
    return new Promise<string[]>((resolve, reject) => {
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
    this.lines = [];
    this.failedBatch = false;
    rememberChild(child.pid);
    child.stdout!.setEncoding("utf8").on("data", (d: string) => {
      if (child !== this.child) return;
      this.out += d;
      let nl: number;
      while ((nl = this.out.indexOf("\n")) >= 0) {
        const line = this.out.slice(0, nl);
        this.out = this.out.slice(nl + 1);
        if (this.lines.length < 1000) this.lines.push(line);
        if (!this.kind.isAck(line)) continue;
        const answer = this.lines;
        this.lines = [];
        // stderr was written before this answer: its data, if any, is delivered in this same
        // poll phase, so decide once the phase is over.
        setImmediate(() => {
          clearTimeout(this.errTimer);
          this.errTimer = undefined;
          const w = this.waiting.shift();
          if (!w) return;
          clearTimeout(w.timer);
          if (!this.failedBatch) return w.resolve(answer);
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

/**
 * The processes this agent started lately: `nft monitor` names the process behind each change,
 * and a change of our own is no tampering. Kept a minute (a one-shot command has exited by the
 * time its change is reported, so its parent can no longer be read).
 */
const ownChildren = new Map<number, number>();

function rememberChild(pid: number | undefined): void {
  if (pid === undefined) return;
  const now = Date.now();
  if (ownChildren.size > 1000) for (const [p, at] of ownChildren) if (at < now - 60_000) ownChildren.delete(p);
  ownChildren.set(pid, now);
}

/** True when `pid` is a process this agent started (its child now, or lately). */
export function isOwnProcess(pid: number): boolean {
  if (ownChildren.has(pid)) return true;
  try {
    return /^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] === String(process.pid);
  } catch {
    return false;
  }
}

/** Runs a command as execa does, remembering its process as ours. */
function exec(argv: string[], opts: { input?: string; stripFinalNewline?: boolean } = {}) {
  const sub = execa(argv[0], argv.slice(1), { input: opts.input ?? "", timeout: CMD_TIMEOUT_MS, reject: false, stripFinalNewline: opts.stripFinalNewline ?? true });
  rememberChild(sub.pid);
  return sub;
}

async function run(cmd: Command): Promise<void> {
  const r = await exec(cmd.argv, { input: cmd.input });
  if (r.exitCode !== 0) {
    const why = String(r.stderr || r.stdout || r.shortMessage || "").split("\n").slice(0, 3).join(" / ");
    throw new CommandError(`${cmd.argv.join(" ")} failed (${r.timedOut ? "timed out" : `exit ${r.exitCode}`}): ${why}`);
  }
}

/** Runs one step of a plan: logs it, or runs its command (unless its check command succeeds). */
async function runStep(step: Step, log: (s: string) => void): Promise<void> {
  if ("log" in step) return log(step.log);
  if (step.when && (await exec(step.when)).exitCode !== 0) return;
  if (step.unless && (await exec(step.unless)).exitCode === 0) return;
  await run(step);
}

/** A change the kernel refused, with the kernel's own message. */
export interface Refusal {
  change: Change;
  message: string;
}

/** The firewall's objects are not there (or its command cannot run): no entry is to blame. */
export class KernelUnavailable extends Error {}

/** A firewall backend at work: a `BACKENDS` entry run against the kernel. */
export interface Backend {
  setup(): Promise<void>;
  /**
   * Applies a batch. One bad entry never holds back the rest: a batch the kernel refuses is split
   * in halves until each refused change stands alone; those are returned, everything else has
   * landed. Throws `KernelUnavailable` when every change fails and the firewall's objects are
   * missing (nothing is then to blame on an entry).
   */
  apply(changes: Change[], now: number): Promise<Refusal[]>;
  /**
   * Makes the kernel hold exactly `desired`. When the kernel refuses that, the entries it refuses
   * are found without touching the live sets (`test`, halving), and the kernel is made to hold the
   * rest; those refused are returned. Throws when it still fails.
   */
  reconcile(desired: Map<string, number | null>, now: number): Promise<Refusal[]>;
  /** Longest kernel timeout, seconds: longer bans are capped and must be renewed (undefined: no limit). */
  readonly maxTimeoutS?: number;
  /**
   * Adds what the kernel lacks of `desired`, removing nothing, in one batch; when the kernel
   * refuses it, each half is tried, down to the entries refused alone, which are returned.
   */
  fill(desired: Map<string, number | null>, now: number): Promise<Refusal[]>;
  /** Runs the plan's enforcement check (undefined: this backend has none); `quick`: only what the session answers. */
  inspect?(quick: boolean): Promise<Inspection | undefined>;
  close(): void;
}

/**
 * Runs `attempt` on `items`; when it fails, on each half, down to single items: returns the
 * items that fail alone, with their error's message. Order is kept (unblocks before blocks).
 */
export async function splitRefused<T>(items: T[], attempt: (part: T[]) => Promise<void>): Promise<Array<{ item: T; message: string }>> {
  try {
    if (items.length) await attempt(items);
    return [];
  } catch (e) {
    if (items.length === 1) return [{ item: items[0], message: (e as Error).message }];
    const mid = items.length >> 1;
    const left = await splitRefused(items.slice(0, mid), attempt);
    const right = await splitRefused(items.slice(mid), attempt);
    for (const r of right) left.push(r);
    return left;
  }
}

/** Creates the backend for `name`: runs its plan, batches through its session if it has one; `log` receives dry-run plans. */
export function makeBackend(name: BackendName, cfg: FirewallConfig, log: (s: string) => void): Backend {
  const plan: BackendPlan = BACKENDS[name];
  const kind = plan.session?.(cfg.prefix);
  const session = kind && new KernelSession(kind);
  /** What the kernel holds, for a backend whose changes depend on it (`listed`). */
  const present = new Set<string>();
  const runAll = async (steps: Step[]) => {
    for (const s of steps) await runStep(s, log);
  };
  /** A batch goes to the session; to a one-shot command when the session fails. */
  const runBatch = async (steps: Step[]) => {
    for (const step of steps) {
      if (session && "argv" in step) await session.send(step.input ?? "").catch(() => run(step));
      else await runStep(step, log);
    }
  };
  const { inspect, read } = plan;
  const quick = plan.quick?.(cfg.prefix);
  const asker = quick && new KernelSession(quick.session);
  /** When every change failed: do the firewall's objects exist? (Its count commands run.) Throws KernelUnavailable when not. */
  const available = async (why: string) => {
    for (const argv of plan.count(cfg.prefix)) {
      const r = await execa(argv[0], argv.slice(1), { timeout: CMD_TIMEOUT_MS, reject: false });
      if (r.exitCode !== 0) throw new KernelUnavailable(`${why} (and ${argv.join(" ")} fails: the firewall's objects are missing)`);
    }
  };
  return {
    async setup() {
      await runAll(plan.setup(cfg));
      if (plan.listed) {
        // Learn what a previous run left, without touching it.
        present.clear();
        for (const argv of plan.count(cfg.prefix)) {
          const r = await exec(argv);
          if (r.exitCode === 0) for (const ip of plan.listed(r.stdout)) present.add(ip);
        }
      }
      // Start the long-lived process now, so the first ban does not pay for it.
      if (session) await session.send("").catch((e: Error) => log(`warning: ${e.message}; each batch will start its own ${kind.argv[2]}`));
    },
    async apply(changes, now) {
      const attempt = async (part: Change[]) => {
        await runBatch(plan.change(cfg, part, now, present));
        if (plan.listed) for (const c of part) c.until === undefined ? present.delete(c.ip) : present.add(c.ip);
      };
      const refused = (await splitRefused(changes, attempt)).map((r) => ({ change: r.item, message: r.message }));
      if (refused.length && refused.length === changes.length) await available(refused[0].message);
      return refused;
    },
    async reconcile(desired, now) {
      let refused: Refusal[] = [];
      try {
        await runAll(plan.reconcile(cfg, desired, now));
      } catch (e) {
        if (!plan.test) throw e;
        // Which entries does the kernel refuse? Tried in scratch sets, the live ones untouched.
        const entries: Change[] = [];
        for (const [ip, until] of desired) entries.push({ ip, until });
        refused = (await splitRefused(entries, (part) => runAll(plan.test!(cfg, part, now)))).map((r) => ({ change: r.item, message: r.message }));
        for (const argv of plan.testCleanup?.(cfg.prefix) ?? []) await execa(argv[0], argv.slice(1), { timeout: CMD_TIMEOUT_MS, reject: false });
        if (!refused.length) throw e;
        if (refused.length === entries.length) await available(refused[0].message);
        const rest = new Map(desired);
        for (const r of refused) rest.delete(r.change.ip);
        await runAll(plan.reconcile(cfg, rest, now));
      }
      if (plan.listed) {
        present.clear();
        for (const ip of desired.keys()) present.add(ip);
      }
      return refused;
    },
    maxTimeoutS: plan.maxTimeoutS,
    async fill(desired, now) {
      const attempt = async (part: Array<[string, number | null]>) => {
        await runBatch(plan.fill(cfg, new Map(part), now, present));
        if (plan.listed) for (const [ip] of part) present.add(ip);
      };
      const refused = (await splitRefused([...desired], attempt)).map((r) => ({ change: { ip: r.item[0], until: r.item[1] }, message: r.message }));
      if (refused.length && refused.length === desired.size) await available(refused[0].message);
      return refused;
    },
    inspect:
      inspect && read
        ? async (fast) => {
            const cmds = inspect(cfg);
            const out: Record<string, string | undefined> = {};
            for (const [n, q] of Object.entries(quick?.queries ?? {})) {
              // A query that fails (the set is gone: ipset then ends) is asked of a process of its own.
              const lines = await asker!.query(q).catch(() => undefined);
              out[n] = lines?.join("\n") ?? ((r) => (r.exitCode === 0 ? String(r.stdout) : undefined))(await exec(cmds[n]));
              delete cmds[n];
            }
            if (!fast || !quick) {
              for (const [n, argv] of Object.entries(cmds)) {
                const r = await exec(argv);
                out[n] = r.exitCode === 0 ? String(r.stdout) : undefined;
              }
            }
            return read(cfg, out);
          }
        : undefined,
    close: () => {
      session?.close();
      asker?.close();
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
// State file (--state): cursor and claims

/** The agent's state file: where it is in the hub's stream, and the claims it holds. */
export interface AgentState {
  /** Undefined when the file's first line is damaged: its claims still go back into the kernel, and a full sync follows. */
  cursor?: Cursor;
  claims: FleetEvent[];
  /** Lines skipped as damaged (each costs only itself), with the first one's reason. */
  damaged: number;
  firstDamage?: string;
}

/**
 * Serialises the state file's content: a first line `{"v":2,"cursor":...}`, then one claim per
 * line, so that a damaged byte costs the one claim (or the cursor) it falls in, not the file.
 */
export function stateText(cursor: Cursor, claims: Claims): string {
  const lines = [JSON.stringify({ v: 2, cursor })];
  for (const byOrigin of claims.values()) for (const e of byOrigin.values()) lines.push(JSON.stringify(e));
  return lines.join("\n") + "\n";
}

function parseJson(line: string): unknown {
  try {
    return JSON.parse(line);
  } catch {
    return undefined;
  }
}

function isCursor(c: unknown): c is Cursor {
  return typeof (c as Cursor)?.hub === "string" && typeof (c as Cursor)?.seq === "string";
}

/**
 * Parses a state file: each damaged line is skipped and counted, the rest kept. Reads the
 * one-object file of earlier versions (`{v: 1, cursor, claims: [...]}`) too. Undefined when
 * nothing in it is a cursor or a claim (not a state file: a full sync follows).
 */
export function parseState(text: string): AgentState | undefined {
  const lines = text.split("\n").filter((l) => l.trim());
  const first = parseJson(lines[0] ?? "") as { v?: unknown; cursor?: unknown; claims?: unknown } | undefined;
  const v1 = first?.v === 1 && lines.length === 1 && Array.isArray(first.claims);
  const entries: Array<[number, unknown]> = v1 ? (first.claims as unknown[]).map((c, i) => [i + 1, c]) : lines.slice(1).map((l, i) => [i + 2, parseJson(l)]);
  const cursor = (first?.v === 1 || first?.v === 2) && isCursor(first.cursor) ? { hub: first.cursor.hub, seq: first.cursor.seq } : undefined;
  const state: AgentState = { cursor, claims: [], damaged: cursor || v1 ? 0 : 1 };
  if (!cursor) state.firstDamage = "line 1: not a cursor";
  for (const [n, e] of entries) {
    const why = e === undefined ? "not JSON" : checkEvent(e);
    if (!why) state.claims.push(e as FleetEvent);
    else {
      state.damaged++;
      state.firstDamage ??= `${v1 ? "claim" : "line"} ${n}: ${why}`;
    }
  }
  return cursor || state.claims.length ? state : undefined;
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

  /** The saved state, or undefined (no file; or not a state file, with a warning: a full sync follows). Damaged lines cost only themselves, with one warning. */
  async load(): Promise<AgentState | undefined> {
    if (!this.path || !existsSync(this.path)) return undefined;
    const saved = parseState(await readFile(this.path, "utf8"));
    if (!saved) this.log(`warning: ${this.path} is not a banshare agent state file; starting with a full sync`);
    else if (saved.damaged) this.log(`warning: ${this.path}: skipped ${saved.damaged} damaged line(s) (${saved.firstDamage}); every other claim is kept${saved.cursor ? "" : ", and a full sync follows"}`);
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
// The hub's clock: what bans are timed by

/** How long one sample of the hub's clock counts towards `HubClock`'s estimate, ms. */
const CLOCK_WINDOW_MS = 10 * 60_000;

/**
 * The hub's clock as this agent reads it. A ban's `until` is on the hub's clock, the fleet's
 * reference, so the agent times bans by it: a server hours behind still holds a 600 s ban for
 * 600 s. Each `now` the hub sends (its welcome, placed at the midpoint of the hello's round
 * trip; its sync and event frames, a lower bound, network delay being in it) is kept as an
 * offset to the monotonic clock, the best of the last CLOCK_WINDOW_MS; a step of the local
 * clock changes nothing. While the local clock agrees within CLOCK_TOLERANCE_MS it is used as
 * it is (below that, skew and network delay cannot be told apart); before any hub answered too.
 */
export class HubClock {
  /** Samples of the hub's clock minus the monotonic clock, ms, with when (monotonic) each was taken. */
  private samples: Array<{ base: number; at: number }> = [];
  private base: number | undefined;
  /** The local clock was off when last told (for the log line when it changes). */
  private off = false;

  constructor(
    private readonly log: (line: string) => void,
    private readonly mono: () => number = () => performance.now(),
    private readonly wall: () => number = () => Date.now(),
  ) {}

  /** The hub's time now, ms. */
  now(): number {
    const wall = this.wall();
    return wall + this.offset(wall);
  }

  /** A time on the hub's clock as the local clock reads it (for the CSV, whose rows carry local times). */
  toLocal(t: number): number {
    return t - this.offset(this.wall());
  }

  /** A time on the local clock as the hub's clock reads it (for the times the agent reports to the hub). */
  toHub(t: number): number {
    return t + this.offset(this.wall());
  }

  /** The hub's clock minus the local clock reading `wall`, ms: 0 while they agree within the tolerance (one reading, so no ms ticks in between). */
  private offset(wall: number): number {
    if (this.base === undefined) return 0;
    const d = Math.round(this.mono() + this.base) - wall;
    return Math.abs(d) > CLOCK_TOLERANCE_MS ? d : 0;
  }

  /** The welcome's `now`, answering a hello sent at monotonic `sentMono`: a new connection, a new estimate. */
  welcomed(hubNow: number, sentMono: number): void {
    const at = this.mono();
    this.samples = [{ base: hubNow - (sentMono + at) / 2, at }];
    this.update();
  }

  /** A sync or event frame's `now`, received just now. */
  heard(hubNow: number): void {
    const at = this.mono();
    const last = this.samples[this.samples.length - 1];
    const base = hubNow - at;
    // One sample per second is plenty: a burst of events costs nothing here.
    if (last && at - last.at < 1000) {
      if (base <= last.base) return;
      last.base = base;
    } else this.samples.push({ base, at });
    while (this.samples.length > 1 && this.samples[0].at < at - CLOCK_WINDOW_MS) this.samples.shift();
    this.update();
  }

  private update(): void {
    this.base = Math.max(...this.samples.map((x) => x.base));
    const skew = this.mono() + this.base - this.wall();
    const off = Math.abs(skew) > CLOCK_TOLERANCE_MS;
    if (off && !this.off) this.log(`warning: this server's clock is ${(Math.abs(skew) / 1000).toFixed(1)} s ${skew > 0 ? "behind" : "ahead of"} the hub's; bans are timed by the hub's clock`);
    else if (!off && this.off) this.log(`this server's clock is back within ${CLOCK_TOLERANCE_MS} ms of the hub's`);
    this.off = off;
  }
}

// ---------------------------------------------------------------------------------------------
// CSV log (--csv)

/**
 * The structured log: one row per BLOCK, SCHEDULE_UNBLOCK, UNBLOCK, REJECT; a no-op without a
 * path. Rows are on the local clock, `until` too (moved from the hub's clock by `clock`), so
 * `until - time` is how long the ban has left on this server.
 */
export class CsvLog {
  /** The node name the rows carry: the hub's name for this node once welcomed. */
  node: string;

  private constructor(
    private readonly out: CsvFile | undefined,
    node: string,
    private readonly clock?: HubClock,
  ) {
    this.node = node;
  }

  /** Opens `path` for appending, writing the header first when the file is new. */
  static async open(path: string | undefined, node: string, log: (line: string) => void, clock?: HubClock): Promise<CsvLog> {
    if (!path) return new CsvLog(undefined, node);
    if (!existsSync(path)) await appendFile(path, CSV_HEADER + "\n");
    return new CsvLog(new CsvFile(path, log), node, clock);
  }

  /** Rows recorded and not yet written. */
  private pending = "";

  record(r: Row): void {
    if (!this.out) return;
    // The rows of one batch (a BLOCK and its SCHEDULE_UNBLOCK) go in one write, so that a reader
    // of the file never sees one without the other.
    if (!this.pending) queueMicrotask(() => this.flush());
    const until = r.until && this.clock ? { until: this.clock.toLocal(r.until) } : {};
    this.pending += csvRow({ time: Date.now(), node: this.node, ...r, ...until });
  }

  close(): Promise<void> {
    this.flush();
    return this.out?.close() ?? Promise.resolve();
  }

  private flush(): void {
    if (this.pending) this.out?.write(this.pending);
    this.pending = "";
  }
}

/**
 * The `--csv` file: rows appended in one write per batch, the file opened only for that write,
 * so it is never held open (a remount read-only works). A write that fails (a full or read-only
 * disk) is cut back to where it began, so no torn row stays, and its rows wait, up to
 * `CSV_MAX_PENDING` bytes (the oldest rows beyond are dropped, and counted), for the next try a
 * second later: writing resumes by itself once the disk has room. One warning when it starts
 * failing, one line when it writes again.
 */
export class CsvFile {
  private pending = "";
  private writing: Promise<void> | undefined;
  private failing = false;
  private dropped = 0;
  private retry: NodeJS.Timeout | undefined;

  constructor(
    readonly path: string,
    private readonly log: (line: string) => void,
  ) {}

  /** Queues `text` (whole rows) to be appended. */
  write(text: string): void {
    this.pending += text;
    if (this.pending.length > CSV_MAX_PENDING) {
      const cut = this.pending.indexOf("\n", this.pending.length - CSV_MAX_PENDING) + 1;
      this.dropped += this.pending.slice(0, cut).split("\n").length - 1;
      this.pending = this.pending.slice(cut);
    }
    this.kick();
  }

  /** Writes what waits, once more if the disk refuses; resolves when done. */
  async close(): Promise<void> {
    clearTimeout(this.retry);
    await this.writing;
    this.kick(true);
    await this.writing;
  }

  /** Starts a write of what waits, unless one is under way; while failing, only the retry (`again`) does. */
  private kick(again = false): void {
    if (this.writing || !this.pending || (this.failing && !again)) return;
    const chunk = this.pending;
    this.pending = "";
    this.writing = appendWhole(this.path, chunk).then(
      () => {
        if (this.failing) this.log(`${this.path} is written again${this.dropped ? ` (${this.dropped} row(s) dropped while it could not be)` : ""}`);
        this.failing = false;
        this.dropped = 0;
      },
      (e: Error) => {
        this.pending = chunk + this.pending;
        if (!this.failing) this.log(`warning: cannot write ${this.path}: ${e.message}; its rows wait in memory and are tried again every second`);
        this.failing = true;
        this.retry = setTimeout(() => this.kick(true), 1000);
        this.retry.unref();
      },
    );
    void this.writing.finally(() => {
      this.writing = undefined;
      this.kick();
    });
  }
}

/** Most bytes of rows a failing `--csv` file holds in memory (about 8,000 rows). */
const CSV_MAX_PENDING = 1 << 20;

/** Appends `text` to `path` (created with the CSV header when missing); on failure the file is cut back to its size before. */
async function appendWhole(path: string, text: string): Promise<void> {
  const fh = await open(path, "a");
  let size = 0;
  try {
    size = (await fh.stat()).size;
    await fh.writeFile(size === 0 ? `${CSV_HEADER}\n${text}` : text);
  } catch (e) {
    await fh.truncate(size).catch(() => {});
    throw e;
  } finally {
    await fh.close().catch(() => {});
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
  /** The clock bans are timed by: the hub's (default: the local clock). */
  now?: () => number;
}

/** How long a failed kernel command waits before the kernel is reconciled again, ms. */
const RETRY_MS = 5000;
/** Refused entries of one batch logged one line each; the rest are counted in one more line (each has its REJECT row). */
const MAX_REFUSED_LINES = 20;

/**
 * Owns the fleet's claims as this agent knows them and what it applied to the kernel. Events
 * mark addresses dirty; one kernel command runs at a time, and changes that arrive meanwhile
 * wait and go in the next batch. After a sync the kernel is reconciled to the claims in one
 * command. A sweep each second ends what expired and renews kernel timeouts that were capped
 * (a ban longer than the backend's `maxTimeoutS` is re-added once half of its capped timeout
 * has passed). An entry the kernel refuses is a REJECT row and one log line, and is not tried
 * again until its claim changes (or the next sync's reconcile).
 */
export class Applier {
  readonly claims: Claims = new Map();
  /** What the kernel holds, as far as the agent applied it: address -> until. */
  private applied = new Map<string, number | null>();
  private readonly dirty = new Set<string>();
  /** Events relayed live (not in a sync), by address, until the batch that applies them. */
  private readonly arrived = new Map<string, FleetEvent>();
  /** Entries the kernel refused, with the end they had then: not tried again while it stays the same. */
  readonly refused = new Map<string, { until: number | null; message: string }>();
  /** Claimed networks: an event on one of them, or on an address inside one, needs the overlap rule (`resolveOverlaps`). */
  private readonly nets = new Map<string, Address>();
  /** Entries whose kernel timeout was capped: when to re-add them (ms). */
  private readonly renewAt = new Map<string, number>();
  private nextRenewal = Infinity;
  /** Entries due for renewal, in the next batch. */
  private readonly renew = new Set<string>();
  private pendingReconcile = false;
  /** The kernel command under way. */
  private working: Promise<unknown> | undefined;
  private readonly sweeper: NodeJS.Timeout;
  private retryTimer: NodeJS.Timeout | undefined;

  /** The hub's clock: every `until` is on it, so every expiry and kernel timeout is counted by it (the Guard's count too). */
  readonly now: () => number;

  constructor(private readonly opts: ApplierOptions) {
    this.now = opts.now ?? (() => Date.now());
    // The kernel drops expired entries by itself; the sweep keeps memory and the log in step
    // (and does the expiring for the iptables backend, whose rules have no timeout).
    this.sweeper = setInterval(() => this.sweep(this.now()), 1000);
    this.sweeper.unref();
  }

  /**
   * Takes the claims of a saved state and puts what they block into the kernel in one batch,
   * adding what it lacks and removing nothing (after a reboot it holds none of it; after a
   * restart, maybe bans newer than the file). Expired claims are not restored. No CSV rows: the
   * fleet's view did not change, and the next reconcile logs only real changes. Resolves with
   * the number of addresses restored; a kernel that refuses them is logged, and the next
   * enforcement check or sync tries again.
   */
  async restore(events: FleetEvent[], now: number): Promise<number> {
    for (const e of events) this.merge(e);
    this.applied = this.kernelState(now);
    // When the kernel last got a capped timeout is not known: renew those at the first sweep.
    for (const [ip, until] of this.applied) {
      this.scheduleRenewal(ip, until, now);
      if (this.renewAt.has(ip)) this.renewAt.set(ip, (this.nextRenewal = now));
    }
    return this.exclusive(() => this.opts.backend.fill(new Map(this.applied), now)).then(
      (refused) => {
        this.refuse(refused);
        return this.applied.size - refused.length;
      },
      (e: Error) => {
        this.opts.log(`error: cannot restore the state file's bans into the kernel: ${e.message}`);
        return 0;
      },
    );
  }

  /**
   * Puts what the agent applied back into the kernel in one batch (the backend's reconcile), after
   * something else removed it: no CSV rows, nothing changed in the fleet's view. Resolves with
   * the number of addresses the kernel holds again.
   */
  async refill(): Promise<number> {
    const held = new Map(this.applied);
    const refused = await this.exclusive(() => this.opts.backend.reconcile(held, this.now()));
    this.refuse(refused);
    return held.size - refused.length;
  }

  /** What the agent applied to the kernel: address -> until. */
  held(): ReadonlyMap<string, number | null> {
    return this.applied;
  }

  /** Counts the kernel commands begun and ended: unchanged across a look at the kernel, nothing changed it meanwhile. */
  get epoch(): number {
    return this.epochs;
  }

  /** A kernel command is under way, or changes wait for one. */
  get busy(): boolean {
    return Boolean(this.working || this.dirty.size || this.pendingReconcile);
  }

  private epochs = 0;

  /** Runs `command` when no other kernel command runs, as the only one; then the work that waited. */
  private async exclusive<T>(command: () => Promise<T>): Promise<T> {
    while (this.working) await this.working.catch(() => {});
    this.epochs++;
    const working = command();
    this.working = working;
    try {
      return await working;
    } finally {
      this.working = undefined;
      this.epochs++;
      this.kick();
    }
  }

  /** Merges events (a REJECT row for an allowlisted ban) and applies what changed; `live`: remember them for `onApplied`. */
  take(events: FleetEvent[], live = false): void {
    for (const e of events) {
      const why = this.opts.allow.reason(e.ip);
      if (why && e.kind === "ban") this.opts.record({ action: "REJECT", ip: e.ip, origin: e.origin, jail: e.jail, until: e.until, detail: why });
      if (this.merge(e)) this.dirty.add(e.ip);
      if (live && (this.arrived.size < MAX_APPLIED_QUEUE * 10 || this.arrived.has(e.ip))) this.arrived.set(e.ip, e);
    }
    this.kick();
  }

  /** The answer to a hello: the full state (`full`) or the events missed; the kernel is then reconciled. */
  sync(events: FleetEvent[], full: boolean): void {
    if (full) {
      this.claims.clear();
      this.nets.clear();
    }
    this.pendingReconcile = true;
    this.take(events);
  }

  /** `net` joined the allowlist: what the kernel holds inside it comes out in the next batch. */
  allowed(net: Address): void {
    for (const ip of this.applied.keys()) {
      const a = parseAddress(ip);
      if (a && overlaps(a, net)) this.dirty.add(ip);
    }
    this.kick();
  }

  /** Forgets the live events not yet applied (their connection closed: nobody to report to). */
  forgetLive(): void {
    this.arrived.clear();
  }

  /** What the kernel should hold now: the claims' blocks, the overlap rule applied (refused entries included). */
  kernelState(now: number): Map<string, number | null> {
    return resolveOverlaps(desiredState(this.claims, this.opts.allow, now));
  }

  /** Marks what ended by `now` (claims and applied entries), and the capped timeouts due for renewal, and applies it. */
  sweep(now: number): void {
    for (const ip of pruneClaims(this.claims, now)) this.dirty.add(ip);
    for (const [ip, until] of this.applied) if (until !== null && until <= now) this.dirty.add(ip);
    if (now >= this.nextRenewal) {
      this.nextRenewal = Infinity;
      for (const [ip, at] of this.renewAt) {
        if (at <= now) {
          this.renew.add(ip);
          this.dirty.add(ip);
        } else if (at < this.nextRenewal) this.nextRenewal = at;
      }
    }
    if (this.dirty.size) this.kick();
  }

  /** Stops the sweep, waits for the kernel command under way (and those it queued), then closes the backend. */
  async close(): Promise<void> {
    clearInterval(this.sweeper);
    clearTimeout(this.retryTimer);
    while (this.working) await this.working.catch(() => {});
    this.opts.backend.close();
  }

  private merge(e: FleetEvent): boolean {
    if (e.ip.includes("/") && !this.nets.has(e.ip)) {
      const a = parseAddress(e.ip);
      if (a) this.nets.set(e.ip, a);
    }
    return mergeClaim(this.claims, e);
  }

  private kick(): void {
    if (!this.working) void this.work().catch((e: Error) => this.opts.log(`error: ${e.stack}`));
  }

  private async work(): Promise<void> {
    while ((this.dirty.size || this.pendingReconcile) && !this.working) {
      const now = this.now();
      this.epochs++;
      if (this.pendingReconcile) await this.reconcile(now);
      else await this.applyDirty(now);
      this.epochs++;
    }
  }

  /** Reconciles the kernel again in RETRY_MS (a command that failed as a whole). */
  private retryLater(): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.pendingReconcile = true;
      this.kick();
    }, RETRY_MS);
    this.retryTimer.unref();
  }

  private async reconcile(now: number): Promise<void> {
    const { backend, log } = this.opts;
    this.pendingReconcile = false;
    this.dirty.clear();
    this.renew.clear();
    this.arrived.clear();
    // Entries refused before are tried again, once per sync: never a hot loop.
    const desired = this.kernelState(now);
    const working = backend.reconcile(desired, now);
    this.working = working;
    try {
      const refused = await working;
      this.refuse(refused);
      for (const r of refused) desired.delete(r.change.ip);
      for (const ip of this.refused.keys()) if (!refused.some((r) => r.change.ip === ip)) this.refused.delete(ip);
      for (const c of changesFor(desired, this.applied)) this.logApplied(c.ip, this.applied.get(c.ip), c.until, now, "sync");
      this.applied = desired;
      this.renewAt.clear();
      this.nextRenewal = Infinity;
      for (const [ip, until] of desired) this.scheduleRenewal(ip, until, now);
      log(`synced: ${desired.size} address(es) blocked (${this.opts.backendName})${refused.length ? `, ${refused.length} refused by the kernel` : ""}`);
    } catch (e) {
      log(`error: reconcile failed, retrying in ${RETRY_MS / 1000} s: ${(e as Error).message}`);
      this.retryLater();
    } finally {
      this.working = undefined;
    }
  }

  /** The changes for the dirty addresses, and the renewals due; refused entries left out while their claim is unchanged. */
  private plan(now: number): { changes: Change[]; renewals: number } {
    const { allow } = this.opts;
    let changes: Change[];
    let desired: Map<string, number | null>;
    if (this.touchesNet()) {
      // A network or an address inside one: the overlap rule decides over the whole state.
      desired = this.kernelState(now);
      this.dropRefused(desired, this.refused.keys());
      changes = changesFor(desired, this.applied);
    } else {
      desired = desiredState(this.claims, allow, now, this.dirty);
      this.dropRefused(desired, this.dirty);
      changes = changesFor(desired, this.applied, this.dirty);
    }
    let renewals = 0;
    for (const ip of this.renew) {
      const until = desired.get(ip);
      if (until !== undefined && until === this.applied.get(ip)) {
        changes.push({ ip, until });
        renewals++;
      }
    }
    this.renew.clear();
    // Unblocks first: a network's entries inside it leave the set before it comes (or the other way round).
    const unblocks = changes.filter((c) => c.until === undefined);
    return { changes: unblocks.length && unblocks.length < changes.length ? unblocks.concat(changes.filter((c) => c.until !== undefined)) : changes, renewals };
  }

  /** Leaves out of `desired` the entries of `ips` the kernel refused with the same end; forgets refusals whose claim changed. */
  private dropRefused(desired: Map<string, number | null>, ips: Iterable<string>): void {
    if (!this.refused.size) return;
    for (const ip of [...ips]) {
      const r = this.refused.get(ip);
      if (!r) continue;
      if (desired.has(ip) && desired.get(ip) === r.until) desired.delete(ip);
      else this.refused.delete(ip);
    }
  }

  /** True when a dirty address is a claimed network or lies inside one. */
  private touchesNet(): boolean {
    if (!this.nets.size) return false;
    for (const [n] of this.nets) if (!this.claims.has(n)) this.nets.delete(n);
    for (const ip of this.dirty) {
      if (ip.includes("/")) return true;
      const a = parseAddress(ip);
      if (a) for (const n of this.nets.values()) if (contains(n, a)) return true;
    }
    return false;
  }

  /** Remembers refused changes: a REJECT row and a log line for each one not refused before with the same end. */
  private refuse(refused: Refusal[]): void {
    let lines = 0;
    for (const { change, message } of refused) {
      const before = this.refused.get(change.ip);
      if (change.until !== undefined) this.refused.set(change.ip, { until: change.until, message });
      if (before && before.until === change.until) continue;
      const c = this.cause(change.ip);
      this.opts.record({ action: "REJECT", ip: change.ip, origin: c?.origin, jail: c?.jail, until: change.until, detail: `kernel refused: ${message}` });
      if (++lines <= MAX_REFUSED_LINES) this.opts.log(`error: the kernel refused ${change.until === undefined ? "to unblock" : "to block"} ${change.ip}: ${message}`);
    }
    if (lines > MAX_REFUSED_LINES) this.opts.log(`error: the kernel refused ${lines - MAX_REFUSED_LINES} more entries (REJECT rows in the CSV)`);
  }

  /** Notes when a capped kernel timeout must be renewed: half-way through it. */
  private scheduleRenewal(ip: string, until: number | null | undefined, now: number): void {
    const max = this.opts.backend.maxTimeoutS;
    if (max === undefined || until === undefined || until === null || until - now <= max * 1000) {
      this.renewAt.delete(ip);
      return;
    }
    const at = now + (max * 1000) / 2;
    this.renewAt.set(ip, at);
    if (at < this.nextRenewal) this.nextRenewal = at;
  }

  private async applyDirty(now: number): Promise<void> {
    const { backend, log } = this.opts;
    const { changes, renewals } = this.plan(now);
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
    const working = backend.apply(changes, now);
    this.working = working;
    let refused: Refusal[];
    try {
      refused = await working;
    } catch (e) {
      // Nothing landed and no entry is to blame (the firewall's objects are missing): the whole
      // state goes again in a reconcile shortly, not one change at a time in a hot loop.
      log(`error: applying ${changes.length} change(s) failed, reconciling in ${RETRY_MS / 1000} s: ${(e as Error).message}`);
      this.retryLater();
      return;
    } finally {
      this.working = undefined;
    }
    this.refuse(refused);
    const failed = new Set(refused.map((r) => r.change));
    const done = failed.size ? changes.filter((c) => !failed.has(c)) : changes;
    const at = this.now();
    for (const c of done) {
      this.logApplied(c.ip, this.applied.get(c.ip), c.until, at, "event");
      if (c.until === undefined) this.applied.delete(c.ip);
      else this.applied.set(c.ip, c.until);
      this.scheduleRenewal(c.ip, c.until, now);
    }
    for (const r of refused) if (r.change.until === undefined) this.applied.delete(r.change.ip);
    if (live.size) this.opts.onApplied?.(done, live);
    const shown = done.length - (renewals && !failed.size ? renewals : 0);
    if (renewals) log(`renewed the capped kernel timeout of ${renewals} address(es)`);
    if (shown <= 20) {
      for (const c of done.slice(0, shown)) log(`${c.until === undefined ? "unblocked" : "blocked"} ${c.ip}${c.until === undefined ? "" : ` until ${c.until === null ? "never" : new Date(c.until).toISOString()}`}`);
    } else log(`applied ${shown} change(s)`);
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
      // Left out of the set because a blocked network covers it: still blocked, no UNBLOCK.
      if (!this.opts.allow.reason(ip) && blockedUntil(this.claims.get(ip), now) !== undefined) return;
      const last = [...(this.claims.get(ip)?.values() ?? [])].sort((a, b) => b.detectedAt - a.detectedAt)[0];
      const expired = before !== null && before <= now;
      record({ action: "UNBLOCK", ip, origin: last?.origin, jail: last?.jail, detail: expired ? "ban ended" : `${via}: unbanned by ${last?.origin ?? "the fleet"}` });
      return;
    }
    const c = this.cause(ip);
    // A response time only for a live event: an entry a sync brings (a restart, a reconnect) was
    // detected while this agent was away, and its age is no measure of how fast the fleet blocks.
    const live = via === "event";
    if (before === undefined) record({ action: "BLOCK", ip, origin: c?.origin, jail: c?.jail, until: after, rtMs: live && c ? now - c.detectedAt : undefined, detail: live ? `${via}: banned by ${c?.origin ?? "?"}` : `${via}: banned by ${c?.origin ?? "?"} (already banned when this agent synced; no response time)` });
    // A timed block that becomes permanent cancels its scheduled unblock: say so (until "never").
    if (after !== before && (after !== null || before !== undefined)) record({ action: "SCHEDULE_UNBLOCK", ip, origin: c?.origin, jail: c?.jail, until: after, detail: after === null ? "none: blocked for good" : `in ${Math.round((after - now) / 1000)} s` });
  }
}

// ---------------------------------------------------------------------------------------------
// The guard: the kernel keeps enforcing what the agent applied, whatever else rewrites the firewall

/** How the agent enforces, as `Agent.enforcement()` reports it: a snapshot, nothing live. */
export interface Enforcement {
  backend: string;
  /** Each hook the agent should be in: present, missing, or absent (Docker's chain is not there), and since when (ms). */
  hooks: Array<{ hook: string; state: "present" | "missing" | "absent"; since: number }>;
  /** What the last check found missing or wrong; empty while enforcing. */
  missing: string[];
  /** Since when something is missing (ms). */
  missingSince?: number;
  /** Entries in the kernel's sets (or the iptables backend's rules) at the last count; undefined where not counted (nftables). */
  entries?: number;
  /** Addresses the agent applied to the kernel. */
  expected: number;
  /** Entries the kernel lacks or has too many at the last count that compared (beyond entries ending within a few seconds); 0: none. */
  drift?: number;
  /** Repairs since start, and the last one. */
  repairs: number;
  lastRepair?: { at: number; what: string };
  /** When the kernel was last looked at (ms). */
  lastCheck?: number;
}

/**
 * Why the kernel's entry counts do not match what the agent applied, or undefined when they do.
 * Where the kernel ends entries itself (`expires`), an entry ending within `marginMs` of `now`
 * may be there or not.
 */
export function countDrift(entries: Record<4 | 6, number>, held: ReadonlyMap<string, number | null>, now: number, expires: boolean, marginMs = 3000): string | undefined {
  const sure = { 4: 0, 6: 0 };
  const maybe = { 4: 0, 6: 0 };
  for (const [ip, until] of held) {
    const fam = family(ip);
    if (!expires || until === null || until > now + marginMs) sure[fam]++;
    else if (until > now - marginMs) maybe[fam]++;
  }
  const out: string[] = [];
  for (const fam of [4, 6] as const) {
    if (entries[fam] < sure[fam] || entries[fam] > sure[fam] + maybe[fam]) out.push(`IPv${fam}: ${entries[fam]} of ${sure[fam]}${maybe[fam] ? `-${sure[fam] + maybe[fam]}` : ""} entries in the kernel`);
  }
  return out.length ? out.join(", ") : undefined;
}

/**
 * A long-lived `nft monitor`: every change to the ruleset (iptables-nft's rules included) is an
 * event naming the process that made it. Tells `onChange` about each change another process
 * made, with its event lines. Restarts when it ends; without nft, does nothing.
 */
export class NftMonitor {
  private child: ChildProcess | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private attempt = 0;

  constructor(
    private readonly onChange: (by: string, lines: string[]) => void,
    private readonly log: (line: string) => void,
  ) {}

  start(): void {
    if (this.closed) return;
    const child = spawn("stdbuf", ["-oL", "nft", "monitor"], { stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    let buf = "";
    let lines: string[] = [];
    let err = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => {
      this.attempt = 0;
      buf += d;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const gen = /^# new generation \d+ by process (\d+) \((.*)\)/.exec(line);
        if (!gen) {
          if (lines.length < 1000) lines.push(line);
          continue;
        }
        const mine = isOwnProcess(Number(gen[1]));
        const batch = lines;
        lines = [];
        if (!mine) this.onChange(`${gen[2]} (pid ${gen[1]})`, batch);
      }
    });
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (err = (err + d).slice(-500)));
    child.on("error", () => {}); // reported by "close"
    child.on("close", (code, sig) => {
      if (this.closed || child !== this.child) return;
      this.child = undefined;
      const delay = Math.min(30_000, 1000 * 2 ** Math.min(this.attempt++, 5));
      this.log(`warning: nft monitor ended (${sig ?? `exit ${code}`}${err.trim() ? `: ${err.trim().split("\n")[0]}` : ""}); changes by other programs are seen by the periodic check only, until it restarts in ${delay} ms`);
      this.timer = setTimeout(() => this.start(), delay);
      this.timer.unref();
    });
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.child?.kill("SIGKILL");
  }
}

/** What a `Guard` is given. */
export interface GuardOptions {
  backend: Backend;
  backendName: BackendName;
  applier: Applier;
  prefix: string;
  record: (r: Row) => void;
  log: (line: string) => void;
  /** A full check this often (ms): the safety net for changes no event tells of. */
  checkMs: number;
  /** The quick check (the set headers, through a long-lived `ipset restore`) this often (ms; default `QUICK_CHECK_MS`). */
  quickMs?: number;
  /** Watch `nft monitor` for changes by other programs (default true). */
  monitor?: boolean;
}

/**
 * Checks, continually and cheaply, that the kernel holds the agent's table, chains, sets and
 * jumps and that the sets hold what it applied, and restores whatever is missing without a
 * restart: the hooks (the backend's setup, idempotent) and the full set contents in one batch.
 * When to look: on each change another program makes to the ruleset (`NftMonitor`), at every
 * quick tick (every half second; ipset: the set headers through a long-lived `ipset restore`, since
 * `ipset flush` and `ipset destroy` make no nftables event), and at every full tick (10 s). Each repair is
 * one log line, one REPAIR row and one more in `repairs`. A repair that does not hold (something
 * undoes it at once) is retried ever more slowly, up to every 30 s.
 */
export class Guard {
  private running: Promise<void> | undefined;
  private again: boolean | undefined;
  private soon: NodeJS.Timeout | undefined;
  private timers: NodeJS.Timeout[] = [];
  private monitor: NftMonitor | undefined;
  private closed = false;
  /** Repairs since the last check that found everything in place. */
  private streak = 0;
  /** Entries another program deleted from an nftables set (seen only as events). */
  private lost: string | undefined;
  /**
   * The kernel's counts at the last look, and when they were last compared with everything the
   * agent applied (a pass over 100,000 entries costs ~10 ms, too much for every second):
   * they are compared when a count falls to 0 or by more than 1% between two looks (a flush, a
   * reload), when the last comparison was put off, and every 30 s.
   */
  private counted: { last?: Record<4 | 6, number>; comparedAt: number; due: boolean } = { comparedAt: 0, due: true };
  private readonly hooks = new Map<string, { state: "present" | "missing" | "absent"; since: number }>();
  private missing: string[] = [];
  private missingSince: number | undefined;
  private drift = 0;
  private entries: number | undefined;
  private repairs = 0;
  private lastRepair: { at: number; what: string } | undefined;
  private lastCheck: number | undefined;
  /** Ends the wait before a repeated repair (close). */
  private wake: (() => void) | undefined;

  constructor(private readonly opts: GuardOptions) {}

  /** Starts watching; a backend without a check (dry-run), or a `checkMs` of 0, leaves it idle. */
  start(): void {
    const { opts } = this;
    if (!opts.backend.inspect || opts.checkMs <= 0) return;
    this.timers.push(setInterval(() => this.run(true), opts.checkMs));
    if (BACKENDS[opts.backendName].quick) this.timers.push(setInterval(() => this.run(false), opts.quickMs ?? QUICK_CHECK_MS));
    for (const t of this.timers) t.unref();
    if (opts.monitor !== false) {
      this.monitor = new NftMonitor((by, lines) => this.changed(by, lines), opts.log);
      this.monitor.start();
    }
    this.run(true);
  }

  /** Looks now (a full check), or once the check under way is done. */
  check(): Promise<void> {
    this.run(true);
    return this.idle();
  }

  /** Resolves once no check or repair is under way. */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  /** How the agent enforces now. */
  snapshot(): Enforcement {
    return {
      backend: this.opts.backendName,
      hooks: [...this.hooks].map(([hook, h]) => ({ hook, ...h })),
      missing: [...this.missing],
      missingSince: this.missingSince,
      entries: this.entries,
      expected: this.opts.applier.held().size,
      drift: this.drift,
      repairs: this.repairs,
      lastRepair: this.lastRepair && { ...this.lastRepair },
      lastCheck: this.lastCheck,
    };
  }

  close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers) clearInterval(t);
    clearTimeout(this.soon);
    this.monitor?.close();
    this.wake?.();
    return this.idle();
  }

  /** Another program changed the ruleset: look shortly (a reload is many changes in a row). */
  private changed(by: string, lines: string[]): void {
    const set = new RegExp(`^(delete element|flush set) inet ${this.opts.prefix} `);
    if (this.opts.backendName === "nftables" && lines.some((l) => set.test(l))) this.lost = `entries deleted from the sets by ${by}`;
    if (this.soon) return;
    this.soon = setTimeout(() => {
      this.soon = undefined;
      this.run(true);
    }, 30);
  }

  private run(full: boolean): void {
    if (this.closed) return;
    if (this.running) {
      this.again = this.again || full;
      return;
    }
    this.running = this.look(full)
      .catch((e: Error) => this.opts.log(`error: enforcement check: ${e.message}`))
      .finally(() => {
        this.running = undefined;
        const again = this.again;
        this.again = undefined;
        if (again !== undefined) this.run(again);
      });
  }

  private async look(full: boolean): Promise<void> {
    const { applier, backend } = this.opts;
    const before = { idle: !applier.busy, epoch: applier.epoch };
    const found = await backend.inspect!(!full);
    if (!found || this.closed) return;
    const now = Date.now();
    this.lastCheck = now;
    for (const [hook, state] of found.hooks) if (this.hooks.get(hook)?.state !== state) this.hooks.set(hook, { state, since: now });
    const problems = [...found.missing];
    if (this.lost) problems.push(this.lost);
    this.lost = undefined;
    if (found.entries) {
      const { last } = this.counted;
      this.entries = found.entries[4] + found.entries[6];
      this.counted.last = found.entries;
      const fell = (f: 4 | 6) => last !== undefined && found.entries![f] < last[f] && (found.entries![f] === 0 || last[f] - found.entries![f] > last[f] / 100);
      if (fell(4) || fell(6) || now - this.counted.comparedAt >= 30_000) this.counted.due = true;
      // Counts compare only while no kernel command ran: a batch under way is no drift.
      const settled = before.idle && !applier.busy && applier.epoch === before.epoch;
      if (this.counted.due && settled) {
        this.counted = { last: found.entries, comparedAt: now, due: false };
        // What should have expired by now is counted by the hub's clock, as the kernel timeouts were set.
        const drift = countDrift(found.entries, applier.held(), applier.now(), BACKENDS[this.opts.backendName].expires === true);
        this.drift = drift ? Math.max(1, Math.abs(this.entries - applier.held().size)) : 0;
        if (drift) problems.push(drift);
      }
    }
    if (!problems.length) {
      if (full || !this.missing.length) {
        this.streak = 0;
        this.missing = [];
        this.missingSince = undefined;
        this.drift = 0;
      }
      return;
    }
    this.missing = problems;
    this.missingSince ??= now;
    await this.repair(problems.join("; "));
  }

  private async repair(what: string): Promise<void> {
    const { backend, applier, log, record } = this.opts;
    const wait = this.streak < 2 ? 0 : Math.min(30_000, 250 * 2 ** (this.streak - 2));
    if (wait) await new Promise<void>((resolve) => (this.wake = resolve) && setTimeout(resolve, wait).unref());
    if (this.closed) return;
    this.streak++;
    const t0 = Date.now();
    try {
      await backend.setup();
      const n = await applier.refill();
      this.repairs++;
      this.lastRepair = { at: Date.now(), what };
      log(`repaired: ${what}; restored the hooks and ${n} entr${n === 1 ? "y" : "ies"} in one batch in ${Date.now() - t0} ms`);
      record({ action: "REPAIR", detail: `${what}; restored hooks and ${n} entries` });
    } catch (e) {
      log(`error: repair of "${what}" failed: ${(e as Error).message}`);
    }
    // Look again at once: the repair held, or something undid it.
    this.again = true;
    this.counted.due = true;
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

  /** Why the directory or a file was last refused (logged once while it stays so). */
  private readonly refusedWhy = new Map<string, string>();

  /**
   * Sends each spooled event not sent yet on this connection; moves unreadable files aside.
   * Every file is forwarded as this node's own event, so only from a directory of the agent's
   * user that no group or other user can write to (`spoolDirProblem`), and only regular files
   * of that user: anything else is one log line and stays where it is.
   */
  async forward(): Promise<void> {
    const uid = process.getuid?.();
    const info = await lstat(this.dir).catch(() => undefined);
    if (!info) return;
    const unsafe = spoolDirProblem(this.dir, info, uid);
    if (this.refuse(this.dir, unsafe && `error: not forwarding the spool: ${unsafe}`)) return;
    const files = (await readdir(this.dir).catch(() => [] as string[])).filter((f) => f.endsWith(".json")).sort();
    for (const f of files) {
      const path = join(this.dir, f);
      if ([...this.sent.values()].includes(path)) continue;
      const file = await lstat(path).catch(() => undefined);
      if (!file) continue;
      const foreign = !file.isFile() ? "is not a regular file" : uid !== undefined && file.uid !== uid ? `belongs to uid ${file.uid}, not to the agent's (uid ${uid})` : undefined;
      if (this.refuse(path, foreign && `warning: skipping spool file ${f}: it ${foreign}`)) continue;
      // Unreadable now (gone, no permission): next round. Empty (damaged: ban.ts renames only whole files): moved aside below.
      const text = await readFile(path, "utf8").catch(() => undefined);
      if (text === undefined) continue;
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

  /** The event `id`, in `path`, went on this connection by other means (the hand-off): not sent again from here, and its answer is the file's. */
  track(id: string, path: string): void {
    this.sent.set(id, path);
    this.handed.add(id);
  }

  /** Tracked events (handed in by ban.ts, sent at once): their file's removal is no delivery from the spool, and not logged as one. */
  private readonly handed = new Set<string>();

  /** The hub has the event `id` in its journal: its file goes. */
  acked(id: string): void {
    const path = this.sent.get(id);
    if (!path) return;
    this.sent.delete(id);
    const handed = this.handed.delete(id);
    void unlink(path).then(() => handed || this.log(`delivered spooled event ${id}`)).catch(() => {});
  }

  /** The hub refused the event `id`: over the rate limit or a hub-side write error it stays for the next round, otherwise it is moved aside. */
  refused(id: string, code: ErrorFrame["code"]): void {
    const path = this.sent.get(id);
    if (!path) return;
    this.sent.delete(id);
    this.handed.delete(id);
    if (code !== "rate_limited" && code !== "internal") void this.reject(path).catch(() => {});
  }

  /** Logs `why` for `what` once (until it changes or clears); true when there is one. */
  private refuse(what: string, why: string | undefined): boolean {
    if (!why) {
      this.refusedWhy.delete(what);
      return false;
    }
    if (this.refusedWhy.get(what) !== why) {
      if (this.refusedWhy.size >= 1000) this.refusedWhy.clear();
      this.refusedWhy.set(what, why);
      this.log(why);
    }
    return true;
  }

  private async reject(path: string): Promise<void> {
    await mkdir(join(this.dir, "rejected"), { recursive: true, mode: 0o700 });
    await rename(path, join(this.dir, "rejected", path.split("/").pop()!)).catch(() => {});
  }
}

/** Writes the frame into the spool directory atomically: temp file, fsync, rename, fsync the folder. */
export async function spool(dir: string, frame: BanFrame | UnbanFrame): Promise<string> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  // The agent forwards only from a directory no one else can write to: an event spooled anywhere
  // else would never be delivered, so it is an error here, not a warning later.
  const unsafe = spoolDirProblem(dir, await lstat(dir), process.getuid?.());
  if (unsafe) throw new Error(unsafe);
  const name = `${frame.detectedAt}-${frame.id}.json`;
  const tmp = join(dir, `.${name}.tmp`);
  // "wx": never through a file or link someone else put there.
  const fh = await open(tmp, "wx", 0o600);
  try {
    await fh.writeFile(JSON.stringify(frame) + "\n");
    await fh.sync();
  } catch (e) {
    // A full disk: no half-written temp file stays behind.
    await fh.close().catch(() => {});
    await unlink(tmp).catch(() => {});
    throw e;
  }
  await fh.close();
  await rename(tmp, join(dir, name));
  const d = await open(dir, "r");
  await d.sync().finally(() => d.close());
  return join(dir, name);
}

/** How the hub answered one event the agent published for ban.ts: `lost` when the connection went first. */
export type PublishResult = { status: "acked"; seq: string } | { status: "refused"; code: ErrorFrame["code"]; message: string } | { status: "lost" };

/** What the hand-off needs of the hub link. */
export interface Publisher {
  /** Sends the event on the live connection and resolves with the hub's answer; undefined when no connection is up. */
  publish(frame: BanFrame | UnbanFrame, file: string): Promise<PublishResult> | undefined;
  /** Why the link cannot deliver for now and needs a hand (TLS, token), or undefined. */
  readonly problem: string | undefined;
  /** How long to wait for the hub's answer once the spool holds an event: a few of its recent answer times, 10-100 ms; 0 with no connection. */
  ackWaitMs(): number;
}

/** Connections the hand-off socket serves at once. */
const HANDOFF_MAX_CONNS = 64;
/** A ban.ts that has not sent its line within this long is dropped. */
const HANDOFF_READ_MS = 2000;

/**
 * The agent's side of ban.ts's hand-off (`<spool>/agent.sock`): takes one ban or unban per
 * connection, sends it to the hub over the link's live connection and writes it to the spool at
 * the same time, and answers once either holds it: the hub's ack, or the spool file fsynced. So
 * Fail2Ban's action waits milliseconds, never on the network, and the event is never only in
 * memory. The file goes once the hub acked; a file left (hub away) is what the spool forwards.
 * The socket is 0600 in the spool directory the agent already requires to be its own and not
 * writable by others (`spoolDirProblem`), so only this user (root) hands events in.
 */
export class Handoff {
  private server: LocalServer | undefined;
  readonly path: string;

  constructor(
    readonly dir: string,
    private readonly link: Publisher,
    private readonly log: (line: string) => void,
    private readonly now: () => number = Date.now,
  ) {
    this.path = join(dir, HANDOFF_SOCKET);
  }

  /** Listens on the socket; a failure is one log line, and ban.ts falls back to the hub and the spool. */
  async start(): Promise<void> {
    try {
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      const unsafe = spoolDirProblem(this.dir, await lstat(this.dir), process.getuid?.());
      if (unsafe) throw new Error(unsafe);
      const old = await lstat(this.path).catch(() => undefined);
      // A socket left by an agent that ended without closing it; anything else is not ours to remove.
      if (old && !old.isSocket()) throw new Error(`${this.path} exists and is not a socket`);
      if (old) await unlink(this.path);
      const server = createLocalServer((conn) => this.serve(conn));
      server.maxConnections = HANDOFF_MAX_CONNS;
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(this.path, () => resolve());
      });
      server.on("error", (e) => this.log(`warning: hand-off socket ${this.path}: ${e.message}`));
      await chmod(this.path, 0o600);
      this.server = server;
      this.log(`taking events from ban.ts on ${this.path}`);
    } catch (e) {
      this.log(`warning: not taking events from ban.ts on ${this.path} (${(e as Error).message}); ban.ts sends to the hub itself, then spools`);
    }
  }

  async close(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = undefined;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await unlink(this.path).catch(() => {});
  }

  private serve(conn: Socket): void {
    let text = "";
    let taken = false;
    conn.setEncoding("utf8");
    conn.setTimeout(HANDOFF_READ_MS, () => conn.destroy());
    conn.on("error", () => {});
    const answer = (a: HandoffAnswer) => {
      if (!conn.destroyed) conn.end(JSON.stringify(a) + "\n");
    };
    conn.on("data", (d: string) => {
      if (taken) return;
      text += d;
      const nl = text.indexOf("\n");
      if (nl < 0 && text.length <= MAX_NODE_FRAME_BYTES) return;
      taken = true;
      conn.setTimeout(0);
      const parsed = parseNodeFrame(nl < 0 ? text : text.slice(0, nl), this.now());
      if (!parsed.ok) return answer({ type: "error", code: parsed.code, message: parsed.message, ...(parsed.id ? { id: parsed.id } : {}) });
      const f = parsed.value;
      if ((f.type !== "ban" && f.type !== "unban") || (f.type === "unban" && f.all)) return answer({ type: "error", code: "bad_frame", message: `Expected a ban or an unban of this node, got ${f.type === "unban" ? "an unban for every node" : `a ${f.type} frame`}` });
      void this.take(f).then(answer);
    });
  }

  /** Publishes and spools `frame` at once; resolves with the answer for ban.ts as soon as one holds it. */
  async take(frame: BanFrame | UnbanFrame): Promise<HandoffAnswer> {
    const file = join(this.dir, `${frame.detectedAt}-${frame.id}.json`);
    const sent = this.link.publish(frame, file);
    const written = spool(this.dir, frame).then(
      () => ({ status: "written" as const }),
      (e: Error) => ({ status: "unwritten" as const, message: e.message }),
    );
    const hub = sent ?? new Promise<PublishResult>(() => {});
    // The file goes once the hub has the event, or refused it for good; until then it is what the spool forwards.
    let refusedForGood = false;
    void Promise.all([sent ?? { status: "lost" as const }, written]).then(([h, w]) => {
      if (w.status === "written" && (h.status === "acked" || refusedForGood)) void unlink(file).catch(() => {});
    });
    let first: PublishResult | { status: "written" } | { status: "unwritten"; message: string } = await Promise.race([hub, written]);
    // On disk: the hub usually answers within milliseconds, and its refusal belongs in Fail2Ban's
    // log (exit 1). Wait that long for it, no longer: a hub that went silent costs the action
    // only a few of its recent round trips.
    if (first.status === "written" && sent) {
      const wait = this.link.ackWaitMs();
      let timer: NodeJS.Timeout | undefined;
      const h = await Promise.race([sent, new Promise<undefined>((r) => {
        timer = setTimeout(() => r(undefined), wait);
      })]);
      clearTimeout(timer);
      if (h && h.status !== "lost") first = h;
    }
    if (first.status === "acked") return { type: "queued", id: frame.id, via: "hub", seq: first.seq };
    if (first.status === "refused" && first.code !== "rate_limited" && first.code !== "internal") {
      // ban.ts says so in Fail2Ban's log; nothing is left to deliver.
      refusedForGood = true;
      return { type: "error", id: frame.id, code: first.code, message: first.message };
    }
    if (first.status === "written") return this.queued(frame.id);
    // Not on disk (a full or read-only disk): only the hub's ack can still hold it.
    const w = await written;
    if (w.status === "written") return this.queued(frame.id);
    const h = sent ? await sent : ({ status: "lost" } as const);
    if (h.status === "acked") return { type: "queued", id: frame.id, via: "hub", seq: h.seq };
    this.log(`error: could not keep the ${frame.type} of ${frame.ip} from ban.ts: ${w.status === "unwritten" ? w.message : "?"}`);
    return { type: "error", id: frame.id, code: "unavailable", message: `the agent could not spool it (${w.status === "unwritten" ? w.message : "?"}) and the hub has not acked it` };
  }

  private queued(id: string): HandoffAnswer {
    const problem = this.link.problem;
    return { type: "queued", id, via: "spool", ...(problem ? { problem } : {}) };
  }
}

// ---------------------------------------------------------------------------------------------
// Enforcement: what the agent reports to the hub, and serves on --metrics

/** How the agent enforces now (the Guard's `snapshot()`): what the reports and --metrics show. */
export type EnforcementState = Enforcement;

/** The `enforcement` frame of a snapshot, cut to what messages.ts accepts (pure). */
export function enforcementFrame(s: EnforcementState, clock?: HubClock): EnforcementFrame {
  const text = (t: string) => t.replace(/[^\x20-\x7e]/g, "?").slice(0, MAX_ENFORCEMENT_TEXT) || "?";
  // The hub checks the times against its clock: they go on it.
  const hub = (t: number) => (clock ? Math.round(clock.toHub(t)) : t);
  const frame: EnforcementFrame = {
    type: "enforcement",
    backend: s.backend,
    hooks: s.hooks.slice(0, MAX_ENFORCEMENT_HOOKS).map((h) => ({ name: h.hook.slice(0, 64), state: h.state, since: hub(h.since) })),
    claims: s.expected,
    drift: s.drift ?? 0,
    missing: s.missing.slice(0, MAX_ENFORCEMENT_HOOKS).map(text),
    repairs: s.repairs,
  };
  if (s.entries !== undefined) frame.entries = s.entries;
  if (s.missingSince !== undefined) frame.missingSince = hub(s.missingSince);
  if (s.lastRepair) frame.lastRepair = { at: hub(s.lastRepair.at), what: text(s.lastRepair.what) };
  return frame;
}

/** The agent's DROP rules' packet and byte counters (`iptables -L -v -x`, `nft -t list table`), read on request. */
async function dropCounters(backend: BackendName, prefix: string): Promise<{ packets: number; bytes: number } | undefined> {
  if (backend === "nftables") {
    // -t: the table without its sets' elements (cheap at any size), the rules' counters included.
    const r = await execa("nft", ["-t", "list", "table", "inet", prefix], { timeout: CMD_TIMEOUT_MS, reject: false });
    return r.exitCode === 0 ? sumCounters(r.stdout, /\bcounter packets (\d+) bytes (\d+) drop$/gm) : undefined;
  }
  if (backend !== "ipset" && backend !== "iptables") return undefined;
  let packets = 0;
  let bytes = 0;
  for (const bin of ["iptables", "ip6tables"]) {
    const r = await execa(bin, ["-w", "-L", prefix, "-v", "-x", "-n"], { timeout: CMD_TIMEOUT_MS, reject: false });
    if (r.exitCode !== 0) continue;
    const sum = sumCounters(r.stdout, /^\s*(\d+)\s+(\d+)\s+DROP\b/gm);
    packets += sum.packets;
    bytes += sum.bytes;
  }
  return { packets, bytes };
}

/** The packets and bytes of every counter `re` (groups 1, 2) finds in `text`. */
function sumCounters(text: string, re: RegExp): { packets: number; bytes: number } {
  let packets = 0;
  let bytes = 0;
  for (const m of text.matchAll(re)) {
    packets += Number(m[1]);
    bytes += Number(m[2]);
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
export interface HubLinkOptions extends Pick<AgentOptions, "hubs" | "node" | "spoolDir" | "heartbeatMs" | "ca" | "maxPrefix" | "log"> {
  token: string;
  /** Bounds of one sync (default: `MAX_SYNC_EVENTS`, `MAX_SYNC_BYTES`); smaller in tests. */
  syncLimits?: { events: number; bytes: number };
  applier: Applier;
  state: StateFile;
  csv: CsvLog;
  /** How the agent enforces now, for the hub's `enforcement` reports (`enforcementSnapshot` in startAgent). */
  enforcement?: () => EnforcementState;
  /** Told when a connection closed, before the reconnect's delay: the hubs' names are resolved again. */
  disconnected?: () => void;
  /** Set from the `now` of the hub's frames; the times reported to the hub are on it (default: the local clock). */
  clock?: HubClock;
}

/** What a `Session` is given by its `HubLink`. */
interface SessionHost {
  /** Where the agent is in the hub's stream; a session moves it on. */
  cursor: Cursor | undefined;
  readonly opts: HubLinkOptions;
  /** The hub welcomed this session: the reconnect backoff starts over, unless recent sessions broke off an oversized sync. */
  welcomed(): void;
  /** This session's sync completed: the backoff after an oversized sync is forgiven. */
  synced(): void;
}

/**
 * One connection to the hub, from open to close: the hello and heartbeat, the sync answering
 * the hello (maybe in chunks), live events, acks for the spool, and the response-time reports
 * for the hub. Made on each connection and thrown away when it closes.
 */
export class Session {
  /** The hub stopped answering (a missed pong, a handshake that timed out): the link passes it over for a while. */
  hung = false;
  private alive = true;
  private hubId = "";
  private awaitingSync = false;
  private syncBuffer: FleetEvent[] = [];
  /** Bytes of the sync frames received so far for `syncBuffer`. */
  private syncBytes = 0;
  /** Size of the frame being handled, bytes. */
  private frameBytes = 0;
  /** The hub's sync outgrew MAX_SYNC_EVENTS or MAX_SYNC_BYTES and this session dropped the connection. */
  overflowed = false;
  private hubTakesApplied = false;
  private hubTakesEnforcement = false;
  private reportTimer: NodeJS.Timeout | undefined;
  private lastReport = "";
  private appliedQueue: AppliedRecord[] = [];
  private appliedTimer: NodeJS.Timeout | undefined;
  private pingTimer: NodeJS.Timeout | undefined;
  private spool: Spool | undefined;
  /** Events handed in by ban.ts and sent on this connection, waiting for the hub's answer. */
  private readonly waiting = new Map<string, (r: PublishResult) => void>();
  /** Recent time from publishing an event to the hub's answer (ms, smoothed): what the hand-off waits for, a few times over. */
  private answerMs = 10;
  /** When the hello went, on the monotonic clock: the welcome's `now` is placed at the middle of the round trip. */
  private helloAt = 0;

  constructor(
    private readonly sock: WebSocket,
    readonly url: string,
    private readonly host: SessionHost,
  ) {}

  /**
   * Says hello from our cursor, and pings every half heartbeat: a ping unanswered (no pong, no
   * frame) by the next one drops the connection, so a silently dead path or a frozen hub is
   * noticed within one heartbeat of its last sign of life.
   */
  open(): void {
    const { opts } = this.host;
    this.helloAt = performance.now();
    this.send({ type: "hello", v: PROTOCOL_VERSION, node: opts.node, want: "events", cursor: this.host.cursor, sentAt: Date.now() });
    const every = Math.max(1, Math.round(opts.heartbeatMs / 2));
    this.pingTimer = setInterval(() => {
      if (!this.alive) {
        opts.log(`no answer from ${this.url} within ${every} ms of a ping; reconnecting`);
        this.hung = true;
        this.sock.terminate();
        return;
      }
      this.alive = false;
      this.sock.ping();
    }, every);
  }

  /** A pong or a frame: the path is alive. */
  heard(): void {
    this.alive = true;
  }

  receive(data: Buffer): void {
    this.alive = true;
    if (this.overflowed) return;
    this.frameBytes = data.length;
    const parsed = parseHubFrame(data.toString("utf8"));
    if (!parsed.ok) return this.host.opts.log(`warning: ignoring a frame from the hub: ${parsed.message}`);
    const f = parsed.value;
    const clock = this.host.opts.clock;
    if (clock && (f.type === "welcome" || f.type === "sync" || f.type === "event") && f.now !== undefined) {
      if (f.type === "welcome") clock.welcomed(f.now, this.helloAt);
      else clock.heard(f.now);
    }
    if (f.type === "welcome") this.onWelcome(f);
    else if (f.type === "sync") this.onSync(f);
    else if (f.type === "event") this.onEvents(this.admit([f]), f.seq);
    else if (f.type === "ack") this.onAck(f);
    else if (f.type === "error") this.onError(f);
  }

  /** Queues a response time for each applied change a live event caused; one frame goes out shortly. */
  reportApplied(changes: Change[], live: Map<string, FleetEvent>): void {
    const at = this.host.opts.clock?.now() ?? Date.now();
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

  /**
   * Sends an event handed in by ban.ts, once welcomed; resolves with the hub's answer, or `lost`
   * when the connection ends first. Its spool `file` is tracked so the spool does not send it again.
   */
  publish(frame: BanFrame | UnbanFrame, file: string): Promise<PublishResult> | undefined {
    if (!this.hubId || this.sock.readyState !== WebSocket.OPEN || this.waiting.has(frame.id)) return undefined;
    this.spool?.track(frame.id, file);
    this.send({ ...frame, sentAt: Date.now() });
    const t0 = performance.now();
    return new Promise((resolve) =>
      this.waiting.set(frame.id, (r) => {
        if (r.status !== "lost") this.answerMs = 0.7 * this.answerMs + 0.3 * (performance.now() - t0);
        resolve(r);
      }),
    );
  }

  /** How long the hand-off waits for the hub's answer once an event is on disk: 3 recent answer times, 10-100 ms. */
  ackWaitMs(): number {
    return Math.round(Math.min(100, Math.max(10, 3 * this.answerMs)));
  }

  /** Stops the session's timers; what it had not sent is dropped. */
  close(): void {
    for (const resolve of this.waiting.values()) resolve({ status: "lost" });
    this.waiting.clear();
    clearInterval(this.pingTimer);
    clearInterval(this.reportTimer);
    clearTimeout(this.appliedTimer);
    this.spool?.stop();
  }

  private send(frame: object): void {
    if (this.sock.readyState === WebSocket.OPEN) this.sock.send(JSON.stringify(frame));
  }

  private onWelcome(f: WelcomeFrame): void {
    this.host.welcomed();
    this.host.opts.csv.node = f.node;
    this.hubTakesApplied = Array.isArray(f.accepts) && f.accepts.includes("applied");
    this.hubTakesEnforcement = Array.isArray(f.accepts) && f.accepts.includes("enforcement");
    this.host.opts.log(`connected to ${this.url} as ${f.node} (${f.role}), hub ${f.hub} at seq ${f.seq}`);
    this.hubId = f.hub;
    this.awaitingSync = true;
    this.syncBuffer = [];
    this.syncBytes = 0;
    if (this.host.opts.spoolDir) {
      // Sent now, on this server's clock: the hub measures with it how long the event waited (its age), not when.
      this.spool = new Spool(this.host.opts.spoolDir, (frame) => this.send({ ...frame, sentAt: Date.now() }), this.host.opts.log);
      this.spool.start();
    }
  }

  private onSync(f: SyncFrame): void {
    const events = this.admit(f.events, f.dropped);
    // A sync not awaited is a burst the hub relayed in one frame.
    if (!this.awaitingSync) return this.onEvents(events, f.seq);
    // The answer to our hello: the full state, or the events after our cursor, maybe in chunks,
    // bounded: past the bound the connection goes, and the kernel keeps what it holds.
    this.syncBytes += this.frameBytes;
    const max = this.host.opts.syncLimits ?? { events: MAX_SYNC_EVENTS, bytes: MAX_SYNC_BYTES };
    if (this.syncBuffer.length + events.length > max.events || this.syncBytes > max.bytes) {
      this.host.opts.log(`error: the sync from ${this.url} exceeds ${max.events} events or ${max.bytes} bytes (${this.syncBuffer.length + events.length} events, ${this.syncBytes} bytes so far); dropping the connection and keeping what the kernel holds`);
      this.overflowed = true;
      this.awaitingSync = false;
      this.syncBuffer = [];
      this.sock.terminate();
      return;
    }
    // No spread push: a frame's events can outnumber the arguments a call may take.
    for (const e of events) this.syncBuffer.push(e);
    if (f.more) return;
    const all = this.syncBuffer;
    this.awaitingSync = false;
    this.syncBuffer = [];
    this.host.opts.log(f.full ? `full sync: ${all.length} event(s) at seq ${f.seq}` : `resumed after seq ${this.host.cursor?.seq}: ${all.length} event(s) missed, now at seq ${f.seq}`);
    this.host.opts.applier.sync(all, f.full);
    this.host.cursor = { hub: this.hubId, seq: f.seq };
    this.host.synced();
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
      const frame = JSON.stringify(enforcementFrame(snapshot(), this.host.opts.clock));
      if (frame === this.lastReport || this.sock.readyState !== WebSocket.OPEN || this.sock.bufferedAmount > 1 << 20) return;
      this.lastReport = frame;
      this.sock.send(frame);
    };
    report();
    this.reportTimer = setInterval(report, ENFORCEMENT_REPORT_MS);
    this.reportTimer.unref();
  }

  /**
   * The events of a frame the agent takes: the address of each must pass `checkBannable` with
   * the agent's prefix limits, as the hub checks what nodes send. A refused ban is a REJECT row;
   * refused events and the malformed ones `parseHubFrame` dropped are log lines (the first few
   * of a frame one each, the rest counted in one); the rest of the frame applies.
   */
  private admit(events: FleetEvent[], dropped?: SyncFrame["dropped"]): FleetEvent[] {
    const { log, csv } = this.host.opts;
    const limits = this.host.opts.maxPrefix ?? DEFAULT_MAX_PREFIX;
    let out: FleetEvent[] | undefined;
    let refused = 0;
    for (let i = 0; i < events.length; i++) {
      const e = events[i];
      const r = checkBannable(e.ip, limits);
      if (r.ok) {
        out?.push(e);
        continue;
      }
      out ??= events.slice(0, i);
      if (e.kind === "ban") csv.record({ action: "REJECT", ip: e.ip, origin: e.origin, jail: e.jail, until: e.until, detail: `from the hub: ${r.message}` });
      if (++refused <= MAX_REFUSAL_LINES) log(`warning: ignoring the hub's ${e.kind} of ${e.ip} from ${e.origin}: ${r.message}`);
    }
    if (refused > MAX_REFUSAL_LINES) log(`warning: ignored ${refused - MAX_REFUSAL_LINES} more event(s) of that frame from the hub (REJECT rows in the CSV)`);
    if (dropped) {
      log(`warning: ignoring ${dropped.count} malformed event(s) in a sync frame from the hub: ${dropped.reasons.join("; ")}`);
      csv.record({ action: "REJECT", detail: `${dropped.count} malformed event(s) in a sync frame from the hub: ${dropped.reasons.join("; ")}` });
    }
    return out ?? events;
  }

  /** Events relayed live: applied, remembered for the response-time report, and the cursor moves on (once there is one). */
  private onEvents(events: FleetEvent[], seq: string): void {
    this.host.opts.applier.take(events, this.hubTakesApplied);
    if (this.host.cursor) this.host.cursor = { hub: this.hubId, seq };
    this.host.opts.state.schedule();
  }

  private onAck(f: AckFrame): void {
    this.answered(f.id, { status: "acked", seq: f.seq });
    this.spool?.acked(f.id);
  }

  private onError(f: ErrorFrame): void {
    this.host.opts.log(`hub refused${f.id ? ` ${f.id}` : ""}: ${f.code}: ${f.message}`);
    if (!f.id) return;
    this.answered(f.id, { status: "refused", code: f.code, message: f.message });
    this.spool?.refused(f.id, f.code);
  }

  private answered(id: string, r: PublishResult): void {
    const resolve = this.waiting.get(id);
    if (!resolve) return;
    this.waiting.delete(id);
    resolve(r);
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
 * Keeps one connection to the hub: tries the hubs in order, the next one (`nextHub`) whenever a
 * connection ends, passing over a hub that hung recently; reconnects with `nextDelay` backoff,
 * and makes a `Session` for each connection. The cursor outlives the sessions.
 */
export class HubLink implements SessionHost, Publisher {
  /** Where the agent is in the hub's stream: set from the state file, moved on by each session. */
  cursor: Cursor | undefined;
  /** Why the last connection failed in a way retrying does not fix (TLS, token); cleared by a welcome. */
  problem: string | undefined;
  private welcomedSession: Session | undefined;
  private session: Session | undefined;
  private sock: WebSocket | undefined;
  private attempt = 0;
  /** Sessions in a row that broke off an oversized sync: the backoff keeps growing across their welcomes. */
  private strikes = 0;
  private hubIndex = 0;
  /** When each hub (by index) last hung: a frozen hub is not tried again first. */
  private readonly hungAt = new Map<number, number>();
  private retryTimer: NodeJS.Timeout | undefined;
  private closing = false;

  constructor(readonly opts: HubLinkOptions) {}

  welcomed(): void {
    this.attempt = this.strikes;
    this.problem = undefined;
    this.welcomedSession = this.session;
  }

  publish(frame: BanFrame | UnbanFrame, file: string): Promise<PublishResult> | undefined {
    return this.welcomedSession === this.session ? this.session?.publish(frame, file) : undefined;
  }

  ackWaitMs(): number {
    return this.session?.ackWaitMs() ?? 0;
  }

  synced(): void {
    this.strikes = 0;
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
      handshakeTimeout: handshakeTimeoutMs(opts.heartbeatMs),
      ca: opts.ca ? [readFileSync(opts.ca, "utf8")] : undefined,
    });
    const session = new Session(sock, url, this);
    this.sock = sock;
    this.session = session;
    sock.on("unexpected-response", (_req, res) => {
      const line = `${url} refused the connection: HTTP ${res.statusCode}${res.statusMessage ? ` ${res.statusMessage}` : ""}${res.statusCode === 401 || res.statusCode === 403 ? " (token not accepted: check --token-file and the hub's token list)" : ""}`;
      if (res.statusCode === 401 || res.statusCode === 403) this.problem = line;
      opts.log(`error: ${line}`);
      sock.terminate();
    });
    sock.on("open", () => session.open());
    sock.on("pong", () => session.heard());
    sock.on("message", (data: Buffer) => session.receive(data));
    sock.on("error", (e) => {
      if (/handshake has timed out/.test(e.message)) session.hung = true;
      // A certificate this agent cannot verify is its set-up, not the network: say what to fix.
      const tls = tlsProblem(e as NodeJS.ErrnoException, url);
      if (tls) this.problem = tls;
      opts.log(tls ? `error: ${tls}` : `${url}: ${e.message}`);
    });
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
    if (session.overflowed) this.attempt = ++this.strikes;
    if (this.session === session) this.session = undefined;
    if (this.welcomedSession === session) this.welcomedSession = undefined;
    this.opts.applier.forgetLive();
    if (this.closing) return;
    this.opts.disconnected?.();
    // Whatever ended it (a refusal, a close, a hub gone silent), the next hub is tried first:
    // with hubs on one Redis the cursor resumes there, and a frozen hub is not waited on twice.
    const now = Date.now();
    const failed = this.hubIndex % this.opts.hubs.length;
    if (session.hung) this.hungAt.set(failed, now);
    this.hubIndex = nextHub(this.opts.hubs.length, failed, this.hungAt, now, hungMemoryMs(this.opts.heartbeatMs));
    // A hub whose syncs this agent keeps overflowing is given a growing pause at once; anything else is retried at a restart's pace first.
    const delay = this.strikes ? growingDelay(this.attempt++) : nextDelay(this.attempt++);
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

/** How often the hubs' names are resolved again while the connection stays up, ms (and after each disconnect). */
const HUB_RESOLVE_MS = 10 * 60_000;

/**
 * The hubs' addresses, never to be blocked: their names are resolved at start, again after
 * each disconnect (before the reconnect) and every HUB_RESOLVE_MS, and each new address is
 * given to `learned` (the allowlist and the applier). A name that does not resolve keeps the
 * addresses it had, with one log line when it starts failing and one when it resolves again;
 * addresses are only ever added, so a hub that moved keeps the old one protected too.
 */
export class HubAddresses {
  private readonly known = new Map<string, Address[]>();
  private readonly failing = new Set<string>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly urls: string[],
    private readonly log: (line: string) => void,
    private readonly resolve: (host: string) => Promise<string[]> = async (host) => (await lookup(host, { all: true })).map((r) => r.address),
  ) {}

  /** Every address known so far. */
  all(): Address[] {
    return [...this.known.values()].flat();
  }

  /** Resolves every hub name; resolves with the addresses not known before. */
  async refresh(): Promise<Address[]> {
    const added: Address[] = [];
    for (const host of new Set(this.urls.map(hubHost))) {
      const direct = parseAddress(host);
      const had = this.known.get(host) ?? [];
      let found: Address[];
      try {
        found = direct ? [direct] : (await this.resolve(host)).map((x) => parseAddress(x)).filter((a): a is Address => a !== undefined);
      } catch (e) {
        if (!this.failing.has(host)) this.log(`warning: cannot resolve the hub ${host} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); ${had.length ? `keeping its last known address(es) ${had.map((a) => a.text).join(", ")} out of every ban` : "its addresses are not protected from bans until it resolves"}`);
        this.failing.add(host);
        continue;
      }
      if (this.failing.delete(host)) this.log(`the hub ${host} resolves again: ${found.map((a) => a.text).join(", ")}`);
      const fresh = found.filter((a) => !had.some((h) => h.text === a.text));
      if (fresh.length) this.known.set(host, [...had, ...fresh]);
      if (had.length && fresh.length) this.log(`the hub ${host} has new address(es) ${fresh.map((a) => a.text).join(", ")}: never blocked from now on`);
      added.push(...fresh);
    }
    return added;
  }

  /** Refreshes every HUB_RESOLVE_MS and when `poke()`d, giving each new address to `learned`. */
  watch(learned: (a: Address) => void): { poke(): void } {
    const poke = () => void this.refresh().then((added) => added.forEach(learned), (e: Error) => this.log(`warning: resolving the hubs: ${e.message}`));
    this.timer = setInterval(poke, HUB_RESOLVE_MS);
    this.timer.unref();
    return { poke };
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

/** A problem the agent cannot start with, whose message says it all (a bad token file): one line, exit 1. */
export class StartError extends Error {}

/** Reads a token file: the token alone, surrounding whitespace ignored. */
export async function readToken(file: string): Promise<string> {
  const token = (await readOptionFile("token-file", file)).trim();
  if (!/^[\x21-\x7e]{16,512}$/.test(token)) throw new StartError(`Expected ${file} to hold one token of 16-512 printable characters, got something else`);
  return token;
}

/** Reads the file an option names, or fails in one line naming the option: before the agent touches the kernel. */
async function readOptionFile(flag: string, path: string): Promise<string> {
  try {
    return await readFile(path, "utf8");
  } catch (e) {
    throw new StartError(`Expected --${flag} ${path} (or "${flag}" in --config) to be a file the agent can read: ${(e as Error).message}`);
  }
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
    if (u.startsWith("ws:") && !isLoopbackHost(host)) out.push(`warning: --insecure: ${u} is plain ws://: the token and the bans cross the network unencrypted; use wss:// with --ca`);
  }
  return out;
}

/** Puts the --state file's claims into the kernel before any hub answers: after a reboot the kernel holds nothing, and the hub may be away. */
async function restoreSaved(state: StateFile, link: HubLink, applier: Applier, now: number, opts: AgentOptions): Promise<void> {
  const saved = await state.load();
  if (!saved) return;
  link.cursor = saved.cursor;
  const n = await applier.restore(saved.claims, now);
  opts.log(`loaded ${applier.claims.size} address(es) and ${saved.cursor ? `cursor ${saved.cursor.hub}:${saved.cursor.seq}` : "no cursor"} from ${opts.statePath}`);
  opts.log(`restored: ${n} address(es) blocked from the state file before any hub answered (${opts.backend})`);
}

/** Starts an agent: sets up the firewall objects, then connects and keeps connecting. */
export async function startAgent(opts: AgentOptions): Promise<Agent> {
  const log = opts.log;
  const token = await readToken(opts.tokenFile);
  if (opts.ca) await readOptionFile("ca", opts.ca);
  const cfg: FirewallConfig = { prefix: opts.prefix, ports: opts.ports, allow: opts.allow.map((s) => parseAddress(s)!), hooks: opts.hooks ?? backendHooks(opts.backend) };
  const hubAddresses = new HubAddresses(opts.hubs, log);
  await hubAddresses.refresh();
  const never = [...cfg.allow, ...ownAddresses(), ...hubAddresses.all()];
  for (const w of warnings(opts)) log(w);
  const backend = makeBackend(opts.backend, cfg, log);
  await backend.setup();
  const clock = new HubClock(log);
  const csv = await CsvLog.open(opts.csvPath, opts.node ?? "agent", log, clock);

  const allow = new Allowlist(never, () => 2 * applier.claims.size + 10_000);
  const applier: Applier = new Applier({
    backend,
    backendName: opts.backend,
    allow,
    record: (r) => csv.record(r),
    log,
    onApplied: (changes, live) => link.reportApplied(changes, live),
    now: () => clock.now(),
  });
  const state: StateFile = new StateFile(opts.statePath, log, () => ({ cursor: link.cursor, claims: applier.claims }));
  // What the hub's `enforcement` reports and --metrics show: the Guard's view of the kernel.
  const enforcementSnapshot = (): EnforcementState => guard.snapshot();
  const resolver = hubAddresses.watch((a) => allow.add(a) && applier.allowed(a));
  const link: HubLink = new HubLink({ ...opts, token, applier, state, csv, enforcement: enforcementSnapshot, disconnected: resolver.poke, clock });
  // ban.ts hands its events in here from now on, hub or no hub: they wait in the spool.
  const handoff = opts.spoolDir ? new Handoff(opts.spoolDir, link, log) : undefined;
  await handoff?.start();
  await restoreSaved(state, link, applier, clock.now(), opts);
  const guard = new Guard({ backend, backendName: opts.backend, applier, prefix: opts.prefix, record: (r) => csv.record(r), log, checkMs: opts.checkMs ?? 10_000 });
  guard.start();
  const metrics = opts.metrics ? await serveMetrics(opts.metrics, opts.backend, opts.prefix, enforcementSnapshot, log) : undefined;
  link.connect();

  let closed: Promise<void> | undefined;
  return {
    claims: applier.claims,
    cursor: () => link.cursor,
    enforcement: enforcementSnapshot,
    close() {
      closed ??= (async () => {
        await handoff?.close();
        link.close();
        hubAddresses.stop();
        metrics?.close();
        await guard.close();
        await applier.close();
        await state.close();
        await csv.close();
      })();
      return closed;
    },
  };
}

/** The hooks of `backend` when --hook is not given: nftables has no DOCKER-USER (its forward hook runs first). */
export function backendHooks(backend: BackendName): Hook[] {
  return backend === "nftables" ? ["input", "forward"] : [...DEFAULT_HOOKS];
}

/** --hook's values (repeatable, comma-separated, any case; `none`: sets only) as hooks; throws with one sentence. */
export function parseHooks(values: string[], backend: BackendName): Hook[] {
  const words = values.flatMap((v) => v.split(",")).map((w) => w.trim().toLowerCase()).filter(Boolean);
  if (words.includes("none")) {
    if (words.length > 1) throw new UsageError(`Expected --hook none alone (sets only), got ${JSON.stringify(values.join(","))}`);
    return [];
  }
  const hooks: Hook[] = [];
  for (const w of words) {
    if (!(HOOKS as readonly string[]).includes(w)) throw new UsageError(`Expected --hook to be ${HOOKS.join(", ")} or none, got ${JSON.stringify(w)}`);
    if (w === "docker-user" && backend === "nftables") throw new UsageError("Expected --hook input or forward with --backend nftables, got docker-user: its forward hook already runs before Docker's chains");
    if (!hooks.includes(w as Hook)) hooks.push(w as Hook);
  }
  return hooks;
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

/**
 * Throws a UsageError for an option given more than once that takes one value: yargs would hand
 * on an array of the values (`--backend ipset --backend nftables`), which nothing after it expects.
 */
function onlyOnce(argv: Record<string, unknown>, repeatable: readonly string[]): true {
  for (const [key, value] of Object.entries(argv)) {
    if (key === "_" || /[A-Z]/.test(key) || repeatable.includes(key) || !Array.isArray(value)) continue;
    throw new UsageError(`Expected --${key} once, got it ${value.length} times: ${value.map((v) => JSON.stringify(v)).join(", ")}`);
  }
  return true;
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
      .option("csv", { type: "string", describe: "Structured log: one CSV row per BLOCK, SCHEDULE_UNBLOCK, UNBLOCK, REJECT, REPAIR" })
      .option("spool", { type: "string", describe: "Spool directory of ban.ts: events it could not deliver are forwarded from here, and ban.ts hands its events in on the socket agent.sock there" })
      .option("state", { type: "string", describe: "State file (cursor and claims): at start its bans go back into the kernel before any hub answers (a reboot leaves no gap), then the agent resumes where it stopped instead of a full sync" })
      .option("ca", { type: "string", describe: "PEM CA certificate to verify a wss:// hub with (self-signed fleets)" })
      .option("heartbeat", { type: "number", default: 15, describe: "Seconds between pings to the hub; no answer within one interval means reconnect" })
      .option("prefix", { type: "string", default: "banshare", describe: "Name of the sets, chain and nftables table the agent owns" })
      .option("hook", { type: "string", array: true, describe: "Where the DROP is hooked in (repeatable or comma-separated): INPUT, FORWARD, DOCKER-USER (ipset, iptables; DOCKER-USER once Docker made it), or the nftables hooks input, forward; none: only create and fill the sets, for your own rules (default: all of them)" })
      .option("check-interval", { type: "number", default: 10, describe: "Seconds between full checks that the hooks, chains, sets and their entries are in the kernel (changes by other programs are also seen at once through nft monitor); anything missing is restored; 0: never check" })
      .option("max-prefix-v4", { type: "number", default: DEFAULT_MAX_PREFIX.v4, describe: "Refuse IPv4 networks from the hub broader than this prefix length (set it as on the hub)" })
      .option("max-prefix-v6", { type: "number", default: DEFAULT_MAX_PREFIX.v6, describe: "Refuse IPv6 networks from the hub broader than this prefix length (set it as on the hub)" })
      .option("cleanup", { type: "boolean", default: false, describe: "Remove every firewall object the agent created, then exit" })
      .option("insecure", { type: "boolean", default: false, describe: "Send the token over plain ws:// to a hub off this host (it crosses the network in clear); without it such a --hub is refused" })
      .option("metrics", { type: "string", describe: "Serve the agent's own Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9101 (GET /metrics: entries, claims, drift, hooks missing, repairs, packets dropped by its DROP rules)" })
      .check((a) => onlyOnce(a, ["allow", "hook"]))
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
  if (!(a.checkInterval === 0 || (a.checkInterval >= 0.1 && a.checkInterval <= 3600))) throw new UsageError(`Expected --check-interval to be 0 or 0.1-3600 seconds, got ${a.checkInterval}`);
  const hooks = a.hook === undefined ? undefined : parseHooks(a.hook, a.backend);
  for (const [flag, v, max] of [["--max-prefix-v4", a.maxPrefixV4, 32], ["--max-prefix-v6", a.maxPrefixV6, 128]] as const) {
    if (!Number.isInteger(v) || v < 0 || v > max) throw new UsageError(`Expected ${flag} to be a prefix length 0-${max}, got ${v}`);
  }
  if (!(a.heartbeat >= 1 && a.heartbeat <= 86400)) throw new UsageError(`Expected --heartbeat to be 1-86400 seconds, got ${a.heartbeat}`);
  if (a.node !== undefined && !/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/.test(a.node)) throw new UsageError(`Expected --node to be a node name, got ${JSON.stringify(a.node)}`);
  const mp = a.metrics === undefined ? undefined : /^(.+):(\d{1,5})$/.exec(a.metrics);
  if (a.metrics !== undefined && (!mp || Number(mp[2]) < 1 || Number(mp[2]) > 65535)) throw new UsageError(`Expected --metrics to be HOST:PORT, e.g. 127.0.0.1:9101, got ${JSON.stringify(a.metrics)}`);
  // Refused before any connection: the token would be on the wire in clear at the first byte.
  const plain = hubs.find((h) => h.startsWith("ws:") && !isLoopbackHost(new URL(h).hostname));
  if (plain && !a.insecure) throw new UsageError(`Expected a wss:// hub off this host, got ${JSON.stringify(plain)}: plain ws:// would send the token in clear (use wss:// with --ca, or --insecure on a network you trust)`);
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
      hooks,
      checkMs: Math.round(a.checkInterval * 1000),
      maxPrefix: { v4: a.maxPrefixV4, v6: a.maxPrefixV6 },
      metrics: a.metrics,
    },
  };
}

function logLine(line: string): void {
  // One line whatever it quotes: text from a peer (an error message, a name) cannot forge another.
  process.stderr.write(`${new Date().toISOString()} agent: ${printable(line)}\n`);
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
