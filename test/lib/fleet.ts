/**
 * Test helpers for running banshare itself: enrol nodes, start a hub and agents as real
 * processes, read their CSV logs, wait for a condition.
 */

import { existsSync, readFileSync } from "node:fs";
import { chmod, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import { addNode } from "../../hub.ts";
import { tsx, type Proc, type ProcOptions } from "./proc.ts";

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
    return Object.fromEntries(cols.map((c, i) => [c, cells[i] ?? ""])) as Row;
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
