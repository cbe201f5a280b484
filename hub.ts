/**
 * banshare hub: relays ban and unban events between the nodes of a fleet.
 *
 *   node --import tsx hub.ts --tokens /etc/banshare/tokens --state /var/lib/banshare/journal.jsonl
 *   node --import tsx hub.ts add-node web1 --tokens /etc/banshare/tokens   # prints web1's token
 *
 * Nodes authenticate with `Authorization: Bearer TOKEN` on the WebSocket upgrade; the token
 * file holds only SHA-256 hashes. The hub keeps the fleet's claims (messages.ts), writes every
 * accepted event to its journal and fsyncs before it acks, and pushes each event to every
 * other node's agents. `GET /healthz` and `GET /metrics` answer on the same port.
 *
 * Inside, data flows one way: a frame (`Sessions`) or a POST (`HttpApi`) -> `Publisher` (refusal
 * rules, then `FleetState.decide` with the pure `decideRules`) -> `Store.append` (`Journal` or
 * `RedisStore`, chosen in `openStore`) -> once durable, `FleetState.commit` -> `Relay` -> the
 * agents' connections. `Metrics`, `Recorder` (CSV) and `StatusFeed` are told what happened and
 * change nothing else; `startHub` only wires the parts.
 *
 * With `--store redis://HOST:PORT/DB` the events go to a Redis stream instead of the journal, and
 * several hubs on one Redis serve one fleet: each relays every event in the stream to its own
 * agents, and an agent's cursor is valid on every one of them (README, "Running several hubs").
 *
 * @module
 */

import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { once } from "node:events";
import { createReadStream, existsSync, readFileSync, realpathSync } from "node:fs";
import { appendFile, chmod, mkdir, open, readFile, rename, rm, statfs, writeFile, type FileHandle } from "node:fs/promises";
import { STATUS_CODES, createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { networkInterfaces } from "node:os";
import { dirname } from "node:path";
import type { Duplex } from "node:stream";
import { fileURLToPath } from "node:url";
import { WebSocketServer, type WebSocket } from "ws";
import yargs from "yargs";
import {
  ALL_ORIGINS,
  CLOCK_TOLERANCE_MS,
  ESCALATION_ORIGIN,
  CSV_HEADER,
  DEFAULT_MAX_PREFIX,
  MAX_NODE_FRAME_BYTES,
  MAX_STATUS_BANS,
  MAX_STATUS_EVENTS,
  MAX_STATUS_RT,
  PROTOCOL_VERSION,
  blockedUntil,
  checkEvent,
  clockSkew,
  csvRow,
  printable,
  eventUntil,
  hubDetectedAt,
  isName,
  isNewer,
  isExpired,
  mergeClaim,
  overlaps,
  parseAddress,
  parseNodeFrame,
  pruneClaims,
  type Address,
  type AddressClaims,
  type BanFrame,
  enforcementVerdict,
  type Claims,
  type CsvRecord,
  type Cursor,
  type AppliedFrame,
  type AppliedRecord,
  type EnforcementReport,
  type ErrorCode,
  type FleetEvent,
  type NodeList,
  type HelloFrame,
  type ListedClaim,
  type HubFrame,
  type StatusBan,
  type StatusFrame,
  type PrefixLimits,
  type Role,
  type UnbanFrame,
} from "./messages.ts";

/** One enrolled node from the token file. */
export interface TokenEntry {
  name: string;
  hash: string;
  role: Role;
}

/** Everything `startHub` needs; `parseArgs` turns flags into this. */
export interface HubOptions {
  host: string;
  port: number;
  tokensFile: string;
  statePath?: string;
  csvPath?: string;
  heartbeatMs: number;
  maxPrefix: PrefixLimits;
  tlsCert?: string;
  tlsKey?: string;
  /** Largest number of events in one `sync` frame. */
  syncChunk: number;
  /** A socket with more than this many bytes queued is dropped rather than grow the hub. */
  maxBufferedBytes: number;
  /** Per-node event rate limit: sustained events per second, and the burst allowed above it. */
  rate: number;
  burst: number;
  /** Most simultaneous connections one node may hold: WebSockets and HTTP requests being served. */
  maxConnsPerNode: number;
  /** Most sockets not yet authenticated, in all (default: a quarter of the open-file limit, at most 1024) and per source address (32). */
  maxPending?: number;
  maxPendingPerAddress?: number;
  /** Most live ban claims one node may hold at the hub (default DEFAULT_MAX_CLAIMS_PER_NODE); a new address past it is refused with `claim_limit`. */
  maxClaimsPerNode?: number;
  /** Networks no ban may touch (the operator's own ranges); the hub's own addresses are added. */
  protect: string[];
  /** Serve plain ws:// on a non-loopback address (tokens cross the network in clear). */
  insecure?: boolean;
  /** Repeat offenders: each earlier ban of an address multiplies a new one by `factor`, up to `maxSeconds`. */
  escalate?: { factor: number; maxSeconds: number };
  /** Relay a ban to the fleet only once this many distinct nodes claim the address (1: at once). */
  quorum?: number;
  /** Nodes whose bans are relayed at once whatever --quorum says. */
  trusted?: string[];
  /** Shared store, `redis://`, `rediss://` or `redis-sentinel://` URL: events in a Redis stream instead of the journal. */
  store?: string;
  /** Redis mode: replicas that must have an event before the sender's ack (WAIT); 0: the master's word. */
  storeReplicas?: number;
  /** Redis mode: entries the stream keeps at most (trimmed approximately, by whole stream nodes). */
  streamMaxLen: number;
  /** Redis mode: entries older than this are trimmed, in ms. */
  streamMaxAgeMs: number;
  log: (line: string) => void;
}

/** A running hub. */
export interface Hub {
  port: number;
  hubId: string;
  claims: Claims;
  seq(): number;
  reloadTokens(): Promise<void>;
  close(): Promise<void>;
}

/** A usage or validation error: `main` prints its message alone and exits 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

const ROLES: Role[] = ["node", "reader", "admin"];
const DEFAULT_PORT = 7700;
const SYNC_CHUNK = 5000;
const HELLO_TIMEOUT_MS = 10_000;
/** A socket gets this long to make an authenticated request (or upgrade); an HTTP request this long to arrive whole. */
const PENDING_TIMEOUT_MS = 10_000;
const REQUEST_TIMEOUT_MS = 30_000;
const DEFAULT_MAX_PENDING_PER_ADDRESS = 32;
/** A revoked connection gets this long for the close handshake before it is cut. */
const REVOKE_GRACE_MS = 1000;
/** A receiving socket whose sync has not moved for this long (its reader takes nothing) is dropped: it would hold its share of the state in the hub's memory. */
const SYNC_DROP_MS = 20_000;
/** Refusals before a token was accepted: per source address and reason, the first FLOOD_FIRST per FLOOD_WINDOW_MS are logged one by one (FLOOD_BUDGET in all), the rest summed up in one line per window. */
const FLOOD_FIRST = 5;
const FLOOD_BUDGET = 100;
const FLOOD_SOURCES = 256;
const FLOOD_WINDOW_MS = 10_000;
/** HTTP requests of one source address other than publishing: this many a second, this many at once; one that would wait longer than HTTP_MAX_WAIT_MS is refused. */
const HTTP_RATE = 20;
const HTTP_BURST = 100;
const HTTP_MAX_WAIT_MS = 5000;
/** The fleet-long lists (GET /v1/blocked, /v1/bans) per node: this many a second, this many at once. */
const LIST_RATE = 2;
const LIST_BURST = 10;
/**
 * Syncs are sent a frame at a time, round-robin, for at most SYNC_SLICE_MS before the event loop
 * serves everyone else (live bans, acks, HTTP); a sync waits while its socket holds more than
 * SYNC_WINDOW_BYTES not yet taken by the kernel (all waiting: another look in SYNC_WAIT_MS). A
 * snapshot of the claims serves every sync that starts within SNAPSHOT_REUSE_MS of it, or
 * within 50 times the time it took to build (a million claims take seconds to put in order).
 */
const SYNC_SLICE_MS = 4;
const SYNC_WINDOW_BYTES = 512 * 1024;
const SYNC_WAIT_MS = 5;
const SNAPSHOT_REUSE_MS = 2000;
/**
 * Syncs sent at the same time; the others wait their turn in order. Each socket holding sync
 * bytes costs the event loop a write each time round, so a herd of a thousand is served 16 at a
 * time (each completes sooner); one whose agent has not read for SYNC_STALL_MS yields its place.
 */
const SYNC_CONCURRENCY = 16;
const SYNC_STALL_MS = 1000;
const MAX_REFUSED_PER_CONN = 1000;
/** Status page: ms between `status` frames, response times kept per node, how far back they are shown. */
const STATUS_INTERVAL_MS = 1000;
const RT_RING = 200;
const STATUS_RT_WINDOW_MS = 24 * 3600 * 1000;
/** The subprotocol the status page speaks; the hub selects it, never the token's. */
export const STATUS_PROTOCOL = "banshare.v1";
/** A browser offers its token as the subprotocol `banshare.token.TOKEN`. */
const TOKEN_PROTOCOL_PREFIX = "banshare.token.";
/** A token as the hub reads it, from a bearer header or a subprotocol: 1-512 printable ASCII characters, no spaces. */
const TOKEN_PATTERN = String.raw`[\x21-\x7e]{1,512}`;
/** Where `requestToken` finds a token: a bearer header, or a subprotocol (the prefix escaped, its dots literal). */
const BEARER_RE = new RegExp(`^Bearer (${TOKEN_PATTERN})$`);
const TOKEN_PROTOCOL_RE = new RegExp(`^${TOKEN_PROTOCOL_PREFIX.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}(${TOKEN_PATTERN})$`);

const HUB_FLAGS = ["config", "tokens", "listen", "state", "store", "store-replicas", "stream-max-len", "stream-max-age", "csv", "heartbeat", "max-prefix-v4", "max-prefix-v6", "tls-cert", "tls-key", "max-buffered", "rate", "burst", "max-conns-per-node", "max-claims-per-node", "max-pending", "max-pending-per-address", "protect", "insecure", "escalate", "escalate-max", "quorum", "trust", "role", "out", "dir", "host", "days"];
const JOURNAL_MAGIC = "banshare-journal";
/** A week of a busy fleet (one event a second on average, bursts included) fits in it. */
const DEFAULT_STREAM_MAX_LEN = 1_000_000;
const DEFAULT_STREAM_MAX_AGE_H = 7 * 24;

// ---------------------------------------------------------------------------------------------
// Pure helpers

/** SHA-256 of a token, hex: what the token file stores. */
export function hashToken(token: string): string {
  return createHash("sha256").update(token, "utf8").digest("hex");
}

/** Parses the token file: `NAME SHA256HEX [ROLE]` per line, `#` comments. Throws on the first bad line. */
export function parseTokens(text: string, file = "tokens"): TokenEntry[] {
  const out: TokenEntry[] = [];
  const names = new Set<string>();
  text.split("\n").forEach((raw, i) => {
    const line = raw.replace(/#.*/, "").trim();
    if (!line) return;
    const [name, hash, role = "node", extra] = line.split(/\s+/);
    const where = `${file}:${i + 1}`;
    if (extra !== undefined) throw new UsageError(`${where}: expected "NAME SHA256HEX [ROLE]", got ${line.split(/\s+/).length} fields`);
    if (!isName(name)) throw new UsageError(`${where}: expected a node name of A-Z a-z 0-9 _ . : -, got ${JSON.stringify(name)}`);
    if (!/^[0-9a-f]{64}$/.test(hash ?? "")) throw new UsageError(`${where}: expected a 64-digit lowercase SHA-256 hex hash for ${name}`);
    if (!ROLES.includes(role as Role)) throw new UsageError(`${where}: expected role node, reader or admin, got ${JSON.stringify(role)}`);
    if (names.has(name)) throw new UsageError(`${where}: node ${name} is listed twice`);
    names.add(name);
    out.push({ name, hash, role: role as Role });
  });
  return out;
}

/** The addresses of this host's interfaces: a ban must never cut the hub off its own fleet. */
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

/** True when `host` is a loopback address or name, where plain ws:// never leaves the machine. */
export function isLoopback(host: string): boolean {
  const a = parseAddress(host.replace(/^\[|\]$/g, ""));
  return host === "localhost" || (a !== undefined && (a.family === 4 ? a.bytes[0] === 127 : a.text === "::1"));
}

/** Finds the entry whose hash matches `token`, comparing every entry in constant time. */
export function findToken(entries: TokenEntry[], token: string): TokenEntry | undefined {
  const presented = Buffer.from(hashToken(token), "hex");
  let found: TokenEntry | undefined;
  for (const e of entries) {
    if (timingSafeEqual(presented, Buffer.from(e.hash, "hex"))) found = e;
  }
  return found;
}

/** Reads the bearer token of an upgrade request, or undefined. */
export function bearerToken(req: Pick<IncomingMessage, "headers">): string | undefined {
  const m = BEARER_RE.exec(req.headers.authorization ?? "");
  return m?.[1];
}

/**
 * Reads the token of a request: its bearer token or, on a WebSocket upgrade only, a
 * `banshare.token.TOKEN` subprotocol (a browser cannot set an Authorization header, and a token
 * in the URL would end up in logs and history).
 */
export function requestToken(req: Pick<IncomingMessage, "headers">): string | undefined {
  const bearer = bearerToken(req);
  if (bearer !== undefined || req.headers.upgrade === undefined) return bearer;
  for (const p of (req.headers["sec-websocket-protocol"] ?? "").split(",")) {
    const m = TOKEN_PROTOCOL_RE.exec(p.trim());
    if (m) return m[1];
  }
  return undefined;
}

/**
 * The blocked addresses for the status page: the `limit` most recently detected, newest first,
 * and how many there are in all. Each shows its newest active ban claim, when the address is
 * unblocked, and how many nodes claim it. Claims held back by `--quorum` do not count yet.
 */
export function statusBans(claims: Claims, now: number, limit: number): { bans: StatusBan[]; total: number } {
  // A min-heap of the newest `limit` by detection time: a pass over 100k addresses, no full sort.
  const heap: StatusBan[] = [];
  const less = (a: StatusBan, b: StatusBan) => a.detectedAt < b.detectedAt;
  const swap = (i: number, j: number) => ([heap[i], heap[j]] = [heap[j], heap[i]]);
  let total = 0;
  for (const [ip, all] of claims) {
    let byOrigin = all;
    for (const c of all.values()) {
      if (c.held) {
        byOrigin = new Map([...all].filter(([, x]) => !x.held));
        break;
      }
    }
    const until = blockedUntil(byOrigin, now);
    if (until === undefined) continue;
    total++;
    const admin = byOrigin.get(ALL_ORIGINS);
    let newest: FleetEvent | undefined;
    let count = 0;
    for (const c of byOrigin.values()) {
      if (c.kind !== "ban" || c.origin === ALL_ORIGINS || isExpired(c, now) || (admin && !isNewer(c, admin))) continue;
      if (c.origin !== ESCALATION_ORIGIN) count++;
      if (!newest || c.detectedAt > newest.detectedAt) newest = c;
    }
    if (!newest) continue;
    const esc = byOrigin.get(ESCALATION_ORIGIN);
    const escalated = esc?.kind === "ban" && esc.escalation && !isExpired(esc, now) && !(admin && !isNewer(esc, admin)) ? esc.escalation : undefined;
    const row: StatusBan = { ip, origin: newest.origin, jail: newest.jail, detectedAt: newest.detectedAt, until, claims: count, escalation: escalated };
    if (heap.length < limit) {
      heap.push(row);
      for (let i = heap.length - 1; i > 0 && less(heap[i], heap[(i - 1) >> 1]); i = (i - 1) >> 1) swap(i, (i - 1) >> 1);
    } else if (limit > 0 && less(heap[0], row)) {
      heap[0] = row;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < heap.length && less(heap[l], heap[m])) m = l;
        if (r < heap.length && less(heap[r], heap[m])) m = r;
        if (m === i) break;
        swap(i, m);
        i = m;
      }
    }
  }
  return { bans: heap.sort((a, b) => b.detectedAt - a.detectedAt), total };
}

