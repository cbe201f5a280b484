/**
 * Test helpers for running banshare itself: enrol nodes, start a hub and agents as real
 * processes (one at a time, or a whole fleet with `startFleet`), read their CSV logs, wait for
 * a condition.
 */

import { existsSync, readFileSync } from "node:fs";
import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { addNode } from "../../hub.ts";
import { stopAll, tsx, type Proc, type ProcOptions } from "./proc.ts";

/** A TCP port free on 127.0.0.1 right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** Polls `check` every 50 ms until it returns a truthy value; rejects with `what` after `timeoutMs`. */
export async function waitFor<T>(check: () => T | Promise<T>, what: string, timeoutMs = 15_000): Promise<NonNullable<T>> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v as NonNullable<T>;
    if (Date.now() > end) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Enrols nodes in `dir/tokens`; returns each node's token file (mode 600). */
export async function enrol(dir: string, nodes: Array<[string, "node" | "reader" | "admin"]>): Promise<Record<string, string>> {
  const files: Record<string, string> = {};
  for (const [name, role] of nodes) {
    const token = await addNode(join(dir, "tokens"), name, role);
    files[name] = join(dir, `${name}.token`);
    await writeFile(files[name], token + "\n", { mode: 0o600 });
    await chmod(files[name], 0o600);
  }
  return files;
}

/** A CSV log row, by column name. */
export type Row = Record<"time" | "node" | "action" | "ip" | "origin" | "jail" | "until" | "rt_ms" | "detail", string>;

