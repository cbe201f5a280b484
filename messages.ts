/**
 * banshare wire protocol v1: frame types, constants, validators and the claim-merge rule.
 *
 * This is the one file hub.ts, agent.ts and ban.ts share. It does no I/O: every function
 * here is pure, so each script can validate every inbound frame the same way and the
 * fleet converges on one state whatever the delivery order.
 *
 * @module
 */

import { isIPv4, isIPv6 } from "node:net";

/** Protocol version spoken in `hello` and `welcome`. */
export const PROTOCOL_VERSION = 1;

/** Largest frame a node may send to the hub, in bytes. A ban frame is about 200 bytes. */
export const MAX_NODE_FRAME_BYTES = 16 * 1024;

/** Largest frame the hub sends (a `sync` chunk), in bytes. */
export const MAX_HUB_FRAME_BYTES = 64 * 1024 * 1024;

/** Longest ban accepted, in seconds (10 years). Fail2Ban's permanent ban is `-1`. */
export const MAX_BANTIME_S = 10 * 365 * 24 * 3600;

/**
 * How far into the future a time an agent reports (`applied`, `enforcement`) may be, in ms. The
 * agent reports them on the hub's clock, so this only bounds a confused or hostile peer.
 */
export const MAX_CLOCK_SKEW_MS = 5 * 60 * 1000;

/**
 * Two clocks this close (ms) are taken to agree: a one-way measurement cannot tell a smaller
 * skew from network delay. Beyond it the hub times a node's events by its own clock, and an
 * agent times bans by the hub's.
 */
export const CLOCK_TOLERANCE_MS = 1000;

/** How long a tombstone of a permanent ban is kept, in ms. */
export const PERMANENT_TOMBSTONE_MS = 30 * 24 * 3600 * 1000;

/** How long a tombstone is kept when the claim it cancels is not known, in ms. */
export const UNKNOWN_TOMBSTONE_MS = 24 * 3600 * 1000;

/** Origin of an admin unban that lifts every older claim on an address. */
export const ALL_ORIGINS = "*";

/**
 * Origin of the hub's own claim that lengthens a repeat offender's ban (`hub.ts --escalate`).
 * It is not a node name, so the claim reaches every agent, the offender's origin included, and a
 * node's unban when its Fail2Ban ban ends lifts only that node's claim, not the escalation.
 */
export const ESCALATION_ORIGIN = "+escalation";

export type Role = "node" | "reader" | "admin";
export type Kind = "ban" | "unban";

/** A position in the hub's event stream; opaque strings to the agent. */
export interface Cursor {
  hub: string;
  seq: string;
}

/** Node -> hub, first frame. */
export interface HelloFrame {
  type: "hello";
  v: number;
  node?: string;
  /** `events`: an agent that applies the fleet's bans; `status`: a status page watching the hub (reader or admin). */
  want?: "events" | "status";
  cursor?: Cursor;
  /** The node's clock when it sent this, ms: the hub measures the node's clock skew with it. */
  sentAt?: number;
}

/** Node -> hub: one Fail2Ban ban. */
export interface BanFrame {
  type: "ban";
  id: string;
  ip: string;
  jail: string;
  bantime: number;
  detectedAt: number;
  /** The sender's clock when it sent this, ms (later than `detectedAt` by the time it waited in a spool). */
  sentAt?: number;
}

/** Node -> hub: one Fail2Ban unban; `all` (admin only) lifts every node's older claim. */
export interface UnbanFrame {
  type: "unban";
  id: string;
  ip: string;
  jail: string;
  detectedAt: number;
  all?: boolean;
  /** As on a ban. */
  sentAt?: number;
}

/** One event an agent applied to its kernel, and how long after its detection that happened. */
export interface AppliedRecord {
  seq: string;
  ip: string;
  /** Response time: applied (agent's clock) minus detected (origin's clock), ms. */
  rtMs: number;
  /** When it was applied, ms. */
  at: number;
}

/**
 * Agent -> hub: events it applied, batched; for the status page's response-time chart. Sent
 * only to a hub whose `welcome` lists `applied` in `accepts`, so an older hub never sees it.
 */
export interface AppliedFrame {
  type: "applied";
  events: AppliedRecord[];
}

/** Most records in one `applied` frame (about 100 bytes each, well under the frame limit). */
export const MAX_APPLIED_BATCH = 100;

/** Largest response time an `applied` record may report, ms (a day; a sync's old bans are not response times). */
export const MAX_APPLIED_RT_MS = 24 * 3600 * 1000;

/** One place the agent's DROP rule must be reached from (`iptables INPUT`, `nft forward`, ...) and whether it is. */
export interface EnforcementHook {
  /** 1-64 of `A-Z a-z 0-9 _ . : / -` and spaces, e.g. `iptables INPUT`. */
  name: string;
  /** `absent`: nothing to hook (Docker's chain does not exist); not a problem. */
  state: "present" | "missing" | "absent";
  /** In this state since, ms. */
  since?: number;
}

/**
 * Agent -> hub: how the agent enforces now, sent when it is welcomed and whenever it changes (at
 * most once a second). Sent only to a hub whose `welcome` lists `enforcement` in `accepts`.
 */
export interface EnforcementFrame {
  type: "enforcement";
  /** The agent's --backend. */
  backend: string;
  hooks: EnforcementHook[];
  /** Entries in the kernel's sets (or rules) at the last count; absent where not counted. */
  entries?: number;
  /** Addresses the agent applied, what the kernel should hold. */
  claims: number;
  /** How many entries the kernel lacks or has too many (0 when not counted). */
  drift: number;
  /** What the last check found missing or wrong, each in a few words; empty while enforcing. */
  missing: string[];
  missingSince?: number;
  /** Repairs since the agent started, and the last one. */
  repairs: number;
  lastRepair?: { at: number; what: string };
}

/** Most hooks, and most `missing` lines, one `enforcement` frame may carry. */
export const MAX_ENFORCEMENT_HOOKS = 16;

/** Longest `missing` line or `lastRepair.what` in an `enforcement` frame. */
export const MAX_ENFORCEMENT_TEXT = 200;

export type NodeFrame = HelloFrame | BanFrame | UnbanFrame | AppliedFrame | EnforcementFrame;

/**
 * One accepted event: a claim by `origin` on `ip`. For a ban, `until` is when it ends
 * (ms, null for permanent); for an unban (a tombstone), when the tombstone may be dropped.
 * `until`, `detectedAt` and `relayedAt` are on the hub's clock (`detectedAt`: the origin's
 * detection as the hub places it, `hubDetectedAt`), the fleet's one reference.
 */