/** Parses `HOST:PORT`, `[V6]:PORT` or `PORT`. Throws with one sentence on anything else. */
export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(s) ?? /^()()(\d{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new UsageError(`Expected --listen as HOST:PORT or [IPV6]:PORT, got ${JSON.stringify(s)}`);
  return { host: m[1] || m[2] || "127.0.0.1", port };
}

const POSITION_RE = /^0*(\d{1,15})(?:-0*(\d{1,15}))?$/;

/** True when `s` is a position in the event stream: a journal seq (`42`) or a Redis stream entry ID (`1718000000000-3`). */
export function isPosition(s: string): boolean {
  return POSITION_RE.test(s);
}

/**
 * Compares two positions: negative when `a` comes first, 0 when equal, positive after. A journal
 * seq `N` is `N-0`; a stream ID compares by its milliseconds, then by its sequence number. Every
 * comparison of a seq or a cursor goes through here (a plain string or Number() comparison is
 * wrong for stream IDs: "999-0" < "1000-0").
 */
export function comparePositions(a: string, b: string): number {
  const x = POSITION_RE.exec(a);
  const y = POSITION_RE.exec(b);
  if (!x || !y) throw new Error(`Expected positions as N or MS-N, got ${JSON.stringify(x ? b : a)}`);
  return Number(x[1]) - Number(y[1]) || Number(x[2] ?? 0) - Number(y[2] ?? 0);
}

/**
 * Turns an accepted ban or unban frame into the event the fleet stores, given the claims it
 * joins. Its times are on the hub's clock (`now`): the detection as `hubDetectedAt` places it
 * (an admin unban's: `now`), and `until` counted from there, so a sender's wrong clock neither
 * shortens nor stretches it.
 */
export function toEvent(f: BanFrame | UnbanFrame, origin: string, seq: number | string, claims: Claims, now: number): FleetEvent {
  const byOrigin = claims.get(f.ip);
  const isAll = f.type === "unban" && f.all === true;
  const previous = isAll ? blockedUntil(byOrigin, now) : byOrigin?.get(origin)?.kind === "ban" ? byOrigin.get(origin)!.until : undefined;
  // An admin's unban for every node is typed by hand and never spooled: it means now, and lifts
  // every claim the hub received before it, whatever the clocks said.
  const detectedAt = isAll ? now : hubDetectedAt(f.detectedAt, f.sentAt, now);
  return {
    seq: String(seq),
    kind: f.type,
    ip: f.ip,
    origin: isAll ? ALL_ORIGINS : origin,
    jail: f.jail,
    until: eventUntil(f.type, detectedAt, f.type === "ban" ? f.bantime : undefined, previous),
    detectedAt,
    id: f.id,
    relayedAt: now,
  };
}

/**
 * The events a connecting agent needs: every live claim, its own node's included (the agent
 * holds what the fleet decided, so a Fail2Ban restart on the origin, which flushes Fail2Ban's
 * own rules, leaves no gap), or, when resuming from `afterSeq`, only those accepted after it.
 * Claims are last-writer-wins, so the newest event per (ip, origin) is all a resuming agent
 * lacks; superseded and expired ones need no resend.
 */
export function syncEvents(claims: Claims, afterSeq: string | undefined, now: number): FleetEvent[] {
  // Each position parsed once, not once per comparison: 50,000 claims in a few ms, not 300.
  const keyed: Array<{ e: FleetEvent; ms: number; n: number }> = [];
  const after = afterSeq === undefined ? undefined : positionKey(afterSeq);
  for (const byOrigin of claims.values()) {
    for (const e of byOrigin.values()) {
      if (e.held || (e.until !== null && e.until <= now)) continue;
      const [ms, n] = positionKey(e.seq);
      if (after && (ms - after[0] || n - after[1]) <= 0) continue;
      keyed.push({ e, ms, n });
    }
  }
  keyed.sort((a, b) => a.ms - b.ms || a.n - b.n);
  return keyed.map((k) => k.e);
}

/** A position as the two numbers `comparePositions` orders it by. */
function positionKey(s: string): [number, number] {
  const m = POSITION_RE.exec(s);
  if (!m) throw new Error(`Expected positions as N or MS-N, got ${JSON.stringify(s)}`);
  return [Number(m[1]), Number(m[2] ?? 0)];
}

/**
 * The hub's merge: `mergeClaim`, except that a released copy of a held claim (same detection
 * and id, no longer held, a later seq) replaces it: `--quorum` holds a claim back and releases
 * it with a new seq, so agents resuming by cursor get it too.
 */
export function mergeHubClaim(claims: Claims, e: FleetEvent): boolean {
  const old = claims.get(e.ip)?.get(e.origin);
  if (old?.held && !e.held && old.id === e.id && old.detectedAt === e.detectedAt) {
    claims.get(e.ip)!.set(e.origin, e);
    return true;
  }
  return mergeClaim(claims, e);
}

/**
 * How long a ban with `bantime` seconds lasts after `priors` earlier bans of the same address
 * (`--escalate`): bantime x factor^priors, capped at `maxSeconds`, never shorter than bantime.
 */
export function escalatedSeconds(bantime: number, priors: number, factor: number, maxSeconds: number): number {
  return Math.max(bantime, Math.min(maxSeconds, bantime * factor ** Math.min(priors, 64)));
}

/**
 * The ban claims on one address that are live now: not ended, and not lifted by a newer admin
 * unban (origin `*`). Held claims are included, marked; empty when nothing claims the address.
 */
export function liveClaims(byOrigin: Map<string, FleetEvent>, now: number): ListedClaim[] {
  const all = byOrigin.get(ALL_ORIGINS);
  const out: ListedClaim[] = [];
  for (const c of byOrigin.values()) {
    if (c.kind !== "ban" || (c.until !== null && c.until <= now) || (all && !isNewer(c, all))) continue;
    const held = (c as { held?: boolean }).held === true;
    out.push({ origin: c.origin, jail: c.jail, until: c.until, detectedAt: c.detectedAt, seq: c.seq, ...(held ? { held } : {}) });
  }
  return out;
}

/**
 * Counts for `GET /v1/whoami`: addresses the fleet blocks now (what every agent holds in its
 * kernel set, its own node's bans included) and the live ban claims, neither counting what
 * `--quorum` holds back.
 */
export function countBlocked(claims: Claims, now: number): { blocked: number; claims: number } {
  let blocked = 0;
  let live = 0;
  for (const byOrigin of claims.values()) {
    const relayed = liveClaims(byOrigin, now).filter((c) => !c.held);
    if (!relayed.length) continue;
    blocked++;
    live += relayed.length;
  }
  return { blocked, claims: live };
}

/** The addresses `countBlocked` counts as blocked: what every agent's kernel should hold (`GET /v1/blocked`, for `ban.ts status`). */
export function blockedAddresses(claims: Claims, now: number): string[] {
  const out: string[] = [];
  for (const [ip, byOrigin] of claims) if (liveClaims(byOrigin, now).some((c) => !c.held)) out.push(ip);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Fleet rules: --quorum and --escalate as pure decisions (inputs in, decision out)

/** The rules a hub applies to new bans: `--quorum`, `--trust`, `--escalate`, `--max-claims-per-node`. */
export interface FleetRules {
  quorum: number;
  trusted: string[];
  escalate?: { factor: number; maxSeconds: number };
  /** Most ban claims one node may hold (none: no limit). */
  maxClaimsPerNode?: number;
}

/**
 * Default `--max-claims-per-node`: one node may claim 100,000 addresses, 1/20 of what an agent's
 * kernel set holds (2,097,152), so a single compromised node at the default rate cannot fill
 * every agent's set (50/s fills one in 11.6 h), while a busy honest one (a few thousand live
 * bans) is far below it.
 */
export const DEFAULT_MAX_CLAIMS_PER_NODE = 100_000;

/** What the fleet rules decide for one new event. */
export interface RuleDecision {
  /** `--quorum`: too few nodes claim the address, so the event is held back. */
  hold?: { claimers: number; quorum: number };
  /** Held claims this event releases: copies no longer held, to be stored (and given seqs) with it. */
  release: FleetEvent[];
  /** `--escalate`: the hub's escalation claim for a repeat offender (to be given a seq), and why. */
  escalation?: { event: FleetEvent; priors: number; bantime: number; seconds: number };
}

/**
 * The nodes that count towards `--quorum` on one address: those with a live ban claim, so a
 * claim an admin unban lifted is no vote for banning the address again. Held claims count.
 */
export function quorumClaimers(byOrigin: AddressClaims, now: number): number {
  return liveClaims(byOrigin, now).filter((c) => c.origin !== ESCALATION_ORIGIN).length;
}

/**
 * `--quorum` and `--escalate` for a new event `e` from `sender`, given the address's claims with
 * `e` merged in and the detection times of the address's earlier bans (`offenses`). Holds `e`
 * back while too few nodes claim the address; otherwise releases the claims held before it
 * (copies with new seqs, so agents resuming by cursor get them); adds the escalation claim for
 * a repeat offender. Changes, counts and logs nothing: the caller does that with the decision.
 */
export function decideRules(rules: FleetRules, sender: string, e: FleetEvent, byOrigin: AddressClaims, offenses: readonly number[], now: number): RuleDecision {
  const decision: RuleDecision = { release: [] };
  if (e.kind !== "ban" || e.origin === ALL_ORIGINS) return decision;
  if (rules.quorum > 1 && !rules.trusted.includes(sender)) {
    const claimers = quorumClaimers(byOrigin, now);
    if (claimers < rules.quorum) decision.hold = { claimers, quorum: rules.quorum };
  }
  if (!decision.hold) {
    const admin = byOrigin.get(ALL_ORIGINS);
    for (const c of byOrigin.values()) {
      if (c.held && c !== e && !isExpired(c, now) && !(admin && !isNewer(c, admin))) decision.release.push({ ...c, seq: "", held: undefined });
    }
  }
  if (rules.escalate && e.until !== null) {
    const { factor, maxSeconds } = rules.escalate;
    const horizon = now - maxSeconds * 1000;
    const priors = offenses.filter((t) => t > horizon && t !== e.detectedAt).length;
    const bantime = Math.round((e.until - e.detectedAt) / 1000);
    const seconds = escalatedSeconds(bantime, priors, factor, maxSeconds);
    const current = byOrigin.get(ESCALATION_ORIGIN);
    const until = Math.max(e.detectedAt + seconds * 1000, current?.kind === "ban" && current.until !== null ? current.until : 0);
    if (seconds > bantime && until > e.until) {
      const event: FleetEvent = { ...e, seq: "", origin: ESCALATION_ORIGIN, until, escalation: Math.round((seconds / bantime) * 100) / 100, ...(decision.hold ? { held: true } : {}) };
      decision.escalation = { event, priors, bantime, seconds };
    }
  }
  return decision;
}

/**
 * The counts /metrics, /v1/whoami and /healthz report, kept up to date as claims change and end
 * instead of walked per request: per address, the origins whose ban claim is live, relayed and
 * lifted by no newer admin unban; per origin, how many such claims it holds; the addresses they
 * block; the claims `--quorum` holds back (until pruned). An address is recounted when its claims change and
 * when its next claim ends (a heap of end times), so a read costs the claims that ended since
 * the last read plus one entry per origin: O(nodes), not O(claims).
 */
export class ClaimCounts {
  private readonly byAddress = new Map<string, { live: string[]; held: number }>();
  private readonly byOrigin = new Map<string, number>();
  private blocked = 0;
  private held = 0;
  /** Min-heap of (end time, address): when an address must be recounted; `next` is each address's earliest entry. */
  private readonly heap: Array<[number, string]> = [];
  private readonly next = new Map<string, number>();
  /** Addresses whose claims changed since the last read: recounted then, at the reader's time. */
  private readonly dirty = new Set<string>();

  /** The claims of address `ip` changed. */
  touch(ip: string): void {
    this.dirty.add(ip);
  }

  /** Counts address `ip` again from its claims (`undefined`: it has none) as they stand at `now`. */
  private recount(ip: string, byOrigin: AddressClaims | undefined, now: number): void {
    const old = this.byAddress.get(ip);
    if (old) {
      for (const o of old.live) this.addOrigin(o, -1);
      if (old.live.length) this.blocked--;
      this.held -= old.held;
      this.byAddress.delete(ip);
    }
    if (!byOrigin) return;
    const admin = byOrigin.get(ALL_ORIGINS);
    const live: string[] = [];
    let held = 0;
    let ends = Infinity;
    for (const c of byOrigin.values()) {
      // Held claims count as /metrics always counted them: every one the hub holds until pruned.
      if (c.held) held++;
      if (c.held || c.kind !== "ban" || isExpired(c, now) || (admin && !isNewer(c, admin))) continue;
      live.push(c.origin);
      if (c.until !== null) ends = Math.min(ends, c.until);
    }
    if (!live.length && !held) return;
    this.byAddress.set(ip, { live, held });
    for (const o of live) this.addOrigin(o, 1);
    if (live.length) this.blocked++;
    this.held += held;
    const scheduled = this.next.get(ip);
    if (ends !== Infinity && (scheduled === undefined || ends < scheduled)) {
      this.next.set(ip, ends);
      this.push([ends, ip]);
    }
  }

  /** Recounts, from `claims`, every address touched since the last call and every one whose earliest claim ended by `now`. */
  expire(claims: Claims, now: number): void {
    for (const ip of this.dirty) this.recount(ip, claims.get(ip), now);
    this.dirty.clear();
    while (this.heap.length && this.heap[0][0] <= now) {
      const [at, ip] = this.pop();
      // An entry superseded by an earlier one for the same address was recounted then.
      if (this.next.get(ip) !== at) continue;
      this.next.delete(ip);
      this.recount(ip, claims.get(ip), now);
    }
  }

  /** The blocked addresses, as of the last `expire`. */
  *addresses(): Generator<string> {
    for (const [ip, a] of this.byAddress) if (a.live.length) yield ip;
  }

  /** Addresses blocked, live relayed claims in all, per origin, and claims held, as of the last `expire`. */
  totals(): { blocked: number; claims: number; held: number; byOrigin: ReadonlyMap<string, number> } {
    let claims = 0;
    for (const n of this.byOrigin.values()) claims += n;
    return { blocked: this.blocked, claims, held: this.held, byOrigin: this.byOrigin };
  }

  private addOrigin(origin: string, d: number): void {
    const n = (this.byOrigin.get(origin) ?? 0) + d;
    if (n) this.byOrigin.set(origin, n);
    else this.byOrigin.delete(origin);
  }

  private push(item: [number, string]): void {
    const h = this.heap;
    h.push(item);
    for (let i = h.length - 1; i > 0; ) {
      const up = (i - 1) >> 1;
      if (h[up][0] <= h[i][0]) break;
      [h[up], h[i]] = [h[i], h[up]];
      i = up;
    }
  }

  private pop(): [number, string] {
    const h = this.heap;
    const top = h[0];
    const last = h.pop()!;
    if (h.length) {
      h[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && h[l][0] < h[m][0]) m = l;
        if (r < h.length && h[r][0] < h[m][0]) m = r;
        if (m === i) break;
        [h[m], h[i]] = [h[i], h[m]];
        i = m;
      }
    }
    return top;
  }
}

/**
 * What an admin's unban for every node (`admin`, origin `*`) must add to lift every ban claim on
 * the address whatever its timestamp: the `*` claim lifts the claims older than it, so each
 * claim dated after it gets a tombstone of its own origin, at its own
 * detection time and newer by its id alone. A later ban from that origin still counts, and no
 * other origin's claims are touched. The hub dates claims no later than it received them and an
 * all-nodes unban at its arrival (`toEvent`), so only a claim received in the same millisecond,
 * or stored by an older hub with its sender's time (an origin whose clock ran ahead), is not older.
 */
export function adminLifts(byOrigin: AddressClaims, admin: FleetEvent, now: number): FleetEvent[] {
  const out: FleetEvent[] = [];
  for (const c of byOrigin.values()) {
    if (c.kind !== "ban" || c.origin === ALL_ORIGINS || isExpired(c, now) || !isNewer(c, admin)) continue;
    out.push({ seq: "", kind: "unban", ip: c.ip, origin: c.origin, jail: c.jail, until: eventUntil("unban", c.detectedAt, undefined, c.until), detectedAt: c.detectedAt, id: `${c.id}.lifted`, relayedAt: now });
  }
  return out;
}

/**
 * The fleet's claims as this hub knows them, and what it decides with them. `claims` hold what
 * is durable (what syncs, listings and the status page show); `pending` what was accepted and is
 * on its way to the store, newest per (ip, origin): decisions see both, so a burst is decided
 * against itself, yet a sync never shows an agent an event a crash could still take back.
 */
export class FleetState {
  readonly claims: Claims = new Map();
  /** What /metrics and /v1/whoami report of the claims, kept up to date as they change and end. */
  private readonly counts = new ClaimCounts();
  private readonly pending: Claims = new Map();
  /** `--escalate`: detection times of the bans each address got, within the last maxSeconds. */
  private readonly offenses = new Map<string, number[]>();
  /** Position of the last durable event: the most a sync may promise an agent. */
  durable = "0";
  /** Ban claims per node origin in `claims` (ended ones until the next prune): what `--max-claims-per-node` bounds. */
  private readonly perOrigin = new Map<string, number>();

  constructor(private readonly rules: FleetRules) {}

  /**
   * Why `origin` may not claim one more address with a ban of `ip` (`--max-claims-per-node`), or
   * undefined: a node at its limit may still renew, lengthen or lift what it claims. Counted on
   * what is durable, so a burst in flight can pass the limit by what it holds.
   */
  claimLimit(origin: string, ip: string, now: number): string | undefined {
    const max = this.rules.maxClaimsPerNode;
    const held = this.perOrigin.get(origin) ?? 0;
    if (max === undefined || held < max) return undefined;
    const own = this.claims.get(ip)?.get(origin);
    if (own?.kind === "ban" && !isExpired(own, now)) return undefined;
    return `Node ${origin} already claims ${held} address(es), the limit (--max-claims-per-node ${max}); a ban of a new address waits until some of them end or an admin lifts them`;
  }

  /** Takes one event the store held when the hub started. */
  load(e: FleetEvent): void {
    this.mergeDurable(e);
    this.noteOffense(e);
  }

  /**
   * Decides frame `f` from `sender` against every claim accepted so far: a replay (or an older
   * event) gives the claim that stands, for the ack; a new event gives the batch to store: the
   * event, the held claims it releases and an escalation claim, with the rules' decision.
   */
  decide(sender: string, f: BanFrame | UnbanFrame, now: number): { standing: FleetEvent; event: FleetEvent } | { event: FleetEvent; batch: FleetEvent[]; decision: RuleDecision } {
    const view: Claims = new Map([[f.ip, new Map([...(this.claims.get(f.ip) ?? []), ...(this.pending.get(f.ip) ?? [])])]]);
    const event = toEvent(f, sender, "", view, now);
    // A frame sent again (a retry, a spool delivered twice) is the claim that stands, even when
    // the hub placed its detection a few ms apart from the first time (a skewed sender's clock).
    const prior = view.get(f.ip)!.get(event.origin);
    if (prior?.id === event.id) return { standing: prior, event: prior };
    if (!mergeClaim(view, event)) return { standing: view.get(f.ip)!.get(event.origin)!, event };
    const decision = decideRules(this.rules, sender, event, view.get(f.ip)!, this.offenses.get(f.ip) ?? [], now);
    if (decision.hold) event.held = true;
    const lifts = event.origin === ALL_ORIGINS ? adminLifts(view.get(f.ip)!, event, now) : [];
    return { event, batch: [event, ...decision.release, ...(decision.escalation ? [decision.escalation.event] : []), ...lifts], decision };
  }

  /**
   * The live ban claims on `ip` once `batch` (durable, but maybe not read back from the store
   * yet) joins what the hub holds: what an admin's unban for every node left, for its ack.
   */
  remaining(ip: string, batch: FleetEvent[], now: number): number {
    const view: Claims = new Map([[ip, new Map([...(this.claims.get(ip) ?? []), ...(this.pending.get(ip) ?? [])])]]);
    for (const e of batch) if (e.ip === ip) mergeHubClaim(view, e);
    return liveClaims(view.get(ip)!, now).length;
  }

  /** A decided batch goes to the store: its claims are pending until durable. */
  stage(batch: FleetEvent[]): void {
    for (const e of batch) mergeHubClaim(this.pending, e);
    if (batch[0].until !== null) this.noteOffense(batch[0]);
  }

  /** The store answered for `batch` (durable, refused or failed): none of it is pending any more. */
  unstage(batch: FleetEvent[]): void {
    for (const e of batch) this.dropPending(e);
  }

  /** Events now durable (the journal flushed them, or they were read from the shared stream), in order: they join the claims. */
  commit(events: FleetEvent[]): FleetEvent[] {
    for (const e of events) {
      this.mergeDurable(e);
      this.dropPending(e);
    }
    this.durable = events[events.length - 1].seq;
    return events;
  }

  /** Claims a reload of the store gave (the shared stream was trimmed past this hub): the newer ones join the claims and are returned in order. */
  repair(events: FleetEvent[]): FleetEvent[] {
    return events.filter((e) => this.mergeDurable(e)).sort((a, b) => comparePositions(a.seq, b.seq));
  }

  /** Forgets ended claims and offenses older than `--escalate-max`. */
  prune(now: number): void {
    for (const ip of pruneClaims(this.claims, now)) this.counts.touch(ip);
    // The prune walked every claim anyway: count them again (what ended is gone now).
    this.perOrigin.clear();
    for (const byOrigin of this.claims.values()) for (const c of byOrigin.values()) this.tally(c, 1);
    if (!this.rules.escalate) return;
    const horizon = now - this.rules.escalate.maxSeconds * 1000;
    for (const [ip, list] of this.offenses) {
      const kept = list.filter((t) => t > horizon);
      if (kept.length) this.offenses.set(ip, kept);
      else this.offenses.delete(ip);
    }
  }

  /** (address, origin) claims held, ended ones included until pruned: the lines a compaction writes at most. */
  size(): number {
    let n = 0;
    for (const byOrigin of this.claims.values()) n += byOrigin.size;
    return n;
  }

  /** Every claim not ended by `now`: what a compacted journal holds. */
  *live(now: number): Generator<FleetEvent> {
    for (const byOrigin of this.claims.values()) for (const e of byOrigin.values()) if (!isExpired(e, now)) yield e;
  }

  /**
   * The fleet's counts now: addresses with at least one live relayed ban claim lifted by no
   * newer admin unban (the fleet's blocked addresses), those claims in all and per origin, and
   * the claims `--quorum` holds. Kept up to date, not walked: O(origins) per call.
   */
  totals(now: number): ReturnType<ClaimCounts["totals"]> {
    this.counts.expire(this.claims, now);
    return this.counts.totals();
  }

  /** Addresses the fleet blocks now (see `totals`). */
  blockedCount(now: number): number {
    return this.totals(now).blocked;
  }

  /** Those addresses, from the kept counts: what every agent's kernel should hold. */
  blockedAddresses(now: number): string[] {
    this.counts.expire(this.claims, now);
    return [...this.counts.addresses()];
  }

  /** Merges a durable event into the claims, keeping the per-node count in step; true when it changed them. */
  private mergeDurable(e: FleetEvent): boolean {
    const old = this.claims.get(e.ip)?.get(e.origin);
    if (!mergeHubClaim(this.claims, e)) return false;
    this.tally(old, -1);
    this.tally(e, 1);
    this.counts.touch(e.ip);
    return true;
  }

  private tally(c: FleetEvent | undefined, by: 1 | -1): void {
    if (!c || c.kind !== "ban" || c.origin === ALL_ORIGINS || c.origin === ESCALATION_ORIGIN) return;
    const n = (this.perOrigin.get(c.origin) ?? 0) + by;
    if (n > 0) this.perOrigin.set(c.origin, n);
    else this.perOrigin.delete(c.origin);
  }

  private dropPending(e: FleetEvent): void {
    const byOrigin = this.pending.get(e.ip);
    if (byOrigin?.get(e.origin) === e) byOrigin.delete(e.origin);
    if (byOrigin?.size === 0) this.pending.delete(e.ip);
  }

  private noteOffense(e: FleetEvent): void {
    if (!this.rules.escalate || e.kind !== "ban" || e.origin === ALL_ORIGINS || e.origin === ESCALATION_ORIGIN) return;
    const list = this.offenses.get(e.ip) ?? [];
    if (!list.includes(e.detectedAt)) list.push(e.detectedAt);
    if (list.length > 64) list.shift();
    this.offenses.set(e.ip, list);
  }
}

// ---------------------------------------------------------------------------------------------
// Store: where accepted events become durable. The journal (one hub) and Redis (several hubs)
// implement it; `openStore` chooses, and nothing else in the hub asks which it has.

/** What every store gives the hub. */
interface Store {
  /** The `hub` of a cursor: the journal's own id, or the fleet id every hub on one Redis shares. */
  readonly hubId: string;
  /** Reads what the store holds, each event to `each`, before anything is appended. */
  load(each: (e: FleetEvent) => void): Promise<void>;
  /** Gives each event its position (its seq) and resolves with them once the events are durable. */
  append(events: FleetEvent[]): Promise<string[]>;
  /** Resolves once everything appended so far is durable (or failed). */
  barrier(): Promise<void>;
  /**
   * The ack's seq for `event`, which the hub's claims say changes nothing (`standing` is as new
   * or newer): a replay, or an older event, is acked once what stands is durable.
   */
  replay(standing: FleetEvent, event: FleetEvent): Promise<string>;
  /** True when an agent at `seq` resumes from it: every event after it can still be had; `durable` is the hub's last durable position. */
  resumes(seq: string, durable: string): Promise<boolean>;
  /** The position a welcome, /healthz and the listings report: the last event appended (journal) or read (stream). */
  position(): string;
  /** Why it takes no event now (a write failed, Redis cannot be reached), or undefined: checked before each event, so cheap. */
  unavailable(): string | undefined;
  health(): StoreHealth;
  /** The startup line after "listening on ...": what the hub serves, from where. */
  describe(addresses: number): string;
  close(): Promise<void>;
}

/** A store's state for /healthz and /metrics. */
interface StoreHealth {
  /** It takes events now. */
  ok: boolean;
  /** `banshare_seq`: the journal's seq, or the stream entries this hub has read since it started. */
  count: number;
  /** Fields of its own in /healthz, and lines of its own in /metrics. */
  fields: Record<string, string>;
  metrics: string[];
}

/** What a store tells the hub: events as they become durable, in order; claims a reload found; an error after which it stores nothing (the hub stops). */
interface StoreListener {
  durable(events: FleetEvent[]): void;
  repaired(events: FleetEvent[]): void;
  fatal(why: string): void;
  log(line: string): void;
}

/** What a journal compacts to: the claims it should keep (read only, never changed by the journal). */
interface StoreSnapshot {
  size(): number;
  live(now: number): Iterable<FleetEvent>;
}

/** Opens the store `opts` names and loads what it holds into `each`: the one place a store is chosen. */
async function openStore(opts: HubOptions, listener: StoreListener, snapshot: StoreSnapshot, each: (e: FleetEvent) => void): Promise<Store> {
  const store: Store = opts.store ? new RedisStore(opts, listener, snapshot) : new Journal(opts.statePath, listener, snapshot);
  await store.load(each);
  return store;
}

// ---------------------------------------------------------------------------------------------
// Journal: append-only JSONL, group commit, compaction by rename

interface JournalHeader {
  journal: typeof JOURNAL_MAGIC;
  v: number;
  hub: string;
  seq: number;
}

/** What a journal file holds. */
export interface JournalContents {
  hubId: string;
  seq: number;
  events: FleetEvent[];
  skipped: number;
}

/** How many damaged lines a start lists one by one; the rest are counted in the summary line. */
const MAX_DAMAGED_LISTED = 10;
/** Below this much free space the journal's check does not call the disk writable again. */
const JOURNAL_MIN_FREE_BYTES = 64 * 1024;
/** While the journal cannot be written: how often it checks whether it can again. */
const JOURNAL_PROBE_MS = 1000;
/** After a compaction failed: how long before the next try (the journal keeps appending meanwhile). */
const COMPACT_RETRY_MS = 60_000;

function parseJournalHeader(line: string): JournalHeader | undefined {
  try {
    const h = JSON.parse(line) as JournalHeader;
    return h?.journal === JOURNAL_MAGIC && typeof h.hub === "string" ? h : undefined;
  } catch {
    return undefined;
  }
}

/** One stored event (a journal line, a Redis entry), or why it is damaged: not JSON, or not an event as the hub writes them. */
function checkStoredEvent(line: string): FleetEvent | string {
  let e: unknown;
  try {
    e = JSON.parse(line);
  } catch {
    return "not JSON";
  }
  return checkEvent(e) ?? (e as FleetEvent);
}

/** One stored event, or undefined for a torn or damaged one. */
function parseJournalLine(line: string): FleetEvent | undefined {
  const e = checkStoredEvent(line);
  return typeof e === "string" ? undefined : e;
}

/** What reading a journal found besides its events. */
interface JournalRead {
  hubId: string;
  seq: number;
  /** Event lines: read, and damaged (skipped). */
  events: number;
  skipped: number;
  /** The first MAX_DAMAGED_LISTED damaged lines, as "line N: why". */
  damaged: string[];
  /** Bytes up to the end of the last line ending in a newline: anything after it is a write that never completed. */
  whole: number;
}

/**
 * Reads a journal file line by line, handing each event to `each` as it is read: the hub never
 * holds the file's text or an array of its events. Lines are split on bytes, so `whole` is exact
 * whatever a damaged line holds. A torn (unterminated) last line or a damaged one is skipped and
 * counted, never fatal. Undefined for an empty file; throws when the file is not a journal.
 */
async function readJournalLines(path: string, each: (e: FleetEvent) => void): Promise<JournalRead | undefined> {
  let header: JournalHeader | undefined;
  const read: JournalRead = { hubId: "", seq: 0, events: 0, skipped: 0, damaged: [], whole: 0 };
  let lineNo = 0;
  const stranger = () => new UsageError(`${path} is not a banshare journal: refusing to overwrite it`);
  /** The first line is no header: a stranger's file, or a journal whose header is damaged (then the next line is an event). */
  let headless = false;
  const line = (text: string, terminated: boolean) => {
    lineNo++;
    if (!header && !headless) {
      header = parseJournalHeader(text);
      if (header) read.seq = Number(header.seq) || 0;
      else headless = true;
      return;
    }
    if (!text) return;
    // An unterminated last line is a write that never completed: never acked, whatever it holds.
    let e = terminated ? checkStoredEvent(text) : "torn (no newline: a write that never completed)";
    if (typeof e !== "string" && !/^\d{1,15}$/.test(e.seq)) e = `event seq ${JSON.stringify(e.seq)}`;
    if (!header) {
      if (typeof e === "string") throw stranger();
      // A new hub id: no agent's cursor can be trusted against this journal, so each takes a full sync.
      header = { journal: JOURNAL_MAGIC, v: 1, hub: randomBytes(8).toString("hex"), seq: 0 };
      read.skipped++;
      read.damaged.push("line 1: the header is damaged; the hub takes a new id, and every agent a full sync");
    }
    if (typeof e === "string") {
      read.skipped++;
      if (read.damaged.length < MAX_DAMAGED_LISTED) read.damaged.push(`line ${lineNo}: ${e}`);
      return;
    }
    read.events++;
    each(e);
    read.seq = Math.max(read.seq, Number(e.seq));
  };
  let rest: Buffer = Buffer.alloc(0);
  let offset = 0;
  for await (const chunk of createReadStream(path) as AsyncIterable<Buffer>) {
    const data = rest.length ? Buffer.concat([rest, chunk]) : chunk;
    let start = 0;
    for (let nl = data.indexOf(10); nl >= 0; nl = data.indexOf(10, start)) {
      line(data.subarray(start, nl).toString("utf8"), true);
      start = nl + 1;
      read.whole = offset + start;
    }
    offset += start;
    rest = Buffer.from(data.subarray(start));
  }
  if (rest.length) line(rest.toString("utf8"), false);
  if (headless && !header) throw stranger();
  return header && { ...read, hubId: header.hub };
}

/** What the journal at `path` holds, read as the hub reads it when it starts; undefined for an empty file. */
export async function readJournal(path: string): Promise<JournalContents | undefined> {
  const events: FleetEvent[] = [];
  const read = await readJournalLines(path, (e) => events.push(e));
  return read && { hubId: read.hubId, seq: read.seq, skipped: read.skipped, events };
}

/** Writes all of `text` at `position`, however many writes it takes: a short write is not success. */
async function writeWhole(fh: FileHandle, text: string, position: number): Promise<number> {
  const buf = Buffer.from(text, "utf8");
  for (let done = 0; done < buf.length; ) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
    if (bytesWritten <= 0) throw new Error(`short write: ${done} of ${buf.length} bytes written`);
    done += bytesWritten;
  }
  return buf.length;
}

/**
 * The embedded store: one hub's JSONL file (none without `--state`), fsync before ack, compacted
 * to the live claims as it grows. An event is acked only once its line is whole on disk; when a
 * write fails (a full or read-only disk) the events not written are refused, the file is cut back
 * to its last whole line and their seqs are given again (no one saw them), and the journal takes
 * events again as soon as a write lands. It holds the file open only while it writes.
 */
class Journal implements Store {
  hubId = randomBytes(8).toString("hex");
  /** The seq of the last event appended: the journal numbers the events, 1, 2, 3... */
  private seq = 0;
  /** The seq of the last event whose line is whole on disk. */
  private written = 0;
  private queued: FleetEvent[] = [];
  private waiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  private flushing = false;
  private lines = 0;
  /** Claims counted at the last check (or written by the last compaction), and when. */
  private counted = { live: 0, at: 0 };
  /** No compaction before this time (one failed). */
  private compactAfter = 0;
  /** Bytes of whole, fsynced lines: where the next line goes; anything past it is a failed write to cut. */
  private bytes = 0;
  /** While the journal cannot be written: why, since when, and how many events it refused. */
  private failing?: { why: string; since: number; refused: number };
  private probe?: NodeJS.Timeout;

  constructor(
    private readonly path: string | undefined,
    private readonly listener: StoreListener,
    private readonly snapshot: StoreSnapshot,
  ) {}

  /** Reads the journal (if any) and compacts it before the first append; a failed compaction keeps the file as it was. */
  async load(each: (e: FleetEvent) => void): Promise<void> {
    if (!this.path) return;
    await mkdir(dirname(this.path), { recursive: true });
    const read = existsSync(this.path) ? await readJournalLines(this.path, each) : undefined;
    if (read) {
      this.hubId = read.hubId;
      this.seq = this.written = read.seq;
      for (const d of read.damaged) this.listener.log(`warning: ${this.path} ${d}: skipped`);
      if (read.skipped) this.listener.log(`warning: skipped ${read.skipped} torn or corrupt line(s) in ${this.path}${read.skipped > read.damaged.length ? ` (the first ${read.damaged.length} listed above)` : ""}; every other event is kept`);
    }
    try {
      await this.compact();
    } catch (e) {
      if (!read) throw e;
      // The journal as it was still holds everything: go on with it, appending after its last whole line.
      this.bytes = read.whole;
      this.lines = read.events;
      this.compactAfter = Date.now() + COMPACT_RETRY_MS;
      this.listener.log(`warning: could not compact ${this.path} (${(e as Error).message}); keeping it as it is`);
    }
  }

