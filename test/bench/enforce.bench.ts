/**
 * Benchmark 8 (issue 13): enforcement that heals itself, on the real kernel in network namespaces.
 *
 * - Tampering -> restored: per kind of tampering (test/lib/enforce.ts's TAMPERS), the time from
 *   the tampering's end to an attacker's TCP probe (one connect every 100 ms) seeing `blocked`
 *   again for good, and to the agent's `repaired:` log line.
 * - The checks' cost: the agent process's CPU (with its children: the long-lived `ipset restore`
 *   and `nft monitor`, and every command it ran and reaped) over a quiet window with ~100,000
 *   entries in its set, Guard on (default) against `--check-interval 0` (no Guard at all).
 * - CPU per 1,000 applied bans: a burst of N bans applied, the same CPU delta / (N / 1000).
 *
 * One hub (journal seeded with 100,000 bans), one agent process at a time (`agent.ts`, its own
 * namespace per backend), an attacker namespace; all torn down at the end.
 *
 * For a look at one part: BANSHARE_BENCH_BACKENDS=nftables, BANSHARE_BENCH_REPS=N,
 * BANSHARE_BENCH_WINDOW=MS; BANSHARE_BENCH_LOG=1 writes each agent's output to
 * $TMPDIR/enforce-agent-BACKEND.log.
 */

import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { snapshotRuleset, startProbe, timeToState, gaps, TAMPERS, type Probe, type TamperName } from "../lib/enforce.ts";
import { readCsv, runBan, startHubProc, type HubProc } from "../lib/fleet.ts";
import { createTopology, startTcpListener, type Topology } from "../lib/netns.ts";
import { tsx, type Proc } from "../lib/proc.ts";
import { enrolMany, fmt, nowMs, sleep, stats, statsHeader, statsRow, table } from "./lib.ts";
import { seedJournal, until } from "./fleet.ts";

export const title = "8. Enforcement: tampering -> restored, the checks' cost, CPU per 1,000 bans";

const PORT = 2222;
const SEEDED = 100_000;
const CLK_TCK = 100;

type Backend = "ipset" | "nftables";
const KINDS: Record<Backend, TamperName[]> = {
  ipset: ["iptables -F", "iptables -D INPUT", "ipset flush", "ipset destroy", "iptables-restore", "nft flush ruleset"],
  nftables: ["nft flush ruleset", "nft delete table"],
};

/**
 * CPU time (ms) of `pid` and every process below it: utime + stime + cutime + cstime of each
 * (fields 14-17 of /proc/PID/stat), so a child that exits between two samples moves from its
 * own figure into its parent's cutime/cstime and nothing is counted twice or lost.
 */