export interface FleetEvent {
  seq: string;
  kind: Kind;
  ip: string;
  origin: string;
  jail: string;
  until: number | null;
  detectedAt: number;
  id: string;
  relayedAt: number;
  /** On an escalation claim: how many times the offender's ban was multiplied. */
  escalation?: number;
  /** Hub only, never sent: accepted and journaled, but held back until `--quorum` nodes claim the address. */
  held?: boolean;
}

export interface WelcomeFrame {
  type: "welcome";
  v: number;
  hub: string;
  node: string;
  role: Role;
  seq: string;
  /** Node frames beyond v1's that this hub takes (`applied`); absent on older hubs. */
  accepts?: string[];
  /** The hub's clock when it sent this, ms; absent on older hubs (as on `sync` and `event`). */
  now?: number;
}

export interface SyncFrame {
  type: "sync";
  full: boolean;
  events: FleetEvent[];
  seq: string;
  /** More `sync` frames follow (a large state is streamed in chunks). */
  more?: boolean;
  /** The hub's clock when it sent this, ms. */
  now?: number;
  /**
   * Set by `parseHubFrame`, never sent: the events of the frame it left out because they are
   * malformed (`events` holds the others), with the reasons of the first `MAX_DROPPED_REASONS`.
   */
  dropped?: { count: number; reasons: string[] };
}

/** How many reasons `parseHubFrame` keeps for the events it drops from one sync frame. */
export const MAX_DROPPED_REASONS = 10;

export interface EventFrame extends FleetEvent {
  type: "event";
  /** The hub's clock when it sent this, ms. */
  now?: number;
}

export interface AckFrame {
  type: "ack";
  id: string;
  seq: string;
  /**
   * Answering an admin's `unban --all-nodes` only: the live ban claims left on the address once
   * the unban is durable (0 when it lifted everything). `ban.ts` exits 1 when it is not 0.
   */
  remaining?: number;
}

export interface ErrorFrame {
  type: "error";
  code: ErrorCode;
  message: string;
  id?: string;
}

/** One connection in a `status` frame. `lag`: the hub's seq minus the last seq relayed to the agent. */
export interface StatusConn {
  name: string;
  role: Role;
  remote: string;
  /** `events`: an agent; `status`: a status page; `send`: ban.ts or a node that only publishes. */
  kind: "events" | "status" | "send";
  /** Connected since, ms. */
  since: number;
  /** Last pong or frame from it, ms. */
  lastSeen: number;
  lag?: number;
  /** The newest seq the agent reported applied. */
  appliedSeq?: string;
  /** The agent's latest `enforcement` report (without its type) and when it came, ms. */
  enforcement?: EnforcementReport;
  /** `enforcementVerdict` of that report: what the status page shows. */
  verdict?: { ok: boolean; text: string };
  /** The hub's clock minus the node's, ms, as last measured; absent: not measured. */
  clockSkewMs?: number;
}

/** An agent's `enforcement` report as the hub keeps and shows it: the frame's fields and when it came (ms). */
export type EnforcementReport = Omit<EnforcementFrame, "type"> & { at: number };

/** One agent connection, as the admin's `GET /v1/nodes` lists it. */
export interface NodeState {
  node: string;
  remote: string;
  since: number;
  lastSeen: number;
  /** The latest report; null when the agent sent none (an older agent, or none yet). */
  enforcement: EnforcementReport | null;
  /** `enforcementVerdict` of the report; null without one. */
  verdict: { ok: boolean; text: string } | null;
  /** The hub's clock minus the node's, ms, as last measured (one-way: network delay is in it); null: not measured (an older agent). */
  clockSkewMs: number | null;
}

/** The document `GET /v1/nodes` answers; `now` is the hub's clock. */
export interface NodeList {
  hub: string;
  now: number;
  nodes: NodeState[];
}

/** One blocked address in a `status` frame: its newest active ban claim, and how many nodes claim it. */
export interface StatusBan {
  ip: string;
  origin: string;
  jail: string;
  detectedAt: number;
  /** When the address is unblocked (the latest active claim's end), ms; null: never. */
  until: number | null;
  claims: number;
  /** A repeat offender's ban, lengthened by this factor (`hub.ts --escalate`). */
  escalation?: number;
}

/** One live ban claim, as `GET /v1/bans` lists it; `held` while `--quorum` keeps it from the fleet. */
export interface ListedClaim {
  origin: string;
  jail: string;
  until: number | null;
  detectedAt: number;
  seq: string;
  held?: boolean;
}

/** One blocked address, as `GET /v1/bans` lists it. */
export interface ListedBan {
  ip: string;
  nodes: number;
  claims: ListedClaim[];
}

/** The document `GET /v1/bans` answers; `now` is the hub's clock. */
export interface BanList {
  hub: string;
  seq: string;
  now: number;
  bans: ListedBan[];
  count: number;
}

/** One response time an agent reported: detection to applied on `node`, ms. */
export interface StatusRt {
  node: string;
  at: number;
  rtMs: number;
}

/** Hub -> status page, about once a second while it watches: the hub's state, bounded in size. */
export interface StatusFrame {
  type: "status";
  hub: string;
  seq: string;
  at: number;
  conns: StatusConn[];
  /** Blocked addresses, newest first, at most `MAX_STATUS_BANS`; `bansTotal` counts them all. */
  bans: StatusBan[];
  bansTotal: number;
  /** Recent response times, oldest first, at most `MAX_STATUS_RT`. */
  rt: StatusRt[];
}

/** Most blocked addresses a `status` frame lists. */
export const MAX_STATUS_BANS = 500;

/** Most response times a `status` frame carries. */
export const MAX_STATUS_RT = 1000;

/**
 * Hub -> status page, once when it starts watching: the hub's recent events, oldest first, at
 * most `MAX_STATUS_EVENTS`, from what it relayed and what its store held at start; live events follow.
 */
export interface HistoryFrame {
  type: "history";
  events: FleetEvent[];
}

/** Most events the status page's history holds (the hub's and the page's). */
export const MAX_STATUS_EVENTS = 200;

export type HubFrame = WelcomeFrame | SyncFrame | EventFrame | AckFrame | ErrorFrame | StatusFrame | HistoryFrame;

export type ErrorCode =
  | "bad_frame"
  | "bad_ip"
  | "version"
  | "not_hello"
  | "forbidden"
  | "protected"
  | "too_big"
  | "rate_limited"
  | "claim_limit"
  | "internal";

