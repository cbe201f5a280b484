/**
 * banshare sender: invoked by Fail2Ban's action, sends one ban or unban to the hub and exits.
 *
 *   node --import tsx ban.ts ban 203.0.113.7 --jail sshd --bantime 600 --config /etc/banshare/ban.json
 *   node --import tsx ban.ts unban 203.0.113.7 --jail sshd
 *
 * Exit 0 once the hub acked the event (it is in the hub's journal), or when the hub could not
 * be reached within --timeout and the event was spooled for the agent to forward. Exit 2 on
 * invalid input, 1 when the hub refused the event or it could neither be sent nor spooled.
 * Start-up time is the floor of the fleet's reaction time, so this file imports only node
 * built-ins and messages.ts: no yargs (node:util parseArgs costs nothing to load) and no ws
 * (the event goes as one HTTP POST to the hub's /v1/events).
 *
 * @module
 */

import { randomBytes } from "node:crypto";
import { realpathSync } from "node:fs";
import { mkdir, open, readFile, rename } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs as parseCli } from "node:util";
import { MAX_NODE_FRAME_BYTES, checkBannable, isName, parseHubFrame, type BanFrame, type UnbanFrame } from "./messages.ts";

/** Default spool directory, shared with the agent's --spool. */
export const DEFAULT_SPOOL = "/var/lib/banshare/spool";

/** What one invocation does. */
export interface SendOptions {
  command: "ban" | "unban";
  ip: string;
  jail: string;
  bantime: number;
  detectedAt: number;
  hubs: string[];
  tokenFile: string;
  timeoutMs: number;
  spoolDir: string;
  ca?: string;
}

/** Invalid usage or input: exit 2 with one line. */
export class UsageError extends Error {}

const USAGE = `Usage: node --import tsx ban.ts ban|unban IP [options]

Sends one ban or unban to the banshare hub; Fail2Ban's banshare action calls it.

Options (each also from the environment, e.g. BANSHARE_HUB, or a JSON --config file):
  --jail NAME          Fail2Ban jail (default: sshd)
  --bantime SECONDS    ban length, -1 for permanent (ban only; default: 600)
  --time EPOCH         detection time in epoch seconds, Fail2Ban's <time> (default: now)
  --hub URL[,URL]      hub URL(s), ws:// or wss://, tried in order
  --token-file FILE    file holding this node's token
  --timeout SECONDS    give up on the hub after this long and spool (default: 5)
  --spool DIR          where undeliverable events wait for the agent (default: ${DEFAULT_SPOOL})
  --ca FILE            PEM CA certificate for a wss:// hub with a private CA
  --config FILE        JSON file with any of the options above
  --help               show this text

Exit status: 0 acked or spooled, 1 refused by the hub or not sent, 2 invalid input.`;

const OPTIONS = {
  jail: { type: "string" },
  bantime: { type: "string" },
  time: { type: "string" },
  hub: { type: "string" },
  "token-file": { type: "string" },
  timeout: { type: "string" },
  spool: { type: "string" },
  ca: { type: "string" },
  config: { type: "string" },
  help: { type: "boolean" },
} as const;

type Flag = Exclude<keyof typeof OPTIONS, "help">;

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
 * Turns argv, the environment and an already-read config object into send options.
 * Precedence: command line, then environment, then config file, then defaults.
 */
