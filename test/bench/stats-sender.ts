/**
 * Small helpers shared by sender.bench.ts and crowdsec.bench.ts: summary statistics over
 * samples in milliseconds, markdown rendering, the machine line, and process timing.
 */
import { execFile, spawn } from "node:child_process";
import { cpus, loadavg, totalmem } from "node:os";

/** min / median / p99 / max of a sample, in ms. */
export interface Summary {
  n: number;
  min: number;
  median: number;
  p99: number;
  max: number;
}

/** Nearest-rank quantile of sorted values (q in 0..1). */
function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

/** Summarises samples (ms); p99 is interpolated, so with n < 100 it sits just below the max. */
export function summarize(samples: number[]): Summary {
  const s = [...samples].sort((a, b) => a - b);
  return { n: s.length, min: s[0] ?? NaN, median: quantile(s, 0.5), p99: quantile(s, 0.99), max: s[s.length - 1] ?? NaN };
}

/** Formats ms: below 10 s as ms with 0-1 decimals, above as s. */
export function fmtMs(ms: number): string {
  if (!Number.isFinite(ms)) return "-";
  if (ms >= 10_000) return `${(ms / 1000).toFixed(2)} s`;
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

/** One markdown table row: label, n, min, median, p99, max, extra cells. */
export function summaryRow(label: string, s: Summary, ...extra: string[]): string {
  return `| ${[label, String(s.n), fmtMs(s.min), fmtMs(s.median), fmtMs(s.p99), fmtMs(s.max), ...extra].join(" | ")} |`;
}

/** Header for summaryRow tables. */
export function summaryHeader(first: string, ...extra: string[]): string {
  const cols = [first, "n", "min", "median", "p99", "max", ...extra];
  return `| ${cols.join(" | ")} |\n|${cols.map(() => " --- ").join("|")}|`;
}

/** One line describing the machine and its load at the time of the run. */
export function machineLine(): string {
  const c = cpus();
  return `${c.length} x ${c[0]?.model ?? "?"}, ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}, load average ${loadavg().map((l) => l.toFixed(2)).join(" ")}`;
}

/** Runs a command to completion (stdout ignored, stderr kept); resolves with its wall time in ms, exit code and start/exit as epoch ms. */
export function timeProcess(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<{ ms: number; code: number | null; stderr: string; startEpoch: number; endEpoch: number }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("error", reject);
    child.on("exit", (code) => {
      const t1 = performance.now();
      resolve({ ms: t1 - t0, code, stderr, startEpoch: performance.timeOrigin + t0, endEpoch: performance.timeOrigin + t1 });
    });
  });
}

/** Fisher-Yates shuffle (a copy). */
export function shuffled<T>(xs: readonly T[]): T[] {
  const a = [...xs];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Runs `ipset test SET IP` in a namespace; true when the address is in the set. */
function ipsetHas(ns: string, set: string, ip: string): Promise<boolean> {
  return new Promise((resolve) => execFile("ip", ["netns", "exec", ns, "ipset", "-q", "test", set, ip], { timeout: 5000 }, (err) => resolve(!err)));
}

/** Polls `ipset test` until the address is in the set; resolves with performance.now() of the first hit. */
export async function pollSet(ns: string, set: string, ip: string, timeoutMs: number): Promise<number> {
  const end = performance.now() + timeoutMs;
  for (;;) {
    if (await ipsetHas(ns, set, ip)) return performance.now();
    if (performance.now() > end) throw new Error(`${ip} did not appear in ${set} in ${ns} within ${timeoutMs} ms`);
    await sleep(5);
  }
}
