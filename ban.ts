/**
 * banshare sender: invoked by Fail2Ban's action, sends one ban or unban to the hub and exits.
 *
 *   node --import tsx ban.ts ban 203.0.113.7 --jail sshd --bantime 600 --config /etc/banshare/ban.json
 *   node --import tsx ban.ts unban 203.0.113.7 --jail sshd
 *
 * and the operator's commands, run by hand against the same hub:
 *
 *   node --import tsx ban.ts list [--json]                  # the fleet's bans (admin token)
 *   node --import tsx ban.ts status [--state AGENT_STATE]   # hub, node, agent cursor, kernel set
 *   node --import tsx ban.ts unban 203.0.113.7 --all-nodes  # lift every node's claim (admin token)
 *   node --import tsx ban.ts import banned.txt              # publish bans Fail2Ban already holds
 *
 * A ban or unban goes first to this server's agent, on the socket it keeps in the spool
 * directory (`agent.sock`): the agent holds a live connection to the hub and the spool, so the
 * action ends in milliseconds whatever the network does. With no agent answering, it goes as one
 * POST to the hubs in order (a hub whose TCP connection is not up within --connect-timeout is
 * passed over), and into the spool when none acks within --timeout.
 * Exit 0 once the event is durable somewhere that delivers it: acked by the hub (in its journal),
 * fsynced by the agent, or spooled for the agent. Exit 2 on invalid input; 1 when the hub refused
 * the event, when something set up wrong must be fixed (token file, CA, the hub's certificate;
 * the event is still spooled then), or when it could neither be sent nor spooled.
 * Start-up time is the floor of the fleet's reaction time, so this file imports only node
 * built-ins and messages.ts: no yargs (node:util parseArgs costs nothing to load) and no ws
 * (the event goes as one HTTP POST to the hub's /v1/events). What only the operator's commands
 * need (child_process for the kernel count, a keep-alive agent) is imported inside them.
 *
 * @module
 */

import { createHash, randomBytes } from "node:crypto";
import { realpathSync } from "node:fs";
import { lstat, mkdir, open, readFile, rename, unlink } from "node:fs/promises";
import { createConnection } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs as parseCli } from "node:util";
import type { Agent, IncomingMessage } from "node:http";
import { HANDOFF_SOCKET, MAX_BANTIME_S, MAX_CLOCK_SKEW_MS, MAX_HANDOFF_ANSWER_BYTES, MAX_NODE_FRAME_BYTES, checkBannable, contains, isLoopbackHost, isName, parseAddress, parseHandoffAnswer, parseHubFrame, printable, spoolDirProblem, tlsProblem, type BanFrame, type BanList, type ListedBan, type NodeList, type NodeState, type UnbanFrame } from "./messages.ts";

/** Default spool directory: the agent's --spool must name the same one to deliver what waits there, and to take events on its hand-off socket there. */
export const DEFAULT_SPOOL = "/var/lib/banshare/spool";

/** --timeout: how long a hub may take to ack once connected (seconds). */
const DEFAULT_TIMEOUT_S = 2;
/** --connect-timeout: how long a hub's TCP connection may take (seconds); a hub one continent away connects in a fraction of it. */
const DEFAULT_CONNECT_TIMEOUT_S = 0.3;
/** How long the local agent may take to answer a hand-off (it answers once the event is fsynced or acked). */
const HANDOFF_ANSWER_MS = 1000;

/** Where the hub is and how to reach it: what every command needs. */
export interface HubAccess {
  hubs: string[];
  tokenFile: string;
  timeoutMs: number;
  /** Give up on a hub whose TCP connection is not up after this long: a blackholed hub costs no more. */
  connectTimeoutMs: number;
  ca?: string;
}

/** What one ban or unban invocation does. */
export interface SendOptions extends HubAccess {
  command: "ban" | "unban";
  ip: string;
  jail: string;
  bantime: number;
  detectedAt: number;
  spoolDir: string;
  /** `unban --all-nodes` (admin): lift every node's older claim. Never spooled. */
  all?: boolean;
}

/** `ban.ts list`: the hub's live claims, as a table or the hub's JSON. */
export interface ListOptions extends HubAccess {
  command: "list";
  json: boolean;
}

/** Kernel backends `ban.ts status` can count, as the agent's --backend names them. */
export type Backend = "ipset" | "nftables" | "iptables" | "dry-run";

/** `ban.ts status`: hub, node, agent cursor and kernel set of this server. */
export interface StatusOptions extends HubAccess {
  command: "status";
  /** The agent's --state file, for its cursor. */
  statePath?: string;
  backend: Backend;
  prefix: string;
  /** `--fleet` (admin): every connected node's enforcement, from `GET /v1/nodes`, instead of this server's. */
  fleet?: boolean;
}

/** `ban.ts import`: publishes bans Fail2Ban already holds. */
export interface ImportOptions extends HubAccess {
  command: "import";
  /** A file, or `-` for stdin. */
  file: string;
  /** Jail and bantime for input that does not say. */
  jail: string;
  bantime: number;
  /** Requests in flight at once. */
  concurrency: number;
}

/** Everything ban.ts can be asked to do. */
export type Invocation = SendOptions | ListOptions | StatusOptions | ImportOptions;

/** Invalid usage or input: exit 2 with one line. */
export class UsageError extends Error {}

const USAGE = `Usage: node --import tsx ban.ts ban|unban IP [options]
       node --import tsx ban.ts unban IP --all-nodes [options]
       node --import tsx ban.ts list [--json] [options]
       node --import tsx ban.ts status [--state FILE] [--backend B] [options]
       node --import tsx ban.ts status --fleet [options]
       node --import tsx ban.ts import [FILE|-] [--jail J] [--bantime S] [options]

ban, unban: send one ban or unban to the banshare hub; Fail2Ban's banshare action calls them.
list: the fleet's live bans, newest first (admin token). status: is the hub reachable, who
this token is, where this server's agent is, and what its kernel set holds; with --fleet
(admin token), one line per connected node: enforcing, drift N or hook missing since. import: publish
the bans Fail2Ban already holds: \`fail2ban-client banned\`, \`fail2ban-client get JAIL banip
--with-time\`, or addresses one per line (# comments), with their original times when given.

Options (each also from the environment, e.g. BANSHARE_HUB, or a JSON --config file):
  --jail NAME          Fail2Ban jail (default: sshd)
  --bantime SECONDS    ban length, -1 for permanent (ban, import; default: 600)
  --time EPOCH         detection time in epoch seconds, Fail2Ban's <time> (default: now)
  --restored 0|1       ban: Fail2Ban's <restored>; 1: --time is a restored ban's, rounded to the second
  --all-nodes          unban: lift every node's claim on IP, not only this node's (admin)
  --json               list: print the hub's JSON instead of a table
  --state FILE         status: the agent's --state file, for its cursor
  --backend B          status: the agent's backend, ipset, nftables, iptables or dry-run (default: ipset)
  --prefix NAME        status: the agent's --prefix (default: banshare)
  --fleet              status: every connected node's enforcement instead (admin)
  --concurrency N      import: requests in flight at once (default: 8)
  --hub URL[,URL]      hub URL(s), ws:// or wss://, tried in order
  --token-file FILE    file holding this node's token
  --timeout SECONDS    give up on a connected hub that has not answered after this long
                       (ban, unban: then spool; default: ${DEFAULT_TIMEOUT_S})
  --connect-timeout SECONDS
                       give up on a hub whose TCP connection is not up after this long: a
                       blackholed hub costs no more (default: ${DEFAULT_CONNECT_TIMEOUT_S})
  --spool DIR          the agent's --spool: ban and unban are handed to the agent on its
                       socket there, or wait there as files for it (default: ${DEFAULT_SPOOL})
  --ca FILE            PEM CA certificate for a wss:// hub with a private CA
  --insecure           allow a plain ws:// hub off this host (the token crosses the network in clear)
  --config FILE        JSON file with any of the options above
  --help               show this text

Exit status: 0 acked, taken by the agent or spooled (ban, unban), listed, hub reachable (status), every node
enforcing (status --fleet), all imported; 1 refused by the hub or not sent, a set-up error
to fix (token file, --ca, the hub's certificate; ban, unban: the event is still kept), hub unreachable,
a node that drifts, misses a hook or has not reported (status --fleet), no agent connected, or
a bad import line; 2 invalid input.`;