/** A frame that failed validation: what to answer, and which frame it answers. */
export interface Invalid {
  ok: false;
  code: ErrorCode;
  message: string;
  id?: string;
}

export type Checked<T> = { ok: true; value: T } | Invalid;

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
const ID_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

/** True when `s` is a valid node or jail name: 1-64 of `A-Z a-z 0-9 _ . : -`, not starting with a sign. */
export function isName(s: unknown): s is string {
  return typeof s === "string" && NAME_RE.test(s);
}

// ---------------------------------------------------------------------------------------------
// Addresses

/**
 * Why `dir` (its lstat `info`) is no safe spool for a process of user `uid`, or undefined: the
 * agent forwards every event in it as its own node's, so it must be a directory of that user
 * that no group or other user can write to. `ban.ts` checks it before it
 * spools, the agent before it forwards.
 */
export function spoolDirProblem(dir: string, info: { isDirectory(): boolean; uid: number; mode: number }, uid: number | undefined): string | undefined {
  if (!info.isDirectory()) return `${dir} is not a directory (a symbolic link?)`;
  if (uid !== undefined && info.uid !== uid) return `${dir} belongs to uid ${info.uid}, not to this user (uid ${uid}): chown it`;
  if (info.mode & 0o022) return `${dir} is writable by ${info.mode & 0o020 ? "its group" : "other users"} (mode ${(info.mode & 0o7777).toString(8).padStart(4, "0")}): chmod 700 it`;
  return undefined;
}

/**
 * The agent's hand-off socket, inside the spool directory that ban.ts and the agent are both
 * given: the directory's owner and mode (`spoolDirProblem`) are what guard it, as they guard the
 * spool. ban.ts writes one ban or unban frame as a JSON line; the agent answers one
 * `HandoffAnswer` line once the event is durable (acked by the hub, or fsynced in the spool).
 */
export const HANDOFF_SOCKET = "agent.sock";

/**
 * The agent's answer on the hand-off socket. `queued`: the event is durable and the agent will
 * deliver it (`via` says where it is now); `problem`, when present, is why the agent cannot
 * deliver for now (a TLS or token failure on its hub link), which needs fixing by hand.
 * `error`: the event is not kept; `code` is the hub's refusal code or `unavailable`.
 */
export type HandoffAnswer = { type: "queued"; id: string; via: "hub" | "spool"; seq?: string; problem?: string } | { type: "error"; id?: string; code: string; message: string };

/** Longest hand-off answer line, bytes. */
export const MAX_HANDOFF_ANSWER_BYTES = 4096;

/** Checks one hand-off answer line (from the agent, to ban.ts). */
export function parseHandoffAnswer(text: string): Checked<HandoffAnswer> {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(text);
  } catch {
    return bad("Expected a JSON answer from the agent, got text that is not JSON");
  }
  if (typeof o !== "object" || o === null) return bad("Expected a JSON object from the agent");
  const short = (v: unknown) => typeof v === "string" && v.length <= 1000;
  if (o.type === "queued" && typeof o.id === "string" && ID_RE.test(o.id) && (o.via === "hub" || o.via === "spool") && (o.seq === undefined || (typeof o.seq === "string" && /^\d{1,20}$/.test(o.seq))) && (o.problem === undefined || short(o.problem))) {
    return { ok: true, value: { type: "queued", id: o.id, via: o.via, ...(o.seq !== undefined ? { seq: o.seq as string } : {}), ...(o.problem !== undefined ? { problem: o.problem as string } : {}) } };
  }
  if (o.type === "error" && typeof o.code === "string" && /^[a-z_]{1,32}$/.test(o.code) && short(o.message) && (o.id === undefined || (typeof o.id === "string" && ID_RE.test(o.id)))) {
    return { ok: true, value: { type: "error", code: o.code, message: o.message as string, ...(o.id !== undefined ? { id: o.id as string } : {}) } };
  }
  return bad(`Expected a "queued" or "error" answer from the agent, got ${quote(JSON.stringify(o).slice(0, 80))}`);
}

/** Certificate codes that mean: this side does not trust whoever signed the hub's certificate. */
const UNTRUSTED_CERT = new Set(["UNABLE_TO_VERIFY_LEAF_SIGNATURE", "SELF_SIGNED_CERT_IN_CHAIN", "DEPTH_ZERO_SELF_SIGNED_CERT", "UNABLE_TO_GET_ISSUER_CERT", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "CERT_UNTRUSTED", "CERT_SIGNATURE_FAILURE", "CERT_CHAIN_TOO_LONG", "INVALID_CA"]);

/**
 * What a TLS failure reaching `url` means and which option fixes it, or undefined when `e` is
 * no TLS failure (a refused or timed-out connection is the network's, and worth retrying).
 * A certificate this side cannot verify is a set-up error: retrying or spooling does not fix it.
 */
export function tlsProblem(e: { code?: string; message: string }, url: string): string | undefined {
  let host = url;
  try {
    host = new URL(url).hostname.replace(/^\[|\]$/g, "");
  } catch {
    /* keep the URL as given */
  }
  const code = e.code ?? "";
  if (code === "ERR_TLS_CERT_ALTNAME_INVALID") return `${url}: the hub's certificate does not cover ${host} (${e.message.replace(/^Hostname\/IP does not match certificate's altnames: /, "")}): use a name it covers in --hub, or make one that covers ${host} (hub.ts gen-cert --host ${host})`;
  if (UNTRUSTED_CERT.has(code)) return `${url}: the hub's certificate is not signed by a CA this side trusts (${code}): give --ca the hub's ca.pem (see hub.ts gen-cert)`;
  if (code === "CERT_HAS_EXPIRED") return `${url}: the hub's certificate has expired (${code}): make a new one on the hub (hub.ts gen-cert) and check both clocks`;
  if (code === "CERT_NOT_YET_VALID") return `${url}: the hub's certificate is not valid yet (${code}): check this server's clock`;
  if (code === "ERR_SSL_WRONG_VERSION_NUMBER" || /wrong version number|packet length too long/.test(e.message)) return `${url}: the hub does not speak TLS on that port: check the port in --hub, or use ws:// for a hub without --tls-cert`;
  return undefined;
}

/**
 * True when a URL's host (`new URL(u).hostname`, brackets or not) is this machine's loopback:
 * `localhost`, 127.0.0.0/8 or ::1. Only there may a token go over plain ws:// or http://
 * without `--insecure`: a name that must be resolved first could lead anywhere.
 */