  /**
   * Rewrites the journal as the live claims: temp file, every byte checked, fsync, size checked,
   * rename, fsync the folder. Throws (the temp file removed, the journal untouched) when any step fails.
   */
  private async compact(): Promise<void> {
    if (!this.path) return;
    const tmp = `${this.path}.tmp`;
    const out = await open(tmp, "w", 0o600);
    let size = 0;
    let lines = 0;
    try {
      // The last seq on disk: events queued meanwhile follow with their own.
      const header: JournalHeader = { journal: JOURNAL_MAGIC, v: 1, hub: this.hubId, seq: this.written };
      let chunk = JSON.stringify(header) + "\n";
      for (const e of this.snapshot.live(Date.now())) {
        chunk += JSON.stringify(e) + "\n";
        lines++;
        if (chunk.length > 1 << 20) {
          size += await writeWhole(out, chunk, size);
          chunk = "";
        }
      }
      size += await writeWhole(out, chunk, size);
      await out.sync();
      const on = (await out.stat()).size;
      if (on !== size) throw new Error(`the new file holds ${on} of ${size} bytes`);
    } catch (e) {
      await out.close().catch(() => {});
      await rm(tmp, { force: true }).catch(() => {});
      throw e;
    }
    await out.close();
    await rename(tmp, this.path);
    const dir = await open(dirname(this.path), "r");
    await dir.sync().finally(() => dir.close());
    this.lines = lines;
    this.counted = { live: lines, at: Date.now() };
    this.bytes = size;
  }

  /** Numbers the events and resolves with their seqs once they are durable. Every event queued meanwhile shares one fsync. */
  append(events: FleetEvent[]): Promise<string[]> {
    const seqs = events.map((e) => (e.seq = String(++this.seq)));
    for (const e of events) this.queued.push(e);
    const p = new Promise<string[]>((resolve, reject) => this.waiters.push({ resolve: () => resolve(seqs), reject }));
    if (!this.flushing) void this.flush();
    return p;
  }

  async barrier(): Promise<void> {
    if (this.flushing || this.queued.length) await this.append([]);
  }

  /** The journal holds all the hub's claims hold: the standing claim is the answer, once written. */
  async replay(standing: FleetEvent): Promise<string> {
    await this.barrier();
    return standing.seq;
  }

  /** Only a seq this journal gave, and no later than what is durable: a cursor ahead of it (a journal restored from a backup) full-syncs. */
  async resumes(seq: string, durable: string): Promise<boolean> {
    return /^\d+$/.test(seq) && comparePositions(seq, durable) <= 0;
  }

  position(): string {
    return String(this.seq);
  }

  /** Always undefined: every event tries the disk, so the first write that lands ends a failure. */
  unavailable(): string | undefined {
    return undefined;
  }

  health(): StoreHealth {
    const f = this.failing;
    return {
      ok: !f,
      count: this.seq,
      fields: f ? { store: "down", error: `cannot write ${this.path}: ${f.why}` } : {},
      metrics: [
        ...metric("banshare_journal_bytes", "gauge", "Size of the journal file (--state).", [["", this.bytes]]),
        ...metric("banshare_store_up", "gauge", "1 while the journal (--state) can be written; 0 while it refuses events (a full or read-only disk).", [["", f ? 0 : 1]]),
      ],
    };
  }

  describe(addresses: number): string {
    return `as hub ${this.hubId}, ${addresses} address(es) claimed, seq ${this.seq}${this.path ? "" : " (no --state: nothing survives a restart)"}`;
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    let fh: FileHandle | undefined;
    try {
      // Let the current burst of frames queue up first: one write and one fsync for all of them.
      await new Promise((r) => setImmediate(r));
      while (this.queued.length || this.waiters.length) {
        const events = this.queued.splice(0);
        const waiters = this.waiters.splice(0);
        if (this.path && events.length) {
          try {
            fh ??= await this.reopen();
            const bytes = await writeWhole(fh, events.map((e) => JSON.stringify(e) + "\n").join(""), this.bytes);
            // fsync before ack: an acked ban must survive kill -9 and power loss.
            await fh.sync();
            this.bytes += bytes;
            this.written = Number(events[events.length - 1].seq);
            this.lines += events.length;
            this.recovered();
          } catch (e) {
            fh = await this.refuseUnwritten(e as Error, fh, events.length, waiters);
            continue;
          }
        }
        if (events.length) this.listener.durable(events);
        for (const w of waiters) w.resolve();
        if (this.compactionDue()) {
          await fh?.close();
          fh = undefined;
          await this.compact().catch((e: Error) => {
            this.compactAfter = Date.now() + COMPACT_RETRY_MS;
            this.listener.log(`warning: could not compact ${this.path} (${e.message}); keeping it as it is, next try in ${COMPACT_RETRY_MS / 1000} s`);
          });
        }
      }
    } catch (e) {
      for (const w of this.waiters.splice(0)) w.reject(e as Error);
      this.listener.fatal(`journal failed, stopping so that no unsaved event is acked: ${(e as Error).message}`);
    } finally {
      this.flushing = false;
      await fh?.close().catch(() => {});
    }
  }

  /**
   * Count (address, origin) claims, the lines a compaction writes: counting addresses, a fleet
   * whose nodes ban the same addresses would rewrite the whole journal every flush. Counting walks
   * every claim: not on every flush of a busy hub, only once the journal outgrew the last count,
   * or that count is 10 s old (claims may have expired since).
   */
  private compactionDue(): boolean {
    if (Date.now() < this.compactAfter) return false;
    if (!(this.lines > Math.max(10_000, 4 * this.counted.live) || (this.lines > 10_000 && Date.now() - this.counted.at > 10_000))) return false;
    this.counted = { live: this.snapshot.size(), at: Date.now() };
    return this.lines > Math.max(10_000, 4 * this.counted.live);
  }

  /** Opens the journal for writing at its last whole line, cutting what a failed write left after it. */
  private async reopen(): Promise<FileHandle> {
    const fh = await open(this.path!, "r+");
    try {
      const { size } = await fh.stat();
      if (size < this.bytes) throw new Error(`${this.path} is ${size} bytes, shorter than the ${this.bytes} this hub wrote: something else changed it`);
      if (size > this.bytes) {
        await fh.truncate(this.bytes);
        await fh.sync();
      }
      return fh;
    } catch (e) {
      await fh.close().catch(() => {});
      throw e;
    }
  }

  /**
   * A write failed: refuses this batch and everything queued after it (their seqs go back, as no
   * one saw them: not acked, not relayed, not whole on disk), cuts the file back to its last whole
   * line so the next line starts on its own, and closes it. One log line when the failure begins.
   */
  private async refuseUnwritten(e: Error, fh: FileHandle | undefined, batch: number, waiters: Array<{ reject: (e: Error) => void }>): Promise<undefined> {
    const refused = [...waiters, ...this.waiters.splice(0)];
    const count = batch + this.queued.splice(0).length;
    this.seq = this.written;
    const why = e.message;
    if (!this.failing) {
      this.listener.log(`error: cannot write the journal ${this.path} (${why}): refusing events until it can; every acked event is kept, and senders spool what is refused`);
      this.failing = { why, since: Date.now(), refused: 0 };
      this.probe = every(JOURNAL_PROBE_MS, () => void this.check());
    }
    this.failing.why = why;
    this.failing.refused += count;
    for (const w of refused) w.reject(new Error(`the journal cannot be written (${why})`));
    if (fh) {
      // If the cut fails too (a read-only disk), the next open makes it.
      await fh.truncate(this.bytes).then(() => fh.sync()).catch(() => {});
      await fh.close().catch(() => {});
    }
    return undefined;
  }

  /**
   * While failing, once a second: can the journal be written again (open, cut, fsync, and room
   * left)? Then /healthz says so before the next event. It counts as a flush: a write never runs
   * beside it (its cut would take a line being written).
   */
  private async check(): Promise<void> {
    if (!this.failing || this.flushing) return;
    this.flushing = true;
    try {
      const fh = await this.reopen();
      await fh.close();
      const fs = await statfs(this.path!);
      if (fs.bavail * fs.bsize < JOURNAL_MIN_FREE_BYTES) throw new Error(`no space left on device (${fs.bavail * fs.bsize} bytes free)`);
      this.recovered();
    } catch (e) {
      if (this.failing) this.failing.why = (e as Error).message;
    } finally {
      this.flushing = false;
      if (this.queued.length || this.waiters.length) void this.flush();
    }
  }

  /** A write landed (or the check passed): the journal takes events again. */
  private recovered(): void {
    if (!this.failing) return;
    clearInterval(this.probe);
    this.listener.log(`the journal ${this.path} can be written again after ${Math.round((Date.now() - this.failing.since) / 1000)} s; ${this.failing.refused} event(s) were refused meanwhile`);
    this.failing = undefined;
  }

  async close(): Promise<void> {
    clearInterval(this.probe);
    await this.barrier().catch(() => {});
  }
}
// ---------------------------------------------------------------------------------------------
// Shared store: a Redis stream of events and a hash of claims, for several hubs

/** Where a `--store` URL points: one Redis, or the master a set of Sentinels names. */
export interface RedisTarget {
  /** URL for the Redis client (the master's, once Sentinels named it). */
  url?: string;
  sentinels?: Array<{ host: string; port: number }>;
  master?: string;
  username?: string;
  password?: string;
  db: number;
  tls: boolean;
  /** The URL without its password, for logs. */
  display: string;
}

/**
 * Parses `--store`: `redis://[USER:PASS@]HOST:PORT[/DB]`, `rediss://...` (TLS), or
 * `redis-sentinel://[USER:PASS@]HOST:PORT,HOST:PORT/MASTER[/DB]`. Throws with one sentence.
 */
export function parseStoreUrl(s: string): RedisTarget {
  const m = /^(redis|rediss|redis-sentinel):\/\/(?:([^:@/]*)(?::([^@/]*))?@)?([^/@]+?)(?:\/([^/]*))?(?:\/(\d+))?\/?$/.exec(s);
  const bad = () => new UsageError(`Expected --store as redis://HOST:PORT/DB, rediss://HOST:PORT/DB or redis-sentinel://HOST:PORT,HOST:PORT/MASTER/DB, got ${JSON.stringify(s.replace(/:[^:@/]*@/, ":***@"))}`);
  if (!m) throw bad();
  const [, scheme, user, pass, hosts, fifth, sixth] = m;
  const username = user ? decodeURIComponent(user) : undefined;
  const password = pass !== undefined ? decodeURIComponent(pass) : undefined;
  const display = s.replace(/:[^:@/]*@/, ":***@");
  const hostPort = (h: string) => {
    const hm = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$/.exec(h);
    if (!hm) throw bad();
    return { host: hm[1].replace(/^\[|\]$/g, ""), port: Number(hm[2] ?? (scheme === "redis-sentinel" ? 26379 : 6379)) };
  };
  if (scheme === "redis-sentinel") {
    if (!fifth || !/^[A-Za-z0-9_.-]+$/.test(fifth)) throw bad();
    return { sentinels: hosts.split(",").map(hostPort), master: fifth, username, password, db: Number(sixth ?? 0), tls: false, display };
  }
  if (sixth !== undefined || hosts.includes(",") || (fifth !== undefined && fifth !== "" && !/^\d+$/.test(fifth))) throw bad();
  hostPort(hosts);
  return { url: s, username, password, db: Number(fifth || 0), tls: scheme === "rediss", display };
}

/** The keys of one fleet; one hash tag, so that on a Redis Cluster they share a slot (one Lua script touches them all). */
const REDIS_KEYS = { events: "banshare:{fleet}:events", claims: "banshare:{fleet}:claims", id: "banshare:{fleet}:id", epoch: "banshare:{fleet}:epoch", lock: "banshare:{fleet}:prune-lock" };

/**
 * Appends one event unless the claim stored for its (ip, origin) is as new or newer (the merge
 * rule of messages.ts: detectedAt, then id in byte order), all in one step, so two hubs accepting
 * for the same claim at once cannot leave the hash holding the older one. Stream entry and claim
 * are written together: the entry ID is the event's seq, put into the claim's JSON here.
 * Returns {1, id} when appended, {0, seq of the stored claim} when not.
 */
const APPEND_LUA = `
local function newer(at, id, oat, oid)
  if at ~= oat then return at > oat end
  local n = math.min(#id, #oid)
  for i = 1, n do
    local x, y = string.byte(id, i), string.byte(oid, i)
    if x ~= y then return x > y end
  end
  return #id > #oid
end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  local oat = tonumber(string.match(old, '"detectedAt":(%d+)'))
  local oid = string.match(old, '"id":"([^"]*)"')
  if oat and oid and not newer(tonumber(ARGV[3]), ARGV[4], oat, oid) then
    return {0, string.match(old, '^{"seq":"([^"]*)"')}
  end
end
local pos = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], '{"seq":"' .. pos .. '",' .. string.sub(ARGV[2], 2))
return {1, pos}
`;

/** Deletes the expired claims it is given (field, value pairs), each only if it still holds that value. */
const PRUNE_LUA = `
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
`;

/** The subset of a node-redis client the store uses. */
interface RedisClient {
  connect(): Promise<unknown>;
  sendCommand(args: string[]): Promise<unknown>;
  destroy(): void;
  on(event: "error", fn: (e: Error) => void): unknown;
}

/** Rejects with `what` if `p` has not settled within `ms` (a Redis host gone silent never answers). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer from Redis within ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

/**
 * Redis Streams store: every hub appends to one stream and reads it all (XREAD BLOCK), so every
 * hub relays every event, whichever hub accepted it. Claims live in one hash, written with the
 * stream entry, so a hub starting (or a hub whose agents need a full sync) has the fleet state.
 * One reading loop owns the connections: it (re)connects with backoff, re-resolving the master
 * through the Sentinels, and resumes XREAD after the last entry it handed on.
 *
 * A Redis can forget (restarted without its append-only file, or from an older snapshot, or
 * flushed): each hub remembers the highest stream ID it has seen and the store's epoch (a random
 * value written when the store was first used, and again by the hub that finds it lost). On every
 * reconnect and after every read it compares: a stream that ends before what this hub saw, a
 * missing epoch, or another epoch than the one it knew, is a loss. The hub says so (log line,
 * /healthz `storeLost`, `banshare_store_losses_total`) and writes back every claim it holds,
 * bans and unbans, through the append script, whose merge rule skips what the store still has:
 * the stream and the hash hold the fleet state again, and every hub's full syncs are complete.
 */
/** How long a hub remembers the events it acked for a write-back (its stream reader has them back in milliseconds), and at most how many. */
const RECENT_ACKED_MS = 60_000;
const MAX_RECENT_ACKED = 100_000;

class RedisStore implements Store {
  hubId = "";
  /** ID of the last stream entry handed to `listener.durable`: what this hub's agents have been sent. */
  private last = "0-0";
  /** The highest stream ID this hub has read or appended: the store ending before it forgot. */
  private seen = "0-0";
  /** The store's epoch as this hub last saw it ("" before the first look). */
  private epoch = "";
  /** The last loss found (when, what), for /healthz; the losses found and the claims written back since start, for /metrics. */
  private lost?: string;
  private lostAt = 0;
  private losses = 0;
  private writtenBack = 0;
  /** A write-back on its way, and whether one is still owed (a write-back that failed halfway). */
  private restoring?: Promise<void>;
  /**
   * Events this hub appended and acked in the last RECENT_ACKED_MS: until its stream reader has
   * read them back they are in no hub's claims, so a store emptied in that moment would lose
   * them; the write-back puts them back with the claims.
   */
  private readonly recentAcked: Array<{ e: FleetEvent; at: number }> = [];
  private owed = false;
  /** Stream entries this hub has read since it started: `banshare_seq` (a stream ID is no count). */
  private read = 0;
  /** The oldest cursor that resumes: the first entry the stream kept once trimmed ("0-0" before). */
  private trimmed = "0-0";
  private up = false;
  private cmd?: RedisClient;
  private reader?: RedisClient;
  private closing = false;
  private loop?: Promise<void>;
  private wake?: () => void;
  private timer?: NodeJS.Timeout;
  private sha = { append: "" };
  private createClient!: (o: object) => RedisClient;
  private readonly target: RedisTarget;
  private readonly maxLen: number;
  private readonly maxAgeMs: number;
  /** Replicas that must have an event before it is acked (`--store-replicas`, WAIT). */
  private readonly replicas: number;
  /** Appends on their way: a barrier waits for them. */
  private readonly inflight = new Set<Promise<unknown>>();

  constructor(
    opts: HubOptions,
    private readonly listener: StoreListener,
    /** The hub's claims: what a write-back puts into a store that forgot (read only). */
    private readonly snapshot: StoreSnapshot,
  ) {
    // Both rules decide against the address's claims as they stand when a ban arrives; hubs on
    // one Redis see each other's bans a moment late, so there they would not hold as documented.
    if (opts.escalate || (opts.quorum ?? 1) !== 1) throw new UsageError("--escalate and --quorum are not supported with --store yet");
    this.target = parseStoreUrl(opts.store!);
    this.maxLen = opts.streamMaxLen;
    this.maxAgeMs = opts.streamMaxAgeMs;
    this.replicas = opts.storeReplicas ?? 0;
  }

  /**
   * Connects, takes (or creates) the fleet id, loads the claims hash into `each` and starts
   * reading the stream after the point the snapshot is sure to cover. Throws if Redis cannot be
   * reached at start: a hub without its store would serve an empty fleet state.
   */
  async load(each: (e: FleetEvent) => void): Promise<void> {
    // Loaded here only: a single-hub fleet on its journal never loads the Redis client.
    const { createClient } = await import("redis");
    this.createClient = (o) => createClient(o) as unknown as RedisClient;
    await this.connect();
    // Snapshot: the stream's last ID first, then the claims. The hash may hold claims newer than
    // that ID too; reading the stream from it merges them again, which changes nothing.
    this.last = this.seen = await this.streamInfo(true);
    await this.verify();
    let count = 0;
    await this.scanClaims(this.cmd!, (e) => {
      each(e);
      count++;
    });
    this.listener.log(`store ${this.target.display}: fleet ${this.hubId}, ${count} claim(s) loaded, stream at ${this.last}`);
    this.loop = this.readLoop();
    this.timer = setInterval(() => void this.maintain().catch((e: Error) => this.listener.log(`warning: store maintenance: ${e.message}`)), 60_000);
    this.timer.unref();
  }

  /** Hands every claim of the hash to `each`, HSCAN by chunks (a fleet of 100k claims is never one reply). */
  private async scanClaims(cmd: RedisClient, each: (e: FleetEvent) => void): Promise<void> {
    let cursor = "0";
    do {
      const [next, flat] = (await cmd.sendCommand(["HSCAN", REDIS_KEYS.claims, cursor, "COUNT", "2000"])) as [string, string[]];
      for (let i = 1; i < flat.length; i += 2) {
        const e = parseJournalLine(flat[i]);
        if (e) each(e);
      }
      cursor = next;
    } while (cursor !== "0");
  }

  /** Connects both clients (the reader blocks in XREAD, so it has its own), and makes sure of the fleet id. */
  private async connect(): Promise<void> {
    let url = this.target.url;
    if (this.target.sentinels) url = await this.askSentinels();
    const make = () => {
      // No offline queue and no reconnect of its own: a command while Redis is away fails at
      // once (the sender is told `internal` and spools), and the reading loop reconnects.
      const c = this.createClient({ url, username: this.target.username, password: this.target.password, database: this.target.db, RESP: 2, disableOfflineQueue: true, socket: { reconnectStrategy: false, connectTimeout: 3000 } });
      // Errors of a client already replaced (an outage's late echo) must not drop the new ones.
      c.on("error", (e) => (c === this.cmd || c === this.reader) && this.fail(e));
      return c;
    };
    const cmd = make();
    const reader = make();
    try {
      await within(Promise.all([cmd.connect(), reader.connect()]), 5000, "connect");
      const fresh = randomBytes(8).toString("hex");
      await cmd.sendCommand(["SET", REDIS_KEYS.id, this.hubId || fresh, "NX"]);
      const id = (await cmd.sendCommand(["GET", REDIS_KEYS.id])) as string;
      if (this.hubId && id !== this.hubId) this.listener.log(`warning: store ${this.target.display} holds fleet ${id}, not ${this.hubId} as before: agents will full-sync`);
      this.hubId = id;
      this.sha.append = (await cmd.sendCommand(["SCRIPT", "LOAD", APPEND_LUA])) as string;
    } catch (e) {
      cmd.destroy();
      reader.destroy();
      throw e;
    }
    this.cmd = cmd;
    this.reader = reader;
  }

  /** The master's address from the first Sentinel that answers. */
  private async askSentinels(): Promise<string> {
    const errors: string[] = [];
    for (const s of this.target.sentinels!) {
      const c = this.createClient({ socket: { host: s.host, port: s.port, reconnectStrategy: false, connectTimeout: 2000 }, RESP: 2, disableOfflineQueue: true });
      c.on("error", () => {});
      try {
        await within(c.connect(), 3000, `sentinel ${s.host}:${s.port}`);
        const addr = (await within(c.sendCommand(["SENTINEL", "GET-MASTER-ADDR-BY-NAME", this.target.master!]), 3000, "sentinel")) as [string, string] | null;
        if (addr) return `${this.target.tls ? "rediss" : "redis"}://${addr[0].includes(":") ? `[${addr[0]}]` : addr[0]}:${addr[1]}`;
        errors.push(`${s.host}:${s.port} does not know master ${this.target.master}`);
      } catch (e) {
        errors.push(`${s.host}:${s.port}: ${(e as Error).message}`);
      } finally {
        c.destroy();
      }
    }
    throw new Error(`no Sentinel named the master: ${errors.join("; ")}`);
  }

  /**
   * Reads the stream's state: its last ID (with `last`), and the oldest cursor that resumes, kept
   * for cursor checks. Redis 7.0 does not count trimmed entries in max-deleted-entry-id, so a
   * trim shows as fewer entries than were ever added; a cursor before the first kept entry may
   * have missed a trimmed one (if it is the last trimmed one, it did not, but that cannot be told).
   */
  private async streamInfo(last = false): Promise<string> {
    const info = (await this.cmd!.sendCommand(["XINFO", "STREAM", REDIS_KEYS.events]).catch((e: Error) => {
      if (/no such key/i.test(e.message)) return undefined;
      throw e;
    })) as unknown[] | undefined;
    if (!info) return "0-0";
    const field = (k: string) => info[info.indexOf(k) + 1] as string;
    const first = info[info.indexOf("first-entry") + 1] as [string, string[]] | null;
    const trimmed = Number(field("entries-added")) > Number(field("length"));
    this.trimmed = !trimmed ? "0-0" : first ? first[0] : field("last-generated-id");
    return last ? field("last-generated-id") : this.trimmed;
  }

  /** Marks the store down (once per outage) and drops both connections; the reading loop reconnects. */
  private fail(e: Error): void {
    if (this.up) this.listener.log(`error: store ${this.target.display} unreachable (${e.message}); agents stay connected, events are refused until it is back`);
    this.up = false;
    const [cmd, reader] = [this.cmd, this.reader];
    this.cmd = this.reader = undefined;
    cmd?.destroy();
    reader?.destroy();
    this.wake?.();
  }

  /** Raises the highest stream ID this hub has seen. */
  private see(id: string): void {
    if (comparePositions(id, this.seen) > 0) this.seen = id;
  }

  /**
   * Compares the store with what this hub saw (and refreshes the trim horizon): a stream that
   * ends before the highest ID this hub saw, a missing epoch, or another epoch than the one it
   * knew, is a loss. The first look only learns the epoch (creating it in a new store).
   */
  private async verify(): Promise<void> {
    const cmd = this.cmd!;
    let epoch = (await cmd.sendCommand(["GET", REDIS_KEYS.epoch])) as string | null;
    const fresh = randomBytes(8).toString("hex");
    const created = !epoch && (await cmd.sendCommand(["SET", REDIS_KEYS.epoch, fresh, "NX"])) === "OK";
    epoch = created ? fresh : ((epoch ?? (await cmd.sendCommand(["GET", REDIS_KEYS.epoch]))) as string);
    const top = await this.streamInfo(true);
    const known = this.epoch;
    this.epoch = epoch;
    if (!known) return;
    const behind = comparePositions(top, this.seen) < 0;
    // Only the first hub to find it gives the store a new epoch: the others see that one.
    if (behind && top === "0-0") await this.lose(`it holds no stream, and this hub had read up to ${this.seen}: emptied (restarted without its append-only file, or flushed)`, top, epoch === known);
    else if (behind) await this.lose(`its stream ends at ${top}, before ${this.seen}, which this hub had read: rolled back (restarted from an older snapshot, or failed over to a replica that lagged)`, top, epoch === known);
    else if (created) await this.lose("its epoch key was gone: emptied (restarted without its append-only file, or flushed)", top, false);
    // Two hubs finding one loss at once each give it an epoch: the second is no news to the first.
    else if (epoch !== known && Date.now() - this.lostAt > 60_000) await this.lose("its epoch changed: another hub found it emptied or rolled back", top, false);
  }