const OPTIONS = {
  jail: { type: "string" },
  bantime: { type: "string" },
  time: { type: "string" },
  hub: { type: "string" },
  "token-file": { type: "string" },
  timeout: { type: "string" },
  "connect-timeout": { type: "string" },
  spool: { type: "string" },
  ca: { type: "string" },
  config: { type: "string" },
  "all-nodes": { type: "boolean" },
  insecure: { type: "boolean" },
  json: { type: "boolean" },
  fleet: { type: "boolean" },
  restored: { type: "string" },
  state: { type: "string" },
  backend: { type: "string" },
  prefix: { type: "string" },
  concurrency: { type: "string" },
  help: { type: "boolean" },
} as const;

type Flag = Exclude<keyof typeof OPTIONS, "help">;

type Command = Invocation["command"];
const COMMANDS: Command[] = ["ban", "unban", "list", "status", "import"];

/** Flags that belong to one command; the others (hub, token, timeout, ca, config) go with every one. */
const COMMAND_FLAGS: Record<Command, Flag[]> = {
  ban: ["jail", "bantime", "time", "restored", "spool"],
  unban: ["jail", "time", "spool", "all-nodes"],
  list: ["json"],
  status: ["state", "backend", "prefix", "fleet"],
  import: ["jail", "bantime", "concurrency"],
};
const BACKENDS: Backend[] = ["ipset", "nftables", "iptables", "dry-run"];
/** The agent's nftables sets (a copy of agent.ts's, kept in step by test/copies.test.ts): addresses, then networks. */
const NFT_SETS = ["v4", "v6", "v4net", "v6net"];

/** The host of a hub URL, without IPv6 brackets; empty when it is not a URL. */
function hostOf(url: string): string {
  try {
    return new URL(url).hostname.replace(/^\[|\]$/g, "");
  } catch {
    return "";
  }
}

function camel(flag: string): string {
  return flag.replace(/-(\w)/g, (_, c: string) => c.toUpperCase());
}

function envName(flag: string): string {
  return `BANSHARE_${flag.toUpperCase().replace(/-/g, "_")}`;
}

function num(flag: string, v: string | undefined, ok: (n: number) => boolean, expected: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n) || !ok(n)) throw new UsageError(`Expected --${flag} to be ${expected}, got ${JSON.stringify(v)}`);
  return n;
}

/**
 * Turns argv, the environment and an already-read config object into what to do.
 * Precedence: command line, then environment, then config file, then defaults.
 */
export function parseArgs(argv: string[], env: Record<string, string | undefined> = {}, config: Record<string, unknown> = {}, now = Date.now()): Invocation | "help" {
  let parsed;
  // `--bantime -1` is Fail2Ban's permanent ban: a negative number is a value, not a flag.
  const args = argv.map((a, i) => (/^-\d/.test(a) && /^--\w/.test(argv[i - 1] ?? "") && !argv[i - 1].includes("=") ? `\0${a}` : a));
  const joined = args.flatMap((a, i) => (a.startsWith("\0") ? [] : args[i + 1]?.startsWith("\0") ? [`${a}=${args[i + 1].slice(1)}`] : [a]));
  try {
    parsed = parseCli({ args: joined, options: OPTIONS, allowPositionals: true, strict: true, tokens: true });
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0].replace(/\. To specify.*$/, ""));
  }
  // A flag given twice would silently take its last value: say so instead.
  const given = parsed.tokens.flatMap((t) => (t.kind === "option" ? [t.name] : []));
  const twice = given.find((name, i) => given.indexOf(name) !== i);
  if (twice) throw new UsageError(`Expected --${twice} once, got it ${given.filter((n) => n === twice).length} times`);
  if (parsed.values.help) return "help";
  const get = (flag: Flag): string | undefined => {
    const v = parsed.values[flag] ?? env[envName(flag)] ?? config[flag] ?? config[camel(flag)];
    return v === undefined || v === null ? undefined : String(v);
  };
  const [command, ...operands] = parsed.positionals;
  if (!COMMANDS.includes(command as Command)) {
    throw new UsageError(`Expected the command ban or unban (or list, status, import), got ${command === undefined ? "none" : JSON.stringify(command)}`);
  }
  const cmd = command as Command;
  // Only the command line is checked: the environment and a shared --config may hold other commands' flags.
  for (const flag of Object.keys(parsed.values) as Flag[]) {
    const owner = COMMANDS.find((c) => COMMAND_FLAGS[c].includes(flag));
    if (owner && !COMMAND_FLAGS[cmd].includes(flag)) throw new UsageError(`Expected no --${flag} with ${cmd}: it is an option of ${COMMANDS.filter((c) => COMMAND_FLAGS[c].includes(flag)).join(" and ")}`);
  }
  const timeout = num("timeout", get("timeout"), (n) => n > 0 && n <= 300, "0-300 seconds") ?? DEFAULT_TIMEOUT_S;
  const connectTimeout = num("connect-timeout", get("connect-timeout"), (n) => n > 0 && n <= 300, "0-300 seconds") ?? DEFAULT_CONNECT_TIMEOUT_S;
  const hub = get("hub");
  if (!hub) throw new UsageError(`Expected --hub URL (or ${envName("hub")}, or "hub" in --config), got none`);
  const hubs = hub.split(",").map((s) => s.trim()).filter(Boolean);
  for (const h of hubs) if (!/^wss?:\/\/[^\s/]+/.test(h)) throw new UsageError(`Expected --hub to be ws:// or wss:// URLs, got ${JSON.stringify(h)}`);
  const insecure = parsed.values.insecure === true || /^(1|true)$/i.test(get("insecure") ?? "");
  for (const h of hubs) {
    // Refused before any connection: the token would be on the wire in clear at the first byte.
    if (h.startsWith("ws:") && !isLoopbackHost(hostOf(h)) && !insecure) throw new UsageError(`Expected a wss:// hub off this host, got ${JSON.stringify(h)}: plain ws:// would send the token in clear (use wss:// with --ca, or --insecure on a network you trust)`);
  }
  const tokenFile = get("token-file");
  if (!tokenFile) throw new UsageError(`Expected --token-file FILE (or ${envName("token-file")}, or "tokenFile" in --config), got none`);
  const access: HubAccess = { hubs, tokenFile, timeoutMs: timeout * 1000, connectTimeoutMs: Math.min(connectTimeout, timeout) * 1000, ca: get("ca") };
  const jail = () => {
    const j = get("jail") ?? "sshd";
    if (!isName(j)) throw new UsageError(`Expected --jail to be a jail name of A-Z a-z 0-9 _ . : -, got ${JSON.stringify(j)}`);
    return j;
  };
  const bantime = () => num("bantime", get("bantime"), (n) => Number.isInteger(n) && (n === -1 || (n >= 1 && n <= MAX_BANTIME_S)), `-1 or a whole number of seconds up to ${MAX_BANTIME_S}`) ?? 600;

  if (cmd === "list" || cmd === "status") {
    if (operands.length) throw new UsageError(`Expected no operand after ${cmd}, got ${JSON.stringify(operands.join(" "))}`);
    if (cmd === "list") return { command: cmd, json: parsed.values.json === true, ...access };
    const backend = get("backend") ?? "ipset";
    if (!BACKENDS.includes(backend as Backend)) throw new UsageError(`Expected --backend to be ${BACKENDS.join(", ")}, got ${JSON.stringify(backend)}`);
    const prefix = get("prefix") ?? "banshare";
    if (!/^[a-z][a-z0-9_-]{0,20}$/.test(prefix)) throw new UsageError(`Expected --prefix to be 1-21 of a-z 0-9 _ - starting with a letter, got ${JSON.stringify(prefix)}`);
    return { command: cmd, statePath: get("state"), backend: backend as Backend, prefix, ...(parsed.values.fleet === true ? { fleet: true } : {}), ...access };
  }
  if (cmd === "import") {
    if (operands.length > 1) throw new UsageError(`Expected one FILE (or - for stdin) after import, got ${JSON.stringify(operands.join(" "))}`);
    const concurrency = num("concurrency", get("concurrency"), (n) => Number.isInteger(n) && n >= 1 && n <= 64, "a whole number from 1 to 64") ?? 8;
    return { command: cmd, file: operands[0] ?? "-", jail: jail(), bantime: bantime(), concurrency, ...access };
  }
  const [ip, ...rest] = operands;
  if (ip === undefined) throw new UsageError(`Expected an IP address after ${cmd}, got none`);
  if (rest.length) throw new UsageError(`Expected one IP address, got also ${JSON.stringify(rest.join(" "))}`);
  const addr = checkBannable(ip);
  if (!addr.ok) throw new UsageError(addr.message);
  const time = num("time", get("time"), (n) => n > 0 && n * 1000 < now + 300_000, "an epoch time in seconds, not in the future");
  const restored = get("restored");
  if (restored !== undefined && restored !== "0" && restored !== "1") throw new UsageError(`Expected --restored to be 0 or 1 (Fail2Ban's <restored>), got ${JSON.stringify(restored)}`);
  // Fail2Ban's database keeps a ban's time rounded to the second, so a restored ban's <time> can
  // be up to 0.5 s after the original detection. Take the earliest time that rounds to it: the
  // restored ban is then never newer than the original, nor ends after it, and a Fail2Ban restart
  // changes nothing at the hub.
  const detectedAt = time === undefined ? now : restored === "1" ? Math.round(time) * 1000 - 500 : Math.round(time * 1000);
  return {
    command: cmd,
    ip: addr.value.text,
    jail: jail(),
    bantime: bantime(),
    detectedAt,
    ...access,
    spoolDir: get("spool") ?? DEFAULT_SPOOL,
    ...(parsed.values["all-nodes"] ? { all: true } : {}),
  };
}

