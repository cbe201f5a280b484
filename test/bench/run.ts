/**
 * banshare benchmarks: runs every `test/bench/*.bench.ts` (or those named) and writes
 * BENCHMARKS.md.
 *
 *   npm run bench                      # everything, full sizes
 *   npm run bench -- --quick           # smaller sizes (minutes, not the full run's tens of minutes)
 *   npm run bench -- relay burst       # only these (file names without .bench.ts)
 *   npm run bench -- --out FILE        # write elsewhere than BENCHMARKS.md
 *
 * Only a full run of every benchmark writes BENCHMARKS.md by default: a quick or partial run
 * writes `bench-quick.md` / `bench-partial.md` in the system's temporary folder (or `--out`), so
 * it never replaces the committed figures.
 *
 * Each benchmark module exports `title` and `run({ quick })`, which returns a markdown section.
 * Sections print as they complete; a benchmark that throws gets a section saying so and the
 * run continues. Exit 1 if any failed. `test/bench/CHANGES.md` (the changes these numbers drove,
 * with before and after) is appended when present.
 */

import { existsSync, readFileSync, readdirSync, realpathSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { machineInfo, table } from "./lib.ts";
import { runCleanupNow } from "../lib/proc.ts";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, "..", "..");

/** What a benchmark module exports. */
export interface BenchModule {
  title: string;
  run(opts: { quick: boolean }): Promise<string>;
}

/**
 * Parses the command line: `--quick`, `--out FILE`, and benchmark names. Without `--out`, only a
 * full-size run of every benchmark goes to BENCHMARKS.md; a quick or partial one to the temp folder.
 */
export function parseArgs(argv: string[]): { quick: boolean; out: string; names: string[] } {
  const names: string[] = [];
  let quick = false;
  let out: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--quick") quick = true;
    else if (a === "--out") {
      out = argv[++i];
      if (!out) throw new Error("Expected a file name after --out, got nothing");
    } else if (a.startsWith("-")) throw new Error(`Expected --quick, --out FILE or benchmark names, got ${a}`);
    else names.push(a.replace(/\.bench\.ts$/, ""));
  }
  out ??= quick ? join(tmpdir(), "bench-quick.md") : names.length ? join(tmpdir(), "bench-partial.md") : join(ROOT, "BENCHMARKS.md");
  return { quick, out, names };
}

/** The benchmark files, in name order, restricted to `names` when given. */
export function findBenchmarks(dir: string, names: string[]): string[] {
  const all = readdirSync(dir).filter((f) => f.endsWith(".bench.ts")).sort();
  const unknown = names.filter((n) => !all.includes(`${n}.bench.ts`));
  if (unknown.length) throw new Error(`No benchmark named ${unknown.join(", ")}; have ${all.map((f) => basename(f, ".bench.ts")).join(", ")}`);
  return all.filter((f) => !names.length || names.includes(basename(f, ".bench.ts"))).map((f) => join(dir, f));
}

async function main(): Promise<void> {
  let args: ReturnType<typeof parseArgs>;
  let files: string[];
  try {
    args = parseArgs(process.argv.slice(2));
    files = findBenchmarks(HERE, args.names);
  } catch (e) {
    console.error((e as Error).message);
    process.exitCode = 2;
    return;
  }
  const started = Date.now();
  const machine = machineInfo();
  const cmd = `npm run bench${args.quick || args.names.length ? ` -- ${[...(args.quick ? ["--quick"] : []), ...args.names].join(" ")}` : ""}`;
  const header = [
    "# banshare benchmarks",
    "",
    `Produced by \`${cmd}\` (${args.quick ? "quick sizes" : "full sizes"}). Code: \`test/bench/\`; the issue: #6.`,
    "",
    table(["machine", ""], Object.entries(machine)),
    "",
  ].join("\n");
  console.log(header);
  const sections: string[] = [];
  let failed = 0;
  for (const file of files) {
    const name = basename(file, ".bench.ts");
    const t0 = Date.now();
    let section: string;
    try {
      const mod = (await import(pathToFileURL(file).href)) as BenchModule;
      section = await mod.run({ quick: args.quick });
      if (!section.startsWith("#")) section = `## ${mod.title}\n\n${section}`;
    } catch (e) {
      failed++;
      section = `## ${name}: failed\n\n\`\`\`\n${(e as Error).stack ?? e}\n\`\`\`\n`;
    }
    section = `${section.trimEnd()}\n\n_${name}: ${((Date.now() - t0) / 1000).toFixed(1)} s_\n`;
    sections.push(section);
    console.log(section);
    // Rewrite after each section: an interrupted run still leaves what it measured.
    await writeFile(args.out, [header, ...sections].join("\n"));
  }
  const total = `_All benchmarks: ${((Date.now() - started) / 1000).toFixed(1)} s._\n`;
  // Hand-kept record of the changes these numbers drove, before and after (issue 6 asks for it).
  const changes = existsSync(join(HERE, "CHANGES.md")) ? `\n${readFileSync(join(HERE, "CHANGES.md"), "utf8")}` : "";
  await writeFile(args.out, [header, ...sections, total].join("\n") + changes);
  console.log(total);
  console.error(`wrote ${args.out}`);
  if (failed) process.exitCode = 1;
}

function isMain(): boolean {
  return !!process.argv[1] && fileURLToPath(import.meta.url) === realpathSync(process.argv[1]);
}

if (isMain()) {
  try {
    await main();
  } finally {
    runCleanupNow();
  }
}