export function isLoopbackHost(host: string): boolean {
  const a = parseAddress(host.replace(/^\[|\]$/g, ""));
  return host === "localhost" || (a !== undefined && (a.family === 4 ? a.bytes[0] === 127 : a.text === "::1"));
}

/** A parsed, canonical address or network. */
export interface Address {
  family: 4 | 6;
  /** Network bytes, host bits cleared. */
  bytes: Uint8Array;
  prefix: number;
  /** Canonical text: `1.2.3.4`, `2001:db8::1`, `10.0.0.0/24`, `2001:db8::/64`. */
  text: string;
}

function v4Bytes(s: string): Uint8Array {
  // Hot path (every event, every allowlist check): no intermediate arrays.
  const out = new Uint8Array(4);
  let i = 0;
  let n = 0;
  for (let k = 0; k < s.length; k++) {
    const c = s.charCodeAt(k);
    if (c === 46) {
      out[i++] = n;
      n = 0;
    } else n = n * 10 + (c - 48);
  }
  out[i] = n;
  return out;
}

function v6Bytes(s: string): Uint8Array {
  let text = s;
  const out = new Uint8Array(16);
  // A trailing dotted quad (::ffff:1.2.3.4) becomes two hextets.
  const quad = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (quad) {
    const b = v4Bytes(quad[1]);
    text = text.slice(0, quad.index) + ((b[0] << 8) | b[1]).toString(16) + ":" + ((b[2] << 8) | b[3]).toString(16);
  }
  const [head, tail] = text.includes("::") ? text.split("::") : [text, undefined];
  const h = head ? head.split(":") : [];
  const t = tail === undefined ? [] : tail ? tail.split(":") : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
  groups.forEach((g, i) => {
    const n = parseInt(g, 16);
    out[i * 2] = n >> 8;
    out[i * 2 + 1] = n & 0xff;
  });
  return out;
}

function v6Text(b: Uint8Array): string {
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((b[i] << 8) | b[i + 1]);
  // RFC 5952: compress the longest run of two or more zero groups, the first one on a tie.
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (best < 0) return hex.join(":");
  return hex.slice(0, best).join(":") + "::" + hex.slice(best + bestLen).join(":");
}

function maskBytes(bytes: Uint8Array, prefix: number): Uint8Array {
  const out = Uint8Array.from(bytes);
  for (let i = 0; i < out.length; i++) {
    const bits = Math.max(0, Math.min(8, prefix - i * 8));
    out[i] &= bits === 0 ? 0 : (0xff << (8 - bits)) & 0xff;
  }
  return out;
}

/**
 * Parses an IPv4 or IPv6 address or CIDR network into its canonical form; undefined when
 * `s` is not one. Host bits of a network are cleared; an IPv4-mapped IPv6 address becomes
 * IPv4. Nothing but digits, hex, dots, colons and one slash passes, so a parsed address is
 * safe as an argv element.
 */
export function parseAddress(s: unknown): Address | undefined {
  if (typeof s !== "string" || s.length === 0 || s.length > 64) return undefined;
  const slash = s.indexOf("/");
  const host = slash < 0 ? s : s.slice(0, slash);
  const bits = slash < 0 ? undefined : s.slice(slash + 1);
  let family: 4 | 6;
  let bytes: Uint8Array;
  if (isIPv4(host)) {
    family = 4;
    bytes = v4Bytes(host);
  } else if (isIPv6(host) && !host.includes("%")) {
    bytes = v6Bytes(host);
    const mapped = bytes.slice(0, 10).every((x) => x === 0) && bytes[10] === 0xff && bytes[11] === 0xff;
    if (mapped) {
      family = 4;
      bytes = bytes.slice(12);
    } else family = 6;
  } else return undefined;
  const max = family === 4 ? 32 : 128;
  let prefix = max;
  if (bits !== undefined) {
    if (!/^\d{1,3}$/.test(bits)) return undefined;
    prefix = Number(bits) - (family === 4 && host.includes(":") ? 96 : 0);
    if (prefix < 0 || prefix > max) return undefined;
  }
  bytes = maskBytes(bytes, prefix);
  const base = family === 4 ? Array.from(bytes).join(".") : v6Text(bytes);
  return { family, bytes, prefix, text: prefix === max ? base : `${base}/${prefix}` };
}

/** True when network `outer` contains address or network `inner`. */
export function contains(outer: Address, inner: Address): boolean {
  if (outer.family !== inner.family || inner.prefix < outer.prefix) return false;
  // maskBytes(inner.bytes, outer.prefix) equals outer.bytes, compared in place (hot path: no allocation).
  for (let i = 0; i < inner.bytes.length; i++) {
    const bits = Math.max(0, Math.min(8, outer.prefix - i * 8));
    const mask = bits === 0 ? 0 : (0xff << (8 - bits)) & 0xff;
    if ((inner.bytes[i] & mask) !== outer.bytes[i]) return false;
  }
  return true;
}

/** True when `a` and `b` share any address. */
export function overlaps(a: Address, b: Address): boolean {
  return contains(a, b) || contains(b, a);
}

const NEVER_BAN = [
  ["0.0.0.0/8", "unspecified"],
  ["127.0.0.0/8", "loopback"],
  ["169.254.0.0/16", "link-local"],
  ["224.0.0.0/4", "multicast"],
  ["255.255.255.255/32", "broadcast"],
  ["240.0.0.0/4", "reserved"],
  ["::/128", "unspecified"],
  ["::1/128", "loopback"],
  ["fe80::/10", "link-local"],
  ["ff00::/8", "multicast"],
].map(([cidr, why]) => ({ net: parseAddress(cidr)!, why }));

/** NAT64's well-known prefix (RFC 6052): every IPv4 address again, behind a NAT64 gateway. */
const NAT64 = parseAddress("64:ff9b::/96")!;

/** Prefix limits: a ban may not be broader than these. */
export interface PrefixLimits {
  v4: number;
  v6: number;
}

/** Default limits: single IPv4 addresses, IPv6 networks no broader than a /64. */
export const DEFAULT_MAX_PREFIX: PrefixLimits = { v4: 32, v6: 64 };

/**
 * Checks that `s` is an address that may be banned: valid; not loopback, unspecified,
 * link-local, multicast, broadcast or reserved (240.0.0.0/4); no broader than `limits`; and
 * inside NAT64's `64:ff9b::/96` only as the IPv4 address it embeds would be (an IPv4 ban
 * through the gateway: no broader than /96 plus the IPv4 limit, not of a range refused above),
 * never the prefix itself or a network around it (all of IPv4). The hub runs it on every ban
 * a node sends, the agent on every address the hub sends. Returns the canonical address or a
 * one-sentence reason.
 */