/** The frame this invocation sends. */
export function toFrame(o: SendOptions, id: string): BanFrame | UnbanFrame {
  return o.command === "ban"
    ? { type: "ban", id, ip: o.ip, jail: o.jail, bantime: o.bantime, detectedAt: o.detectedAt }
    : { type: "unban", id, ip: o.ip, jail: o.jail, detectedAt: o.detectedAt, ...(o.all ? { all: true } : {}) };
}

/**
 * How a send ended. `unreachable` is worth spooling; `refused` is not; `untrusted` (a TLS
 * failure: this side cannot verify the hub, or the port speaks no TLS) is an error to fix by
 * hand, though the event is still spooled for an agent that may be set up right.
 */
export type SendResult = { status: "acked"; seq: string; remaining?: number } | { status: "refused"; reason: string; code?: string } | { status: "unreachable"; reason: string; code?: string } | { status: "untrusted"; reason: string };

/**
 * Sends one frame to one hub as `POST /v1/events` and waits for its ack. Never throws.
 * One HTTP round trip on node's own http module: no WebSocket session (upgrade, hello,
 * welcome) and no WebSocket library to load, which is most of what a sender costs to start.
 * With a keep-alive `agent` (import), a socket whose answer was read goes back to it.
 */
export async function sendOnce(url: string, token: string, frame: BanFrame | UnbanFrame, timeoutMs: number, ca?: string, agent?: Agent, connectTimeoutMs = timeoutMs): Promise<SendResult> {
  const u = new URL(url);
  const secure = u.protocol === "wss:";
  // https (and with it tls) is loaded only for a wss:// hub.
  const { request } = secure ? await import("node:https") : await import("node:http");
  // Stamped as it goes, on this server's clock: the hub measures this clock's skew with it, and
  // how long before sending the ban was detected, and times the ban by its own clock.
  const body = JSON.stringify({ ...frame, sentAt: Date.now() });
  return new Promise((resolve) => {
    let done = false;
    let connectTimer: NodeJS.Timeout | undefined;
    const finish = (r: SendResult, answered = false) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearTimeout(connectTimer);
      resolve(r);
      if (!answered || !agent) req.destroy();
    };
    const timer = setTimeout(() => finish({ status: "unreachable", reason: `no ack from ${url} within ${timeoutMs} ms` }), timeoutMs);
    const req = request(
      {
        host: u.hostname.replace(/^\[|\]$/g, ""),
        port: u.port || (secure ? 443 : 80),
        path: "/v1/events",
        method: "POST",
        headers: { authorization: `Bearer ${token}`, "content-type": "application/json", "content-length": Buffer.byteLength(body) },
        ca: ca ? [ca] : undefined,
        agent,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (d: string) => {
          if (text.length < MAX_NODE_FRAME_BYTES) text += d;
        });
        res.on("error", (e) => finish({ status: "unreachable", reason: `${url}: ${e.message}` }));
        res.on("end", () => {
          const s = res.statusCode ?? 0;
          const parsed = text ? parseHubFrame(text) : undefined;
          const f = parsed?.ok ? parsed.value : undefined;
          if (s === 200 && f?.type === "ack" && f.id === frame.id) return finish({ status: "acked", seq: f.seq, ...(Number.isInteger(f.remaining) ? { remaining: f.remaining } : {}) }, true);
          if (f?.type === "error") {
            // Over the rate limit or a hub-side write error is passing: spool it. Anything else is a refusal.
            const passing = f.code === "rate_limited" || f.code === "internal";
            return finish({ status: passing ? "unreachable" : "refused", reason: `hub refused the ${frame.type}: ${f.code}: ${f.message}`, code: f.code }, true);
          }
          if (s === 429) return finish({ status: "unreachable", reason: `${url} answered HTTP 429${res.statusMessage ? ` ${res.statusMessage}` : ""}`, code: "rate_limited" });
          if (s === 401 || s === 403) return finish({ status: "refused", reason: `${url} refused the token (HTTP ${s}): check --token-file and the hub's token list` });
          // 400 without an error frame: the hub cannot read the request (ws:// to its TLS port); a spool would fail the same way.
          if (s === 400 || s === 404) return finish({ status: "refused", reason: `${url} refused the request (HTTP ${s}${res.statusMessage ? ` ${res.statusMessage}` : ""}): check --hub` });
          finish({ status: "unreachable", reason: `${url} answered HTTP ${s}${res.statusMessage ? ` ${res.statusMessage}` : ""}` });
        });
      },
    );
    // A hub that swallows packets (machine gone, route dropped) never answers the SYN: give up
    // on it at --connect-timeout instead of waiting out --timeout, so Fail2Ban is not held up.
    req.on("socket", (sock) => {
      if (!sock.connecting) return;
      connectTimer = setTimeout(() => finish({ status: "unreachable", reason: `no connection to ${url} within ${connectTimeoutMs} ms (--connect-timeout)` }), connectTimeoutMs);
      sock.once("connect", () => clearTimeout(connectTimer));
    });
    req.on("error", (e) => {
      const tls = tlsProblem(e as NodeJS.ErrnoException, url);
      finish(tls ? { status: "untrusted", reason: tls } : { status: "unreachable", reason: `${url}: ${e.message}` });
    });
    req.end(body);
  });
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

/** How a hand-off to the local agent ended: `absent` (no agent answered) falls back to the hub, then the spool. */
export type HandoffResult = { status: "queued"; via: "hub" | "spool"; problem?: string } | { status: "refused"; reason: string } | { status: "absent"; reason: string };

/**
 * Hands one event to the local agent on `<spool>/agent.sock` and waits for its answer: the agent
 * answers once the event is durable (acked by the hub over the connection it holds, or fsynced in
 * the spool it delivers), so Fail2Ban's action ends in milliseconds whatever the network does.
 * Only a socket of this user (or root's) in a spool directory `spoolDirProblem` accepts is used:
 * anyone else's could swallow the bans. Never throws.
 */