export function parseArgs(argv: string[], env: Record<string, string | undefined> = {}, config: Record<string, unknown> = {}, now = Date.now()): SendOptions | "help" {
  let parsed;
  // `--bantime -1` is Fail2Ban's permanent ban: a negative number is a value, not a flag.
  const args = argv.map((a, i) => (/^-\d/.test(a) && /^--\w/.test(argv[i - 1] ?? "") && !argv[i - 1].includes("=") ? `\0${a}` : a));
  const joined = args.flatMap((a, i) => (a.startsWith("\0") ? [] : args[i + 1]?.startsWith("\0") ? [`${a}=${args[i + 1].slice(1)}`] : [a]));
  try {
    parsed = parseCli({ args: joined, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0].replace(/\. To specify.*$/, ""));
  }
  if (parsed.values.help) return "help";
  const get = (flag: Flag): string | undefined => {
    const v = parsed.values[flag] ?? env[envName(flag)] ?? config[flag] ?? config[camel(flag)];
    return v === undefined || v === null ? undefined : String(v);
  };
  const [command, ip, ...rest] = parsed.positionals;
  if (command !== "ban" && command !== "unban") throw new UsageError(`Expected the command ban or unban, got ${command === undefined ? "none" : JSON.stringify(command)}`);
  if (ip === undefined) throw new UsageError(`Expected an IP address after ${command}, got none`);
  if (rest.length) throw new UsageError(`Expected one IP address, got also ${JSON.stringify(rest.join(" "))}`);
  const addr = checkBannable(ip);
  if (!addr.ok) throw new UsageError(addr.message);
  const jail = get("jail") ?? "sshd";
  if (!isName(jail)) throw new UsageError(`Expected --jail to be a jail name of A-Z a-z 0-9 _ . : -, got ${JSON.stringify(jail)}`);
  const bantime = num("bantime", get("bantime"), (n) => Number.isInteger(n) && (n === -1 || n >= 1), "-1 or a whole number of seconds") ?? 600;
  const time = num("time", get("time"), (n) => n > 0 && n * 1000 < now + 300_000, "an epoch time in seconds, not in the future");
  const timeout = num("timeout", get("timeout"), (n) => n > 0 && n <= 300, "0-300 seconds") ?? 5;
  const hub = get("hub");
  if (!hub) throw new UsageError(`Expected --hub URL (or ${envName("hub")}, or "hub" in --config), got none`);
  const hubs = hub.split(",").map((s) => s.trim()).filter(Boolean);
  for (const h of hubs) if (!/^wss?:\/\/[^\s/]+/.test(h)) throw new UsageError(`Expected --hub to be ws:// or wss:// URLs, got ${JSON.stringify(h)}`);
  const tokenFile = get("token-file");
  if (!tokenFile) throw new UsageError(`Expected --token-file FILE (or ${envName("token-file")}, or "tokenFile" in --config), got none`);
  return {
    command,
    ip: addr.value.text,
    jail,
    bantime,
    detectedAt: time === undefined ? now : Math.round(time * 1000),
    hubs,
    tokenFile,
    timeoutMs: timeout * 1000,
    spoolDir: get("spool") ?? DEFAULT_SPOOL,
    ca: get("ca"),
  };
}

/** The frame this invocation sends. */
export function toFrame(o: SendOptions, id: string): BanFrame | UnbanFrame {
  return o.command === "ban"
    ? { type: "ban", id, ip: o.ip, jail: o.jail, bantime: o.bantime, detectedAt: o.detectedAt }
    : { type: "unban", id, ip: o.ip, jail: o.jail, detectedAt: o.detectedAt };
}

/** How a send ended. `unreachable` is worth spooling; `refused` is not. */
export type SendResult = { status: "acked"; seq: string } | { status: "refused"; reason: string } | { status: "unreachable"; reason: string };

/**
 * Sends one frame to one hub as `POST /v1/events` and waits for its ack. Never throws.
 * One HTTP round trip on node's own http module: no WebSocket session (upgrade, hello,
 * welcome) and no WebSocket library to load, which is most of what a sender costs to start.
 */