export function checkBannable(s: unknown, limits: PrefixLimits = { v4: 0, v6: 0 }): Checked<Address> {
  const addr = parseAddress(s);
  if (!addr) {
    return { ok: false, code: "bad_ip", message: `Expected an IPv4 or IPv6 address or CIDR network, got ${quote(s)}` };
  }
  for (const { net, why } of NEVER_BAN) {
    if (overlaps(net, addr)) return { ok: false, code: "bad_ip", message: `Refusing to ban ${addr.text}: it overlaps the ${why} range ${net.text}` };
  }
  if (overlaps(NAT64, addr)) {
    if (addr.prefix <= NAT64.prefix) return { ok: false, code: "bad_ip", message: `Refusing to ban ${addr.text}: it covers the NAT64 prefix ${NAT64.text}, all of IPv4` };
    const v4 = parseAddress(`${Array.from(addr.bytes.subarray(12)).join(".")}/${addr.prefix - 96}`)!;
    const inner = checkBannable(v4.text, limits);
    if (!inner.ok) return { ok: false, code: "bad_ip", message: `Refusing to ban ${addr.text}: as the NAT64 form of ${v4.text}: ${inner.message.replace(/^Refusing to ban \S+: /, "")}` };
  }
  const limit = addr.family === 4 ? limits.v4 : limits.v6;
  if (addr.prefix < limit) {
    return { ok: false, code: "bad_ip", message: `Refusing to ban ${addr.text}: networks broader than /${limit} are not accepted` };
  }
  return { ok: true, value: addr };
}

// ---------------------------------------------------------------------------------------------
// Frames

function quote(v: unknown): string {
  const s = typeof v === "string" ? JSON.stringify(v) : v === undefined ? "nothing" : typeof v;
  return s.length > 80 ? s.slice(0, 77) + "..." : s;
}

function bad(message: string, id?: string, code: ErrorCode = "bad_frame"): Invalid {
  return { ok: false, code, message, id };
}

function isInt(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v);
}

/**
 * Parses and validates one frame a node sent to the hub. `now` (the hub's clock) bounds the
 * times an agent reports; a sender's `detectedAt` and `sentAt` are not bounded by it.
 * Unknown fields are ignored; missing or mistyped ones are refused.
 */
export function parseNodeFrame(data: string, now: number, limits?: PrefixLimits): Checked<NodeFrame> {
  let f: unknown;
  try {
    f = JSON.parse(data);
  } catch {
    return bad("Expected a JSON object, got text that is not JSON");
  }
  if (typeof f !== "object" || f === null || Array.isArray(f)) return bad(`Expected a JSON object, got ${Array.isArray(f) ? "an array" : typeof f}`);
  const o = f as Record<string, unknown>;
  const id = typeof o.id === "string" && ID_RE.test(o.id) ? o.id : undefined;
  switch (o.type) {
    case "hello": {
      if (o.v !== PROTOCOL_VERSION) return bad(`Expected protocol version ${PROTOCOL_VERSION}, got ${quote(o.v)}`, undefined, "version");
      if (o.node !== undefined && !isName(o.node)) return bad(`Expected "node" to be a node name, got ${quote(o.node)}`);
      if (o.want !== undefined && o.want !== "events" && o.want !== "status") return bad(`Expected "want" to be "events", "status" or absent, got ${quote(o.want)}`);
      let cursor: Cursor | undefined;
      if (o.cursor !== undefined) {
        const c = o.cursor as Record<string, unknown> | null;
        if (typeof c !== "object" || c === null || typeof c.hub !== "string" || typeof c.seq !== "string" || c.hub.length > 64 || c.seq.length > 64) {
          return bad(`Expected "cursor" to be {hub, seq} strings, got ${quote(JSON.stringify(o.cursor))}`);
        }
        cursor = { hub: c.hub, seq: c.seq };
      }
      if (!isSentAt(o.sentAt)) return bad(`Expected "sentAt" to be a time in ms or absent, got ${quote(o.sentAt)}`);
      const hello: HelloFrame = { type: "hello", v: PROTOCOL_VERSION, node: o.node as string | undefined, want: o.want as "events" | "status" | undefined, cursor };
      if (o.sentAt !== undefined) hello.sentAt = o.sentAt;
      return { ok: true, value: hello };
    }
    case "ban":
    case "unban": {
      if (!id) return bad(`Expected "id" to be 1-64 characters of A-Z a-z 0-9 _ . : -, got ${quote(o.id)}`);
      const ip = checkBannable(o.ip, limits);
      if (!ip.ok) return { ...ip, id };
      if (!isName(o.jail)) return bad(`Expected "jail" to be a jail name, got ${quote(o.jail)}`, id);
      // No bound against the hub's clock: the sender's clock may be off by hours, and the hub
      // places the detection on its own clock (`hubDetectedAt`) instead of refusing the ban.
      if (!isInt(o.detectedAt) || o.detectedAt <= 0) return bad(`Expected "detectedAt" to be a time in ms, got ${quote(o.detectedAt)}`, id);
      if (!isSentAt(o.sentAt)) return bad(`Expected "sentAt" to be a time in ms or absent, got ${quote(o.sentAt)}`, id);
      const sentAt = o.sentAt === undefined ? {} : { sentAt: o.sentAt };
      if (o.type === "unban") {
        if (o.all !== undefined && typeof o.all !== "boolean") return bad(`Expected "all" to be a boolean, got ${quote(o.all)}`, id);
        return { ok: true, value: { type: "unban", id, ip: ip.value.text, jail: o.jail, detectedAt: o.detectedAt, all: o.all === true || undefined, ...sentAt } };
      }
      if (!isInt(o.bantime) || (o.bantime !== -1 && (o.bantime < 1 || o.bantime > MAX_BANTIME_S))) {
        return bad(`Expected "bantime" to be -1 or 1-${MAX_BANTIME_S} seconds, got ${quote(o.bantime)}`, id);
      }
      return { ok: true, value: { type: "ban", id, ip: ip.value.text, jail: o.jail, bantime: o.bantime, detectedAt: o.detectedAt, ...sentAt } };
    }
    case "applied":
      return checkApplied(o.events, now);
    case "enforcement":
      return checkEnforcement(o, now);
    case undefined:
      return bad(`Expected a "type" field, got none`, id);
    default:
      return bad(`Expected "type" to be hello, ban, unban, applied or enforcement, got ${quote(o.type)}`, id);
  }
}