export async function handOff(spoolDir: string, frame: BanFrame | UnbanFrame, answerMs = HANDOFF_ANSWER_MS): Promise<HandoffResult> {
  const path = join(spoolDir, HANDOFF_SOCKET);
  const uid = process.getuid?.();
  const dir = await lstat(spoolDir).catch(() => undefined);
  if (!dir) return { status: "absent", reason: `no agent: ${spoolDir} does not exist` };
  const unsafe = spoolDirProblem(spoolDir, dir, uid);
  if (unsafe) return { status: "absent", reason: `not handing the event to the agent: ${unsafe}` };
  const sock = await lstat(path).catch(() => undefined);
  if (!sock) return { status: "absent", reason: `no agent listens at ${path}` };
  if (!sock.isSocket() || (uid !== undefined && sock.uid !== uid && sock.uid !== 0)) return { status: "absent", reason: `not handing the event to ${path}: it is not a socket of this user or root` };
  return new Promise((resolve) => {
    let text = "";
    let done = false;
    const finish = (r: HandoffResult) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      conn.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => finish({ status: "absent", reason: `the agent at ${path} did not answer within ${answerMs} ms` }), answerMs);
    const conn = createConnection(path);
    conn.setEncoding("utf8");
    // ECONNREFUSED: a socket left by an agent that is not running.
    conn.on("error", (e) => finish({ status: "absent", reason: `no agent answers at ${path}: ${e.message}` }));
    conn.on("data", (d: string) => {
      text += d;
      const nl = text.indexOf("\n");
      if (nl < 0 && text.length <= MAX_HANDOFF_ANSWER_BYTES) return;
      const parsed = parseHandoffAnswer(nl < 0 ? text : text.slice(0, nl));
      if (!parsed.ok) return finish({ status: "absent", reason: `the agent at ${path} answered something else: ${parsed.message}` });
      const a = parsed.value;
      if (a.id !== undefined && a.id !== frame.id) return finish({ status: "absent", reason: `the agent at ${path} answered for another event` });
      if (a.type === "queued") return finish({ status: "queued", via: a.via, ...(a.problem ? { problem: a.problem } : {}) });
      finish(a.code === "unavailable" ? { status: "absent", reason: `the agent could not keep it: ${a.message}` } : { status: "refused", reason: `hub refused the ${frame.type}: ${a.code}: ${a.message}` });
    });
    conn.on("end", () => finish({ status: "absent", reason: `the agent at ${path} closed the connection without an answer` }));
    // Not end(): the agent answers on this connection, which a half-close would end.
    conn.write(JSON.stringify(frame) + "\n");
  });
}

// ---------------------------------------------------------------------------------------------
// The operator's commands: list, status, import. They are run by hand, not by Fail2Ban, so what
// they need beyond the sender (child_process, a keep-alive agent) is imported inside them.

/** What `GET /v1/whoami` answers. */
export interface WhoAmI {
  node: string;
  role: string;
  hub: string;
  seq: string;
  now: number;
  /** Addresses the fleet blocks (what every agent holds, its own node's bans included) and live ban claims. */
  blocked: number;
  claims: number;
}

/** `ms` as a short duration: `42s`, `9m58s`, `3h05m`, `2d03h`. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  const pad = (n: number) => String(n).padStart(2, "0");
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d${pad(Math.floor((s % 86400) / 3600))}h`;
}

/** The newest detection time among an address's claims. */
function newest(b: ListedBan): number {
  return b.claims.reduce((t, c) => Math.max(t, c.detectedAt), 0);
}

/**
 * The table `ban.ts list` prints: one row per claim, addresses newest first (by their newest
 * claim), each address's claims newest first, time left by the hub's clock; then a summary line.
 */
export function formatBanTable(list: BanList): string {
  const rows: string[][] = [["ADDRESS", "NODES", "ORIGIN", "JAIL", "DETECTED (UTC)", "LEFT"]];
  let claims = 0;
  for (const b of [...list.bans].sort((x, y) => newest(y) - newest(x))) {
    const sorted = [...b.claims].sort((x, y) => y.detectedAt - x.detectedAt);
    sorted.forEach((c, i) => {
      claims++;
      const left = c.until === null ? "permanent" : formatDuration(c.until - list.now);
      // What the hub sent is printed with its control characters escaped: no terminal escapes, no forged rows.
      const row = [i ? "" : b.ip, i ? "" : String(b.nodes), c.origin, c.jail, new Date(c.detectedAt).toISOString().slice(0, 19).replace("T", " "), c.held ? `${left} (held)` : left];
      rows.push(row.map((cell) => printable(String(cell))));
    });
  }
  // A loop, not Math.max(...column): a spread of 125,000+ cells exceeds the arguments a call may take.
  const widths = rows[0].map(() => 0);
  for (const r of rows) r.forEach((cell, col) => (widths[col] = Math.max(widths[col], cell.length)));
  const lines = rows.map((r) => r.map((cell, col) => (col === r.length - 1 ? cell : cell.padEnd(widths[col]))).join("  "));
  lines.push(printable(`${list.count} address(es) blocked, ${claims} claim(s); hub ${list.hub}, seq ${list.seq}`));
  return lines.join("\n") + "\n";
}

