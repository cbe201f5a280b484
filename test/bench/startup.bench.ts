/**
 * Benchmark: start-up of the three scripts (`node --import tsx ban.ts|hub.ts|agent.ts --help`,
 * every import and the argument parsing, no socket) on one or more Node binaries, against the
 * floor `node -e 0` of each.
 *
 *   npm run bench -- startup
 *   BANSHARE_BENCH_NODES=/usr/bin/node:/opt/node22/node_modules/.bin/node:/opt/node24/node_modules/.bin/node \
 *     npm run bench -- startup
 *
 * `BANSHARE_BENCH_NODES` is a colon-separated list of node binaries (default: the one running the
 * benchmark). All binaries and commands run interleaved, in a new shuffled order each round, after
 * one unmeasured warm-up of each (page cache, tsx's transform cache), so load on the machine
 * lands on every cell alike.
 */
import { execFileSync } from "node:child_process";
import { REPO_DIR } from "../lib/fail2ban.ts";
import { fmtMs, machineLine, shuffled, summarize, timeProcess } from "./stats-sender.ts";

export const title = "Start-up per Node version (`--help` of ban.ts, hub.ts, agent.ts)";

/** The commands timed on each binary: a label and the arguments after `node`. */
const COMMANDS: Array<[string, string[]]> = [
  ["`node -e 0`", ["-e", "0"]],
  ["`ban.ts --help`", ["--import", "tsx", "ban.ts", "--help"]],
  ["`hub.ts --help`", ["--import", "tsx", "hub.ts", "--help"]],
  ["`agent.ts --help`", ["--import", "tsx", "agent.ts", "--help"]],
];

/** The node binaries to compare: `BANSHARE_BENCH_NODES` (colon-separated) or this process's own. */
export function nodeBinaries(env: NodeJS.ProcessEnv = process.env): string[] {
  const list = (env.BANSHARE_BENCH_NODES ?? "").split(":").filter(Boolean);
  return list.length ? list : [process.execPath];
}

/** Times every command on every binary, interleaved; returns the markdown section. */
export async function run(opts: { quick: boolean }): Promise<string> {
  const rounds = opts.quick ? 5 : 10;
  const nodes = nodeBinaries().map((bin) => ({ bin, version: execFileSync(bin, ["--version"], { encoding: "utf8", timeout: 10_000 }).trim() }));
  const cells = nodes.flatMap((n) => COMMANDS.map(([label, args]) => ({ node: n, label, args, ms: [] as number[] })));
  for (const c of cells) await timeProcess(c.node.bin, c.args, { cwd: REPO_DIR });
  for (let r = 0; r < rounds; r++) {
    for (const c of shuffled(cells)) {
      const res = await timeProcess(c.node.bin, c.args, { cwd: REPO_DIR });
      if (res.code !== 0) throw new Error(`${c.node.bin} ${c.args.join(" ")} exited ${res.code}: ${res.stderr.trim()}`);
      c.ms.push(res.ms);
    }
  }
  const median = (node: (typeof nodes)[number], label: string) => summarize(cells.find((c) => c.node === node && c.label === label)!.ms).median;
  return [
    `Machine: ${machineLine()}. Median of ${rounds} runs each, spawn to exit, all cells interleaved in one run.`,
    "",
    `| Node | ${COMMANDS.map(([l]) => l).join(" | ")} |`,
    `| --- |${COMMANDS.map(() => " ---: ").join("|")}|`,
    ...nodes.map((n) => `| ${n.version} (\`${n.bin}\`) | ${COMMANDS.map(([l]) => fmtMs(median(n, l))).join(" | ")} |`),
  ].join("\n");
}
