/**
 * Benchmark: the hub's start-up, from spawning `node --import tsx hub.ts` to its "listening on"
 * line, with no journal and with journals of 100,000 and 1,000,000 live bans (written in the
 * format the hub writes, one claim per address), on each Node binary of `BANSHARE_BENCH_NODES`
 * (colon-separated; default: the one running the benchmark).
 *
 *   npm run bench -- hubstart
 *
 * The journal is copied afresh before each start (the hub compacts it at start), so every run
 * reads the same file. `--quick` leaves out the million.
 */
import { spawn, execFileSync } from "node:child_process";
import { copyFile, mkdtemp, rm } from "node:fs/promises";
import { createWriteStream } from "node:fs";
import { once } from "node:events";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_DIR } from "../lib/fail2ban.ts";
import { enrol } from "../lib/fleet.ts";
import { nodeBinaries } from "./startup.bench.ts";
import { fmtMs, machineLine, summarize } from "./stats-sender.ts";

export const title = "Hub start-up: spawn -> listening, by journal size";

/** Writes a journal of `n` live bans, as the hub writes one. */
async function writeJournal(path: string, n: number): Promise<void> {
  const now = Date.now();
  const out = createWriteStream(path);
  out.write(JSON.stringify({ journal: "banshare-journal", v: 1, hub: "0123456789abcdef", seq: n }) + "\n");
  let chunk = "";
  for (let i = 1; i <= n; i++) {
    const ip = `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`;
    chunk += JSON.stringify({ seq: String(i), kind: "ban", ip, origin: "pub", jail: "sshd", until: now + 86_400_000, detectedAt: now - 1000, id: `id${i}`, relayedAt: now - 900 }) + "\n";
    if (chunk.length > 1 << 20) {
      if (!out.write(chunk)) await once(out, "drain");
      chunk = "";
    }
  }
  out.end(chunk);
  await once(out, "finish");
}

/** Spawns the hub and resolves with the ms until it says it listens; then stops it. */
function timeToListen(node: string, args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(node, ["--import", "tsx", "hub.ts", ...args], { cwd: REPO_DIR, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
    const seen = (d: Buffer) => {
      out += d.toString();
      if (!/listening on /.test(out)) return;
      const ms = performance.now() - t0;
      child.stdout.off("data", seen);
      child.stderr.off("data", seen);
      child.kill("SIGTERM");
      child.once("exit", () => {
        clearTimeout(timer);
        resolve(ms);
      });
    };
    child.stdout.on("data", seen);
    child.stderr.on("data", seen);
    child.once("exit", (code) => {
      clearTimeout(timer);
      if (!/listening on /.test(out)) reject(new Error(`hub exited (${code}) before listening: ${out.slice(-500)}`));
    });
  });
}

export async function run(opts: { quick: boolean }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "banshare-hubstart-"));
  try {
    await enrol(dir, [["pub", "node"]]);
    const sizes = opts.quick ? [0, 100_000] : [0, 100_000, 1_000_000];
    for (const n of sizes) if (n) await writeJournal(join(dir, `j${n}.jsonl`), n);
    const rounds = opts.quick ? 2 : 3;
    const nodes = nodeBinaries().map((bin) => ({ bin, version: execFileSync(bin, ["--version"], { encoding: "utf8", timeout: 10_000 }).trim() }));
    const ms = new Map<string, number[]>();
    for (let r = 0; r < rounds; r++) {
      for (const node of nodes) {
        for (const n of sizes) {
          const state = join(dir, "run.jsonl");
          await rm(state, { force: true });
          if (n) await copyFile(join(dir, `j${n}.jsonl`), state);
          const key = `${node.version}|${n}`;
          ms.set(key, [...(ms.get(key) ?? []), await timeToListen(node.bin, ["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0", "--state", state])]);
        }
      }
    }
    const head = `| Node | ${sizes.map((n) => (n ? `${n.toLocaleString("en-US")} bans` : "no journal")).join(" | ")} |`;
    const rows = nodes.map((node) => `| ${node.version} | ${sizes.map((n) => fmtMs(summarize(ms.get(`${node.version}|${n}`)!).median)).join(" | ")} |`);
    return [
      `${machineLine()}. Median of ${rounds} starts each, spawn to the "listening on" line.`,
      "",
      head,
      `| --- | ${sizes.map(() => "---:").join(" | ")} |`,
      ...rows,
      "",
    ].join("\n");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