/** GETs `path` from one hub; resolves with the response once its headers arrived, rejects when the hub cannot be reached within `timeoutMs`. */
async function hubGet(url: string, path: string, token: string, timeoutMs: number, ca?: string): Promise<IncomingMessage> {
  const u = new URL(url);
  const secure = u.protocol === "wss:";
  const { request } = secure ? await import("node:https") : await import("node:http");
  return new Promise((resolve, reject) => {
    const req = request(
      { host: u.hostname.replace(/^\[|\]$/g, ""), port: u.port || (secure ? 443 : 80), path, method: "GET", headers: { authorization: `Bearer ${token}` }, ca: ca ? [ca] : undefined },
      (res) => {
        clearTimeout(timer);
        resolve(res);
      },
    );
    const timer = setTimeout(() => req.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    req.on("error", (e) => {
      clearTimeout(timer);
      const tls = tlsProblem(e as NodeJS.ErrnoException, url);
      reject(Object.assign(new Error(tls ?? `${url}: ${e.message}`), { untrusted: tls !== undefined }));
    });
    req.end();
  });
}

/** Reads a response body as text, keeping at most `max` characters. */
async function readText(res: IncomingMessage, max: number): Promise<string> {
  let text = "";
  res.setEncoding("utf8");
  for await (const chunk of res) if (text.length < max) text += chunk;
  return text;
}

/** Why a hub did not answer 200, in one sentence. */
async function refusal(url: string, path: string, res: IncomingMessage): Promise<string> {
  const s = res.statusCode ?? 0;
  const parsed = parseHubFrame(await readText(res, MAX_NODE_FRAME_BYTES).catch(() => ""));
  if (parsed.ok && parsed.value.type === "error") return `hub refused: ${parsed.value.code}: ${parsed.value.message}`;
  if (s === 401) return `${url} refused the token (HTTP 401): check --token-file and the hub's token list`;
  if (s === 404) return `${url} does not serve ${path} (HTTP 404): is the hub older than this ban.ts?`;
  return `${url} answered HTTP ${s}${res.statusMessage ? ` ${res.statusMessage}` : ""}`;
}

/** Asks the hubs in order for `path`; the first that answers at all is the one. Rejects with every hub's reason. */
async function firstAnswer(o: HubAccess, path: string, token: string, ca?: string): Promise<{ url: string; res: IncomingMessage; ms: number }> {
  const reasons: string[] = [];
  let untrusted = false;
  for (const url of o.hubs) {
    const t0 = performance.now();
    try {
      const res = await hubGet(url, path, token, o.timeoutMs, ca);
      return { url, res, ms: Math.round(performance.now() - t0) };
    } catch (e) {
      reasons.push((e as Error).message);
      untrusted ||= (e as { untrusted?: boolean }).untrusted === true;
    }
  }
  // A hub that answered with a certificate this side refuses was reached: say what to fix, not that it is away.
  throw new Error(`${untrusted ? "could not talk to the hub safely" : "could not reach the hub"}: ${reasons.join("; ")}`);
}

async function runList(o: ListOptions, token: string, ca?: string): Promise<void> {
  let answer;
  try {
    answer = await firstAnswer(o, "/v1/bans", token, ca);
  } catch (e) {
    return fail(1, (e as Error).message);
  }
  const { url, res } = answer;
  if (res.statusCode !== 200) return fail(1, await refusal(url, "/v1/bans", res));
  try {
    if (o.json) {
      // Passed through as it streams in: 100k bans never sit here as one string.
      for await (const chunk of res) {
        if (!process.stdout.write(chunk)) await new Promise((r) => process.stdout.once("drain", r));
      }
      return;
    }
    const list = JSON.parse(await readText(res, 1 << 30)) as BanList;
    process.stdout.write(formatBanTable(list));
  } catch (e) {
    fail(1, `${url} broke off the list: ${(e as Error).message}`);
  }
}

/** The agent's count commands, for its backend and prefix (`kernelListCommands` lists with them). */
export function kernelCountCommands(backend: Backend, prefix: string): string[][] {
  if (backend === "ipset") return [`${prefix}-v4`, `${prefix}-v6`].map((set) => ["ipset", "list", "-terse", set]);
  if (backend === "nftables") return NFT_SETS.map((set) => ["nft", "-j", "list", "set", "inet", prefix, set]);
  if (backend === "iptables") return ["iptables", "ip6tables"].map((bin) => [bin, "-w", "-S", prefix]);
  return [];
}

/** The commands whose output `kernelAddresses` reads: the count commands, with ipset's members listed too. */
export function kernelListCommands(backend: Backend, prefix: string): string[][] {
  return kernelCountCommands(backend, prefix).map((argv) => argv.filter((a) => a !== "-terse"));
}

/** The address (or network) an nft -j set element holds, in canonical text; the raw text for what is not one. */
function nftMember(e: unknown): string {
  const v = (e as { elem?: { val?: unknown } })?.elem?.val ?? e;
  if (typeof v === "string") return parseAddress(v)?.text ?? v;
  const p = (v as { prefix?: { addr?: unknown; len?: unknown } })?.prefix;
  if (p) return parseAddress(`${p.addr}/${p.len}`)?.text ?? JSON.stringify(v);
  const r = (v as { range?: unknown[] })?.range;
  return r ? r.join("-") : JSON.stringify(v);
}

/** The addresses and networks in the output of one of `kernelListCommands`, in canonical text; throws when it is not what that command prints. */
export function kernelAddresses(backend: Backend, output: string): string[] {
  if (backend === "ipset") {
    const at = output.indexOf("\nMembers:\n");
    if (at < 0) throw new Error(`Expected "Members:" from ipset list, got ${JSON.stringify(output.slice(0, 80))}`);
    const lines = output.slice(at + 10).split("\n").map((l) => l.trim().split(/\s+/)[0]).filter(Boolean);
    return lines.map((l) => parseAddress(l)?.text ?? l);
  }
  if (backend === "nftables") {
    const doc = JSON.parse(output) as { nftables?: Array<{ set?: { elem?: unknown[] } }> };
    const set = doc.nftables?.find((x) => x.set)?.set;
    if (!set) throw new Error("Expected a set in the output of nft -j list set");
    return (set.elem ?? []).map(nftMember);
  }
  // iptables: the agent's one DROP rule per address.
  return [...output.matchAll(/^-A \S+ -s (\S+) .*-j DROP$/gm)].map((m) => parseAddress(m[1])?.text ?? m[1]);
}

/**
 * What the kernel holds against what the hub says the fleet blocks: the addresses missing from
 * the kernel (an address inside a network the kernel blocks is not missing: the network covers
 * it, as the agent does it) and the kernel's extra entries. Pure.
 */
export function compareAddresses(kernel: readonly string[], hub: readonly string[]): { missing: string[]; extra: string[] } {
  const held = new Set(kernel);
  const wanted = new Set(hub);
  const nets = kernel.map((k) => parseAddress(k)).filter((a) => a !== undefined && a.prefix < (a.family === 4 ? 32 : 128));
  const missing = hub.filter((ip) => {
    if (held.has(ip)) return false;
    const a = parseAddress(ip);
    return !a || !nets.some((n) => contains(n!, a));
  });
  return { missing: [...new Set(missing)], extra: [...held].filter((k) => !wanted.has(k)) };
}

/** `status`'s verdict on a comparison: "in step: the same N address(es)", or "2 missing (a, b), 1 extra (c)" with at most `show` of each. */
export function formatDifference(d: { missing: string[]; extra: string[] }, show = 5): string {
  if (!d.missing.length && !d.extra.length) return "in step: the same addresses";
  const part = (n: string[], what: string) => (n.length ? [`${n.length} ${what} (${n.slice(0, show).join(", ")}${n.length > show ? ", ..." : ""})`] : []);
  return [...part(d.missing, "missing"), ...part(d.extra, "extra")].join(", ");
}

/** The addresses this server's kernel set holds, or why they could not be read. */
async function kernelList(backend: Backend, prefix: string): Promise<{ addresses: string[]; where: string } | { error: string }> {
  const { execFile } = await import("node:child_process");
  const addresses: string[] = [];
  for (const argv of kernelListCommands(backend, prefix)) {
    try {
      const out = await new Promise<string>((resolve, reject) =>
        execFile(argv[0], argv.slice(1), { timeout: 10_000, maxBuffer: 1 << 29, encoding: "utf8" }, (err, stdout, stderr) =>
          err ? reject(new Error(`${argv.join(" ")}: ${(stderr || err.message).trim().split("\n")[0]}`)) : resolve(stdout),
        ),
      );
      for (const a of kernelAddresses(backend, out)) addresses.push(a);
    } catch (e) {
      return { error: (e as Error).message };
    }
  }
  const where = backend === "ipset" ? `ipset ${prefix}-v4, ${prefix}-v6` : backend === "nftables" ? `nft set inet ${prefix} ${NFT_SETS.join(", ")}` : `iptables/ip6tables chain ${prefix}`;
  return { addresses, where };
}

/** The addresses the hub says every agent should hold (`GET /v1/blocked`), or why not. */
async function hubBlocked(url: string, token: string, timeoutMs: number, ca?: string): Promise<string[] | { error: string }> {
  try {
    const res = await hubGet(url, "/v1/blocked", token, timeoutMs, ca);
    if (res.statusCode !== 200) return { error: await refusal(url, "/v1/blocked", res) };
    const body = JSON.parse(await readText(res, 1 << 30)) as { addresses?: unknown };
    if (!Array.isArray(body.addresses) || !body.addresses.every((a) => typeof a === "string")) return { error: `${url}/v1/blocked is not a list of addresses` };
    return body.addresses as string[];
  } catch (e) {
    return { error: (e as Error).message };
  }
}

/** `status`'s kernel line: what the set holds, compared address by address with what the hub says it should. */
async function kernelLine(o: StatusOptions, token: string, who: { url: string; blocked: number } | undefined, ca?: string): Promise<string> {
  if (o.backend === "dry-run") return "dry-run backend: nothing in the kernel to count";
  const k = await kernelList(o.backend, o.prefix);
  if ("error" in k) return `cannot count: ${k.error}`;
  const n = k.addresses.length;
  const held = `${n} entr${n === 1 ? "y" : "ies"} in ${k.where}`;
  if (!who) return held;
  const hub = await hubBlocked(who.url, token, o.timeoutMs, ca);
  if (!Array.isArray(hub)) return `${held} (hub: ${who.blocked} blocked; cannot compare the addresses: ${hub.error})`;
  const d = compareAddresses(k.addresses, hub);
  const why = d.missing.length || d.extra.length ? " (allowlisted addresses are never blocked; a change may be on its way, or the agent is behind)" : "";
  return `${held} (hub: ${hub.length} blocked): ${formatDifference(d)}${why}`;
}

/** The agent's cursor from its --state file (a first line `{v: 2, cursor}` then one claim per line, or v1's one object `{v: 1, cursor, claims}`), or why not. */
async function agentCursor(path: string): Promise<{ hub: string; seq: string; claims: number; savedAt: number } | { error: string }> {
  const { stat } = await import("node:fs/promises");
  try {
    const [text, info] = await Promise.all([readFile(path, "utf8"), stat(path)]);
    const lines = text.split("\n").filter((l) => l.trim());
    let s: { v?: number; cursor?: { hub?: unknown; seq?: unknown }; claims?: unknown[] } | undefined;
    try {
      s = JSON.parse(lines[0] ?? "");
    } catch {
      /* reported below */
    }
    if ((s?.v !== 1 && s?.v !== 2) || typeof s.cursor?.hub !== "string" || typeof s.cursor?.seq !== "string") return { error: `${path} is not a banshare agent state file, or its first line is damaged` };
    return { hub: s.cursor.hub, seq: s.cursor.seq, claims: s.v === 1 ? (Array.isArray(s.claims) ? s.claims.length : 0) : lines.length - 1, savedAt: info.mtimeMs };
  } catch (e) {
    return { error: `cannot read ${path}: ${(e as Error).message}` };
  }
}

async function runStatus(o: StatusOptions, token: string, ca?: string): Promise<void> {
  const out = (k: string, v: string) => process.stdout.write(`${`${k}:`.padEnd(8)}${printable(v)}\n`);
  let who: WhoAmI | undefined;
  let whoUrl: string | undefined;
  for (const url of o.hubs) {
    const t0 = performance.now();
    let res: IncomingMessage;
    try {
      res = await hubGet(url, "/v1/whoami", token, o.timeoutMs, ca);
    } catch (e) {
      out("hub", `${url} unreachable: ${(e as Error).message}`);
      continue;
    }
    const ms = Math.round(performance.now() - t0);
    if (res.statusCode !== 200) {
      out("hub", `${url} reachable (${ms} ms round trip) but ${await refusal(url, "/v1/whoami", res)}`);
      continue;
    }
    try {
      who = JSON.parse(await readText(res, MAX_NODE_FRAME_BYTES)) as WhoAmI;
    } catch (e) {
      out("hub", `${url} reachable (${ms} ms round trip) but its answer is not JSON: ${(e as Error).message}`);
      continue;
    }
    whoUrl = url;
    out("hub", `${url} reachable, ${ms} ms round trip; hub id ${who.hub}, seq ${who.seq}`);
    out("node", `${who.node} (role ${who.role})`);
    out("fleet", `${who.blocked} address(es) blocked by ${who.claims} claim(s) (what this node's agent holds)`);
    break;
  }
  if (!o.statePath) out("agent", "cursor unknown: give the agent's --state FILE (or BANSHARE_STATE)");
  else {
    const c = await agentCursor(o.statePath);
    if ("error" in c) out("agent", c.error);
    else {
      const behind = !who ? "" : c.hub !== who.hub ? `; hub id differs from the hub's ${who.hub}: the agent gets a full sync when it connects` : /^\d+$/.test(c.seq) && /^\d+$/.test(who.seq) ? `; ${Math.max(0, Number(who.seq) - Number(c.seq))} event(s) behind the hub` : "";
      out("agent", `cursor ${c.hub}:${c.seq}, ${c.claims} claim(s)${behind} (${o.statePath}, saved ${formatDuration(Date.now() - c.savedAt)} ago)`);
    }
  }
  out("kernel", await kernelLine(o, token, who && whoUrl ? { url: whoUrl, blocked: who.blocked } : undefined, ca));
  if (!who) process.exitCode = 1;
}

/** One line of `ban.ts status --fleet` for one node: name, verdict, and the counts behind it. */
export function formatNodeLine(n: NodeState, now: number): string {
  const e = n.enforcement;
  if (!e || !n.verdict) return `${n.node}  no report  (${n.remote}, connected ${formatDuration(now - n.since)} ago: an agent older than the enforcement reports, or not synced yet)`;
  const counts = `${e.entries === undefined ? "entries not counted" : `${e.entries} entr${e.entries === 1 ? "y" : "ies"}`} / ${e.claims} claim(s)`;
  const repairs = `${e.repairs} repair(s)${e.lastRepair ? `, last ${formatDuration(now - e.lastRepair.at)} ago: ${e.lastRepair.what}` : ""}`;
  return `${n.node}  ${n.verdict.text}  (${e.backend}, ${counts}, ${repairs}; ${n.remote}, reported ${formatDuration(now - e.at)} ago)`;
}

/** `status --fleet`: one line per connected agent from `GET /v1/nodes`; exit 1 unless every one enforces. */
async function runFleet(o: StatusOptions, token: string, ca?: string): Promise<void> {
  let answer;
  try {
    answer = await firstAnswer(o, "/v1/nodes", token, ca);
  } catch (e) {
    return fail(1, (e as Error).message);
  }
  const { url, res } = answer;
  if (res.statusCode !== 200) return fail(1, await refusal(url, "/v1/nodes", res));
  let list: NodeList;
  try {
    list = JSON.parse(await readText(res, 1 << 26)) as NodeList;
  } catch (e) {
    return fail(1, `${url} answered /v1/nodes with something that is not JSON: ${(e as Error).message}`);
  }
  for (const n of list.nodes) process.stdout.write(printable(formatNodeLine(n, list.now)) + "\n");
  const bad = list.nodes.filter((n) => !n.verdict?.ok).length;
  if (!list.nodes.length) return fail(1, `no agent is connected to ${url}`);
  process.stdout.write(printable(`${list.nodes.length - bad} of ${list.nodes.length} node(s) enforcing (hub ${list.hub})`) + "\n");
  if (bad) process.exitCode = 1;
}

/** One ban to import, from line `line` of the input. */
export interface ImportItem {
  line: number;
  ip: string;
  jail: string;
  bantime: number;
  detectedAt: number;
}

/** What `parseImport` found: the bans, one error line per bad input line, and how many were already over. */
export interface ParsedImport {
  items: ImportItem[];
  errors: string[];
  over: number;
}

type PyToken = { t: "[" | "]" | "{" | "}" | ":" | "," | "str" | "end"; s: string; line: number };

/** Tokens of a Python literal of lists, dicts and strings, as `fail2ban-client banned` prints it. */
function pyTokens(text: string): PyToken[] | { line: number; message: string } {
  const out: PyToken[] = [];
  let line = 1;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === "\n") line++;
    else if (/\s/.test(ch)) continue;
    else if ("[]{}:,".includes(ch)) out.push({ t: ch as PyToken["t"], s: ch, line });
    else if (ch === "'" || ch === '"') {
      const end = text.indexOf(ch, i + 1);
      if (end < 0 || text.slice(i + 1, end).includes("\n")) return { line, message: "Expected a closing quote in fail2ban-client banned output, got none" };
      out.push({ t: "str", s: text.slice(i + 1, end), line });
      i = end;
    } else return { line, message: `Expected fail2ban-client banned output ([{'JAIL': ['ADDRESS', ...]}, ...]), got ${JSON.stringify(text.slice(i, i + 20))}` };
  }
  out.push({ t: "end", s: "the end", line });
  return out;
}