  /** Answers a loss: says so, reads on from where the store now ends, and writes back what this hub holds; `announce` gives the store a new epoch, so that every other hub finds out too. */
  private async lose(why: string, top: string, announce: boolean): Promise<void> {
    this.losses++;
    this.lostAt = Date.now();
    this.lost = `${new Date(this.lostAt).toISOString()}: ${why}`;
    this.listener.log(`error: store ${this.target.display} lost the fleet state: ${why}; writing back the claims this hub holds`);
    if (comparePositions(top, this.last) < 0) this.last = top;
    this.seen = top;
    // Emptied without a reconnect (a flush): the fleet id goes back too, so every cursor stays valid.
    await this.cmd!.sendCommand(["SET", REDIS_KEYS.id, this.hubId, "NX"]);
    if (announce) {
      this.epoch = randomBytes(8).toString("hex");
      await this.cmd!.sendCommand(["SET", REDIS_KEYS.epoch, this.epoch]);
    }
    this.owed = true;
    this.restore();
  }

  /** Starts the write-back owed, unless one is on its way. */
  private restore(): void {
    if (this.restoring) return;
    this.restoring = this.writeBack().finally(() => (this.restoring = undefined));
  }

  /**
   * Puts every claim this hub holds (bans and unbans not ended) back through the append script:
   * what the store still has as new is skipped, the rest gets new stream entries that every hub
   * reads (a hub that holds the claim already does not relay it again). A failure halfway leaves
   * it owed, for the next reconnect.
   */
  private async writeBack(): Promise<void> {
    this.owed = false;
    const cmd = this.cmd;
    const now = Date.now();
    const claims = [...this.snapshot.live(now), ...this.recentAcked.filter((r) => now - r.at <= RECENT_ACKED_MS && !isExpired(r.e, now)).map((r) => r.e)];
    let appended = 0;
    try {
      if (!cmd) throw new Error("not connected");
      for (let i = 0; i < claims.length; i += 500) {
        for (const [done, id] of await Promise.all(claims.slice(i, i + 500).map((e) => this.runAppend(cmd, e)))) {
          if (done !== 1) continue;
          appended++;
          this.see(id);
        }
      }
      if (this.replicas > 0) await within(cmd.sendCommand(["WAIT", String(this.replicas), "1000"]), 3000, "WAIT");
    } catch (e) {
      this.owed = true;
      this.listener.log(`warning: store ${this.target.display}: write-back stopped after ${appended} claim(s) (${(e as Error).message}); it starts again when the store is back`);
      return;
    } finally {
      this.writtenBack += appended;
    }
    this.lost += `; ${appended} of the ${claims.length} claim(s) this hub holds written back`;
    this.listener.log(`store ${this.target.display}: wrote back ${appended} of the ${claims.length} claim(s) this hub holds (it still had the others): it holds the fleet state again`);
  }

  private async readLoop(): Promise<void> {
    let attempt = 0;
    this.up = true;
    while (!this.closing) {
      try {
        if (!this.reader) {
          await this.connect();
          // Before it takes events again: a Redis that restarted may have come back without them.
          await this.verify();
          if (this.owed) this.restore();
          this.listener.log(`store ${this.target.display} is back: reading the stream after ${this.last}`);
          attempt = 0;
          this.up = true;
        }
        const reply = (await within(this.reader!.sendCommand(["XREAD", "COUNT", "1000", "BLOCK", "2000", "STREAMS", REDIS_KEYS.events, this.last]), 7000, "XREAD")) as Array<[string, Array<[string, string[]]>]> | null;
        const before = this.last;
        const events: FleetEvent[] = [];
        for (const [id, fields] of reply?.[0][1] ?? []) {
          this.last = id;
          this.see(id);
          this.read++;
          const e = parseJournalLine(`{"seq":"${id}",${(fields[1] ?? "{").slice(1)}`);
          if (e) events.push(e);
        }
        if (events.length) this.listener.durable(events);
        // Idle or not, the store is checked each round (a flush needs no reconnect). Trimmed past
        // this reader (it lagged more than --stream-max-len entries): entries it never read are
        // gone, but their claims are in the hash. Reload it; what is newer goes out.
        await this.verify();
        if (reply && this.trimmed !== "0-0" && comparePositions(before, this.trimmed) < 0) {
          const newer: FleetEvent[] = [];
          await this.scanClaims(this.cmd!, (e) => newer.push(e));
          this.listener.repaired(newer);
        }
      } catch (e) {
        if (this.closing) break;
        this.fail(e as Error);
        await new Promise<void>((r) => {
          this.wake = r;
          setTimeout(r, Math.min(5000, 200 * 2 ** Math.min(attempt++, 5))).unref();
        });
        this.wake = undefined;
      }
    }
  }

  /** Appends events one by one; resolves with their stream IDs once Redis has them (for one that was not newer, the stored claim's seq). */
  append(events: FleetEvent[]): Promise<string[]> {
    const p = (async () => {
      const out: string[] = [];
      for (const e of events) out.push((e.seq = await this.appendOne(e)));
      const now = Date.now();
      for (const e of events) this.recentAcked.push({ e, at: now });
      while (this.recentAcked.length && (this.recentAcked.length > MAX_RECENT_ACKED || now - this.recentAcked[0].at > RECENT_ACKED_MS)) this.recentAcked.shift();
      return out;
    })();
    this.inflight.add(p);
    void p.catch(() => {}).finally(() => this.inflight.delete(p));
    return p;
  }

  /** Runs the append script for `e` (its seq left out): [1, the new entry ID] when appended, [0, the stored claim's seq] when that claim is as new. */
  private runAppend(cmd: RedisClient, e: FleetEvent): Promise<[number, string]> {
    const { seq: _unused, ...rest } = e;
    const args = [`${e.ip}|${e.origin}`, JSON.stringify(rest), String(e.detectedAt), e.id, String(this.maxLen)];
    const run = (how: string, script: string) => cmd.sendCommand([how, script, "2", REDIS_KEYS.events, REDIS_KEYS.claims, ...args]);
    return within(
      run("EVALSHA", this.sha.append).catch((err: Error) => (/NOSCRIPT/.test(err.message) ? run("EVAL", APPEND_LUA) : Promise.reject(err))),
      3000,
      "append",
    ) as Promise<[number, string]>;
  }

  private async appendOne(e: FleetEvent): Promise<string> {
    const cmd = this.cmd;
    if (!cmd || !this.up) throw new Error(`store ${this.target.display} is unreachable`);
    try {
      const reply = await this.runAppend(cmd, e);
      if (reply[0] === 1) this.see(reply[1]);
      // Redis replicates asynchronously: a master that fails over right after this write may
      // never pass it on. With --store-replicas the ack waits until that many replicas have it.
      if (this.replicas > 0) {
        const got = Number(await within(cmd.sendCommand(["WAIT", String(this.replicas), "1000"]), 3000, "WAIT"));
        if (got < this.replicas) throw new Error(`only ${got} of ${this.replicas} Redis replica(s) have the event after 1 s; not acked`);
      }
      return reply[1];
    } catch (err) {
      // A master demoted by a failover refuses writes: find the new one (through the Sentinels).
      if (/READONLY|MASTERDOWN|LOADING/.test((err as Error).message)) this.fail(err as Error);
      throw err;
    }
  }

  /**
   * Every hub reads the same stream, so a cursor from any of them is good here, unless the
   * stream was trimmed past it: then it may have missed an event nobody can replay. A cursor
   * ahead of this hub (it lags the one the agent left) resumes too: what lies between comes by relay.
   */
  async resumes(seq: string): Promise<boolean> {
    return comparePositions(seq, await this.horizon()) >= 0;
  }

  position(): string {
    return this.last;
  }

  unavailable(): string | undefined {
    return this.up ? undefined : `store ${this.target.display} is unreachable`;
  }

  health(): StoreHealth {
    const up = this.up;
    return {
      ok: up,
      count: this.read,
      fields: { store: !up ? "down" : this.restoring ? "restoring" : "up", ...(this.lost ? { storeLost: this.lost } : {}) },
      metrics: [
        ...metric("banshare_store_up", "gauge", "1 while the shared store (Redis) answers.", [["", up ? 1 : 0]]),
        ...metric("banshare_store_losses_total", "counter", "Times this hub found the store emptied or rolled back (it then writes back the claims it holds).", [["", this.losses]]),
        ...metric("banshare_store_written_back_total", "counter", "Claims this hub wrote back into a store that had lost them.", [["", this.writtenBack]]),
      ],
    };
  }

  describe(addresses: number): string {
    return `as a hub of fleet ${this.hubId} (store ${this.target.display}), ${addresses} address(es) claimed, stream at ${this.last}`;
  }

  /** The oldest cursor that resumes, fresh from Redis when it answers. */
  private async horizon(): Promise<string> {
    if (this.cmd && this.up) await within(this.streamInfo(), 1000, "XINFO").catch(() => {});
    return this.trimmed;
  }

  /** Once a minute, on one hub at a time: trim the stream by age and drop expired claims from the hash. */
  private async maintain(): Promise<void> {
    const cmd = this.cmd;
    if (!cmd || !this.up) return;
    if ((await cmd.sendCommand(["SET", REDIS_KEYS.lock, this.hubId, "NX", "PX", "50000"])) !== "OK") return;
    await cmd.sendCommand(["XTRIM", REDIS_KEYS.events, "MINID", "~", String(Date.now() - this.maxAgeMs)]);
    const now = Date.now();
    let cursor = "0";
    do {
      const [next, flat] = (await cmd.sendCommand(["HSCAN", REDIS_KEYS.claims, cursor, "COUNT", "2000"])) as [string, string[]];
      const expired: string[] = [];
      for (let i = 1; i < flat.length; i += 2) {
        const e = parseJournalLine(flat[i]);
        if (!e || isExpired(e, now)) expired.push(flat[i - 1], flat[i]);
      }
      if (expired.length) await cmd.sendCommand(["EVAL", PRUNE_LUA, "1", REDIS_KEYS.claims, ...expired]);
      cursor = next;
    } while (cursor !== "0");
    await this.streamInfo();
  }

  /**
   * Redis decides, not this hub's claims: it may have lost what this hub read from it (a master
   * that failed over before its replica had the entry), and APPEND_LUA merges by the same rule.
   */
  async replay(_standing: FleetEvent, event: FleetEvent): Promise<string> {
    return (await this.append([event]))[0];
  }

  /** Resolves once every append on its way has its answer from Redis. */
  async barrier(): Promise<void> {
    await Promise.allSettled([...this.inflight]);
  }

  async close(): Promise<void> {
    this.closing = true;
    clearInterval(this.timer);
    await this.restoring;
    this.cmd?.destroy();
    this.reader?.destroy();
    this.wake?.();
    await this.loop;
  }
}


// ---------------------------------------------------------------------------------------------
// Observers: the CSV recorder, the metrics, the status feed. Told what happened; they change
// nothing else.

/** The structured log (`--csv`): one writer of the hub's rows; without a path it writes nothing. */
export class Recorder {
  private constructor(private readonly out?: CsvFile) {}

  static async open(path: string | undefined, log: (line: string) => void): Promise<Recorder> {
    if (!path) return new Recorder();
    await mkdir(dirname(path), { recursive: true });
    if (!existsSync(path)) await appendFile(path, CSV_HEADER + "\n");
    return new Recorder(new CsvFile(path, log));
  }

  row(r: Omit<CsvRecord, "time" | "node">): void {
    this.out?.write(csvRow({ time: Date.now(), node: "hub", ...r }));
  }

  close(): Promise<void> {
    return this.out?.close() ?? Promise.resolve();
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

/** Upper bounds (seconds) of the relay latency histogram in /metrics. */
const RELAY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];

/** Reasons a refusal may have beyond the protocol's error codes: before any frame, or on the TLS layer. */
type RefusalCode = ErrorCode | "unauthorized" | "too_many_connections" | "too_many_pending" | "timeout" | "tls";

/** One metric in the Prometheus text format: HELP, TYPE, then each sample as (name suffix with labels, value). */
function metric(name: string, type: "counter" | "gauge" | "histogram", help: string, samples: Array<[string, number | string]>): string[] {
  return [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...samples.map(([suffix, v]) => `${name}${suffix} ${v}`)];
}

/** The per-node enforcement gauges of /metrics, from each node's newest `enforcement` report. */
function nodeMetrics(reports: Map<string, EnforcementReport>): string[] {
  const rows = [...reports].sort(([a], [b]) => (a < b ? -1 : 1));
  const per = (f: (r: EnforcementReport) => number | undefined): Array<[string, number]> => rows.flatMap(([node, r]): Array<[string, number]> => (f(r) === undefined ? [] : [[`{node="${node}"}`, f(r)!]]));
  return [
    ...metric("banshare_node_enforcing", "gauge", "1 while the node's agent reports its hooks present, no drift and nothing missing, else 0.", per((r) => (enforcementVerdict(r).ok ? 1 : 0))),
    ...metric("banshare_node_entries", "gauge", "Entries in the node's kernel sets at the agent's last count (absent where it does not count).", per((r) => r.entries)),
    ...metric("banshare_node_claims", "gauge", "Addresses the node's agent applied: what its kernel should hold.", per((r) => r.claims)),
    ...metric("banshare_node_drift", "gauge", "Entries the node's kernel lacks or has too many, as its agent counted.", per((r) => r.drift)),
    ...metric("banshare_node_hooks_missing", "gauge", "Hooks (chains, jumps, nftables hooks) missing on the node.", per((r) => r.hooks.filter((h) => h.state === "missing").length)),
    ...metric("banshare_node_repairs_total", "counter", "Repairs the node's agent made since it started.", per((r) => r.repairs)),
    ...metric("banshare_node_report_timestamp_seconds", "gauge", "When the node's agent last reported its enforcement.", per((r) => Math.floor(r.at / 1000))),
  ];
}

/** Gauges /metrics reads from the other parts when it is asked. */
interface Gauges {
  roles: Record<Role, number>;
  agents: number;
  held: number;
  blocked: number;
  /** Live relayed ban claims per origin. */
  byOrigin: ReadonlyMap<string, number>;
  /** Sockets not yet authenticated. */
  pending: number;
  seq: number;
  store: string[];
  /** Each node's newest `enforcement` report. */
  enforcement: Map<string, EnforcementReport>;
  /** Each node's clock skew (hub minus node), ms. */
  skews?: Map<string, number>;
}

/** The hub's counters, one writer each, and the Prometheus text they make with the gauges. */
export class Metrics {
  private readonly eventsIn = { ban: 0, unban: 0 };
  private readonly eventsOut = { ban: 0, unban: 0 };
  private readonly refusedBy: Record<string, number> = {};
  private unauthorized = 0;
  private escalations = 0;
  /** Hub receive -> relayed (journal fsync included): counts per bucket of RELAY_BUCKETS, and the sum. */
  private readonly relayBuckets = RELAY_BUCKETS.map(() => 0);
  private relaySum = 0;
  private relayCount = 0;

  received(e: FleetEvent): void {
    this.eventsIn[e.kind]++;
  }

  escalated(): void {
    this.escalations++;
  }

  refused(code: RefusalCode): void {
    if (code === "unauthorized") this.unauthorized++;
    else this.refusedBy[code] = (this.refusedBy[code] ?? 0) + 1;
  }

  /** Events relayed at `now`; `sent` copies went out to agents, by kind. */
  relayed(events: FleetEvent[], sent: { ban: number; unban: number }, now: number): void {
    this.eventsOut.ban += sent.ban;
    this.eventsOut.unban += sent.unban;
    for (const e of events) {
      const s = Math.max(0, now - e.relayedAt) / 1000;
      this.relaySum += s;
      this.relayCount++;
      const b = RELAY_BUCKETS.findIndex((le) => s <= le);
      if (b >= 0) this.relayBuckets[b]++;
    }
  }

  text(g: Gauges): string {
    const buckets = RELAY_BUCKETS.map((le, i): [string, number] => [`_bucket{le="${le}"}`, this.relayBuckets.slice(0, i + 1).reduce((a, b) => a + b, 0)]);
    const lines = [
      ...metric("banshare_connected_nodes", "gauge", "WebSocket connections, by role.", ROLES.map((r) => [`{role="${r}"}`, g.roles[r]])),
      ...metric("banshare_agents", "gauge", "Connected agents receiving events (synced).", [["", g.agents]]),
      ...metric("banshare_events_in_total", "counter", "Events accepted from nodes, by kind.", Object.entries(this.eventsIn).map(([k, v]) => [`{kind="${k}"}`, v])),
      ...metric("banshare_events_out_total", "counter", "Events sent to agents (one per agent that got it), by kind.", Object.entries(this.eventsOut).map(([k, v]) => [`{kind="${k}"}`, v])),
      ...metric("banshare_relay_seconds", "histogram", "Hub receive -> relayed to the agents, journal fsync included.", [...buckets, ['_bucket{le="+Inf"}', this.relayCount], ["_sum", this.relaySum.toFixed(6)], ["_count", this.relayCount]]),
      ...metric("banshare_escalations_total", "counter", "Bans lengthened for repeat offenders (--escalate).", [["", this.escalations]]),
      ...metric("banshare_held_claims", "gauge", "Ban claims held back until --quorum nodes claim the address.", [["", g.held]]),
      ...metric("banshare_refused_total", "counter", "Frames refused, by reason.", [...Object.entries(this.refusedBy).map(([k, v]): [string, number] => [`{reason="${k}"}`, v]), ['{reason="unauthorized"}', this.unauthorized]]),
      ...metric("banshare_claims", "gauge", "Addresses with at least one live ban claim relayed to the fleet (not held by --quorum, not lifted).", [["", g.blocked]]),
      ...metric("banshare_origin_claims", "gauge", "Live ban claims relayed to the fleet, by the node that made them.", [...g.byOrigin].sort(([a], [b]) => (a < b ? -1 : 1)).map(([o, n]): [string, number] => [`{origin="${o}"}`, n])),
      ...metric("banshare_pending_sockets", "gauge", "Sockets connected but not yet authenticated (--max-pending).", [["", g.pending]]),
      ...metric("banshare_seq", "gauge", "Sequence number of the last accepted event; with --store, stream entries this hub has read since it started (the stream position is /healthz's seq).", [["", g.seq]]),
      ...g.store,
      ...nodeMetrics(g.enforcement),
      ...metric("banshare_node_clock_skew_seconds", "gauge", "The hub's clock minus the node's, as last measured (one-way: network delay is in it); the hub times events by its own clock.", [...(g.skews ?? [])].sort(([a], [b]) => (a < b ? -1 : 1)).map(([node, ms]): [string, number] => [`{node="${node}"}`, ms / 1000])),
    ];
    return lines.join("\n") + "\n";
  }
}

/** One refusal: its reason, what to say, who asked; `connection` when it came before any frame. */
interface Refusal {
  code: RefusalCode;
  message: string;
  remote: string;
  node?: string;
  id?: string;
  ip?: string;
  connection?: boolean;
  /** It answers an HTTP request (one per connection, so as fast as one can connect): summarised in a flood, as `connection` ones are. */
  http?: boolean;
  /** The CSV row's shorter reason, when the log line says more. */
  csv?: string;
}

/** Where a frame or request is answered: an HTTP status and, unless a connection was refused before its request was read, a frame. */
type Answer = (status: number, frame?: HubFrame) => void;

/** HTTP status of each refusal; 400 for the rest. */
const HTTP_STATUS: Partial<Record<RefusalCode, number>> = { forbidden: 403, protected: 403, claim_limit: 403, rate_limited: 429, too_big: 413, internal: 503, unauthorized: 401, too_many_connections: 429 };

/**
 * Refusals that came before any token was accepted, from strangers who can cause them as fast
 * as they can connect: per source address and reason, the first FLOOD_FIRST of each
 * FLOOD_WINDOW_MS are told one by one (FLOOD_BUDGET in all per window), the rest only counted and
 * told as one line per source and reason when the window ends. Past FLOOD_SOURCES sources in a
 * window the others are summed as one. Pure bookkeeping: `Refusals` logs what it says.
 */
export class FloodSummary {
  private readonly sources = new Map<string, { from: string; why: string; told: number; more: number }>();
  private told = 0;

  /**
   * True when this refusal (from `host`, with `node`'s token if any, for `code` and `message`) is
   * to be told on its own; false when it is only counted. Refusals of one kind (the message up
   * to its first `:`, `;` or `(`, numbers blanked: "unknown token", "plain HTTP") share a count.
   */
  note(host: string, node: string | undefined, code: RefusalCode, message: string): boolean {
    const why = `${code}: ${message.split(/[:;(]/)[0].replace(/\d+/g, "N").trim().slice(0, 48)}`;
    let key = `${host} ${node ?? ""} ${why}`;
    if (!this.sources.has(key) && this.sources.size >= FLOOD_SOURCES) key = `* ${why}`;
    let s = this.sources.get(key);
    if (!s) this.sources.set(key, (s = { from: key.startsWith("* ") ? "other addresses" : node ? `${host} (${node})` : host, why, told: 0, more: 0 }));
    if (s.told < FLOOD_FIRST && this.told < FLOOD_BUDGET) {
      s.told++;
      this.told++;
      return true;
    }
    s.more++;
    return false;
  }

  /** Ends the window: what was only counted in it, per source and reason. */
  flush(): Array<{ from: string; why: string; more: number }> {
    const out = [...this.sources.values()].filter((s) => s.more > 0).map(({ from, why, more }) => ({ from, why, more }));
    this.sources.clear();
    this.told = 0;
    return out;
  }

  get empty(): boolean {
    return this.sources.size === 0;
  }
}

/** The host part of `HOST:PORT` (IPv6 hosts hold colons too). */
function remoteHost(remote: string): string {
  return remote.replace(/:\d+$/, "");
}

/**
 * The one refusal path: count, log line, CSV row and the answer (error frame, JSON error or bare
 * status). Refusals before a token was accepted are summarised per source (`FloodSummary`), so
 * a flood costs a bounded number of lines; every one is counted in /metrics all the same.
 */
export class Refusals {
  private readonly flood = new FloodSummary();
  private timer?: NodeJS.Timeout;

  constructor(
    private readonly metrics: Metrics,
    private readonly recorder: Recorder,
    private readonly log: (line: string) => void,
  ) {}

  refuse(r: Refusal, answer?: Answer, status = HTTP_STATUS[r.code] ?? 400): void {
    this.metrics.refused(r.code);
    const who = r.node ? `${r.node} (${r.remote})` : r.remote;
    const told = !(r.connection || r.http) || this.tell(r);
    if (r.connection) {
      if (told) {
        this.log(`refused connection from ${who}: ${r.message}`);
        this.recorder.row({ action: "REJECT", origin: r.node, detail: `${r.code}: ${r.csv ?? r.message} from ${r.remote}` });
      }
      answer?.(status);
      return;
    }
    if (told) {
      this.log(`refused from ${who}: ${r.message}`);
      this.recorder.row({ action: "REJECT", ip: r.ip, origin: r.node, detail: `${r.code}: ${r.message}` });
    }
    answer?.(status, { type: "error", code: r.code as ErrorCode, message: r.message, id: r.id });
  }

  /** Tells what the flood summary only counted (the window ended, or the hub stops). */
  flush(): void {
    for (const { from, why, more } of this.flood.flush()) {
      this.log(`${more} more refusal(s) (${why}) from ${from} in the last ${FLOOD_WINDOW_MS / 1000} s`);
      this.recorder.row({ action: "REJECT", detail: `${why}: ${more} more from ${from} in the last ${FLOOD_WINDOW_MS / 1000} s` });
    }
    if (this.flood.empty) this.stop();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Whether refusal `r` (of a connection or an HTTP request) is told on its own; starts the window's timer. */
  private tell(r: Refusal): boolean {
    this.timer ??= every(FLOOD_WINDOW_MS, () => this.flush());
    return this.flood.note(remoteHost(r.remote), r.node, r.code, r.message);
  }
}

/** Token bucket per node: `rate` events a second sustained, `burst` at once. */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    readonly rate: number,
    readonly burst: number,
  ) {}

  /** True when `node` may publish one more event now (and takes its token). */
  take(node: string, now: number): boolean {
    const b = this.buckets.get(node) ?? { tokens: this.burst, at: now };
    b.tokens = Math.min(this.burst, b.tokens + ((now - b.at) / 1000) * this.rate);
    b.at = now;
    this.buckets.set(node, b);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }
}

/**
 * Paces the HTTP requests of each source address (all but `POST /v1/events`, which the node's
 * own rate limit governs): `rate` a second and `burst` at once, past which each request waits
 * its turn before it is handled. A client that hammers gets its answers later, instead of taking
 * the hub's time from everyone else; one that would wait more than `maxWaitMs` is refused.
 */
export class Pacer {
  /** Per address, when its next request may go without waiting on the ones before (GCRA's theoretical arrival time). */
  private readonly next = new Map<string, number>();

  constructor(
    readonly rate: number,
    readonly burst: number,
    readonly maxWaitMs: number,
  ) {}

  /** Ms the request from `host` arriving at `now` waits (0: none), or undefined when it would wait too long (it takes no turn then). */
  wait(host: string, now: number): number | undefined {
    const interval = 1000 / this.rate;
    const due = Math.max(this.next.get(host) ?? now, now);
    const wait = Math.max(0, due - now - (this.burst - 1) * interval);
    if (wait > this.maxWaitMs) return undefined;
    this.next.set(host, due + interval);
    if (this.next.size > 4096) for (const [h, t] of this.next) if (t <= now) this.next.delete(h);
    return wait;
  }
}