/** True for an absent `sentAt` or a time in ms. */
function isSentAt(v: unknown): v is number | undefined {
  return v === undefined || (isInt(v) && v > 0);
}

/** Validates the records of an `applied` frame; returns a frame holding only the known fields. */
function checkApplied(events: unknown, now: number): Checked<AppliedFrame> {
  if (!Array.isArray(events) || events.length < 1 || events.length > MAX_APPLIED_BATCH) {
    return bad(`Expected "events" to be an array of 1-${MAX_APPLIED_BATCH} records, got ${Array.isArray(events) ? `${events.length} records` : quote(events)}`);
  }
  const out: AppliedRecord[] = [];
  for (const [i, e] of events.entries()) {
    const r = e as Record<string, unknown> | null;
    const where = `"events"[${i}]`;
    if (typeof r !== "object" || r === null || Array.isArray(r)) return bad(`Expected ${where} to be an object, got ${Array.isArray(r) ? "an array" : quote(r)}`);
    if (typeof r.seq !== "string" || !/^\d{1,15}(-\d{1,15})?$/.test(r.seq)) return bad(`Expected ${where}.seq to be a position (N or MS-N, as the hub sent it), got ${quote(r.seq)}`);
    if (parseAddress(r.ip)?.text !== r.ip) return bad(`Expected ${where}.ip to be a canonical address, got ${quote(r.ip)}`);
    if (!isInt(r.rtMs) || r.rtMs < -MAX_CLOCK_SKEW_MS || r.rtMs > MAX_APPLIED_RT_MS) return bad(`Expected ${where}.rtMs to be an integer from ${-MAX_CLOCK_SKEW_MS} to ${MAX_APPLIED_RT_MS} ms, got ${quote(r.rtMs)}`);
    if (!isInt(r.at) || r.at <= 0 || r.at > now + MAX_CLOCK_SKEW_MS) return bad(`Expected ${where}.at to be a time in ms not in the future, got ${quote(r.at)}`);
    out.push({ seq: r.seq, ip: r.ip as string, rtMs: r.rtMs, at: r.at });
  }
  return { ok: true, value: { type: "applied", events: out } };
}

/** A position in the hub's stream as the agent stores it and says it back in `hello` (which the hub bounds to 64 characters). */
function isSeq(v: unknown): v is string {
  return typeof v === "string" && v.length >= 1 && v.length <= 64;
}

const HOOK_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9 _.:\/-]{0,63}$/;
const TEXT_RE = new RegExp(`^[\\x20-\\x7e]{1,${MAX_ENFORCEMENT_TEXT}}$`);
/** Largest count an `enforcement` frame may report (entries, claims, drift, repairs). */
const MAX_ENFORCEMENT_COUNT = 1e9;

/** Validates an `enforcement` frame; returns one holding only the known fields. */
function checkEnforcement(o: Record<string, unknown>, now: number): Checked<EnforcementFrame> {
  const isCount = (v: unknown): v is number => isInt(v) && v >= 0 && v <= MAX_ENFORCEMENT_COUNT;
  const isTime = (v: unknown): v is number => isInt(v) && v > 0 && v <= now + MAX_CLOCK_SKEW_MS;
  if (!isName(o.backend)) return bad(`Expected "backend" to be a backend name, got ${quote(o.backend)}`);
  if (!Array.isArray(o.hooks) || o.hooks.length > MAX_ENFORCEMENT_HOOKS) return bad(`Expected "hooks" to be an array of at most ${MAX_ENFORCEMENT_HOOKS} hooks, got ${Array.isArray(o.hooks) ? `${o.hooks.length} hooks` : quote(o.hooks)}`);
  const hooks: EnforcementHook[] = [];
  for (const [i, h] of (o.hooks as unknown[]).entries()) {
    const r = h as Record<string, unknown> | null;
    if (typeof r !== "object" || r === null || Array.isArray(r)) return bad(`Expected "hooks"[${i}] to be an object, got ${Array.isArray(r) ? "an array" : quote(r)}`);
    if (typeof r.name !== "string" || !HOOK_NAME_RE.test(r.name)) return bad(`Expected "hooks"[${i}].name to be 1-64 of A-Z a-z 0-9 _ . : / - and spaces, got ${quote(r.name)}`);
    if (r.state !== "present" && r.state !== "missing" && r.state !== "absent") return bad(`Expected "hooks"[${i}].state to be present, missing or absent, got ${quote(r.state)}`);
    if (r.since !== undefined && !isTime(r.since)) return bad(`Expected "hooks"[${i}].since to be a time in ms not in the future, got ${quote(r.since)}`);
    hooks.push({ name: r.name, state: r.state, ...(r.since !== undefined ? { since: r.since } : {}) });
  }
  for (const k of ["claims", "drift", "repairs"] as const) if (!isCount(o[k])) return bad(`Expected "${k}" to be an integer from 0 to ${MAX_ENFORCEMENT_COUNT}, got ${quote(o[k])}`);
  if (o.entries !== undefined && !isCount(o.entries)) return bad(`Expected "entries" to be an integer from 0 to ${MAX_ENFORCEMENT_COUNT} or absent, got ${quote(o.entries)}`);
  if (!Array.isArray(o.missing) || o.missing.length > MAX_ENFORCEMENT_HOOKS || !o.missing.every((m) => typeof m === "string" && TEXT_RE.test(m))) {
    return bad(`Expected "missing" to be at most ${MAX_ENFORCEMENT_HOOKS} lines of 1-${MAX_ENFORCEMENT_TEXT} printable characters, got ${quote(JSON.stringify(o.missing))}`);
  }
  if (o.missingSince !== undefined && !isTime(o.missingSince)) return bad(`Expected "missingSince" to be a time in ms not in the future, got ${quote(o.missingSince)}`);
  let lastRepair: EnforcementFrame["lastRepair"];
  if (o.lastRepair !== undefined) {
    const r = o.lastRepair as Record<string, unknown> | null;
    if (typeof r !== "object" || r === null || !isTime(r.at) || typeof r.what !== "string" || !TEXT_RE.test(r.what)) return bad(`Expected "lastRepair" to be {at, what} (a time in ms, 1-${MAX_ENFORCEMENT_TEXT} printable characters), got ${quote(JSON.stringify(o.lastRepair))}`);
    lastRepair = { at: r.at, what: r.what };
  }
  const value: EnforcementFrame = { type: "enforcement", backend: o.backend, hooks, claims: o.claims as number, drift: o.drift as number, missing: o.missing as string[], repairs: o.repairs as number };
  if (o.entries !== undefined) value.entries = o.entries as number;
  if (o.missingSince !== undefined) value.missingSince = o.missingSince as number;
  if (lastRepair) value.lastRepair = lastRepair;
  return { ok: true, value };
}