type PyValue = { str: string; line: number } | PyValue[] | Array<[{ str: string; line: number }, PyValue]>;

/**
 * Parses the input of `ban.ts import`: `fail2ban-client banned` output (a Python literal
 * `[{'sshd': ['192.0.2.1']}, {'recidive': []}]`), lines of `fail2ban-client get JAIL banip
 * --with-time` (`192.0.2.1 \t2026-11-27 05:00:00 + 600 = 2026-11-27 05:10:00`, Fail2Ban's local
 * time), or addresses separated by blanks and newlines with `#` comments. Timed lines keep their
 * start as detection time and their bantime; the rest get `defaults`. An address listed twice
 * is imported once, with the latest end; a ban already over is skipped and counted.
 */
export function parseImport(text: string, defaults: { jail: string; bantime: number; now: number }): ParsedImport {
  const found: ImportItem[] = [];
  const errors: string[] = [];
  const add = (line: number, ip: string, jail: string, bantime: number, detectedAt: number) => {
    const addr = checkBannable(ip);
    if (!addr.ok) return errors.push(`line ${line}: ${addr.message}`);
    found.push({ line, ip: addr.value.text, jail, bantime, detectedAt });
  };
  if (/^\s*\[/.test(text)) {
    const tokens = pyTokens(text);
    if (!Array.isArray(tokens)) return { items: [], errors: [`line ${tokens.line}: ${tokens.message}`], over: 0 };
    let k = 0;
    const expect = (t: PyToken["t"]) => {
      if (tokens[k].t !== t) throw new Error(`line ${tokens[k].line}: Expected "${t}" in fail2ban-client banned output, got ${JSON.stringify(tokens[k].s)}`);
      return tokens[k++];
    };
    const value = (): PyValue => {
      const tok = tokens[k];
      if (tok.t === "str") return k++, { str: tok.s, line: tok.line };
      const close = tok.t === "[" ? "]" : tok.t === "{" ? "}" : undefined;
      if (!close) throw new Error(`line ${tok.line}: Expected a list, dict or string in fail2ban-client banned output, got ${JSON.stringify(tok.s)}`);
      k++;
      const items: unknown[] = [];
      while (tokens[k].t !== close) {
        if (close === "}") {
          const key = expect("str");
          expect(":");
          items.push([{ str: key.s, line: key.line }, value()]);
        } else items.push(value());
        if (tokens[k].t !== close) expect(",");
      }
      k++;
      return items as PyValue;
    };
    let top: PyValue;
    try {
      top = value();
      expect("end");
    } catch (e) {
      return { items: [], errors: [(e as Error).message], over: 0 };
    }
    const addresses = (jail: string, list: PyValue, line: number) => {
      if (!Array.isArray(list)) return errors.push(`line ${line}: Expected a list of addresses for jail ${jail}, got a string`);
      for (const v of list as PyValue[]) {
        if (Array.isArray(v)) errors.push(`line ${line}: Expected an address in the list of jail ${jail}, got a list or dict`);
        else add(v.line, v.str, jail, defaults.bantime, defaults.now);
      }
    };
    // `fail2ban-client banned`: a list of {jail: [addresses]}; a bare list of addresses is one jail's.
    for (const entry of top as PyValue[]) {
      if (!Array.isArray(entry)) add(entry.line, entry.str, defaults.jail, defaults.bantime, defaults.now);
      else
        for (const pair of entry as unknown[]) {
          if (!Array.isArray(pair) || pair.length !== 2 || Array.isArray(pair[0])) {
            errors.push(`Expected {'JAIL': ['ADDRESS', ...]} entries in fail2ban-client banned output, got a list`);
            break;
          }
          const [key, list] = pair as [{ str: string; line: number }, PyValue];
          if (!isName(key.str)) errors.push(`line ${key.line}: Expected a jail name of A-Z a-z 0-9 _ . : -, got ${JSON.stringify(key.str)}`);
          else addresses(key.str, list, key.line);
        }
    }
  } else {
    const timed = /^(\S+)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+ (-?\d+) = \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/;
    text.split("\n").forEach((raw, i) => {
      const line = raw.replace(/#.*/, "").trim();
      if (!line) return;
      const m = timed.exec(line);
      if (!m) {
        const words = line.split(/\s+/);
        // A word that is not an address at all (not even a refused one) means an unknown format.
        if (words.some((w) => !/^[0-9A-Fa-f:.]+(\/\d+)?$/.test(w))) {
          errors.push(`line ${i + 1}: Expected addresses, or "ADDRESS \\tSTART + BANTIME = END" as fail2ban-client get JAIL banip --with-time prints it, got ${JSON.stringify(line.length > 60 ? line.slice(0, 57) + "..." : line)}`);
        } else for (const w of words) add(i + 1, w, defaults.jail, defaults.bantime, defaults.now);
        return;
      }
      const [, ip, start, bt] = m;
      const [d, t] = start.split(" ");
      const [y, mo, day] = d.split("-").map(Number);
      const [h, mi, s] = t.split(":").map(Number);
      // Fail2Ban prints its local time: read it in ours (run the import on the server, or set TZ).
      const detectedAt = new Date(y, mo - 1, day, h, mi, s).getTime();
      const bantime = Number(bt);
      if (!(bantime === -1 || (bantime >= 1 && bantime <= MAX_BANTIME_S))) return errors.push(`line ${i + 1}: Expected a bantime of -1 or 1-${MAX_BANTIME_S} seconds, got ${bt}`);
      if (!Number.isFinite(detectedAt) || detectedAt > defaults.now + MAX_CLOCK_SKEW_MS) return errors.push(`line ${i + 1}: Expected a ban start not in the future, got ${start}`);
      add(i + 1, ip, defaults.jail, bantime, detectedAt);
    });
  }
  const end = (x: ImportItem) => (x.bantime === -1 ? Infinity : x.detectedAt + x.bantime * 1000);
  const byIp = new Map<string, ImportItem>();
  let over = 0;
  for (const x of found) {
    if (end(x) <= defaults.now) {
      over++;
      continue;
    }
    const had = byIp.get(x.ip);
    if (!had || end(x) > end(had)) byIp.set(x.ip, x);
  }
  return { items: [...byIp.values()], errors, over };
}

/** The frame an imported ban is sent as. Its id follows from its content: importing the same input twice changes nothing. */
export function importFrame(x: ImportItem): BanFrame {
  const id = "imp-" + createHash("sha256").update(`${x.ip} ${x.jail} ${x.bantime} ${x.detectedAt}`).digest("base64url").slice(0, 24);
  return { type: "ban", id, ip: x.ip, jail: x.jail, bantime: x.bantime, detectedAt: x.detectedAt };
}

async function readInput(file: string): Promise<string> {
  if (file !== "-") return readFile(file, "utf8");
  let text = "";
  process.stdin.setEncoding("utf8");
  for await (const chunk of process.stdin) text += chunk;
  return text;
}

async function runImport(o: ImportOptions, token: string, text: string, ca?: string): Promise<void> {
  const { items, errors, over } = parseImport(text, { jail: o.jail, bantime: o.bantime, now: Date.now() });
  for (const e of errors) process.stderr.write(`ban.ts: import: ${e}\n`);
  // One whoami first: a wrong token or a reader's stops here, before thousands of refusals.
  let answer;
  try {
    answer = await firstAnswer(o, "/v1/whoami", token, ca);
  } catch (e) {
    return fail(1, `${(e as Error).message}; nothing imported`);
  }
  const { url, res } = answer;
  if (res.statusCode !== 200) return fail(1, `${await refusal(url, "/v1/whoami", res)}; nothing imported`);
  const who = JSON.parse(await readText(res, MAX_NODE_FRAME_BYTES)) as WhoAmI;
  if (who.role === "reader") return fail(1, `${who.node} has the reader role and cannot publish; nothing imported`);
  // One keep-alive connection per worker: no TCP (or TLS) handshake per ban.
  const { Agent: KeepAlive } = url.startsWith("wss:") ? await import("node:https") : await import("node:http");
  const agent = new KeepAlive({ keepAlive: true, maxSockets: o.concurrency });
  let next = 0;
  let acked = 0;
  let refused = 0;
  let stopped: string | undefined;
  let pauseUntil = 0;
  let backoff = 250;
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  const worker = async () => {
    while (next < items.length && !stopped) {
      const x = items[next++];
      const frame = importFrame(x);
      for (let failures = 0; !stopped; ) {
        if (pauseUntil > Date.now()) await sleep(pauseUntil - Date.now());
        const r = await sendOnce(url, token, frame, o.timeoutMs, ca, agent);
        if (r.status === "acked") {
          acked++;
          backoff = 250;
          break;
        }
        if (r.status === "untrusted") {
          stopped = r.reason;
          break;
        }
        if (r.code === "rate_limited") {
          // Over the hub's --rate: every worker waits, longer each time in a row, then retries.
          pauseUntil = Math.max(pauseUntil, Date.now() + backoff);
          backoff = Math.min(backoff * 2, 5000);
          continue;
        }
        if (r.status === "refused") {
          refused++;
          process.stderr.write(`ban.ts: import: line ${x.line}: ${x.ip}: ${printable(r.reason)}\n`);
          break;
        }
        if (++failures === 3) stopped = r.reason;
        else await sleep(1000);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(o.concurrency, items.length) }, worker));
  agent.destroy();
  const notes = [over ? `${over} already over, skipped` : "", errors.length ? `${errors.length} bad line(s)` : "", refused ? `${refused} refused by the hub` : ""].filter(Boolean);
  process.stdout.write(printable(`imported ${acked} of ${items.length} ban(s) to ${url} as ${who.node}${notes.length ? ` (${notes.join(", ")})` : ""}`) + "\n");
  if (stopped) fail(1, `stopped: ${stopped}; run the import again to send the rest (what the hub already has does not change)`);
  else if (errors.length || refused) process.exitCode = 1;
}

/** Runs list, status or import: reads the token, CA and input, then the command. */
async function runOperator(o: ListOptions | StatusOptions | ImportOptions): Promise<void> {
  let token: string;
  let ca: string | undefined;
  let input = "";
  try {
    token = await readTokenFile(o.tokenFile);
    ca = o.ca ? await readFile(o.ca, "utf8") : undefined;
    if (o.command === "import") input = await readInput(o.file);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    return fail(2, `Expected ${err.path ?? "the input"} to be a readable file, got ${err.code ?? err.message}`);
  }
  if (o.command === "list") return runList(o, token, ca);
  if (o.command === "status") return o.fleet ? runFleet(o, token, ca) : runStatus(o, token, ca);
  return runImport(o, token, input, ca);
}

function fail(code: number, line: string): void {
  // One line whatever it quotes: a hub's error message cannot forge another or reach the terminal raw.
  process.stderr.write(`ban.ts: ${printable(line)}\n`);
  process.exitCode = code;
}

/** Runs one invocation from the command line. */
export async function main(argv = process.argv.slice(2)): Promise<void> {
  let opts: Invocation | "help";
  try {
    const configPath = argv.find((_, i) => argv[i - 1] === "--config") ?? argv.find((a) => a.startsWith("--config="))?.slice(9) ?? process.env.BANSHARE_CONFIG;
    let config: Record<string, unknown> = {};
    if (configPath) {
      try {
        config = JSON.parse(await readFile(configPath, "utf8"));
      } catch (e) {
        throw new UsageError(`Expected --config ${configPath} to be a readable JSON file: ${(e as Error).message}`);
      }
    }
    opts = parseArgs(argv, process.env, config);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    return fail(2, e.message);
  }
  if (opts === "help") {
    process.stdout.write(USAGE + "\n");
    return;
  }
  if (opts.command === "list" || opts.command === "status" || opts.command === "import") return runOperator(opts);
  return send(opts, toFrame(opts, randomBytes(12).toString("base64url")));
}

/**
 * Delivers one ban or unban: to the local agent first (it holds the hub connection and the
 * spool), else to the hubs in order, else into the spool. Exit 0 only once the event is durable
 * somewhere that delivers it; 1 when it was refused, or when something set up wrong (token, CA,
 * certificate) needs fixing, even if the event could still be kept.
 */
async function send(opts: SendOptions, frame: BanFrame | UnbanFrame): Promise<void> {
  const notes: string[] = [];
  // An admin's unban for every node needs the admin token, which the agent does not hold.
  if (!opts.all) {
    const h = await handOff(opts.spoolDir, frame);
    if (h.status === "queued") return h.problem ? fail(1, `the agent holds the ${frame.type} of ${frame.ip} but cannot deliver it: ${h.problem}`) : undefined;
    if (h.status === "refused") return fail(1, h.reason);
    notes.push(h.reason);
  }
  const deadline = Date.now() + opts.timeoutMs;
  let reason = "";
  let broken = "";
  try {
    let token: string;
    try {
      token = await readTokenFile(opts.tokenFile);
    } catch (e) {
      // A broken install must show in Fail2Ban's log, but the ban is still kept for the agent.
      throw Object.assign(new Error(`cannot read --token-file ${opts.tokenFile}: ${(e as Error).message}`), { broken: true });
    }
    let ca: string | undefined;
    try {
      ca = opts.ca ? await readFile(opts.ca, "utf8") : undefined;
    } catch (e) {
      throw Object.assign(new Error(`cannot read --ca ${opts.ca}: ${(e as Error).message} (copy the hub's ca.pem there, or fix "ca" in --config)`), { broken: true });
    }
    // Fail over in the order given, sharing one --timeout between the hubs. Each hub gets an
    // equal share of what is left, so one that swallows packets (host gone behind a router)
    // cannot use up the time of the hubs after it.
    for (const [i, url] of opts.hubs.entries()) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      const share = Math.ceil(left / (opts.hubs.length - i));
      const r = await sendOnce(url, token, frame, share, ca, undefined, Math.min(share, opts.connectTimeoutMs));
      if (r.status === "acked") {
        if (broken) process.stderr.write(`ban.ts: warning: ${printable(broken)}\n`);
        return opts.all ? checkLifted(frame.ip, r.remaining) : undefined;
      }
      if (r.status === "refused") return fail(1, r.reason);
      if (r.status === "untrusted") broken ||= r.reason;
      reason = r.reason;
    }
  } catch (e) {
    reason = (e as Error).message;
    if ((e as { broken?: boolean }).broken) broken = reason;
  }
  // An admin's unban for every node is typed by hand: say so now rather than leave it to an agent
  // whose node token the hub would refuse it from.
  if (opts.all) return fail(1, `could not send the unban of ${frame.ip} for every node (${broken || reason}); it is not spooled: run it again`);
  try {
    const file = await spool(opts.spoolDir, frame);
    const why = [broken || reason, ...notes].filter(Boolean).join("; ");
    process.stderr.write(`ban.ts: ${broken ? "error" : "warning"}: ${printable(`could not send (${why}); spooled the ${frame.type} of ${frame.ip} to ${file} for the agent to deliver`)}\n`);
    process.exitCode = broken ? 1 : 0;
  } catch (e) {
    fail(1, `could not send the ${frame.type} of ${frame.ip} (${broken || reason}) nor spool it: ${(e as Error).message}`);
  }
}

/** Reads this node's token; a token file other users can read is said once, on stderr (the hub cannot tell who sent with it). */
async function readTokenFile(path: string): Promise<string> {
  const fh = await open(path, "r");
  try {
    const mode = (await fh.stat()).mode;
    if (mode & 0o077) process.stderr.write(`ban.ts: warning: ${printable(path)} is readable by ${mode & 0o007 ? "every user" : "its group"} (mode ${(mode & 0o777).toString(8).padStart(4, "0")}): chmod 600 it\n`);
    return (await fh.readFile("utf8")).trim();
  } finally {
    await fh.close();
  }
}

/** After an acked `unban --all-nodes`: exit 1 unless the hub says no claim on `ip` is left. */
function checkLifted(ip: string, remaining: number | undefined): void {
  if (remaining === 0) return;
  if (remaining === undefined) return fail(1, `the hub acked the unban of ${ip} for every node but did not say whether a claim is left (a hub older than this ban.ts): check with ban.ts list`);
  fail(1, `the hub acked the unban of ${ip} for every node, but ${remaining} claim(s) on it are still live: check with ban.ts list, then unban again or revoke the node that keeps banning it`);
}

function isMain(): boolean {
  try {
    return realpathSync(process.argv[1] ?? "") === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isMain()) await main();