// ---------------------------------------------------------------------------------------------
// Clocks

/** A node's clock is said again in the log when its skew moved this far (ms) from what was logged. */
const SKEW_RELOG_MS = 60_000;

/**
 * How far each node's clock is from the hub's (hub minus node, ms), from the `sentAt` of its
 * hellos and events: one-way, so network delay is in it. It measures and warns, nothing more:
 * the hub times every event by its own clock whatever the skew. One log line when a node's skew
 * goes beyond CLOCK_TOLERANCE_MS (again when it moves by another minute), one when it is back
 * within; `/metrics`, `GET /v1/nodes` and the status page show the latest.
 */
export class ClockWatch {
  private readonly skews = new Map<string, { ms: number; logged?: number }>();

  constructor(private readonly log: (line: string) => void) {}

  /** A frame from `node`, stamped `sentAt` on its clock, arrived at `now` on the hub's; `what` names it for the log. */
  observe(node: string, sentAt: number | undefined, now: number, what: string): void {
    if (sentAt === undefined) return;
    const ms = clockSkew(sentAt, now);
    const s = this.skews.get(node) ?? { ms };
    s.ms = ms;
    this.skews.set(node, s);
    const off = Math.abs(ms) > CLOCK_TOLERANCE_MS;
    if (off && (s.logged === undefined || Math.abs(ms - s.logged) > SKEW_RELOG_MS)) {
      s.logged = ms;
      this.log(`warning: node ${node}'s clock is ${(Math.abs(ms) / 1000).toFixed(1)} s ${ms < 0 ? "ahead of" : "behind"} the hub's (measured on its ${what}); its events are timed by the hub's clock. If every node shows the same skew, the hub's clock is the wrong one`);
    } else if (!off && s.logged !== undefined) {
      s.logged = undefined;
      this.log(`node ${node}'s clock is back within ${CLOCK_TOLERANCE_MS} ms of the hub's (${ms} ms, measured on its ${what})`);
    }
  }

  /** The latest skew of `node`, ms; undefined when it sent no `sentAt`. */
  of(node: string): number | undefined {
    return this.skews.get(node)?.ms;
  }

  /** Every node's latest skew, ms. */
  all(): Map<string, number> {
    return new Map([...this.skews].map(([node, s]) => [node, s.ms]));
  }
}

// ---------------------------------------------------------------------------------------------
// Connections

/** One WebSocket connection and what the hub knows of it. */
export class Conn {
  hello = false;
  /** An agent that receives events (it said `want: "events"` and got its sync). */
  receiving = false;
  /** A status page (it said `want: "status"`): gets `status` frames and every relayed event. */
  watching = false;
  alive = true;
  /** Frames refused on this connection. */
  refused = 0;
  /** Its token was revoked: every further frame is dropped unread, and the socket cut after REVOKE_GRACE_MS. */
  revoked = false;
  dropped = 0;
  /** Bytes of the sync sent to it: allowed on top of --max-buffered (Syncs sends only while its socket has room). */
  syncBytes = 0;
  /** Connected at, and the last pong or frame from it, ms. */
  readonly since = Date.now();
  lastSeen = this.since;
  /** The last seq relayed to this agent (the hub's durable seq when it got everything up to it). */
  sentSeq?: string;
  /** The newest seq this agent reported applied (`applied` frames). */
  appliedSeq?: string;
  /** This agent's latest `enforcement` report. */
  enforcement?: EnforcementReport;

  constructor(
    readonly ws: WebSocket,
    readonly entry: TokenEntry,
    readonly token: string,
    readonly remote: string,
    private readonly maxBufferedBytes: number,
    private readonly log: (line: string) => void,
  ) {}

  get who(): string {
    return `${this.entry.name} (${this.remote})`;
  }

  get kind(): "events" | "status" | "send" {
    return this.receiving ? "events" : this.watching ? "status" : "send";
  }

  /** Sends a frame, or one already serialised (a relay serialises once for all its agents); drops a socket that does not read. */
  send(f: HubFrame | Buffer): void {
    if (this.ws.readyState !== this.ws.OPEN) return;
    if (this.ws.bufferedAmount > this.maxBufferedBytes + this.syncBytes) {
      this.log(`dropping ${this.who}: more than ${this.maxBufferedBytes} bytes queued, it is not reading`);
      this.ws.terminate();
      return;
    }
    this.ws.send(Buffer.isBuffer(f) ? f : JSON.stringify(f), { binary: false });
  }

  /** A frame or pong arrived: it is alive. */
  seen(): void {
    this.alive = true;
    this.lastSeen = Date.now();
  }
}

/** An HTTP request being served to an authenticated node: counted with its connections, refused once its token is revoked. */
export interface ServedRequest {
  entry: TokenEntry;
  token: string;
  res: ServerResponse;
  revoked: boolean;
}

/** The open connections. */
export class Connections implements Iterable<Conn> {
  private readonly all = new Set<Conn>();
  private readonly requests = new Set<ServedRequest>();
  /** WebSockets and HTTP requests being served, per node. */
  private readonly perNode = new Map<string, number>();

  add(c: Conn): void {
    this.all.add(c);
    this.count(c.entry.name, 1);
  }

  delete(c: Conn): void {
    if (this.all.delete(c)) this.count(c.entry.name, -1);
  }

  /** An authenticated HTTP request of `entry` is being served until its response closes. */
  request(entry: TokenEntry, token: string, res: ServerResponse): ServedRequest {
    const r: ServedRequest = { entry, token, res, revoked: false };
    this.requests.add(r);
    this.count(entry.name, 1);
    res.once("close", () => {
      if (this.requests.delete(r)) this.count(entry.name, -1);
    });
    return r;
  }

  get size(): number {
    return this.all.size;
  }

  [Symbol.iterator](): Iterator<Conn> {
    return this.all.values();
  }

  /** Connections of node `name`, its HTTP requests being served included. */
  countOf(name: string): number {
    return this.perNode.get(name) ?? 0;
  }

  private count(name: string, d: number): void {
    const n = (this.perNode.get(name) ?? 0) + d;
    if (n > 0) this.perNode.set(name, n);
    else this.perNode.delete(name);
  }

  roles(): Record<Role, number> {
    const out: Record<Role, number> = { node: 0, reader: 0, admin: 0 };
    for (const c of this.all) out[c.entry.role]++;
    return out;
  }

  receiving(): Conn[] {
    return [...this.all].filter((c) => c.receiving);
  }

  /** Each node's newest `enforcement` report, among its agents' connections. */
  enforcementByNode(): Map<string, EnforcementReport> {
    const out = new Map<string, EnforcementReport>();
    for (const c of this.all) {
      const r = c.enforcement;
      const seen = out.get(c.entry.name);
      if (c.receiving && r && (!seen || r.at > seen.at)) out.set(c.entry.name, r);
    }
    return out;
  }

  /** Heartbeat: a node that missed the last ping's pong is gone (cable pulled, host frozen). */
  heartbeat(log: (line: string) => void): void {
    for (const c of this.all) {
      if (!c.alive) {
        log(`${c.who} missed a heartbeat; dropping it`);
        c.ws.terminate();
        continue;
      }
      c.alive = false;
      c.ws.ping();
    }
  }

  /**
   * Cuts off every connection and request whose token is gone from `tokens` or now names another
   * node or role, at once: a connection takes no further frame (they are dropped unread), is sent
   * close 1008 and is terminated after REVOKE_GRACE_MS whether or not the peer answers; a request
   * still being received is refused with 401, a response being streamed is cut.
   */
  revoke(tokens: TokenEntry[], log: (line: string) => void): void {
    const gone = (entry: TokenEntry, token: string) => {
      const now = findToken(tokens, token);
      return !now || now.name !== entry.name || now.role !== entry.role;
    };
    for (const c of this.all) {
      if (c.revoked || !gone(c.entry, c.token)) continue;
      log(`${c.who}: token revoked or changed; disconnecting, no further frame taken`);
      c.revoked = true;
      c.ws.close(1008, "token revoked");
      setTimeout(() => c.ws.terminate(), REVOKE_GRACE_MS).unref();
    }
    for (const r of this.requests) {
      if (r.revoked || !gone(r.entry, r.token)) continue;
      r.revoked = true;
      if (r.res.headersSent) r.res.destroy();
    }
  }

  terminateAll(): void {
    for (const c of this.all) c.ws.terminate();
  }
}

/** The frame that carries relayed events: one `event`, or an incremental `sync` for several; `now` is the hub's clock. */
function eventsFrame(events: FleetEvent[], now: number): HubFrame {
  return events.length === 1 ? { type: "event", ...events[0], now } : { type: "sync", full: false, events, seq: events[events.length - 1].seq, now };
}

/** The durable claims as syncs send them: built once, shared by every sync that starts while it is fresh. */
interface SyncSnapshot {
  /** The durable position it shows. */
  readonly upTo: string;
  /** The live claims, in seq order (`syncEvents`). */
  readonly events: FleetEvent[];
  /** The full-sync frames, serialised once for every sync, each when the first sync needs it. */
  readonly frames: Buffer[];
  /** Events relayed since it was built, and the durable position after them: each sync sends them last. */
  readonly after: FleetEvent[];
  afterUpTo: string;
  readonly at: number;
  /** Until when syncs starting may share it: SNAPSHOT_REUSE_MS, or 50 times its build time. */
  readonly freshUntil: number;
  /** Syncs sending it now. */
  users: number;
}

/** One agent's sync in progress. */
interface SyncJob {
  readonly c: Conn;
  readonly snap: SyncSnapshot;
  /** The cursor it resumes after; undefined: a full sync. */
  readonly after?: string;
  /** Index in `snap.events` of the first event it sends, and of the next. */
  readonly from: number;
  next: number;
  /** Since when its socket has had no room (its agent is not reading), ms; `stuckSince` is not reset by a turn at the back of the line. */
  stalledSince?: number;
  stuckSince?: number;
}