/**
 * What an `enforcement` report says in a few words, as the status page, `/metrics` and `ban.ts
 * status --fleet` show it: `enforcing`, `hook missing since <ISO time> (hook)`, `drift N`, `<what>
 * missing since <ISO time>` or, for the dry-run backend, `dry-run: not enforcing`; `ok` only while
 * enforcing.
 */
export function enforcementVerdict(f: Omit<EnforcementFrame, "type">): { ok: boolean; text: string } {
  if (f.backend === "dry-run") return { ok: false, text: "dry-run: not enforcing" };
  const hook = f.hooks.filter((h) => h.state === "missing").sort((a, b) => (a.since ?? 0) - (b.since ?? 0))[0];
  if (hook) return { ok: false, text: `hook missing since ${hook.since ? new Date(hook.since).toISOString() : "?"} (${hook.name})` };
  if (f.drift > 0) return { ok: false, text: `drift ${f.drift}` };
  if (f.missing.length) return { ok: false, text: `${f.missing[0]} missing since ${f.missingSince ? new Date(f.missingSince).toISOString() : "?"}` };
  return { ok: true, text: "enforcing" };
}

/** Why `e` is not a well-formed event (a sync entry, a journal line, a state file's claim), or undefined. */
export function checkEvent(e: unknown): string | undefined {
  if (typeof e !== "object" || e === null || Array.isArray(e)) return "an event is not an object";
  const o = e as Record<string, unknown>;
  if (o.kind !== "ban" && o.kind !== "unban") return `event kind ${quote(o.kind)}`;
  if (!isSeq(o.seq)) return `event seq ${quote(o.seq)}`;
  if (!parseAddress(o.ip) || parseAddress(o.ip)!.text !== o.ip) return `event ip ${quote(o.ip)}`;
  if (o.origin !== ALL_ORIGINS && o.origin !== ESCALATION_ORIGIN && !isName(o.origin)) return `event origin ${quote(o.origin)}`;
  if (!isName(o.jail)) return `event jail ${quote(o.jail)}`;
  if (o.until !== null && !isInt(o.until)) return `event until ${quote(o.until)}`;
  if (!isInt(o.detectedAt) || !isInt(o.relayedAt)) return "event times";
  if (typeof o.id !== "string" || o.id.length > 256) return `event id ${quote(o.id)}`;
  return undefined;
}

/** Parses and validates one frame the hub sent to an agent or sender. */
export function parseHubFrame(data: string): Checked<HubFrame> {
  let f: Record<string, unknown>;
  try {
    f = JSON.parse(data);
  } catch {
    return bad("Expected a JSON frame from the hub, got text that is not JSON");
  }
  if (typeof f !== "object" || f === null) return bad("Expected a JSON object from the hub");
  // The hub's clock is optional (older hubs send none): one that is not a time is left out, and the frame still counts.
  if (f.now !== undefined && !(isInt(f.now) && f.now > 0)) delete f.now;
  switch (f.type) {
    case "welcome":
      if (typeof f.hub !== "string" || typeof f.node !== "string" || typeof f.seq !== "string") return bad("Malformed welcome frame");
      return { ok: true, value: f as unknown as WelcomeFrame };
    case "sync": {
      if (typeof f.full !== "boolean" || !isSeq(f.seq) || !Array.isArray(f.events)) return bad("Malformed sync frame");
      // A damaged entry costs only itself: the frame keeps the others.
      const events: FleetEvent[] = [];
      let dropped: SyncFrame["dropped"];
      for (const e of f.events) {
        const why = checkEvent(e);
        if (!why) events.push(e as FleetEvent);
        else {
          dropped ??= { count: 0, reasons: [] };
          dropped.count++;
          if (dropped.reasons.length < MAX_DROPPED_REASONS) dropped.reasons.push(why);
        }
      }
      const frame: SyncFrame = { type: "sync", full: f.full, events, seq: f.seq, more: f.more === true || undefined };
      if (f.now !== undefined) frame.now = f.now as number;
      if (dropped) frame.dropped = dropped;
      return { ok: true, value: frame };
    }
    case "event": {
      if (!isSeq(f.seq)) return bad(`Malformed event frame: event seq ${quote(f.seq)}`);
      const why = checkEvent(f);
      return why ? bad(`Malformed event frame: ${why}`) : { ok: true, value: f as unknown as EventFrame };
    }
    case "ack":
      if (typeof f.id !== "string" || typeof f.seq !== "string") return bad("Malformed ack frame");
      return { ok: true, value: f as unknown as AckFrame };
    case "error":
      if (typeof f.code !== "string" || typeof f.message !== "string") return bad("Malformed error frame");
      return { ok: true, value: f as unknown as ErrorFrame };
    default:
      return bad(`Unknown frame type ${quote(f.type)} from the hub`);
  }
}

// ---------------------------------------------------------------------------------------------
// Claims: the fleet state as a last-writer-wins map (ip, origin) -> newest event

/** The claims on one address, by origin. */
export type AddressClaims = Map<string, FleetEvent>;
/** The fleet state: address -> origin -> newest event. */
export type Claims = Map<string, AddressClaims>;

/** True when event `a` is newer than `b`: later `detectedAt`, then the larger `id`. */
export function isNewer(a: Pick<FleetEvent, "detectedAt" | "id">, b: Pick<FleetEvent, "detectedAt" | "id">): boolean {
  return a.detectedAt !== b.detectedAt ? a.detectedAt > b.detectedAt : a.id > b.id;
}

/**
 * Merges one event into the claims map: it replaces the claim of the same (ip, origin) only
 * when newer. Returns true when the map changed. Replaying an event, or an older one,
 * changes nothing, so delivery order never matters.
 */
export function mergeClaim(claims: Claims, e: FleetEvent): boolean {
  let byOrigin = claims.get(e.ip);
  const old = byOrigin?.get(e.origin);
  if (old && !isNewer(e, old)) return false;
  if (!byOrigin) claims.set(e.ip, (byOrigin = new Map()));
  byOrigin.set(e.origin, e);
  return true;
}

/**
 * When the address is blocked until, given its claims: `undefined` when not blocked, `null`
 * when blocked for good, else the latest `until` (ms) among the active ban claims. A ban claim
 * is active until its `until`, unless an admin unban (origin `*`) newer than it exists.
 */