export async function sendOnce(url: string, token: string, frame: BanFrame | UnbanFrame, timeoutMs: number, ca?: string): Promise<SendResult> {
  const u = new URL(url);
  const secure = u.protocol === "wss:";
  // https (and with it tls) is loaded only for a wss:// hub.
  const { request } = secure ? await import("node:https") : await import("node:http");
  const body = JSON.stringify(frame);
  return new Promise((resolve) => {
    let done = false;
    const finish = (r: SendResult) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve(r);
      req.destroy();
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
          if (s === 200 && f?.type === "ack" && f.id === frame.id) return finish({ status: "acked", seq: f.seq });
          if (f?.type === "error") {
            // Over the rate limit or a hub-side write error is passing: spool it. Anything else is a refusal.
            const passing = f.code === "rate_limited" || f.code === "internal";
            return finish({ status: passing ? "unreachable" : "refused", reason: `hub refused the ${frame.type}: ${f.code}: ${f.message}` });
          }
          if (s === 401 || s === 403) return finish({ status: "refused", reason: `${url} refused the token (HTTP ${s}): check --token-file and the hub's token list` });
          // 400 without an error frame: the hub cannot read the request (ws:// to its TLS port); a spool would fail the same way.
          if (s === 400 || s === 404) return finish({ status: "refused", reason: `${url} refused the request (HTTP ${s}${res.statusMessage ? ` ${res.statusMessage}` : ""}): check --hub` });
          finish({ status: "unreachable", reason: `${url} answered HTTP ${s}${res.statusMessage ? ` ${res.statusMessage}` : ""}` });
        });
      },
    );
    req.on("error", (e) => finish({ status: "unreachable", reason: `${url}: ${e.message}` }));
    req.end(body);
  });
}

/** Writes the frame into the spool directory atomically: temp file, fsync, rename, fsync the folder. */
export async function spool(dir: string, frame: BanFrame | UnbanFrame): Promise<string> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const name = `${frame.detectedAt}-${frame.id}.json`;
  const tmp = join(dir, `.${name}.tmp`);
  const fh = await open(tmp, "w", 0o600);
  try {
    await fh.writeFile(JSON.stringify(frame) + "\n");
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, join(dir, name));
  const d = await open(dir, "r");
  await d.sync().finally(() => d.close());
  return join(dir, name);
}

function fail(code: number, line: string): void {
  process.stderr.write(`ban.ts: ${line}\n`);
  process.exitCode = code;
}

/** Runs one invocation from the command line. */
export async function main(argv = process.argv.slice(2)): Promise<void> {
  let opts: SendOptions | "help";
  try {
    const configPath = argv.find((a, i) => argv[i - 1] === "--config") ?? argv.find((a) => a.startsWith("--config="))?.slice(9) ?? process.env.BANSHARE_CONFIG;
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
  const frame = toFrame(opts, randomBytes(12).toString("base64url"));
  const deadline = Date.now() + opts.timeoutMs;
  let reason = "";
  let exitCode = 0;
  try {
    let token: string;
    try {
      token = (await readFile(opts.tokenFile, "utf8")).trim();
    } catch (e) {
      // A broken install must show in Fail2Ban's log, but the ban is still kept for the agent.
      exitCode = 1;
      throw e;
    }
    const ca = opts.ca ? await readFile(opts.ca, "utf8") : undefined;
    // Fail over in the order given, sharing one --timeout between the hubs. Each hub gets an
    // equal share of what is left, so one that swallows packets (host gone behind a router)
    // cannot use up the time of the hubs after it.
    for (const [i, url] of opts.hubs.entries()) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      const r = await sendOnce(url, token, frame, Math.ceil(left / (opts.hubs.length - i)), ca);
      if (r.status === "acked") return;
      if (r.status === "refused") return fail(1, r.reason);
      reason = r.reason;
    }
  } catch (e) {
    reason = (e as Error).message;
  }
  try {
    const file = await spool(opts.spoolDir, frame);
    process.stderr.write(`ban.ts: ${exitCode ? "error" : "warning"}: could not send (${reason}); spooled the ${frame.type} of ${frame.ip} to ${file} for the agent to deliver\n`);
    process.exitCode = exitCode;
  } catch (e) {
    fail(1, `could not send the ${frame.type} of ${frame.ip} (${reason}) nor spool it: ${(e as Error).message}`);
  }
}

function isMain(): boolean {
  try {
    return realpathSync(process.argv[1] ?? "") === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isMain()) await main();