/** Index of the first event of `events` (in seq order) after position `seq`. */
function firstAfter(events: FleetEvent[], seq: string): number {
  let lo = 0;
  let hi = events.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (comparePositions(events[mid].seq, seq) <= 0) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * The syncs in progress. A whole fleet connecting at once (a power cut, a boot) must not starve
 * live traffic: each sync is sent one frame at a time, round-robin among them, a few ms of work
 * per turn of the event loop, and only while its socket has room (a slow reader holds no more
 * than about SYNC_WINDOW_BYTES of the hub's memory). The claims are put in order and each
 * full-sync frame serialised once for every sync starting while the snapshot is fresh; what is
 * relayed meanwhile is sent after the snapshot, and only then does the agent get relayed events.
 */
export class Syncs {
  /** The syncs being sent, round-robin, and those waiting for a place, in order. */
  private readonly active: SyncJob[] = [];
  private readonly backlog: SyncJob[] = [];
  /** Snapshots in use, and the fresh one new syncs share: the relay's events are appended to each. */
  private readonly live = new Set<SyncSnapshot>();
  private current?: SyncSnapshot;
  private scheduled = false;
  private timer?: NodeJS.Timeout;
  private stopped = false;
  /** A herd (more syncs than SYNC_CONCURRENCY at once) under way since, and the syncs it completed: one log line at each end. */
  private herd?: { since: number; done: number };

  constructor(
    private readonly fleet: FleetState,
    private readonly chunk: number,
    private readonly log: (line: string) => void,
  ) {}

  /** Syncs not yet sent in full. */
  get size(): number {
    return this.active.length + this.backlog.length;
  }

  /** Starts bringing `c` up to date: the events after `after` (a cursor the store resumes from), or everything. */
  start(c: Conn, after: string | undefined): void {
    const snap = this.snapshot(Date.now());
    snap.users++;
    const from = after === undefined ? 0 : firstAfter(snap.events, after);
    this.backlog.push({ c, snap, after, from, next: from });
    if (!this.herd && this.size > SYNC_CONCURRENCY) {
      this.herd = { since: Date.now(), done: 0 };
      this.log(`more than ${SYNC_CONCURRENCY} agents want a sync at once: sending ${SYNC_CONCURRENCY} at a time, live traffic first`);
    }
    this.schedule(0);
  }

  /** The relay sent `events` to the synced agents and the durable position is now `upTo`: the syncs in progress send them after their snapshot. */
  relayed(events: FleetEvent[], upTo: string): void {
    const now = Date.now();
    for (const s of this.live) {
      if (!s.users && now > s.freshUntil) {
        this.drop(s);
        continue;
      }
      for (const e of events) s.after.push(e);
      s.afterUpTo = upTo;
    }
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.active.length = 0;
    this.backlog.length = 0;
  }

  private snapshot(now: number): SyncSnapshot {
    const cur = this.current;
    if (cur && now <= cur.freshUntil) return cur;
    if (cur && !cur.users) this.drop(cur);
    const upTo = this.fleet.durable;
    const t0 = performance.now();
    const events = syncEvents(this.fleet.claims, undefined, now);
    const freshUntil = now + Math.max(SNAPSHOT_REUSE_MS, 50 * (performance.now() - t0));
    const snap: SyncSnapshot = { upTo, events, frames: [], after: [], afterUpTo: upTo, at: now, freshUntil, users: 0 };
    this.live.add(snap);
    return (this.current = snap);
  }

  /** A sync is done with `s`: unused, it goes (the fresh one once it is stale, so an idle hub holds none). */
  private release(s: SyncSnapshot): void {
    if (--s.users) return;
    if (s !== this.current) return this.drop(s);
    setTimeout(() => {
      if (!s.users && Date.now() > s.freshUntil) this.drop(s);
    }, s.freshUntil - Date.now() + 1).unref();
  }

  private drop(s: SyncSnapshot): void {
    this.live.delete(s);
    if (this.current === s) this.current = undefined;
  }

  private schedule(delay: number): void {
    if (this.scheduled || this.stopped) return;
    this.scheduled = true;
    const run = () => {
      this.scheduled = false;
      this.timer = undefined;
      this.pump();
    };
    if (delay) this.timer = setTimeout(run, delay);
    else setImmediate(run);
  }

  /** One turn: a frame to each active sync in turn whose socket has room, for at most SYNC_SLICE_MS. */
  private pump(): void {
    const end = performance.now() + SYNC_SLICE_MS;
    const now = Date.now();
    const { active, backlog } = this;
    while (active.length < SYNC_CONCURRENCY && backlog.length) active.push(backlog.shift()!);
    let waiting = 0;
    while (active.length && waiting < active.length && performance.now() < end) {
      const job = active.shift()!;
      const ws = job.c.ws;
      if (ws.readyState !== ws.OPEN) {
        this.release(job.snap);
        if (backlog.length) active.push(backlog.shift()!);
        continue;
      }
      if (ws.bufferedAmount > SYNC_WINDOW_BYTES) {
        job.stalledSince ??= now;
        job.stuckSince ??= now;
        // One that takes nothing for SYNC_DROP_MS is dropped: it would hold its sync in the hub's memory.
        if (now - job.stuckSince > SYNC_DROP_MS) {
          this.log(`dropping ${job.c.who}: its sync stalled, ${ws.bufferedAmount} bytes queued for ${SYNC_DROP_MS / 1000} s; it is not reading`);
          ws.terminate();
          this.release(job.snap);
          if (backlog.length) active.push(backlog.shift()!);
          continue;
        }
        // An agent that does not read keeps no one else waiting: it goes to the back of the line.
        if (now - job.stalledSince > SYNC_STALL_MS && backlog.length) {
          job.stalledSince = undefined;
          backlog.push(job);
          active.push(backlog.shift()!);
        } else active.push(job);
        waiting++;
        continue;
      }
      job.stalledSince = undefined;
      job.stuckSince = undefined;
      waiting = 0;
      if (this.step(job)) active.push(job);
      else if (backlog.length) active.push(backlog.shift()!);
    }
    if (active.length) return this.schedule(waiting >= active.length ? SYNC_WAIT_MS : 0);
    if (this.herd) this.log(`every sync sent: ${this.herd.done} in ${((Date.now() - this.herd.since) / 1000).toFixed(1)} s`);
    this.herd = undefined;
  }

  /**
   * Sends the job's next frame; false once it sent the last. A full sync of more than one frame
   * sends the snapshot's shared frames (each with `more`); the last frames are the job's own:
   * the rest of the snapshot (a small or a resuming sync) and what was relayed since, at the
   * durable position now. The agent then gets relayed events like every other.
   */
  private step(job: SyncJob): boolean {
    const { snap, c } = job;
    const total = snap.events.length;
    const full = job.after === undefined;
    const shared = full && total > this.chunk;
    if (shared ? job.next < total : total - job.next > this.chunk) {
      const end = Math.min(job.next + this.chunk, total);
      const body = () => syncFrame(full, snap.events.slice(job.next, end), snap.upTo, true);
      this.sendSync(c, shared ? (snap.frames[job.next / this.chunk] ??= body()) : body());
      job.next = end;
      return true;
    }
    const rest = snap.events.slice(job.next).concat(this.since(snap, job.after));
    for (let i = 0; i === 0 || i < rest.length; i += this.chunk) this.sendSync(c, syncFrame(full, rest.slice(i, i + this.chunk), snap.afterUpTo, i + this.chunk < rest.length));
    c.receiving = true;
    c.sentSeq = snap.afterUpTo;
    if (this.herd) this.herd.done++;
    this.release(snap);
    this.log(`${c.who} ${full ? "full sync" : `resumed after ${job.after}`}: ${job.next - job.from + rest.length} event(s)`);
    return false;
  }

  /**
   * What was relayed since `snap` that a sync built now would hold: each event that is still its
   * (address, origin)'s claim and not ended, once, and when resuming only those after the cursor.
   */
  private since(snap: SyncSnapshot, cursor: string | undefined): FleetEvent[] {
    const now = Date.now();
    const out = new Set<FleetEvent>();
    for (const e of snap.after) {
      if (this.fleet.claims.get(e.ip)?.get(e.origin) !== e || e.held || (e.until !== null && e.until <= now)) continue;
      if (cursor === undefined || comparePositions(e.seq, cursor) > 0) out.add(e);
    }
    return [...out];
  }

  private sendSync(c: Conn, frame: Buffer): void {
    c.syncBytes += frame.length;
    c.send(frame);
  }
}

/** One `sync` frame, serialised. */
function syncFrame(full: boolean, events: FleetEvent[], seq: string, more: boolean): Buffer {
  // `now` when serialised: a shared snapshot frame sent later carries an older one, still a lower bound of the hub's clock, as the agent takes it.
  return Buffer.from(JSON.stringify({ type: "sync", full, events, seq, more: more || undefined, now: Date.now() }));
}

/**
 * The status page's recent events: the newest MAX_STATUS_EVENTS relayed (held claims left out),
 * seeded at start from what the store held, so a page opened later, or after a restart, shows
 * what happened. Holds references to the events, no copies; `relayed` looks at no more of a
 * burst than it keeps.
 */
export class History {
  private items: FleetEvent[] = [];

  /** Takes one event the store held at start (in any order; `loaded` puts them in time order). */
  load(e: FleetEvent): void {
    if (e.held) return;
    this.items.push(e);
    if (this.items.length >= 2 * MAX_STATUS_EVENTS) this.loaded();
  }

  /** The store is read: the newest by relay time are kept, oldest first. */
  loaded(): void {
    this.items.sort((a, b) => a.relayedAt - b.relayedAt);
    if (this.items.length > MAX_STATUS_EVENTS) this.items = this.items.slice(-MAX_STATUS_EVENTS);
  }

  /** Events just relayed, in order: the last MAX_STATUS_EVENTS that are not held join the history. */
  relayed(all: FleetEvent[]): void {
    let i = all.length;
    for (let kept = 0; i > 0 && kept < MAX_STATUS_EVENTS; ) if (!all[--i].held) kept++;
    for (; i < all.length; i++) if (!all[i].held) this.items.push(all[i]);
    if (this.items.length >= 2 * MAX_STATUS_EVENTS) this.items = this.items.slice(-MAX_STATUS_EVENTS);
  }

  /** The recent events, oldest first, at most MAX_STATUS_EVENTS. */
  events(): FleetEvent[] {
    return this.items.slice(-MAX_STATUS_EVENTS);
  }
}

/**
 * The status page's feed: watchers get a `status` frame every STATUS_INTERVAL_MS, built once for
 * all of them and not at all while nobody watches, and every event as it is relayed; the agents'
 * `applied` reports fill each node's ring of response times.
 */
export class StatusFeed {
  private readonly rts = new Map<string, AppliedRecord[]>();
  private timer?: NodeJS.Timeout;

  constructor(
    private readonly conns: Connections,
    private readonly state: () => { hub: string; seq: string; claims: Claims },
    private readonly log: (line: string) => void,
    private readonly clocks: ClockWatch,
    private readonly history: History,
  ) {}

  watch(c: Conn): void {
    c.watching = true;
    this.log(`${c.who} opened the status page`);
    c.send({ type: "history", events: this.history.events() });
    this.broadcast();
    if (!this.timer) {
      this.timer = setInterval(() => this.broadcast(), STATUS_INTERVAL_MS);
      this.timer.unref();
    }
  }

  /** Records an agent's `applied` report in its node's ring of response times. */
  applied(c: Conn, f: AppliedFrame): void {
    let ring = this.rts.get(c.entry.name);
    if (!ring) this.rts.set(c.entry.name, (ring = []));
    for (const r of f.events) {
      ring.push(r);
      if (c.appliedSeq === undefined || comparePositions(r.seq, c.appliedSeq) > 0) c.appliedSeq = r.seq;
    }
    if (ring.length > RT_RING) ring.splice(0, ring.length - RT_RING);
  }

  /** Shows relayed events to the watchers (a burst of 100k: the newest few hundred, as the page shows no more). */
  relayed(all: FleetEvent[]): void {
    this.history.relayed(all);
    if (!this.timer) return;
    const shown = all.filter((e) => !e.held).slice(-MAX_STATUS_EVENTS);
    if (!shown.length) return;
    let frame: Buffer | undefined;
    for (const c of this.conns) if (c.watching) c.send((frame ??= Buffer.from(JSON.stringify(eventsFrame(shown, Date.now())))));
  }

  frame(): StatusFrame {
    const now = Date.now();
    const { hub, seq, claims } = this.state();
    const { bans, total } = statusBans(claims, now, MAX_STATUS_BANS);
    const rt = [];
    for (const [node, ring] of this.rts) for (const r of ring) if (r.at > now - STATUS_RT_WINDOW_MS) rt.push({ node, at: r.at, rtMs: r.rtMs });
    rt.sort((a, b) => a.at - b.at);
    // Events accepted but not yet relayed to an agent: journal seqs count; stream IDs only tell "none" (a hub relays what it reads at once).
    const lagOf = (sent: string): number | undefined => {
      if (/^\d+$/.test(seq) && /^\d+$/.test(sent)) return Math.max(0, Number(seq) - Number(sent));
      return comparePositions(sent, seq) >= 0 ? 0 : undefined;
    };
    const conns = [...this.conns].filter((c) => c.hello);
    return {
      type: "status",
      hub,
      seq,
      at: now,
      conns: conns.map((c) => ({ name: c.entry.name, role: c.entry.role, remote: c.remote, kind: c.kind, since: c.since, lastSeen: c.lastSeen, lag: c.sentSeq === undefined ? undefined : lagOf(c.sentSeq), appliedSeq: c.appliedSeq, enforcement: c.enforcement, verdict: c.enforcement && enforcementVerdict(c.enforcement), clockSkewMs: this.clocks.of(c.entry.name) })),
      bans,
      bansTotal: total,
      rt: rt.slice(-MAX_STATUS_RT),
    };
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private broadcast(): void {
    const watchers = [...this.conns].filter((c) => c.watching);
    if (!watchers.length) return this.stop();
    const frame = Buffer.from(JSON.stringify(this.frame()));
    for (const c of watchers) c.send(frame);
  }
}

/**
 * Sends durable events on to every agent, their origin's included (it holds its own node's
 * bans in its kernel too), one frame serialised once for all, and tells the observers.
 */
export class Relay {
  constructor(
    private readonly conns: Connections,
    private readonly metrics: Metrics,
    private readonly recorder: Recorder,
    private readonly feed: StatusFeed,
    private readonly syncs: Syncs,
  ) {}

  /** `all` became durable (or came from the store's reload); `upTo` is the hub's durable position now. */
  send(all: FleetEvent[], upTo: string): void {
    const receiving = this.conns.receiving();
    for (const c of receiving) c.sentSeq = upTo;
    this.feed.relayed(all);
    // Claims held back by --quorum stay in the store and the claims, and go nowhere yet.
    const events = all.some((e) => e.held) ? all.filter((e) => !e.held) : all;
    this.syncs.relayed(events, upTo);
    if (!events.length) return;
    const sent = { ban: 0, unban: 0 };
    for (const e of events) sent[e.kind] += receiving.length;
    // One frame for every agent: serialised once, not once per agent (1,000 agents).
    let frame: Buffer | undefined;
    const now = Date.now();
    for (const c of receiving) c.send((frame ??= Buffer.from(JSON.stringify(eventsFrame(events, now)))));
    this.metrics.relayed(events, sent, now);
    for (const e of events) this.recorder.row({ action: "RELAY", ip: e.ip, origin: e.origin, jail: e.jail, until: e.until, rtMs: now - e.detectedAt, detail: `${e.kind} seq ${e.seq} to ${receiving.length} agent(s)` });
  }
}

// ---------------------------------------------------------------------------------------------
// The publish path, one for WebSocket and HTTP: refusal rules -> fleet rules -> store -> ack

/** Takes ban and unban frames from nodes: refuses, decides, stores, acks. */
export class Publisher {
  constructor(
    private readonly fleet: FleetState,
    private readonly store: Store,
    private readonly limiter: RateLimiter,
    private readonly protectedNets: Address[],
    private readonly refusals: Refusals,
    private readonly metrics: Metrics,
    private readonly recorder: Recorder,
    private readonly log: (line: string) => void,
    private readonly clocks: ClockWatch,
  ) {}

  /** Publishes `f` from `entry`: answers its ack once durable, or its refusal. */
  publish(entry: TokenEntry, remote: string, f: BanFrame | UnbanFrame, answer: Answer, http = false): void {
    const no = this.refusal(entry, f);
    if (no) return this.refusals.refuse({ ...no, node: entry.name, remote, id: f.id, ip: f.ip, http }, answer);
    this.accept(entry, remote, f).then(
      ({ seq, remaining }) => answer(200, { type: "ack", id: f.id, seq, ...(remaining === undefined ? {} : { remaining }) }),
      (e: Error) => this.refusals.refuse({ code: "internal", message: `Could not store the event: ${e.message}`, node: entry.name, remote, id: f.id, ip: f.ip, http }, answer),
    );
  }

  /** Why `entry` may not publish `f` (role, admin-only unban, protected network, rate), or undefined. */
  refusal(entry: TokenEntry, f: BanFrame | UnbanFrame): { code: ErrorCode; message: string } | undefined {
    if (entry.role === "reader") return { code: "forbidden", message: `Node ${entry.name} has the reader role and cannot publish` };
    if (f.type === "unban" && f.all && entry.role !== "admin") return { code: "forbidden", message: `Only an admin can unban for every node; ${entry.name} is a ${entry.role}` };
    if (f.type === "ban") {
      const addr = parseAddress(f.ip)!;
      const hit = this.protectedNets.find((n) => overlaps(n, addr));
      if (hit) return { code: "protected", message: `Refusing to ban ${f.ip}: it overlaps the protected network ${hit.text}` };
    }
    const full = f.type === "ban" ? this.fleet.claimLimit(entry.name, f.ip, Date.now()) : undefined;
    if (full) return { code: "claim_limit", message: full };
    if (!this.limiter.take(entry.name, Date.now())) return { code: "rate_limited", message: `Node ${entry.name} is over its limit of ${this.limiter.rate} events/s (burst ${this.limiter.burst}); slow down and retry` };
    return undefined;
  }

  /**
   * Accepts one event from `entry`; resolves with its seq once it is durable (the ack), and for
   * an admin's unban for every node the live claims it left on the address (0: all lifted).
   */
  private async accept(entry: TokenEntry, remote: string, f: BanFrame | UnbanFrame): Promise<{ seq: string; remaining?: number }> {
    const unavailable = this.store.unavailable();
    if (unavailable) throw new Error(unavailable);
    const now = Date.now();
    this.clocks.observe(entry.name, f.sentAt, now, f.type);
    const d = this.fleet.decide(entry.name, f, now);
    const all = f.type === "unban" && f.all === true;
    // A replay or an older event: nothing changes, but the sender still gets its ack.
    if ("standing" in d) {
      // Still a trace: a Fail2Ban restart re-sends every ban it restores, and the operator looks for it here.
      const again = d.standing.id === d.event.id ? "the same event again (a resend)" : `no newer than the claim ${d.standing.origin} holds (a ban Fail2Ban restored after a restart, or a late one)`;
      this.recorder.row({ action: "RECEIVE", ip: f.ip, origin: entry.name, jail: f.jail, until: d.standing.until, detail: `${f.type} from ${entry.name} (${remote}): ${again}; nothing changes` });
      this.log(`${f.type} of ${printable(f.ip)} from ${entry.name}: ${again}; nothing changes`);
      const seq = await this.store.replay(d.standing, d.event);
      return all ? { seq, remaining: this.fleet.remaining(f.ip, [], Date.now()) } : { seq };
    }
    this.tell(entry, remote, d.event, d.decision, now);
    if (d.batch.length > 1 && all) this.log(`unban of ${f.ip} for every node by ${entry.name}: also lifting ${d.batch.length - 1} claim(s) dated after it (${d.batch.slice(1).map((e) => e.origin).join(", ")})`);
    this.fleet.stage(d.batch);
    try {
      const seq = (await this.store.append(d.batch))[0];
      return all ? { seq, remaining: this.fleet.remaining(f.ip, d.batch, Date.now()) } : { seq };
    } finally {
      this.fleet.unstage(d.batch);
    }
  }

  /** Tells the observers about an accepted event and what the fleet rules made of it. */
  private tell(entry: TokenEntry, remote: string, e: FleetEvent, d: RuleDecision, now: number): void {
    if (d.hold) this.recorder.row({ action: "HOLD", ip: e.ip, origin: e.origin, jail: e.jail, until: e.until, detail: `${d.hold.claimers} of ${d.hold.quorum} node(s) claim it: not relayed until --quorum is reached` });
    if (d.escalation) {
      const { event, priors, bantime, seconds } = d.escalation;
      this.metrics.escalated();
      this.recorder.row({ action: "ESCALATE", ip: e.ip, origin: e.origin, jail: e.jail, until: event.until, detail: `banned ${priors} time(s) before: ${bantime} s x ${event.escalation} = ${seconds} s on every node${e.held ? " (held with the ban)" : ""}` });
      this.log(`escalated ${e.ip}: banned ${priors} time(s) before, now ${seconds} s on every node`);
    }
    this.metrics.received(e);
    this.recorder.row({ action: "RECEIVE", ip: e.ip, origin: e.origin, jail: e.jail, until: e.until, rtMs: now - e.detectedAt, detail: `${e.kind} from ${entry.name} (${remote})` });
  }
}

/** `HOST:PORT` of the peer of a request. */
function remoteOf(req: IncomingMessage): string {
  return `${req.socket.remoteAddress}:${req.socket.remotePort}`;
}

/** A socket as the HTTP server saw it connect: under TLS, the plain socket below the TLS one. */
type RawSocket = Duplex & { remoteAddress?: string; remotePort?: number; destroyed: boolean; _parent?: RawSocket };

/** The socket `s` is, or lies on (TLS). */
function rawOf(s: RawSocket): RawSocket {
  return s._parent ?? s;
}

/** The open-file limit of this process (soft), from /proc/self/limits; undefined where it cannot be read. */
function openFileLimit(): number | undefined {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(readFileSync("/proc/self/limits", "utf8"));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** `--max-pending`'s default: a quarter of the open-file limit (the rest is for nodes, the journal, logs), 16 to 1024. */
export function defaultMaxPending(fileLimit = openFileLimit()): number {
  return fileLimit === undefined ? 256 : Math.max(16, Math.min(1024, Math.floor(fileLimit / 4)));
}

/**
 * Every socket's admission, the one path for HTTP, WebSocket and TLS alike: a socket is pending
 * from its connection until a request on it is authenticated (`Gate.admit`), and again while a
 * kept-alive socket waits between requests. Pending sockets are capped per source address (the
 * next is closed at once) and in all (the one waiting longest is closed for the new one), and
 * each gets PENDING_TIMEOUT_MS: silent, trickling and idle sockets cannot hold the hub's file
 * descriptors. Every socket closed here is a refusal.
 */
export class Admission {
  /** Pending sockets, oldest first, with their source address. */
  private readonly pending = new Map<RawSocket, { host: string; remote: string; since: number }>();
  private readonly perHost = new Map<string, number>();
  private readonly timer = every(1000, () => this.sweep(Date.now()));

  constructor(
    private readonly maxPending: number,
    private readonly maxPerAddress: number,
    private readonly refusals: Refusals,
  ) {}

  /** A new socket: pending, unless its address already holds its share (closed at once). */
  connected(s: RawSocket): void {
    s.once("close", () => this.leave(s));
    const host = s.remoteAddress ?? "unknown";
    const remote = `${host}:${s.remotePort}`;
    const held = this.perHost.get(host) ?? 0;
    if (held >= this.maxPerAddress) return this.drop(s, remote, "too_many_pending", `sockets not yet authenticated: ${held} from ${host}, the limit is ${this.maxPerAddress} per address`);
    if (this.pending.size >= this.maxPending) {
      const [oldest, p] = this.pending.entries().next().value!;
      this.drop(oldest, p.remote, "too_many_pending", `sockets not yet authenticated: ${this.pending.size} in all, the limit is ${this.maxPending}; closing the one waiting longest`);
    }
    this.enter(s, host, remote);
  }

  /** A request on `s` was authenticated, or `s` became a WebSocket: no longer pending. */
  admitted(s: RawSocket): void {
    this.leave(rawOf(s));
  }

  /** The authenticated request on `s` was answered and the socket kept alive: pending again. */
  idle(s: RawSocket): void {
    const raw = rawOf(s);
    if (!raw.destroyed && !this.pending.has(raw)) this.enter(raw, raw.remoteAddress ?? "unknown", `${raw.remoteAddress}:${raw.remotePort}`);
  }

  /** Sockets pending now, for /metrics. */
  get size(): number {
    return this.pending.size;
  }

  /** Closes the sockets pending longer than PENDING_TIMEOUT_MS. */
  sweep(now: number): void {
    for (const [s, p] of this.pending) {
      if (now - p.since < PENDING_TIMEOUT_MS) break;
      this.drop(s, p.remote, "timeout", `no authenticated request within ${PENDING_TIMEOUT_MS / 1000} s of connecting`);
    }
  }

  close(): void {
    clearInterval(this.timer);
  }

  private enter(s: RawSocket, host: string, remote: string): void {
    this.pending.set(s, { host, remote, since: Date.now() });
    this.perHost.set(host, (this.perHost.get(host) ?? 0) + 1);
  }

  private leave(s: RawSocket): void {
    const p = this.pending.get(s);
    if (!p) return;
    this.pending.delete(s);
    const n = this.perHost.get(p.host)! - 1;
    if (n > 0) this.perHost.set(p.host, n);
    else this.perHost.delete(p.host);
  }

  private drop(s: RawSocket, remote: string, code: RefusalCode, message: string): void {
    this.leave(s);
    this.refusals.refuse({ code, message, remote, connection: true });
    s.destroy();
  }
}

/** Authentication: the token list, the per-node connection limit, and no one in while the hub stops. */
export class Gate {
  closing = false;

  private constructor(
    private readonly file: string,
    private tokens: TokenEntry[],
    private readonly conns: Connections,
    private readonly maxConnsPerNode: number,
    private readonly admission: Admission,
    private readonly refusals: Refusals,
    private readonly log: (line: string) => void,
  ) {}

  static async open(file: string, conns: Connections, maxConnsPerNode: number, admission: Admission, refusals: Refusals, log: (line: string) => void): Promise<Gate> {
    return new Gate(file, parseTokens(await readFile(file, "utf8"), file), conns, maxConnsPerNode, admission, refusals, log);
  }

  /**
   * Reads the token file again (SIGHUP); connections whose token went or changed are closed. A
   * file that does not parse, or lists no node (empty: an editor or tool rewriting it in place),
   * throws and the old list stays: a reload never locks out every node.
   */
  async reload(): Promise<void> {
    const tokens = parseTokens(await readFile(this.file, "utf8"), this.file);
    if (!tokens.length) throw new UsageError(`${this.file} lists no node (empty, or being rewritten?); reloading it would lock out all ${this.tokens.length}`);
    this.tokens = tokens;
    this.conns.revoke(this.tokens, this.log);
    this.log(`loaded ${this.tokens.length} node(s) from ${this.file}`);
  }

  /**
   * The node a request's token names, or undefined once the refusal (401, 503, 429) is answered.
   * Its socket is admitted then: no longer pending (`Admission`), counted with the node's.
   */
  admit(req: IncomingMessage, remote: string, answer: Answer): TokenEntry | undefined {
    const token = requestToken(req);
    const entry = token === undefined ? undefined : findToken(this.tokens, token);
    if (!entry || this.closing) {
      const why = this.closing ? "hub is stopping" : token === undefined ? "no bearer token" : "unknown token";
      this.refusals.refuse({ code: "unauthorized", message: why, remote, connection: true }, answer, this.closing ? 503 : 401);
      return undefined;
    }
    const open = this.conns.countOf(entry.name);
    if (open >= this.maxConnsPerNode) {
      this.refusals.refuse({ code: "too_many_connections", message: `already ${open} open, the limit is ${this.maxConnsPerNode}`, csv: `${open} open`, node: entry.name, remote, connection: true }, answer);
      return undefined;
    }
    this.admission.admitted(req.socket as RawSocket);
    return entry;
  }
}

/** The WebSocket side: connections are opened here, their frames validated and handed on. */
export class Sessions {
  // A status page offers its token as a subprotocol too: the hub answers with banshare.v1 only.
  private readonly wss = new WebSocketServer({ noServer: true, maxPayload: 1024 * 1024, perMessageDeflate: false, handleProtocols: (offered) => (offered.has(STATUS_PROTOCOL) ? STATUS_PROTOCOL : false) });

  constructor(
    private readonly opts: Pick<HubOptions, "maxPrefix" | "maxBufferedBytes">,
    private readonly gate: Gate,
    private readonly conns: Connections,
    private readonly fleet: FleetState,
    private readonly store: Store,
    private readonly publisher: Publisher,
    private readonly refusals: Refusals,
    private readonly feed: StatusFeed,
    private readonly syncs: Syncs,
    private readonly log: (line: string) => void,
    private readonly clocks: ClockWatch,
  ) {}

  /** An HTTP upgrade: authenticated before the WebSocket handshake, refused in plain HTTP. */
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    socket.on("error", () => socket.destroy());
    const remote = remoteOf(req);
    const entry = this.gate.admit(req, remote, (status) => socket.end(`HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nWWW-Authenticate: Bearer\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`));
    if (entry) this.wss.handleUpgrade(req, socket, head, (ws) => this.open(new Conn(ws, entry, requestToken(req)!, remote, this.opts.maxBufferedBytes, this.log)));
  }

  close(): void {
    this.wss.close();
  }

  private open(c: Conn): void {
    this.conns.add(c);
    const answer = this.answer(c);
    c.ws.on("message", (data: Buffer, isBinary) => this.frame(c, data, isBinary, answer));
    c.ws.on("pong", () => c.seen());
    // A frame the WebSocket layer refuses (over maxPayload, invalid UTF-8, a protocol error)
    // closes the connection: it is a refused frame all the same, counted and logged as one.
    c.ws.on("error", (e: Error & { code?: string }) =>
      e.code?.startsWith("WS_ERR_") ? this.refuse(c, /^WS_ERR_(UNSUPPORTED_\w*LENGTH|TOO_MANY_BUFFERED_PARTS)$/.test(e.code) ? "too_big" : "bad_frame", `Closing the connection: ${e.message}`) : this.log(`${c.who}: ${e.message}`),
    );
    // A connection that never says hello would hold a slot forever: heartbeats keep it alive.
    const helloTimer = setTimeout(() => {
      if (c.hello) return;
      this.refuse(c, "not_hello", `Expected hello within ${HELLO_TIMEOUT_MS / 1000} s of connecting, got none`);
      c.ws.close(1008, "no hello");
    }, HELLO_TIMEOUT_MS);
    helloTimer.unref();
    c.ws.on("close", () => {
      clearTimeout(helloTimer);
      this.conns.delete(c);
      if (c.dropped) this.log(`${c.who}: ${c.dropped} frame(s) after its token was revoked dropped unread`);
    });
  }

  /** Answers on connection `c`; each refusal costs a log line and a CSV row, so a node that keeps sending garbage is cut off. */
  private answer(c: Conn): Answer {
    return (_status, f) => {
      if (f) c.send(f);
      if (f?.type === "error" && ++c.refused === MAX_REFUSED_PER_CONN) {
        this.log(`closing ${c.who}: ${MAX_REFUSED_PER_CONN} refused frames on one connection`);
        c.ws.close(1008, "too many refused frames");
      }
    };
  }

  private refuse(c: Conn, code: ErrorCode, message: string, id?: string, ip?: string): void {
    this.refusals.refuse({ code, message, node: c.entry.name, remote: c.remote, id, ip }, this.answer(c));
  }

  /** One frame from `c`, answered through `answer` (made once per connection: this is the hot path). */
  private frame(c: Conn, data: Buffer, isBinary: boolean, answer: Answer): void {
    // A revoked token's connection takes nothing more, whatever it sends before the socket is cut.
    if (c.revoked) return void c.dropped++;
    c.seen();
    if (isBinary) return this.refuse(c, "bad_frame", "Expected a JSON text frame, got a binary frame");
    if (data.length > MAX_NODE_FRAME_BYTES) return this.refuse(c, "too_big", `Expected a frame of at most ${MAX_NODE_FRAME_BYTES} bytes, got ${data.length}`);
    const parsed = parseNodeFrame(data.toString("utf8"), Date.now(), this.opts.maxPrefix);
    if (!parsed.ok) return this.refuse(c, parsed.code, parsed.message, parsed.id);
    const f = parsed.value;
    if (f.type === "hello") return this.hello(c, f);
    if (f.type === "applied") {
      if (!c.hello) return this.refuse(c, "not_hello", "Expected hello as the first frame, got applied");
      if (!c.receiving) return this.refuse(c, "forbidden", `Expected applied only from an agent that receives events, got it from a ${c.watching ? "status page" : "sender"}`);
      return this.feed.applied(c, f);
    }
    if (f.type === "enforcement") {
      if (!c.hello) return this.refuse(c, "not_hello", "Expected hello as the first frame, got enforcement");
      if (!c.receiving) return this.refuse(c, "forbidden", `Expected enforcement only from an agent that receives events, got it from a ${c.watching ? "status page" : "sender"}`);
      const { type: _type, ...report } = f;
      c.enforcement = { ...report, at: Date.now() };
      return;
    }
    if (!c.hello) return this.refuse(c, "not_hello", `Expected hello as the first frame, got ${f.type}`, f.id, f.ip);
    this.publisher.publish(c.entry, c.remote, f, answer);
  }

  private hello(c: Conn, f: HelloFrame): void {
    if (c.hello) return this.refuse(c, "bad_frame", "Expected one hello per connection, got a second");
    if (f.node !== undefined && f.node !== c.entry.name) {
      this.refuse(c, "forbidden", `This token belongs to node ${c.entry.name}, not ${f.node}`);
      c.ws.close(1008, "token does not match node");
      return;
    }
    if (f.want === "status" && c.entry.role === "node") {
      this.refuse(c, "forbidden", `Node ${c.entry.name} has the node role; the status page needs a reader or admin token`);
      c.ws.close(1008, "status needs a reader or admin token");
      return;
    }
    c.hello = true;
    const now = Date.now();
    this.clocks.observe(c.entry.name, f.sentAt, now, "hello");
    c.send({ type: "welcome", v: PROTOCOL_VERSION, hub: this.store.hubId, node: c.entry.name, role: c.entry.role, seq: this.store.position(), accepts: ["applied", "enforcement"], now });
    if (f.want === "events") {
      void this.sync(c, f.cursor).catch((e: Error) => {
        this.log(`error: sync for ${c.who} failed, closing its connection for a retry: ${e.message}`);
        c.ws.close(1011, "sync failed");
      });
    } else if (f.want === "status") this.feed.watch(c);
  }

  /**
   * Brings an agent up to date (`Syncs`): the events after its cursor when the store can resume
   * from it, else the full state. Only what is durable (the fleet's claims up to its durable
   * position): an event still on its way to the store reaches the agent by relay once it is there.
   */
  private async sync(c: Conn, cursor: Cursor | undefined): Promise<void> {
    const resumes = cursor !== undefined && cursor.hub === this.store.hubId && isPosition(cursor.seq) && (await this.store.resumes(cursor.seq, this.fleet.durable));
    if (c.ws.readyState !== c.ws.OPEN) return;
    this.syncs.start(c, resumes ? cursor.seq : undefined);
  }
}

/** Resolves once `res` has drained (or closed). */
function drained(res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      res.off("drain", done);
      res.off("close", done);
      resolve();
    };
    res.on("drain", done);
    res.on("close", done);
  });
}

/** Answers with one JSON document. */
function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body) + "\n");
}

type Handler = (req: IncomingMessage, res: ServerResponse) => void;

/** The HTTP side: a route table, and one wrapper that authenticates the routes that need it. */
export class HttpApi {
  private readonly routes = new Map<string, { methods?: string[]; handle: Handler }>();
  private readonly pacer = new Pacer(HTTP_RATE, HTTP_BURST, HTTP_MAX_WAIT_MS);
  /** The fleet-long lists cost the hub as much as the fleet is long: per node, LIST_RATE a second. */
  private readonly lists = new RateLimiter(LIST_RATE, LIST_BURST);

  constructor(
    private readonly maxPrefix: PrefixLimits,
    private readonly gate: Gate,
    private readonly conns: Connections,
    private readonly fleet: FleetState,
    private readonly store: Store,
    private readonly publisher: Publisher,
    private readonly refusals: Refusals,
    private readonly metrics: Metrics,
    private readonly clocks: ClockWatch,
    private readonly admission: Admission,
  ) {
    // POST /v1/events: one ban or unban per request, answered with its ack or error frame. This is
    // how ban.ts sends: one round trip and no WebSocket library to load, for the fleet's reaction time.
    this.routes.set("/v1/events", { methods: ["POST"], handle: this.authed((req, res, entry, remote, served) => this.postEvent(req, res, entry, remote, served)) });
    // GET /v1/whoami (any role) and GET /v1/bans (admin only): what `ban.ts status` and `ban.ts list` show.
    this.routes.set("/v1/whoami", { methods: ["GET"], handle: this.authed((_req, res, entry) => this.whoami(res, entry)) });
    this.routes.set("/v1/bans", { methods: ["GET"], handle: this.authed((_req, res, entry, remote) => this.bans(res, entry, remote)) });
    // GET /v1/blocked (any role): the addresses an agent should hold, which `ban.ts status` compares with its kernel.
    this.routes.set("/v1/blocked", { methods: ["GET"], handle: this.authed((_req, res, entry, remote) => void this.blocked(res, entry, remote)) });
    // GET /v1/nodes (admin only): every connected agent and its enforcement report, for `ban.ts status --fleet`.
    this.routes.set("/v1/nodes", { methods: ["GET"], handle: this.authed((_req, res, entry, remote) => this.nodes(res, entry, remote)) });
    // The status page is static (no data, no token in it): its script fetches everything over the socket.
    for (const path of STATUS_PAGE.keys()) this.routes.set(path, { methods: ["GET", "HEAD"], handle: (req, res) => this.statusPage(req, res, path) });
    // /healthz: up or down for anyone (a load balancer); the fleet's size only with a token.
    const fullHealth = this.authed((_req, res) => this.healthz(res, true));
    this.routes.set("/healthz", { handle: (req, res) => (requestToken(req) === undefined ? this.healthz(res, false) : fullHealth(req, res)) });
    // /metrics: a reader's or an admin's token (Prometheus: `authorization: {credentials_file: ...}`).
    this.routes.set("/metrics", { handle: this.authed((_req, res, entry, remote) => this.metricsText(res, entry, remote)) });
  }

  /** Routes a request; all but publishing wait their turn per source address first (`Pacer`). */
  handle(req: IncomingMessage, res: ServerResponse): void {
    const path = (req.url ?? "/").split("?")[0];
    if (path === "/v1/events" && req.method === "POST") return this.route(path, req, res);
    const remote = remoteOf(req);
    const wait = this.pacer.wait(remoteHost(remote), Date.now());
    if (wait === undefined) {
      const message = `Too many requests: more than ${this.pacer.rate}/s (${this.pacer.burst} at once) from ${remoteHost(remote)}; slow down`;
      return this.refusals.refuse({ code: "rate_limited", message, remote, http: true }, (status, f) => {
        res.shouldKeepAlive = false;
        json(res, status, f);
      });
    }
    if (!wait) return this.route(path, req, res);
    setTimeout(() => {
      if (!res.destroyed && !req.socket.destroyed) this.route(path, req, res);
    }, wait);
  }

  private route(path: string, req: IncomingMessage, res: ServerResponse): void {
    const route = this.routes.get(path);
    if (route && (!route.methods || route.methods.includes(req.method ?? ""))) return route.handle(req, res);
    res.writeHead(404, { "content-type": "text/plain" });
    res.end("banshare hub: WebSocket endpoint; see /healthz and /metrics\n");
  }

  /**
   * Authenticates a request by its bearer token before `handle`; a refusal is answered as a bare
   * status. An admitted request counts with its node's connections until answered, and its
   * kept-alive socket is pending again afterwards (`Admission`).
   */
  private authed(handle: (req: IncomingMessage, res: ServerResponse, entry: TokenEntry, remote: string, served: ServedRequest) => void): Handler {
    return (req, res) => {
      const remote = remoteOf(req);
      const entry = this.gate.admit(req, remote, (status) => {
        res.writeHead(status, { "www-authenticate": "Bearer", connection: "close" });
        res.end();
      });
      if (!entry) return;
      const served = this.conns.request(entry, requestToken(req)!, res);
      res.once("finish", () => this.admission.idle(req.socket as RawSocket));
      handle(req, res, entry, remote, served);
    };
  }