export function blockedUntil(byOrigin: AddressClaims | undefined, now: number): number | null | undefined {
  if (!byOrigin) return undefined;
  const all = byOrigin.get(ALL_ORIGINS);
  let result: number | undefined;
  for (const [origin, c] of byOrigin) {
    if (origin === ALL_ORIGINS || c.kind !== "ban") continue;
    if (c.until !== null && c.until <= now) continue;
    if (all && !isNewer(c, all)) continue;
    if (c.until === null) return null;
    if (result === undefined || c.until > result) result = c.until;
  }
  return result;
}

/** True when a claim can be forgotten: its ban has ended, or its tombstone has served its time. */
export function isExpired(c: FleetEvent, now: number): boolean {
  return c.until !== null && c.until <= now;
}

/**
 * Removes expired claims (ended bans, tombstones past their time) and returns the addresses
 * that lost a claim.
 */
export function pruneClaims(claims: Claims, now: number): string[] {
  const touched: string[] = [];
  for (const [ip, byOrigin] of claims) {
    let changed = false;
    for (const [origin, c] of byOrigin) {
      if (isExpired(c, now)) {
        byOrigin.delete(origin);
        changed = true;
      }
    }
    if (byOrigin.size === 0) claims.delete(ip);
    if (changed) touched.push(ip);
  }
  return touched;
}

/**
 * The `until` of an accepted event: a ban ends `bantime` after detection; a tombstone lives
 * until the latest claim it can cancel would have ended (`previousUntil`), so a late, older
 * ban can never revive it.
 */
export function eventUntil(kind: Kind, detectedAt: number, bantime: number | undefined, previousUntil: number | null | undefined): number | null {
  if (kind === "ban") return bantime === -1 || bantime === undefined ? null : detectedAt + bantime * 1000;
  if (previousUntil === null) return detectedAt + PERMANENT_TOMBSTONE_MS;
  // No claim known yet (the ban may still be on its way from a spool): keep it a day.
  if (previousUntil === undefined) return detectedAt + UNKNOWN_TOMBSTONE_MS;
  return Math.max(previousUntil, detectedAt + 60_000);
}

// ---------------------------------------------------------------------------------------------
// Clocks: the hub's is the fleet's reference for lifetimes and order; a sender's measures only

/**
 * How far the hub's clock is from a sender's (hub minus sender, ms) when a frame stamped
 * `sentAt` on the sender's clock arrives at `now` on the hub's: one-way, so the network delay
 * is in it. 0 without `sentAt` (an older sender: taken to agree).
 */
export function clockSkew(sentAt: number | undefined, now: number): number {
  return sentAt === undefined ? 0 : now - sentAt;
}

/**
 * The detection time of a node's event on the hub's clock (`now` is the hub's clock when the
 * frame arrived): what its claim is ordered by and its `until` counts from. The sender's clock
 * is trusted only to measure how long before sending it detected (`sentAt - detectedAt`, the
 * time a spooled event waited), never as a time: beyond CLOCK_TOLERANCE_MS of skew the
 * detection is placed that long before the hub received it, so a sender hours off neither
 * loses its bans nor stretches them. Within the tolerance the sender's time is kept as it is
 * (network delay and skew cannot be told apart, and the response times stay the origin's own
 * measurement). Either way it is never later than `sentAt`, nor than `now`: no claim is in the
 * hub's future, so an unban sent after it (from the origin's clock once fixed, or by an admin)
 * always lifts it.
 */
export function hubDetectedAt(detectedAt: number, sentAt: number | undefined, now: number): number {
  const sent = sentAt ?? now;
  const first = Math.min(detectedAt, sent);
  const skew = clockSkew(sent, now);
  return Math.min(now, Math.abs(skew) > CLOCK_TOLERANCE_MS ? first + skew : first);
}

// ---------------------------------------------------------------------------------------------
// Structured log: the CSV every hub and agent writes (`--csv`)

/** Columns of the structured log. `rt_ms` is the response time: block time minus detection time. */
export const CSV_HEADER = "time,node,action,ip,origin,jail,until,rt_ms,detail";

/** Actions written to the structured log. */
export type CsvAction = "BLOCK" | "SCHEDULE_UNBLOCK" | "UNBLOCK" | "REJECT" | "REPAIR" | "RECEIVE" | "RELAY" | "ESCALATE" | "HOLD";

/** One row of the structured log, as its fields. */
export interface CsvRecord {
  time: number;
  node: string;
  action: CsvAction;
  ip?: string;
  origin?: string;
  jail?: string;
  until?: number | null;
  rtMs?: number;
  detail?: string;
}

/**
 * `s` with every control character written as an escape (`\n`, `\r`, `\t`, `\xNN`, `\uNNNN`,
 * a backslash stays as it is): C0, DEL, C1 and the Unicode line and paragraph separators.
 * Text another peer chose (a hub's error message, a node name, a role) goes through it before
 * it reaches a log line, a CSV cell or a terminal, so it can neither forge a line nor send
 * terminal escapes.
 */
export function printable(s: string): string {
  return s.replace(/[\x00-\x1f\x7f-\x9f\u2028\u2029]/g, (c) => {
    if (c === "\n") return "\\n";
    if (c === "\r") return "\\r";
    if (c === "\t") return "\\t";
    const code = c.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u${code.toString(16)}`;
  });
}

/**
 * One CSV cell: control characters escaped (`printable`: a row is always one line), quoted
 * when it holds `"` or `,`, and a cell a spreadsheet would read as a formula (starting with
 * `=`, `+`, `-`, `@`, a tab or CR, and not a plain number) prefixed with `'`, so a node name
 * like `=HYPERLINK(...)` stays text.
 */
export function csvField(v: string): string {
  let cell = /^[=+\-@\t\r]/.test(v) && !/^-?\d+(\.\d+)?$/.test(v) ? `'${v}` : v;
  cell = printable(cell);
  return /[",]/.test(cell) ? `"${cell.replace(/"/g, '""')}"` : cell;
}

/** Formats one structured-log row (with its newline); times as ISO-8601 UTC with ms. */
export function csvRow(r: CsvRecord): string {
  const until = r.until === undefined ? "" : r.until === null ? "never" : new Date(r.until).toISOString();
  return (
    [new Date(r.time).toISOString(), r.node, r.action, r.ip ?? "", r.origin ?? "", r.jail ?? "", until, r.rtMs === undefined ? "" : String(r.rtMs), r.detail ?? ""]
      .map(csvField)
      .join(",") + "\n"
  );
}