export function treeCpuMs(pid: number): number {
  const kids = new Map<number, number[]>();
  const ticks = new Map<number, number>();
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${d}/stat`, "utf8");
    } catch {
      continue; // gone
    }
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const p = Number(d);
    const ppid = Number(f[1]);
    ticks.set(p, Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]));
    if (!kids.has(ppid)) kids.set(ppid, []);
    kids.get(ppid)!.push(p);
  }
  let sum = 0;
  const todo = [pid];
  while (todo.length) {
    const p = todo.pop()!;
    sum += ticks.get(p) ?? 0;
    todo.push(...(kids.get(p) ?? []));
  }
  return (sum * 1000) / CLK_TCK;
}

/** The time of an agent log line (`2026-...Z agent: ...`), ms. */
function lineTime(line: string): number {
  return Date.parse(line.slice(0, 24));
}

/** Addresses the agent applied in the lines after `from` (`blocked IP` lines and `applied N change(s)`). */
function appliedSince(p: Proc, from: number): number {
  let n = 0;
  for (const l of p.lines().slice(from)) {
    let m = / agent: applied (\d+) change/.exec(l);
    if (m) n += Number(m[1]);
    else if (/ agent: blocked \S+/.test(l)) n++;
  }
  return n;
}

interface Env {
  topo: Topology;
  dir: string;
  hub: HubProc;
}

interface Restored {
  probe: number[];
  repair: number[];
  tamperMs: number[];
  openSamples: number;
}

interface BackendResult {
  backend: Backend;
  entries: Record<"on" | "off", number>;
  cpu: Record<"on" | "off", number>;
  windowMs: number;
  restored: Map<TamperName, Restored>;
  burst: { n: number; cpuMs: number; wallMs: number };
  errors: string[];
}

async function startAgent(env: Env, backend: Backend, node: string, guard: boolean): Promise<{ proc: Proc; entries: number; csv: string }> {
  const csv = join(env.dir, `${node}-${guard ? "on" : "off"}.csv`);
  const args = ["--hub", env.hub.url, "--token-file", join(env.dir, `${node}.token`), "--node", node, "--backend", backend, "--csv", csv, "--state", join(env.dir, `${node}.state`)];
  if (!guard) args.push("--check-interval", "0");
  const proc = tsx("agent.ts", args, { netns: env.topo.ns(node), name: `agent ${node} ${backend}` });
  const line = await proc.waitForLine(/synced: \d+ address/, 120_000);
  return { proc, entries: Number(/synced: (\d+) address/.exec(line)![1]), csv };
}

/** CPU share of the agent's process tree (1 = one core) over `ms` of quiet. */
async function quietCpu(pid: number, ms: number): Promise<number> {
  const c0 = treeCpuMs(pid);
  const t0 = nowMs();
  await sleep(ms);
  return (treeCpuMs(pid) - c0) / (nowMs() - t0);
}

async function measureBackend(env: Env, backend: Backend, node: string, o: { reps: number; windowMs: number; burst: number; burstBase: number }): Promise<BackendResult> {
  const ns = env.topo.ns(node);
  const r: BackendResult = { backend, entries: { on: 0, off: 0 }, cpu: { on: NaN, off: NaN }, windowMs: o.windowMs, restored: new Map(), burst: { n: o.burst, cpuMs: NaN, wallMs: NaN }, errors: [] };

  // The checks off: no Guard at all (--check-interval 0).
  {
    const a = await startAgent(env, backend, node, false);
    try {
      r.entries.off = a.entries;
      await sleep(3000); // the start's work done
      r.cpu.off = await quietCpu(a.proc.pid, o.windowMs);
    } finally {
      await a.proc.stop("SIGTERM", 10_000);
    }
  }

  // The checks on (default): quiet window, then a burst, then the tamperings.
  const a = await startAgent(env, backend, node, true);
  let probe: Probe | undefined;
  try {
    r.entries.on = a.entries;
    await sleep(3000);
    r.cpu.on = await quietCpu(a.proc.pid, o.windowMs);

    // A burst of new bans: CPU of the agent's tree from the first frame to the last applied.
    await sleep(2000);
    const from = a.proc.lines().length;
    const c0 = treeCpuMs(a.proc.pid);
    const t0 = nowMs();
    const sender = tsx("test/bench/sender-worker.ts", ["burst", env.hub.url, join(env.dir, "sender.token"), String(o.burst), String(o.burstBase)], { netns: env.topo.ns("hub"), name: "sender" });
    const info = await sender.closed;
    if (info.code !== 0) throw new Error(`sender exited ${info.code}: ${sender.output().slice(-1000)}`);
    if (await until(() => appliedSince(a.proc, from) >= o.burst, 120_000)) {
      r.burst.cpuMs = treeCpuMs(a.proc.pid) - c0;
      r.burst.wallMs = nowMs() - t0;
    } else r.errors.push(`burst: the agent applied ${appliedSince(a.proc, from)} of ${o.burst} within 120 s`);

    // The tamperings, one kind after another.
    probe = await startProbe(env.topo, "attacker", node, PORT);
    await probe.waitFor("blocked", 15_000, { consecutive: 3 });
    const repairs = () => readCsv(a.csv).filter((x) => x.action === "REPAIR").length;
    for (const kind of KINDS[backend]) {
      const res: Restored = { probe: [], repair: [], tamperMs: [], openSamples: 0 };
      r.restored.set(kind, res);
      for (let i = 0; i < o.reps; i++) {
        await probe.waitFor("blocked", 15_000, { consecutive: 3 });
        await sleep(300);
        const before = repairs();
        const lines = a.proc.lines().length;
        const start = Date.now();
        if (kind === "ipset destroy") {
          // `iptables -F; ipset destroy` as an admin types it: the agent not scheduled between
          // the two, or it hooks the sets in again and the destroy fails ("in use").
          process.kill(a.proc.pid, "SIGSTOP");
          try {
            await TAMPERS[kind](ns);
          } finally {
            process.kill(a.proc.pid, "SIGCONT");
          }
        } else await TAMPERS[kind](ns);
        const done = Date.now();
        try {
          await probe.waitFor("blocked", 15_000, { since: done, consecutive: 5 });
          await until(() => repairs() > before, 10_000);
        } catch (e) {
          r.errors.push(`${kind}: ${(e as Error).message.slice(0, 300)}`);
          continue;
        }
        const tl = probe.timeline();
        const t = timeToState(tl, done, "blocked");
        if (t !== undefined) res.probe.push(t);
        res.openSamples += gaps(tl, start).reduce((n, g) => n + g.samples, 0);
        const repaired = a.proc.lines().slice(lines).filter((l) => / agent: repaired: /.test(l)).at(-1);
        if (repaired) res.repair.push(lineTime(repaired) - done);
        res.tamperMs.push(done - start);
      }
      process.stderr.write(`enforce ${backend} ${kind}: median ${fmt(stats(res.probe).median)} ms\n`);
    }
    await probe.stop();
    probe = undefined;
  } finally {
    await probe?.stop();
    await a.proc.stop("SIGTERM", 10_000);
    if (process.env.BANSHARE_BENCH_LOG) writeFileSync(join(tmpdir(), `enforce-agent-${backend}.log`), a.proc.output());
  }
  return r;
}

export async function run({ quick }: { quick: boolean }): Promise<string> {
  const reps = Number(process.env.BANSHARE_BENCH_REPS) || (quick ? 3 : 5);
  const windowMs = Number(process.env.BANSHARE_BENCH_WINDOW) || (quick ? 15_000 : 20_000);
  const burst = quick ? 2_000 : 5_000;
  const dir = mkdtempSync(join(tmpdir(), "banshare-bench-enforce-"));
  const nodes: Record<Backend, string> = { ipset: "a1", nftables: "a2" };
  let topo: Topology | undefined;
  let hub: HubProc | undefined;
  const results: BackendResult[] = [];
  try {
    await enrolMany(dir, ["a1", "a2", "web0", "sender"]);
    await seedJournal(dir, SEEDED, 52);
    topo = await createTopology(["hub", "attacker", "a1", "a2"], { prefix: "bsbenf", subnet: 84 });
    for (const n of ["a1", "a2"]) {
      await snapshotRuleset(topo.ns(n)); // the "rules file" of the iptables-restore tampering
      await startTcpListener(topo, n, PORT);
    }
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", `${topo.ip("hub")}:0`, "--state", join(dir, "journal.jsonl"), "--heartbeat", "600", "--rate", "1000000", "--burst", "1000000"], { netns: topo.ns("hub") });
    const banned = await runBan(["ban", topo.ip("attacker"), "--jail", "sshd", "--bantime", "7200", "--hub", hub.url, "--token-file", join(dir, "web0.token"), "--spool", join(dir, "spool")], { netns: topo.ns("hub") });
    if (banned.code !== 0) throw new Error(`ban.ts failed: ${banned.output.slice(-500)}`);
    const env: Env = { topo, dir, hub };
    let base = 60;
    for (const backend of (process.env.BANSHARE_BENCH_BACKENDS?.split(",") ?? ["ipset", "nftables"]) as Backend[]) results.push(await measureBackend(env, backend, nodes[backend], { reps, windowMs, burst, burstBase: base++ }));
  } finally {
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    rmSync(dir, { recursive: true, force: true });
  }

  const all = results.flatMap((b) => [...b.restored.values()].flatMap((x) => x.probe));
  const perKind = results.flatMap((b) => [...b.restored].map(([k, x]) => ({ b: b.backend, k, s: stats(x.probe) })));
  const medOk = perKind.every((x) => x.s.median < 1000);
  const p99Ok = perKind.every((x) => x.s.p99 < 2000);
  const worstMed = Math.max(...perKind.map((x) => x.s.median));
  const worstP99 = Math.max(...perKind.map((x) => x.s.p99));
  const pct = (x: number) => `${(x * 100).toFixed(2)}%`;
  const cpuOk = results.every((b) => b.cpu.on - b.cpu.off < 0.01);
  const cmd = `npm run bench -- ${quick ? "--quick " : ""}enforce`;
  const out = [
    `## ${title}`,
    "",
    `Command: \`${cmd}\`. Network namespaces: a hub (journal seeded with ${SEEDED.toLocaleString("en")} active bans of another node), an attacker, and one agent host per backend (\`agent.ts\` as a process, ipset on a1, nftables on a2, a TCP listener on :${PORT}), the attacker banned through \`ban.ts\`. One agent runs at a time.`,
    "",
    `### Tampering -> enforcement restored`,
    "",
    `With the agent (Guard on, defaults) holding ~${SEEDED.toLocaleString("en")} entries, each tampering of test/lib/enforce.ts's \`TAMPERS\` is run ${reps} times in the agent's namespace (\`ipset destroy\` = \`iptables -F\` + \`ipset destroy\`, with the agent SIGSTOPped during it, as the kernel test does). "probe" is measured from the tampering's last command returning to the first sample of the attacker's probe (one TCP connect every 100 ms, 80 ms timeout) in the run of \`blocked\` that lasts, so its resolution is 100 ms; "repair" is from the same moment to the agent's \`repaired:\` log line (ms timestamps; the repair's batch has returned, the REPAIR CSV row follows). A negative repair time: the agent repaired before the tampering's last command returned (an event from the first).`,
    "",
    statsHeader(["backend", "tampering", "measured to"]),
  ];
  for (const b of results)
    for (const [k, x] of b.restored) {
      out.push(statsRow([b.backend, `\`${k}\``, "**probe: blocked again**"], x.probe));
      out.push(statsRow([b.backend, `\`${k}\``, "agent's `repaired:` line"], x.repair));
    }
  out.push("");
  out.push(table(["backend", "tampering", "tampering's own run time, median ms", "attacker's connects that got in (all runs)"], results.flatMap((b) => [...b.restored].map(([k, x]) => [b.backend, `\`${k}\``, fmt(stats(x.tamperMs).median), x.openSamples]))));
  out.push("");
  out.push(`All kinds together (probe): median ${fmt(stats(all).median)} ms, p99 ${fmt(stats(all).p99)} ms, n ${all.length}.`);
  out.push("", `Goal: median under 1 s for every kind: **${medOk ? "met" : "missed"}** (worst median ${fmt(worstMed)} ms); p99 under 2 s for every kind: **${p99Ok ? "met" : "missed"}** (worst p99 ${fmt(worstP99)} ms; with ${reps} runs per kind the p99 is the slowest run).`);
  for (const b of results) if (b.errors.length) out.push("", `${b.backend} errors: ${b.errors.join(" / ")}`);
  out.push(
    "",
    `### The checks' cost at ${SEEDED.toLocaleString("en")} entries`,
    "",
    `The agent's CPU over a quiet window of ${windowMs / 1000} s (no bans arriving, 3 s after its first sync): utime + stime + cutime + cstime from /proc/PID/stat of the agent and every process below it (the long-lived \`ipset restore\` and \`nft monitor\`, and the commands it ran and reaped), as a share of one core. "off" is \`--check-interval 0\`, which starts no Guard at all (no ticks, no \`nft monitor\`); the rest of the agent (heartbeat every 15 s, the 1 s sweeper) runs in both.`,
    "",
    table(
      ["backend", "entries", "Guard on (default)", "Guard off (`--check-interval 0`)", "the checks' cost (on - off)"],
      results.map((b) => [b.backend, b.entries.on.toLocaleString("en"), pct(b.cpu.on), pct(b.cpu.off), `**${pct(b.cpu.on - b.cpu.off)}**`]),
    ),
    "",
    `Goal: the checks under 1% of a core: **${cpuOk ? "met" : "missed"}**.`,
    "",
    `### The agent's CPU per 1,000 applied bans`,
    "",
    `A raw WebSocket client publishes ${burst.toLocaleString("en")} bans for new addresses at once (pipelined) to the hub (\`--rate 1000000 --burst 1000000\`); the agent (Guard on, set already holding ~${SEEDED.toLocaleString("en")}) applies them. CPU of its process tree (as above) from just before the first frame to the agent logging the last one applied, divided by ${burst / 1000}. Includes receiving and parsing the events, the bookkeeping, the kernel commands, and the Guard's ticks during the burst.`,
    "",
    table(
      ["backend", "bans", "agent CPU (tree) ms", "wall ms", "**CPU ms per 1,000 bans**"],
      results.map((b) => [b.backend, b.burst.n.toLocaleString("en"), fmt(b.burst.cpuMs), fmt(b.burst.wallMs), `**${fmt(b.burst.cpuMs / (b.burst.n / 1000))}**`]),
    ),
    "",
  );
  return out.join("\n");
}