  private postEvent(req: IncomingMessage, res: ServerResponse, entry: TokenEntry, remote: string, served: ServedRequest): void {
    const answer: Answer = (status, f) => json(res, status, f);
    const refuse = (code: ErrorCode, message: string, id?: string) => this.refusals.refuse({ code, message, node: entry.name, remote, id, http: true }, answer);
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_NODE_FRAME_BYTES) chunks.push(chunk);
    });
    req.on("error", () => res.destroy());
    req.on("end", () => {
      if (served.revoked) {
        return this.refusals.refuse({ code: "unauthorized", message: "token revoked while the request was sent", node: entry.name, remote, connection: true }, (status) => {
          res.writeHead(status, { "www-authenticate": "Bearer", connection: "close" });
          res.end();
        });
      }
      if (size > MAX_NODE_FRAME_BYTES) return refuse("too_big", `Expected a body of at most ${MAX_NODE_FRAME_BYTES} bytes, got ${size}`);
      const parsed = parseNodeFrame(Buffer.concat(chunks).toString("utf8"), Date.now(), this.maxPrefix);
      if (!parsed.ok) return refuse(parsed.code, parsed.message, parsed.id);
      const f = parsed.value;
      if (f.type === "hello" || f.type === "applied" || f.type === "enforcement") return refuse("bad_frame", `Expected a ban or unban frame in a POST, got ${f.type}`);
      this.publisher.publish(entry, remote, f, answer, true);
    });
  }

  private whoami(res: ServerResponse, entry: TokenEntry): void {
    const now = Date.now();
    const { blocked, claims } = this.fleet.totals(now);
    json(res, 200, { node: entry.name, role: entry.role, hub: this.store.hubId, seq: this.store.position(), now, blocked, claims });
  }

  /**
   * Every role's agent gets these addresses in its sync anyway: no more than a node may know.
   * Taken from the kept counts and written in pieces that each wait for the socket, as
   * `streamBans` does: 200,000 addresses never stall the hub for the others.
   */
  private async blocked(res: ServerResponse, entry: TokenEntry, remote: string): Promise<void> {
    if (!this.listAllowed(res, entry, remote)) return;
    const now = Date.now();
    const addresses = this.fleet.blockedAddresses(now);
    res.writeHead(200, { "content-type": "application/json" });
    let chunk = `{"hub":${JSON.stringify(this.store.hubId)},"seq":"${this.store.position()}","now":${now},"addresses":[`;
    for (let i = 0; i < addresses.length; i++) {
      chunk += `${i ? "," : ""}"${addresses[i]}"`;
      if (chunk.length < 64 * 1024) continue;
      const more = res.write(chunk);
      chunk = "";
      if (!more) await drained(res);
      if (res.destroyed) return;
    }
    res.end(`${chunk}]}\n`);
  }

  /** Whether `entry` may have a fleet-long list now (LIST_RATE); answers 429 when not. */
  private listAllowed(res: ServerResponse, entry: TokenEntry, remote: string): boolean {
    if (this.lists.take(entry.name, Date.now())) return true;
    const message = `Node ${entry.name} asks for the fleet's lists more than ${LIST_RATE} a second (${LIST_BURST} at once); slow down`;
    this.refusals.refuse({ code: "rate_limited", message, node: entry.name, remote, http: true }, (status, f) => json(res, status, f));
    return false;
  }

  private bans(res: ServerResponse, entry: TokenEntry, remote: string): void {
    if (entry.role !== "admin") {
      const message = `Only an admin can list the fleet's bans; ${entry.name} is a ${entry.role}`;
      return this.refusals.refuse({ code: "forbidden", message, node: entry.name, remote, http: true }, (status, f) => json(res, status, f));
    }
    if (this.listAllowed(res, entry, remote)) void this.streamBans(res, Date.now());
  }

  private nodes(res: ServerResponse, entry: TokenEntry, remote: string): void {
    if (entry.role !== "admin") {
      const message = `Only an admin can list the fleet's nodes; ${entry.name} is a ${entry.role}`;
      return this.refusals.refuse({ code: "forbidden", message, node: entry.name, remote, http: true }, (status, f) => json(res, status, f));
    }
    const nodes = this.conns.receiving().map((c) => ({ node: c.entry.name, remote: c.remote, since: c.since, lastSeen: c.lastSeen, enforcement: c.enforcement ?? null, verdict: c.enforcement ? enforcementVerdict(c.enforcement) : null, clockSkewMs: this.clocks.of(c.entry.name) ?? null }));
    nodes.sort((a, b) => (a.node < b.node ? -1 : a.node > b.node ? 1 : a.since - b.since));
    const body: NodeList = { hub: this.store.hubId, now: Date.now(), nodes };
    json(res, 200, body);
  }

  /**
   * Writes the live claims as one JSON document, one address per line, in pieces of about 64 KiB
   * that each wait for the socket to drain: 100k bans never sit in memory as one string, and a
   * slow reader holds back only its own response.
   */
  private async streamBans(res: ServerResponse, now: number): Promise<void> {
    res.writeHead(200, { "content-type": "application/json" });
    let chunk = `{"hub":${JSON.stringify(this.store.hubId)},"seq":"${this.store.position()}","now":${now},"bans":[`;
    let count = 0;
    for (const [ip, byOrigin] of this.fleet.claims) {
      const live = liveClaims(byOrigin, now);
      if (!live.length) continue;
      const nodes = live.filter((c) => c.origin !== ESCALATION_ORIGIN).length;
      chunk += `${count++ ? "," : ""}\n${JSON.stringify({ ip, nodes, claims: live })}`;
      if (chunk.length < 64 * 1024) continue;
      const more = res.write(chunk);
      chunk = "";
      if (!more) await drained(res);
      if (res.destroyed) return;
    }
    res.end(`${chunk}\n],"count":${count}}\n`);
  }

  private statusPage(req: IncomingMessage, res: ServerResponse, path: string): void {
    const [type, body] = STATUS_PAGE.get(path)!;
    res.writeHead(200, { "content-type": type, "content-security-policy": STATUS_CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY", "cache-control": "no-cache" });
    res.end(req.method === "HEAD" ? undefined : body);
  }

  /**
   * The store's state decides: a load balancer should not send ban.ts to a hub that cannot store.
   * Without a token, only that (and whether the store is up); with one, the hub id, seq, the fleet's size and why the store is down.
   */
  private healthz(res: ServerResponse, full: boolean): void {
    const h = this.store.health();
    if (!full) return json(res, h.ok ? 200 : 503, { ok: h.ok, ...(h.fields.store ? { store: h.fields.store } : {}) });
    json(res, h.ok ? 200 : 503, { ok: h.ok, hub: this.store.hubId, seq: this.store.position(), nodes: this.conns.size, claims: this.fleet.claims.size, ...h.fields });
  }

  /** Prometheus text for a reader or admin: counters and gauges kept up to date, nothing walked per claim. */
  private metricsText(res: ServerResponse, entry: TokenEntry, remote: string): void {
    if (entry.role === "node") {
      const message = `Metrics need a reader or admin token; ${entry.name} is a node`;
      return this.refusals.refuse({ code: "forbidden", message, node: entry.name, remote, http: true }, (status, f) => json(res, status, f));
    }
    const h = this.store.health();
    const t = this.fleet.totals(Date.now());
    const gauges: Gauges = { roles: this.conns.roles(), agents: this.conns.receiving().length, held: t.held, blocked: t.blocked, byOrigin: t.byOrigin, pending: this.admission.size, seq: h.count, store: h.metrics, enforcement: this.conns.enforcementByNode(), skews: this.clocks.all() };
    res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
    res.end(this.metrics.text(gauges));
  }
}

/**
 * Creates the HTTP(S) server and resolves once it listens. A failed TLS handshake is a refused
 * connection too (a node with the wrong CA, a scanner); a plain ws:// client is told in plain
 * HTTP, the only thing it can read, on the socket under the TLS layer (`_parent`: Node's, not
 * public; without it the socket just closes).
 */
async function listen(opts: HubOptions, http: HttpApi, sessions: Sessions, refusals: Refusals, admission: Admission): Promise<Server> {
  const onRequest = (req: IncomingMessage, res: ServerResponse) => http.handle(req, res);
  // Headers within PENDING_TIMEOUT_MS, a whole request within REQUEST_TIMEOUT_MS, a TLS handshake too: no socket waits for ever.
  const limits = { headersTimeout: PENDING_TIMEOUT_MS, requestTimeout: REQUEST_TIMEOUT_MS, connectionsCheckingInterval: 1000 };
  const server: Server = opts.tlsCert && opts.tlsKey ? createHttpsServer({ cert: await readFile(opts.tlsCert), key: await readFile(opts.tlsKey), handshakeTimeout: PENDING_TIMEOUT_MS, ...limits }, onRequest) : createHttpServer(limits, onRequest);
  server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => sessions.upgrade(req, socket, head));
  // The peer's address, taken while the socket is open: a failed handshake is reported after it closed.
  const peers = new WeakMap<object, string>();
  server.on("connection", (s: RawSocket) => {
    peers.set(s, `${s.remoteAddress}:${s.remotePort}`);
    admission.connected(s);
  });
  server.on("tlsClientError", (e: Error & { code?: string; reason?: string }, tls: Duplex & { _parent?: Duplex }) => {
    const plain = e.code === "ERR_SSL_HTTP_REQUEST";
    // A Node client that does not trust the certificate sends no alert: it just drops the connection.
    const why = plain ? "plain HTTP (ws://) on the TLS port" : `TLS handshake failed: ${e.code === "ECONNRESET" ? "the client dropped it (does it trust the hub's certificate? check its --ca)" : (e.reason ?? e.code ?? e.message.split("\n")[0])}`;
    refusals.refuse({ code: "tls", message: why, remote: peers.get(tls._parent ?? tls) ?? "an unknown address", connection: true });
    if (plain) tls._parent?.end("HTTP/1.1 400 Plain HTTP Sent To The TLS Port, Use wss://\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
  });
  server.listen(opts.port, opts.host);
  await once(server, "listening");
  return server;
}

/** Runs `fn` every `ms` without keeping the process alive. */
function every(ms: number, fn: () => void): NodeJS.Timeout {
  const t = setInterval(fn, ms);
  t.unref();
  return t;
}

/** True when `claims` holds `e` itself (the same event, held or relayed alike). */
function holdsClaim(claims: Claims, e: FleetEvent): boolean {
  const c = claims.get(e.ip)?.get(e.origin);
  return !!c && c.id === e.id && c.detectedAt === e.detectedAt && c.kind === e.kind && !!c.held === !!e.held;
}

/** What the store's news does: durable events join the fleet state and go out; a fatal error stops the hub. */
function storeListener(fleet: FleetState, relay: Relay, log: (line: string) => void, stop: () => void): StoreListener {
  return {
    // A claim the hub holds already (a store's write-back, a stream entry its start-up snapshot
    // had) is not relayed again; the agents' cursors still move on.
    durable: (events) => {
      const fresh = events.filter((e) => !holdsClaim(fleet.claims, e));
      fleet.commit(events);
      relay.send(fresh, fleet.durable);
    },
    repaired: (events) => {
      const newer = fleet.repair(events);
      if (!newer.length) return;
      log(`the stream was trimmed past this hub's reader: ${newer.length} claim(s) taken from the claims hash instead`);
      relay.send(newer, fleet.durable);
    },
    fatal: (why) => {
      log(`error: ${why}`);
      process.exitCode = 1;
      stop();
    },
    log,
  };
}

/** Starts a hub and resolves once it listens: wires the parts, data flowing one way (README, "Architecture"). */
export async function startHub(opts: HubOptions): Promise<Hub> {
  const log = opts.log;
  const recorder = await Recorder.open(opts.csvPath, log);
  const metrics = new Metrics();
  const refusals = new Refusals(metrics, recorder, log);
  const conns = new Connections();
  const admission = new Admission(opts.maxPending ?? defaultMaxPending(), opts.maxPendingPerAddress ?? DEFAULT_MAX_PENDING_PER_ADDRESS, refusals);
  const gate = await Gate.open(opts.tokensFile, conns, opts.maxConnsPerNode, admission, refusals, log);
  const fleet = new FleetState({ quorum: opts.quorum ?? 1, trusted: opts.trusted ?? [], escalate: opts.escalate, maxClaimsPerNode: opts.maxClaimsPerNode ?? DEFAULT_MAX_CLAIMS_PER_NODE });
  const clocks = new ClockWatch(log);
  const history = new History();
  const feed = new StatusFeed(conns, () => ({ hub: store.hubId, seq: store.position(), claims: fleet.claims }), log, clocks, history);
  const syncs = new Syncs(fleet, opts.syncChunk, log);
  const relay = new Relay(conns, metrics, recorder, feed, syncs);
  const store = await openStore(opts, storeListener(fleet, relay, log, () => void hub.close()), fleet, (e) => {
    fleet.load(e);
    history.load(e);
  });
  history.loaded();
  fleet.durable = store.position();
  fleet.totals(Date.now());
  const protectedNets = [...opts.protect.map((p) => parseAddress(p)!), ...ownAddresses()];
  const publisher = new Publisher(fleet, store, new RateLimiter(opts.rate, opts.burst), protectedNets, refusals, metrics, recorder, log, clocks);
  const sessions = new Sessions(opts, gate, conns, fleet, store, publisher, refusals, feed, syncs, log, clocks);
  const http = new HttpApi(opts.maxPrefix, gate, conns, fleet, store, publisher, refusals, metrics, clocks, admission);
  const server = await listen(opts, http, sessions, refusals, admission).catch(async (e: Error) => {
    admission.close();
    await Promise.all([store.close(), recorder.close()]);
    throw e;
  });
  const timers = [every(opts.heartbeatMs, () => conns.heartbeat(log)), every(60_000, () => fleet.prune(Date.now()))];
  let closed: Promise<void> | undefined;
  const hub: Hub = {
    port: (server.address() as AddressInfo).port,
    hubId: store.hubId,
    claims: fleet.claims,
    seq: () => store.health().count,
    reloadTokens: () => gate.reload(),
    close: () =>
      (closed ??= (async () => {
        gate.closing = true;
        for (const t of timers) clearInterval(t);
        feed.stop();
        syncs.stop();
        await store.barrier().catch(() => {});
        conns.terminateAll();
        sessions.close();
        admission.close();
        server.closeAllConnections();
        await new Promise<void>((resolve) => server.close(() => resolve()));
        await store.close();
        refusals.flush();
        refusals.stop();
        await recorder.close();
      })()),
  };
  if (!opts.tlsCert && !isLoopback(opts.host)) log(`warning: --insecure: serving plain ws:// on ${opts.host}; tokens and bans cross the network unencrypted`);
  log(`listening on ${opts.tlsCert ? "wss" : "ws"}://${opts.host.includes(":") ? `[${opts.host}]` : opts.host}:${hub.port} ${store.describe(fleet.claims.size)}`);
  return hub;
}

// ---------------------------------------------------------------------------------------------
// Command line

/** Adds a node to the token file and returns its new token (32 random bytes, base64url). */
export async function addNode(tokensFile: string, name: string, role: Role): Promise<string> {
  if (!isName(name)) throw new UsageError(`Expected a node name of A-Z a-z 0-9 _ . : -, got ${JSON.stringify(name)}`);
  const text = existsSync(tokensFile) ? await readFile(tokensFile, "utf8") : "";
  if (parseTokens(text, tokensFile).some((e) => e.name === name)) throw new UsageError(`Node ${name} is already in ${tokensFile}; remove its line first to issue a new token`);
  const token = randomBytes(32).toString("base64url");
  await mkdir(dirname(tokensFile), { recursive: true });
  await appendFile(tokensFile, `${text && !text.endsWith("\n") ? "\n" : ""}${name} ${hashToken(token)} ${role}\n`, { mode: 0o600 });
  return token;
}

/**
 * Makes a private CA and a hub certificate signed by it, with openssl (argv, no shell). Nodes
 * verify the hub with `--ca DIR/ca.pem`; keep ca.key offline once the hub certificate exists.
 */
/** The names a gen-cert certificate covers: the --host names, then this machine's own (so `ban.ts list --hub wss://127.0.0.1:7700` works on the hub), once each. */
export function certNames(hosts: string[]): string[] {
  return [...new Set([...hosts, "localhost", "127.0.0.1", "::1"])];
}

export async function genCert(dir: string, hosts: string[], days: number): Promise<string[]> {
  const { execFileSync } = await import("node:child_process");
  for (const h of hosts) if (!/^[A-Za-z0-9.:-]{1,253}$/.test(h)) throw new UsageError(`Expected --host to be a DNS name or address, got ${JSON.stringify(h)}`);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const f = (n: string) => `${dir}/${n}`;
  for (const n of ["ca.pem", "hub.pem"]) if (existsSync(f(n))) throw new UsageError(`${f(n)} exists already; move it away to make new certificates`);
  const san = certNames(hosts).map((h) => (parseAddress(h) ? `IP:${h}` : `DNS:${h}`)).join(",");
  const ssl = (...args: string[]) => execFileSync("openssl", args, { stdio: ["ignore", "ignore", "pipe"] });
  ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f("ca.key"), "-out", f("ca.pem"), "-days", String(days), "-subj", "/CN=banshare fleet CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
  ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f("hub.key"), "-out", f("hub.csr"), "-subj", `/CN=${hosts[0]}`);
  await writeFile(f("hub.ext"), `subjectAltName=${san}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n`);
  ssl("x509", "-req", "-in", f("hub.csr"), "-CA", f("ca.pem"), "-CAkey", f("ca.key"), "-CAcreateserial", "-out", f("hub.pem"), "-days", String(days), "-extfile", f("hub.ext"));
  for (const n of ["hub.csr", "hub.ext", "ca.srl"]) await rm(f(n), { force: true });
  for (const n of ["ca.key", "hub.key"]) await chmod(f(n), 0o600);
  return ["ca.pem", "ca.key", "hub.pem", "hub.key"].map(f);
}

export type ParsedArgs =
  | { command: "serve"; options: Omit<HubOptions, "log"> }
  | { command: "add-node"; name: string; tokensFile: string; role: Role; out?: string }
  | { command: "gen-cert"; dir: string; hosts: string[]; days: number };

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

/** Turns the command line (without `node hub.ts`) into a command. Throws with one sentence on bad usage. */
export function parseArgs(argv: string[]): ParsedArgs {
  let result: ParsedArgs | undefined;
  withOwnEnv(HUB_FLAGS, () =>
    yargs(argv)
      .scriptName("hub.ts")
      .usage("Usage: node --import tsx hub.ts [serve] --tokens FILE [options]\n       node --import tsx hub.ts add-node NAME --tokens FILE [--role node|reader|admin]")
      .env("BANSHARE")
      .config("config", "JSON file with any of these options")
      .option("tokens", { type: "string", describe: "Token file: one `NAME SHA256HEX [ROLE]` line per node" })
      .check((a) => onlyOnce(a, ["protect", "trust", "host"]))
      .command(
        ["serve", "$0"],
        "Run the hub",
        (y) =>
          y
            .option("listen", { type: "string", default: `127.0.0.1:${DEFAULT_PORT}`, describe: "Address and port to listen on, HOST:PORT or [IPV6]:PORT" })
            .option("state", { type: "string", describe: "Journal file (JSONL); without it the fleet state is lost on restart" })
            .option("store", { type: "string", describe: "Shared store instead of the journal, for several hubs: redis://HOST:PORT/DB, rediss://... (TLS) or redis-sentinel://HOST:PORT,HOST:PORT/MASTER/DB" })
            .option("store-replicas", { type: "number", default: 0, describe: "With --store: ack a ban only once this many Redis replicas have it (WAIT, 1 s), so a failover cannot lose it; 1 with Sentinel and one replica" })
            .option("stream-max-len", { type: "number", default: DEFAULT_STREAM_MAX_LEN, describe: "With --store: events the Redis stream keeps at most (a cursor older than the oldest gets a full sync)" })
            .option("stream-max-age", { type: "number", default: DEFAULT_STREAM_MAX_AGE_H, describe: "With --store: hours an event stays in the Redis stream" })
            .option("csv", { type: "string", describe: "Structured log: one CSV row per received, relayed or refused event" })
            .option("heartbeat", { type: "number", default: 15, describe: "Seconds between pings; a node that misses one is dropped" })
            .option("max-prefix-v4", { type: "number", default: DEFAULT_MAX_PREFIX.v4, describe: "Refuse IPv4 bans broader than this prefix length" })
            .option("max-prefix-v6", { type: "number", default: DEFAULT_MAX_PREFIX.v6, describe: "Refuse IPv6 bans broader than this prefix length" })
            .option("tls-cert", { type: "string", describe: "PEM certificate: serve wss:// (needs --tls-key)" })
            .option("tls-key", { type: "string", describe: "PEM private key for --tls-cert" })
            .option("max-buffered", { type: "number", default: 64, describe: "MiB queued to one socket before the hub drops it as too slow" })
            .option("rate", { type: "number", default: 50, describe: "Events per second one node may publish, sustained" })
            .option("burst", { type: "number", default: 5000, describe: "Events one node may publish at once above --rate (a Fail2Ban restart restores many bans)" })
            .option("max-conns-per-node", { type: "number", default: 32, describe: "Simultaneous connections one node may hold (agent plus ban.ts calls)" })
            .option("max-claims-per-node", { type: "number", default: DEFAULT_MAX_CLAIMS_PER_NODE, describe: "Addresses one node's live bans may claim at once; a ban of one more is refused (claim_limit, ban.ts exits 1), so one node cannot fill every agent's set" })
            .option("max-pending", { type: "number", describe: "Sockets not yet authenticated the hub holds at most; past that the one waiting longest is dropped (default: a quarter of the open-file limit, at most 1024)" })
            .option("max-pending-per-address", { type: "number", default: DEFAULT_MAX_PENDING_PER_ADDRESS, describe: "Sockets not yet authenticated one source address may hold; more are closed at once" })
            .option("protect", { type: "string", array: true, default: [] as string[], describe: "Network no ban may touch, e.g. your admin range (repeatable); the hub's own addresses are always protected" })
            .option("insecure", { type: "boolean", default: false, describe: "Serve plain ws:// on a non-loopback address: tokens and bans cross the network unencrypted" })
            .option("escalate", { type: "number", describe: "Repeat offenders: multiply a ban by this factor for each earlier ban of the address (by any node, within --escalate-max), on every node; off by default" })
            .option("escalate-max", { type: "number", default: 604800, describe: "Longest escalated ban, in seconds (default 7 days); earlier bans count as long as this" })
            .option("quorum", { type: "number", default: 1, describe: "Relay a ban to the fleet only once this many distinct nodes have claimed the address (the origin's own Fail2Ban bans it at once)" })
            .option("trust", { type: "string", array: true, default: [] as string[], describe: "Node whose bans are relayed at once whatever --quorum says (repeatable)" }),
        (a) => {
          const { host, port } = parseListen(a.listen);
          for (const [flag, v, max] of [["--heartbeat", a.heartbeat, 86400], ["--max-prefix-v4", a.maxPrefixV4, 32], ["--max-prefix-v6", a.maxPrefixV6, 128], ["--max-buffered", a.maxBuffered, 65536]] as const) {
            if (!Number.isInteger(v) || v < (flag === "--heartbeat" || flag === "--max-buffered" ? 1 : 0) || v > max) throw new UsageError(`Expected ${flag} to be an integer up to ${max}, got ${v}`);
          }
          if (!Number.isInteger(a.maxClaimsPerNode) || a.maxClaimsPerNode < 1) throw new UsageError(`Expected --max-claims-per-node to be a whole number of at least 1, got ${a.maxClaimsPerNode}`);
          if (Boolean(a.tlsCert) !== Boolean(a.tlsKey)) throw new UsageError("Expected --tls-cert and --tls-key together, got only one");
          if (!a.tlsCert && !a.insecure && !isLoopback(host)) throw new UsageError(`Expected --tls-cert and --tls-key to listen on ${host} (tokens would cross the network in clear), or --insecure to do it anyway`);
          if (a.store !== undefined && a.state !== undefined) throw new UsageError("Expected --state (one hub, journal) or --store (several hubs, Redis), got both");
          if (a.store !== undefined) parseStoreUrl(a.store);
          if (!Number.isInteger(a.streamMaxLen) || a.streamMaxLen < 1 || !(a.streamMaxAge > 0)) throw new UsageError(`Expected --stream-max-len to be a positive integer and --stream-max-age a positive number of hours, got ${a.streamMaxLen} and ${a.streamMaxAge}`);
          for (const p of a.protect) if (!parseAddress(p)) throw new UsageError(`Expected --protect to be an address or CIDR, got ${JSON.stringify(p)}`);
          // Both decide against the address's claims as they stand when a ban arrives; hubs on one
          // Redis see each other's bans a moment late, so there the rules would not hold as documented.
          if (!Number.isInteger(a.storeReplicas) || a.storeReplicas < 0 || a.storeReplicas > 100) throw new UsageError(`Expected --store-replicas to be a whole number from 0 to 100, got ${a.storeReplicas}`);
          if (a.store && (a.escalate !== undefined || a.quorum !== 1)) throw new UsageError("Expected --escalate and --quorum on a hub with its own journal: with --store (several hubs) they are not supported yet");
          if (a.escalate !== undefined && !(a.escalate > 1 && a.escalate <= 100)) throw new UsageError(`Expected --escalate to be a factor above 1 (e.g. 2), got ${a.escalate}`);
          if (!Number.isInteger(a.escalateMax) || a.escalateMax < 1) throw new UsageError(`Expected --escalate-max to be a whole number of seconds, got ${a.escalateMax}`);
          if (!Number.isInteger(a.quorum) || a.quorum < 1 || a.quorum > 1000) throw new UsageError(`Expected --quorum to be a whole number from 1 to 1000, got ${a.quorum}`);
          for (const n of a.trust) if (!isName(n)) throw new UsageError(`Expected --trust to be a node name, got ${JSON.stringify(n)}`);
          if (!(a.rate > 0) || !(a.burst >= 1) || !Number.isInteger(a.maxConnsPerNode) || a.maxConnsPerNode < 1) throw new UsageError(`Expected --rate > 0, --burst >= 1 and --max-conns-per-node >= 1, got ${a.rate}, ${a.burst}, ${a.maxConnsPerNode}`);
          for (const [flag, v] of [["--max-pending", a.maxPending ?? 1], ["--max-pending-per-address", a.maxPendingPerAddress]] as const) {
            if (!Number.isInteger(v) || v < 1 || v > 1_000_000) throw new UsageError(`Expected ${flag} to be a whole number from 1 to 1000000, got ${v}`);
          }
          result = {
            command: "serve",
            options: {
              host,
              port,
              tokensFile: a.tokens!,
              statePath: a.state,
              csvPath: a.csv,
              heartbeatMs: a.heartbeat * 1000,
              maxPrefix: { v4: a.maxPrefixV4, v6: a.maxPrefixV6 },
              tlsCert: a.tlsCert,
              tlsKey: a.tlsKey,
              syncChunk: SYNC_CHUNK,
              maxBufferedBytes: a.maxBuffered * 1024 * 1024,
              rate: a.rate,
              burst: a.burst,
              maxConnsPerNode: a.maxConnsPerNode,
              maxClaimsPerNode: a.maxClaimsPerNode,
              maxPending: a.maxPending,
              maxPendingPerAddress: a.maxPendingPerAddress,
              protect: a.protect,
              insecure: a.insecure,
              escalate: a.escalate === undefined ? undefined : { factor: a.escalate, maxSeconds: a.escalateMax },
              quorum: a.quorum,
              trusted: a.trust,
              store: a.store,
              storeReplicas: a.storeReplicas,
              streamMaxLen: a.streamMaxLen,
              streamMaxAgeMs: a.streamMaxAge * 3600_000,
            },
          };
        },
      )
      .command(
        "add-node <name>",
        "Enrol a node: append its token hash to the token file and print the token once",
        (y) =>
          y
            .positional("name", { type: "string", demandOption: true, describe: "Node name, usually the host name" })
            .option("role", { choices: ROLES, default: "node" as Role, describe: "node: send and receive; reader: receive only; admin: node plus fleet-wide unban" })
            .option("out", { type: "string", describe: "Write the token to this new file, mode 600 (instead of printing it); refuses an existing file" }),
        (a) => {
          result = { command: "add-node", name: a.name, tokensFile: a.tokens!, role: a.role as Role, ...(a.out ? { out: a.out } : {}) };
        },
      )
      .command(
        "gen-cert",
        "Make a private CA and a certificate for the hub (openssl), for a fleet without a public CA",
        (y) =>
          y
            .option("dir", { type: "string", default: "/etc/banshare/tls", describe: "Where to write ca.pem, ca.key, hub.pem, hub.key" })
            .option("host", { type: "string", array: true, demandOption: true, describe: "Name or address the nodes use for the hub (repeatable)" })
            .option("days", { type: "number", default: 3650, describe: "Validity in days" }),
        (a) => {
          result = { command: "gen-cert", dir: a.dir, hosts: a.host, days: a.days };
        },
      )
      .strict()
      .fail((msg, err) => {
        throw err instanceof UsageError ? err : new UsageError(err?.message ?? msg);
      })
      .help()
      .version(false)
      .wrap(null)
      .parseSync());
  if (!result) throw new UsageError("Expected a command: serve, add-node or gen-cert");
  const tokensFile = result.command === "serve" ? result.options.tokensFile : result.command === "add-node" ? result.tokensFile : "not needed";
  if (!tokensFile) throw new UsageError("Expected --tokens FILE (or BANSHARE_TOKENS), got none");
  return result;
}