/** Reads a structured log written with `--csv` (absent file: no rows). */
export function readCsv(path: string): Row[] {
  if (!existsSync(path)) return [];
  const [header, ...lines] = readFileSync(path, "utf8").split("\n").filter(Boolean);
  const cols = header.split(",");
  return lines.map((l) => {
    const cells: string[] = [];
    let cur = "";
    let quoted = false;
    for (let i = 0; i < l.length; i++) {
      const ch = l[i];
      if (quoted) {
        if (ch === '"' && l[i + 1] === '"') cur += l[++i];
        else if (ch === '"') quoted = false;
        else cur += ch;
      } else if (ch === '"') quoted = true;
      else if (ch === ",") {
        cells.push(cur);
        cur = "";
      } else cur += ch;
    }
    cells.push(cur);
    // As a spreadsheet shows it: the `'` that keeps a cell such as `+escalation` from being a formula is not part of its text.
    return Object.fromEntries(cols.map((c, i) => [c, (cells[i] ?? "").replace(/^'(?=[=+\-@\t\r])/, "")])) as Row;
  });
}

/** Rows of `path` with this action and address. */
export function rows(path: string, action: string, ip: string): Row[] {
  return readCsv(path).filter((r) => r.action === action && r.ip === ip);
}

/** A hub started as a real process. */
export interface HubProc {
  proc: Proc;
  url: string;
  port: number;
}

/** Starts `hub.ts` with `args` and resolves once it listens. Pass `--listen HOST:0` for a free port. */
export async function startHubProc(args: string[], opts: ProcOptions = {}): Promise<HubProc> {
  // A hub inside a test namespace serves plain ws:// on the test's own private bridge.
  const listen = args[args.indexOf("--listen") + 1] ?? "";
  const plainOffLoopback = args.includes("--listen") && !args.includes("--tls-cert") && !/^(127\.|\[::1\]|localhost)/.test(listen);
  const proc = tsx("hub.ts", plainOffLoopback ? [...args, "--insecure"] : args, { name: "hub", ...opts });
  const line = await proc.waitForLine(/listening on (wss?):\/\/(\S+):(\d+)/, 20_000);
  const m = /listening on (wss?):\/\/(\S+):(\d+)/.exec(line)!;
  return { proc, url: `${m[1]}://${m[2]}:${m[3]}`, port: Number(m[3]) };
}

/** Starts `agent.ts` with `args` and resolves once its first sync is applied. */
export async function startAgentProc(name: string, args: string[], opts: ProcOptions = {}): Promise<Proc> {
  const proc = tsx("agent.ts", args, { name, ...opts });
  await proc.waitForLine(/synced: \d+ address/, 20_000);
  return proc;
}

/** Runs `ban.ts` to completion and returns its exit code and output. */
export async function runBan(args: string[], opts: ProcOptions = {}): Promise<{ code: number | null; output: string }> {
  const proc = tsx("ban.ts", args, { name: "ban", ...opts });
  const info = await proc.closed;
  return { code: info.code, output: proc.output() };
}

/** Refusals by reason from the hub's /metrics text. */
export function refusedByReason(metrics: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const m of metrics.matchAll(/^banshare_refused_total\{reason="([^"]+)"\} (\d+)$/gm)) out[m[1]] = Number(m[2]);
  return out;
}

/** What grew (or shrank) between two counts by key; keys that did not change are left out. */
export function delta(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of new Set([...Object.keys(after), ...Object.keys(before)])) {
    const d = (after[k] ?? 0) - (before[k] ?? 0);
    if (d) out[k] = d;
  }
  return out;
}

/** What `startFleet` starts. */
export interface FleetOptions {
  /** Nodes to enrol, with their roles. */
  nodes: Array<[string, "node" | "reader" | "admin"]>;
  /** Nodes that get a dry-run agent once the hub listens (default: none). */
  agents?: string[];
  /** Extra hub flags (a function: of the fleet's directory). */
  hubArgs?: string[] | ((dir: string) => string[]);
  /** Extra flags of every agent. */
  agentArgs?: string[];
  /** `--listen` of the hub (default: 127.0.0.1 on a free port). */
  listen?: string;
  /** The hub keeps a journal in the fleet's directory (default: no --state). */
  journal?: boolean;
  /** The hub and agents write CSV logs NAME.csv in the fleet's directory (default: true). */
  csv?: boolean;
  /** `--heartbeat` seconds of the hub and agents (default: theirs). */
  heartbeat?: number;
  /** Runs in the fleet's directory before the hub starts (e.g. gen-cert). */
  prepare?: (dir: string) => Promise<void>;
}

/** A hub and agents started as real processes in a scratch directory, with their nodes enrolled. */
export interface Fleet {
  dir: string;
  hub: HubProc;
  /** The hub's http:// or https:// base URL. */
  http: string;
  /** Each node's token file. */
  tokenFiles: Record<string, string>;
  agents: Record<string, Proc>;
  /** A node's token. */
  token(node: string): string;
  /** The CSV log of the hub ("hub") or of a node's agent. */
  csv(name: string): string;
  /** The hub's flags, to start it again on the same port. */
  hubArgs: string[];
  /** Starts a node's dry-run agent (with the fleet's agent flags and `extra`) and waits for its first sync. */
  startAgent(node: string, extra?: string[]): Promise<Proc>;
  /** Runs ban.ts as `node` against the hub, spooling to NODE-spool in the fleet's directory. */
  ban(node: string, ...args: string[]): Promise<{ code: number | null; output: string }>;
  /** Stops every process the test started and deletes the directory. */
  stop(): Promise<void>;
}

/** Enrols `nodes`, starts a hub and the `agents` (dry-run); `stop()` undoes all of it. */
export async function startFleet(opts: FleetOptions): Promise<Fleet> {
  const dir = await mkdtemp(join(tmpdir(), "banshare-fleet-"));
  const csv = (name: string) => join(dir, `${name}.csv`);
  const logs = opts.csv ?? true;
  const heartbeat = opts.heartbeat === undefined ? [] : ["--heartbeat", String(opts.heartbeat)];
  const tokenFiles = await enrol(dir, opts.nodes);
  await opts.prepare?.(dir);
  const hubArgs = [
    "--tokens", join(dir, "tokens"),
    ...(opts.journal ? ["--state", join(dir, "journal.jsonl")] : []),
    ...(logs ? ["--csv", csv("hub")] : []),
    "--listen", opts.listen ?? `127.0.0.1:${await freePort()}`,
    ...heartbeat,
    ...(typeof opts.hubArgs === "function" ? opts.hubArgs(dir) : (opts.hubArgs ?? [])),
  ];
  const hub = await startHubProc(hubArgs);
  const fleet: Fleet = {
    dir,
    hub,
    http: hub.url.replace(/^ws/, "http"),
    tokenFiles,
    agents: {},
    token: (node) => readFileSync(tokenFiles[node], "utf8").trim(),
    csv,
    hubArgs,
    startAgent: async (node, extra = []) => {
      const args = ["--hub", fleet.hub.url, "--token-file", tokenFiles[node], "--backend", "dry-run", ...(logs ? ["--csv", csv(node)] : []), ...heartbeat, ...(opts.agentArgs ?? []), ...extra];
      fleet.agents[node] = await startAgentProc(node, args);
      return fleet.agents[node];
    },
    ban: (node, ...args) => runBan([...args, "--hub", fleet.hub.url, "--token-file", tokenFiles[node], "--spool", join(dir, `${node}-spool`), "--timeout", "5"]),
    stop: async () => {
      await stopAll();
      await rm(dir, { recursive: true, force: true });
    },
  };
  for (const n of opts.agents ?? []) await fleet.startAgent(n);
  return fleet;
}
