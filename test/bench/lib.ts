/**
 * Benchmark helpers: statistics over repeated runs, the machine a run happened on, and a
 * process's RSS and CPU time read from /proc. Shared by every `test/bench/*.bench.ts`.
 */

import { readFileSync } from "node:fs";
import { cpus, totalmem, release } from "node:os";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { hashToken } from "../../hub.ts";

/** Wall-clock time in ms with sub-ms resolution, comparable across processes on one host. */
export function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

/** Summary of a sample. */
export interface Stats {
  n: number;
  min: number;
  median: number;
  p99: number;
  max: number;
}

/** min/median/p99/max of `xs` (nearest-rank percentiles); all NaN for an empty sample. */
export function stats(xs: number[]): Stats {
  const s = [...xs].sort((a, b) => a - b);
  const rank = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
  return { n: s.length, min: s[0] ?? NaN, median: rank(50), p99: rank(99), max: s[s.length - 1] ?? NaN };
}

/** Formats a number for a table: 3 significant decimals below 10, 1 below 1000, none above. */
export function fmt(x: number): string {
  if (!Number.isFinite(x)) return "-";
  const a = Math.abs(x);
  return a < 10 ? x.toFixed(2) : a < 1000 ? x.toFixed(1) : Math.round(x).toString();
}

/** Header of a stats table: leading label columns, then n, min, median, p99, max. */
export function statsHeader(labels: string[], unit = "ms"): string {
  const cols = [...labels, "n", `min ${unit}`, `median ${unit}`, `p99 ${unit}`, `max ${unit}`];
  return `| ${cols.join(" | ")} |\n|${cols.map((_, i) => (i < labels.length ? " --- " : " ---: ")).join("|")}|`;
}

/** A markdown table row: the label cells, then the sample's n/min/median/p99/max. */
export function statsRow(labels: Array<string | number>, xs: number[] | Stats): string {
  const s = Array.isArray(xs) ? stats(xs) : xs;
  return `| ${[...labels.map(String), String(s.n), fmt(s.min), fmt(s.median), fmt(s.p99), fmt(s.max)].join(" | ")} |`;
}

/** A plain markdown table. */
export function table(header: string[], rows: Array<Array<string | number>>): string {
  return [`| ${header.join(" | ")} |`, `|${header.map(() => " --- ").join("|")}|`, ...rows.map((r) => `| ${r.map(String).join(" | ")} |`)].join("\n");
}

/** The machine: CPU model, cores, RAM, kernel, node version, date, load. */
export function machineInfo(): Record<string, string> {
  const c = cpus();
  let load = "";
  try {
    load = readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
  } catch {
    /* not Linux */
  }
  return {
    CPU: c[0]?.model ?? "unknown",
    cores: String(c.length),
    RAM: `${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
    kernel: release(),
    node: process.version,
    date: new Date().toISOString(),
    "load average at start": load,
  };
}

const CLK_TCK = 100;

/** A process's resident memory and CPU time so far, from /proc/PID/status and /proc/PID/stat. */
export interface ProcSample {
  at: number;
  rssBytes: number;
  /** user + system CPU time, ms. */
  cpuMs: number;
}

/** Reads `pid`'s RSS and CPU time; undefined when it is gone. */
export function sampleProc(pid: number): ProcSample | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const rssKb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name, which may hold spaces: split after the last ')'.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(f[11]) + Number(f[12]); // utime, stime (fields 14, 15)
    return { at: nowMs(), rssBytes: rssKb * 1024, cpuMs: (ticks * 1000) / CLK_TCK };
  } catch {
    return undefined;
  }
}

/** Samples `pid` every `everyMs` for `forMs`; returns peak and mean RSS and the CPU share used (1 = one core). */
export async function watchProc(pid: number, forMs: number, everyMs = 250): Promise<{ peakRss: number; meanRss: number; cpu: number; samples: ProcSample[] }> {
  const samples: ProcSample[] = [];
  const end = nowMs() + forMs;
  for (;;) {
    const s = sampleProc(pid);
    if (s) samples.push(s);
    if (nowMs() >= end) break;
    await sleep(everyMs);
  }
  const first = samples[0];
  const last = samples[samples.length - 1];
  const cpu = first && last && last.at > first.at ? (last.cpuMs - first.cpuMs) / (last.at - first.at) : NaN;
  return {
    peakRss: Math.max(...samples.map((s) => s.rssBytes)),
    meanRss: samples.reduce((a, s) => a + s.rssBytes, 0) / (samples.length || 1),
    cpu,
    samples,
  };
}

/** MiB, one decimal. */
export function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Enrols many nodes at once (hub.ts add-node does one file rewrite each): writes `dir/tokens`
 * with one line per name and `dir/NAME.token` (mode 600) holding each token.
 */
export async function enrolMany(dir: string, names: string[], role: "node" | "admin" = "node"): Promise<string> {
  const lines: string[] = [];
  await Promise.all(
    names.map(async (name) => {
      const token = `bench-${name}-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
      lines.push(`${name} ${hashToken(token)} ${role}`);
      await writeFile(join(dir, `${name}.token`), token + "\n", { mode: 0o600 });
    }),
  );
  const file = join(dir, "tokens");
  await writeFile(file, lines.join("\n") + "\n", { mode: 0o600 });
  return file;
}

/** The n-th address of a benchmark range (`base`.0.0.1 upwards, last octet 1-250): distinct, unicast, not private. */
export function benchIp(n: number, base = 11): string {
  // base.x.y.z, never .0 or .255 in the last octet; `base` keeps runs of different benchmarks apart.
  const z = (n % 250) + 1;
  const y = Math.floor(n / 250) % 256;
  const x = Math.floor(n / 250 / 256) % 256;
  return `${base}.${x}.${y}.${z}`;
}