function logLine(line: string): void {
  // One line whatever it quotes: text from a peer (an error message, a name) cannot forge another.
  process.stderr.write(`${new Date().toISOString()} hub: ${printable(line)}\n`);
}

/**
 * Reports an error of `main` by its type: a usage error or a file that does not exist, one line
 * and exit 2; a system error (port taken, no permission, openssl failed), one line and exit 1;
 * anything else, its stack and exit 1.
 */
function reportError(e: unknown): void {
  const err = e as NodeJS.ErrnoException & { status?: number };
  const usage = e instanceof UsageError || err.code === "ENOENT";
  const oneLine = usage || typeof err.code === "string" || typeof err.status === "number";
  process.stderr.write(`hub.ts: ${oneLine ? err.message.split("\n")[0] : err.stack}\n`);
  process.exitCode = usage ? 2 : 1;
}

/** Runs the hub or one of its commands from the command line. */
export async function main(argv = process.argv.slice(2)): Promise<void> {
  let args: ParsedArgs;
  try {
    args = parseArgs(argv);
  } catch (e) {
    reportError(e);
    return;
  }
  if (args.command === "gen-cert") {
    try {
      const files = await genCert(args.dir, args.hosts, args.days);
      process.stderr.write(`Wrote ${files.join(", ")}; hub.pem covers ${certNames(args.hosts).join(", ")}.\nHub: --tls-cert ${files[2]} --tls-key ${files[3]}. Nodes: copy ${files[0]} to /etc/banshare/tls/ca.pem on each server (the "ca" of agent.json and ban.json) and use wss://${args.hosts[0]}:${DEFAULT_PORT}. Keep ca.key offline.\n`);
    } catch (e) {
      reportError(e);
    }
    return;
  }
  if (args.command === "add-node") {
    try {
      // The file first, "wx" and 0600: a token is never left readable, nor written over another.
      const fh = args.out ? await open(args.out, "wx", 0o600).catch((e: NodeJS.ErrnoException) => {
        throw new UsageError(e.code === "EEXIST" ? `Expected --out ${args.out} to be a new file, got one that exists: move it away or choose another name` : `Expected --out ${args.out} to be a file this user can create: ${e.message}`);
      }) : undefined;
      const token = await addNode(args.tokensFile, args.name, args.role).catch(async (e) => {
        await fh?.close();
        if (args.out) await rm(args.out, { force: true });
        throw e;
      });
      if (fh) {
        await fh.writeFile(token + "\n");
        await fh.sync();
        await fh.close();
        process.stderr.write(`Added ${args.name} (${args.role}) to ${args.tokensFile}; its token is in ${args.out} (mode 600). Copy it to that node's /etc/banshare/token (mode 600). A running hub loads it on SIGHUP.\n`);
      } else {
        process.stdout.write(token + "\n");
        process.stderr.write(`Added ${args.name} (${args.role}) to ${args.tokensFile}. Save the token above on that node in a root-only file (e.g. /etc/banshare/token, mode 600; or use --out FILE, which writes it so); it is not shown again. A running hub loads it on SIGHUP.\n`);
      }
    } catch (e) {
      reportError(e);
    }
    return;
  }
  let hub: Hub;
  try {
    hub = await startHub({ ...args.options, log: logLine });
  } catch (e) {
    reportError(e);
    return;
  }
  const stop = (sig: string) => {
    logLine(`${sig}: stopping`);
    void hub.close().then(() => logLine("stopped"));
  };
  process.once("SIGTERM", () => stop("SIGTERM"));
  process.once("SIGINT", () => stop("SIGINT"));
  process.on("SIGHUP", () => void hub.reloadTokens().catch((e: Error) => logLine(`SIGHUP: kept the old token list: ${e.message}`)));
}

// ---------------------------------------------------------------------------------------------
// Status page: static HTML, CSS and a small script (no build step, no libraries, no data in
// them). The script asks for a reader or admin token, keeps it in sessionStorage, offers it as a
// WebSocket subprotocol, says hello with `want: "status"` and draws what the hub sends.
// Every protocol value in the script (subprotocols, version, limits, the token pattern) comes
// from the TypeScript constants by interpolation; test/copies.test.ts checks the served script.

/** Content-Security-Policy of the status page: its own script, style and socket, nothing else. */
const STATUS_CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const STATUS_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>banshare status</title>
<link rel="icon" href="/favicon.svg">
<link rel="stylesheet" href="/status.css">
<script src="/status.js" defer></script>
</head>
<body>
<header>
  <h1>banshare</h1>
  <span id="conn" class="muted">not connected</span>
  <button id="logout" type="button" hidden>Log out</button>
</header>
<p id="error" role="alert" hidden></p>
<form id="login" hidden autocomplete="off">
  <label for="token">Reader or admin token</label>
  <input id="token" name="token" type="password" autocomplete="off" spellcheck="false" required>
  <button type="submit">Open</button>
  <p class="muted">The token stays in this tab (sessionStorage) and goes to the hub only. Node tokens are refused.</p>
</form>
<main id="status" hidden>
  <section class="cards">
    <div><span class="label">Hub</span><span id="hub-id"></span></div>
    <div><span class="label">Seq</span><span id="hub-seq"></span></div>
    <div><span class="label">Connections</span><span id="conn-count"></span></div>
    <div><span class="label">Blocked addresses</span><span id="ban-count"></span></div>
  </section>
  <section class="wide">
    <h2>Nodes</h2>
    <div class="scroll"><table id="nodes"><thead><tr><th>Name</th><th>Role</th><th>Kind</th><th>Address</th><th>Connected</th><th>Last seen</th><th>Lag</th><th>Response</th><th>Enforcement</th><th>Clock</th></tr></thead><tbody></tbody></table></div>
  </section>
  <section>
    <h2>Response times</h2>
    <p class="muted">Detection on the origin to applied on each node, as the agents report it, and to the hub for the recent events (kept across a restart), up to the last ${STATUS_RT_WINDOW_MS / 3_600_000} hours.</p>
    <div id="chart"></div>
    <ul id="legend"></ul>
  </section>
  <section>
    <h2>Events <span class="muted">(the newest ${MAX_STATUS_EVENTS})</span></h2>
    <ol id="events"></ol>
  </section>
  <section>
    <h2>Active bans <span id="ban-shown" class="muted"></span></h2>
    <div class="scroll"><table id="bans"><thead><tr><th>Address</th><th>Origin</th><th>Jail</th><th>Detected</th><th>Time left</th><th>Claims</th></tr></thead><tbody></tbody></table></div>
  </section>
</main>
</body>
</html>
`;

const STATUS_CSS = String.raw`:root { color-scheme: light dark; --fg: #1b1f24; --bg: #f4f5f7; --card: #fff; --muted: #5f6b78; --line: #d8dce2; --ban: #b42318; --unban: #067647; --accent: #2459d1; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e8eb; --bg: #111418; --card: #1a1f25; --muted: #9aa3ad; --line: #2c333b; --ban: #f97066; --unban: #47cd89; --accent: #7aa2ff; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; padding: .75rem 1rem; border-bottom: 1px solid var(--line); background: var(--card); }
h1 { font-size: 1.15rem; margin: 0; }
h2 { font-size: 1rem; margin: 0 0 .5rem; }
main { padding: 1rem; display: grid; gap: 1rem; grid-template-columns: repeat(auto-fit, minmax(min(100%, 30rem), 1fr)); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .75rem; min-width: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(8rem, 1fr)); gap: .5rem; }
.cards, .wide { grid-column: 1 / -1; }
.cards div { display: flex; flex-direction: column; min-width: 0; overflow-wrap: anywhere; }
.label, .muted { color: var(--muted); font-size: .85rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
#events { list-style: none; margin: 0; padding: 0; max-height: 22rem; overflow-y: auto; font-variant-numeric: tabular-nums; }
#events li { padding: .2rem 0; border-bottom: 1px solid var(--line); display: flex; flex-wrap: wrap; gap: .2rem .6rem; }
.ban { color: var(--ban); font-weight: 600; }
.unban { color: var(--unban); font-weight: 600; }
#chart svg { width: 100%; height: auto; display: block; }
#legend { list-style: none; padding: 0; margin: .5rem 0 0; display: flex; flex-wrap: wrap; gap: .25rem 1rem; font-size: .85rem; }
.sw { display: inline-block; width: .7rem; height: .7rem; border-radius: 50%; margin-right: .3rem; vertical-align: middle; }
form { margin: 2rem auto; max-width: 24rem; padding: 1rem; background: var(--card); border: 1px solid var(--line); border-radius: 8px; display: grid; gap: .5rem; }
input, button { font: inherit; padding: .5rem; border-radius: 6px; border: 1px solid var(--line); }
button { background: var(--accent); color: #fff; border: 0; cursor: pointer; }
#logout { margin-left: auto; }
#error { margin: 1rem; padding: .6rem .8rem; border-radius: 6px; background: #fde8e7; color: #7a1b12; border: 1px solid #f4b4ae; }
@media (max-width: 600px) { main { padding: .5rem; gap: .5rem; } th, td { padding: .25rem .35rem; } }
`;

// Plain ES5-style script: every value from the hub goes into the page through textContent or
// an SVG attribute, never as markup.
const STATUS_JS = String.raw`"use strict";
(function () {
  var KEY = "banshare.token";
  var MAX_EVENTS = ${MAX_STATUS_EVENTS};
  var WINDOW_MS = ${STATUS_RT_WINDOW_MS};
  // The chart's series of detection -> the hub, from the events: a space, so never a node's name.
  var HUB_SERIES = "to the hub";
  var COLORS = ["#2459d1", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#0c8599", "#c2255c", "#5c940d"];
  var SVG = "http://www.w3.org/2000/svg";
  var ws = null, retry = null, attempt = 0, welcomed = false, hubError = "", skew = 0;
  var events = [];
  var colorOf = {};
  var last = null;

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function now() { return Date.now() - skew; }
  function dur(ms) {
    if (ms === null) return "never";
    var s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  function ago(t) { return dur(now() - t) + " ago"; }
  function clock(t) { return new Date(t).toLocaleTimeString(); }
  function color(node) {
    if (!(node in colorOf)) colorOf[node] = COLORS[Object.keys(colorOf).length % COLORS.length];
    return colorOf[node];
  }
  function median(xs) {
    var s = xs.slice().sort(function (a, b) { return a - b; });
    return s.length ? s[Math.floor((s.length - 1) / 2)] : 0;
  }

  function showError(msg) {
    $("error").textContent = msg;
    $("error").hidden = !msg;
  }
  function setConn(text) { $("conn").textContent = text; }
  function showLogin(msg) {
    $("status").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    setConn("not connected");
    showError(msg || "");
    $("token").focus();
  }

  function connect() {
    var token = sessionStorage.getItem(KEY);
    if (!token) return showLogin("");
    clearTimeout(retry);
    welcomed = false;
    hubError = "";
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
    var sock;
    try {
      sock = new WebSocket(url, [${JSON.stringify(STATUS_PROTOCOL)}, ${JSON.stringify(TOKEN_PROTOCOL_PREFIX)} + token]);
    } catch (e) {
      sessionStorage.removeItem(KEY);
      return showLogin("The browser cannot send this token: " + e.message);
    }
    ws = sock;
    setConn("connecting...");
    $("login").hidden = true;
    sock.onopen = function () { sock.send(JSON.stringify({ type: "hello", v: ${PROTOCOL_VERSION}, want: "status" })); };
    sock.onmessage = function (m) {
      var f;
      try { f = JSON.parse(m.data); } catch (e) { return; }
      if (f && typeof f === "object") handle(f);
    };
    sock.onclose = function () {
      if (ws !== sock) return;
      ws = null;
      if (!welcomed || !sessionStorage.getItem(KEY)) {
        sessionStorage.removeItem(KEY);
        return showLogin(hubError ? "The hub refused: " + hubError : "The hub refused the connection: the token is wrong or revoked (or the hub is unreachable).");
      }
      attempt++;
      var delay = Math.min(30000, 1000 * Math.pow(2, attempt));
      setConn("disconnected; reconnecting in " + Math.round(delay / 1000) + " s");
      retry = setTimeout(connect, delay);
    };
  }

  function handle(f) {
    switch (f.type) {
      case "welcome":
        welcomed = true;
        attempt = 0;
        showError("");
        setConn("connected as " + f.node + " (" + f.role + ")");
        $("status").hidden = false;
        $("logout").hidden = false;
        return;
      case "status":
        skew = Date.now() - f.at;
        render(f);
        return;
      case "event":
        addEvents([f]);
        return;
      case "sync":
        if (Array.isArray(f.events)) addEvents(f.events);
        return;
      case "history":
        // What the hub relayed before this page opened (and what its store held at start); live events follow.
        events = [];
        if (Array.isArray(f.events)) addEvents(f.events);
        return;
      case "error":
        hubError = String(f.message);
        showError("The hub refused: " + hubError);
        if (f.code === "forbidden") sessionStorage.removeItem(KEY);
        return;
    }
  }

  function addEvents(list) {
    for (var i = 0; i < list.length; i++) events.unshift(list[i]);
    if (events.length > MAX_EVENTS) events.length = MAX_EVENTS;
    var ol = $("events");
    clear(ol);
    events.forEach(function (e) {
      var li = el("li");
      li.dataset.ip = e.ip;
      li.appendChild(el("span", clock(e.relayedAt), "muted"));
      li.appendChild(el("span", e.kind, e.kind === "ban" ? "ban" : "unban"));
      li.appendChild(el("span", e.ip));
      li.appendChild(el("span", e.escalation ? "repeat offender: ban x" + e.escalation + " on every node (" + e.jail + ")" : "by " + e.origin + " (" + e.jail + ")", e.escalation ? "ban" : "muted"));
      li.appendChild(el("span", e.kind === "ban" ? "until " + (e.until === null ? "never" : clock(e.until)) : "", "muted"));
      li.appendChild(el("span", "to the hub in " + hubRt(e) + " ms", "muted rt"));
      ol.appendChild(li);
    });
    if (last) drawChart(last.rt, last.byNode);
  }

  // Detection on the origin (as the hub places it) to the hub's receipt.
  function hubRt(e) { return Math.max(0, e.relayedAt - e.detectedAt); }

  function render(f) {
    $("hub-id").textContent = f.hub;
    $("hub-seq").textContent = f.seq;
    $("conn-count").textContent = String(f.conns.length);
    $("ban-count").textContent = String(f.bansTotal);
    var byNode = {};
    f.rt.forEach(function (r) { (byNode[r.node] = byNode[r.node] || []).push(r.rtMs); });

    var tbody = $("nodes").tBodies[0];
    clear(tbody);
    f.conns.slice().sort(function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : a.since - b.since; }).forEach(function (c) {
      var tr = el("tr");
      tr.dataset.name = c.name;
      var rts = byNode[c.name];
      [c.name, c.role, c.kind === "events" ? "agent" : c.kind === "status" ? "status page" : "sender", c.remote, ago(c.since), ago(c.lastSeen),
        c.lag === undefined ? "-" : String(c.lag), rts ? rts[rts.length - 1] + " ms (median " + median(rts) + ")" : "-"].forEach(function (v, i) {
        tr.appendChild(el("td", v, i === 7 ? "rt" : i === 6 ? "lag" : ""));
      });
      // The hub's verdict on the agent's report: enforcing, drift N, or hook missing since.
      var enf = el("td", c.verdict ? c.verdict.text : c.kind === "events" ? "no report" : "-", "enforcement " + (c.verdict ? (c.verdict.ok ? "unban" : "ban") : "muted"));
      if (c.enforcement) enf.title = c.enforcement.backend + ": " + (c.enforcement.entries === undefined ? "entries not counted" : c.enforcement.entries + " entries") + " / " + c.enforcement.claims + " claims, " + c.enforcement.repairs + " repairs";
      tr.appendChild(enf);
      // The hub's clock minus the node's (one-way): beyond a second the node's clock is off, and the hub times its events by its own.
      var sk = c.clockSkewMs;
      var clk = el("td", sk === undefined ? "-" : Math.abs(sk) <= 1000 ? "in step" : dur(Math.abs(sk)) + (sk < 0 ? " ahead" : " behind"), "clock " + (sk !== undefined && Math.abs(sk) > 1000 ? "ban" : "muted"));
      clk.title = sk === undefined ? "not measured (an older node)" : "hub minus node: " + sk + " ms";
      tr.appendChild(clk);
      tbody.appendChild(tr);
    });

    last = { rt: f.rt, byNode: byNode };
    drawChart(f.rt, byNode);

    $("ban-shown").textContent = f.bans.length < f.bansTotal ? "(newest " + f.bans.length + " of " + f.bansTotal + ")" : "(" + f.bansTotal + ")";
    var bt = $("bans").tBodies[0];
    clear(bt);
    f.bans.forEach(function (b) {
      var tr = el("tr");
      tr.dataset.ip = b.ip;
      [b.ip, b.escalation ? b.origin + " (repeat offender, x" + b.escalation + ")" : b.origin, b.jail, ago(b.detectedAt), b.until === null ? "permanent" : dur(b.until - now()), String(b.claims)].forEach(function (v) { tr.appendChild(el("td", v)); });
      bt.appendChild(tr);
    });
  }

  function drawChart(nodeRt, nodeRts) {
    var box = $("chart");
    // The agents' response times, and detection -> the hub for each recent event (seeded from the hub's history).
    var rt = nodeRt.slice(), byNode = {};
    for (var n in nodeRts) byNode[n] = nodeRts[n];
    events.forEach(function (e) {
      rt.push({ node: HUB_SERIES, at: e.relayedAt, rtMs: hubRt(e) });
      (byNode[HUB_SERIES] = byNode[HUB_SERIES] || []).push(hubRt(e));
    });
    var W = Math.max(280, Math.round(box.clientWidth || 600)), H = 200, L = 48, B = 22, T = 8, R = 8;
    var end = now(), first = end;
    rt.forEach(function (r) { if (r.at < first) first = r.at; });
    // From the oldest point shown (a minute at least, WINDOW_MS at most) to now.
    var start = end - Math.min(WINDOW_MS, Math.max(60 * 1000, (end - first) * 1.1));
    var max = 10;
    rt.forEach(function (r) { if (r.rtMs > max) max = r.rtMs; });
    max = Math.ceil(max * 1.1);
    var s = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "Response times, ms" });
    // The y label sets the left margin: measured in the page, so "23332 ms" fits whole.
    clear(box);
    box.appendChild(s);
    var top = svg("text", { x: L - 4, y: T + 10, "text-anchor": "end", "font-size": 11, fill: "currentColor", "class": "ymax" }, max + " ms");
    s.appendChild(top);
    var wide = 0;
    try { wide = top.getComputedTextLength(); } catch (e) { wide = 0; }
    L = Math.max(L, Math.ceil((wide || (max + " ms").length * 7) + 10));
    top.setAttribute("x", String(L - 4));
    var x = function (t) { return L + ((t - start) / (end - start)) * (W - L - R); };
    var y = function (v) { return H - B - (Math.max(0, v) / max) * (H - B - T); };
    s.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "currentColor", "stroke-opacity": 0.4 }));
    s.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "currentColor", "stroke-opacity": 0.4 }));
    s.appendChild(svg("text", { x: L - 4, y: H - B, "text-anchor": "end", "font-size": 11, fill: "currentColor" }, "0"));
    s.appendChild(svg("text", { x: L, y: H - 6, "font-size": 11, fill: "currentColor" }, dur(end - start) + " ago"));
    s.appendChild(svg("text", { x: W - R, y: H - 6, "text-anchor": "end", "font-size": 11, fill: "currentColor" }, "now"));
    rt.forEach(function (r) {
      if (r.at < start) return;
      var c = svg("circle", { cx: x(r.at).toFixed(1), cy: y(r.rtMs).toFixed(1), r: 3, fill: color(r.node) });
      c.appendChild(svg("title", {}, r.node + ": " + r.rtMs + " ms at " + clock(r.at)));
      s.appendChild(c);
    });
    var legend = $("legend");
    clear(legend);
    Object.keys(byNode).sort().forEach(function (n) {
      var li = el("li");
      li.dataset.node = n;
      var sw = el("span", null, "sw");
      sw.style.background = color(n);
      li.appendChild(sw);
      li.appendChild(document.createTextNode(n + ": median " + median(byNode[n]) + " ms, " + byNode[n].length + " event(s)"));
      legend.appendChild(li);
    });
    if (!rt.length) legend.appendChild(el("li", "No response times reported yet.", "muted"));
  }

  $("login").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var token = $("token").value.trim();
    $("token").value = "";
    if (!/^${TOKEN_PATTERN}$/.test(token)) return showLogin("Expected a token of 1 to 512 printable ASCII characters without spaces (as hub.ts add-node prints it).");
    sessionStorage.setItem(KEY, token);
    connect();
  });
  $("logout").addEventListener("click", function () {
    sessionStorage.removeItem(KEY);
    clearTimeout(retry);
    if (ws) ws.close(1000, "logged out");
    ws = null;
    events = [];
    clear($("events"));
    showLogin("");
  });
  connect();
})();
`;

const STATUS_PAGE = new Map<string, [string, string]>([
  ["/", ["text/html; charset=utf-8", STATUS_HTML]],
  ["/status.css", ["text/css; charset=utf-8", STATUS_CSS]],
  ["/status.js", ["text/javascript; charset=utf-8", STATUS_JS]],
  ["/favicon.svg", ["image/svg+xml", '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="7" fill="#2459d1"/><path d="M4 8h8" stroke="#fff" stroke-width="2"/></svg>\n']],
]);

function isMain(): boolean {
  try {
    return realpathSync(process.argv[1] ?? "") === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isMain()) await main();
