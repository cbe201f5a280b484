/**
 * Benchmark 2: sender latency (issue 6).
 *
 *   node --import tsx -e 'const m = await import("./test/bench/sender.bench.ts"); console.log(await m.run({quick:true}))'
 *
 * (a) `ban.ts ban` process start -> exit after the hub's ack, interleaved in one run with the
 *     start-up floors `node -e 0` and `node --import tsx test/bench/empty.ts`, plus probes that
 *     show where the time goes (tsx registration alone, importing only ws, only messages.ts,
 *     `ban.ts --help` = every import but no socket) and the socket phases timed in-process
 *     (TCP + upgrade, hello -> welcome, ban -> ack). The hub runs on 127.0.0.1 with a journal.
 * (b) a failure line appended to the log a real fail2ban-server watches (project action,
 *     client1's namespace) -> the address in the kernel ipset set of the agents on client2 and
 *     client3 (other namespaces), probed with `ipset test`.
 *
 * Needs root, ip netns, ipset and fail2ban-server for (b); (a) runs anywhere.
 */
import { appendFile, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";
import { failureLines, startFail2ban, REPO_DIR, type Fail2ban } from "../lib/fail2ban.ts";
import { enrol, readCsv, startAgentProc, startHubProc, type HubProc } from "../lib/fleet.ts";
import { createTopology, type Topology } from "../lib/netns.ts";
import type { Proc } from "../lib/proc.ts";
import { fmtMs, machineLine, pollSet, shuffled, sleep, summarize, summaryHeader, summaryRow, timeProcess } from "./stats-sender.ts";

export const title = "Sender latency (ban.ts, Fail2Ban log line -> dropped everywhere)";

const NODE = process.execPath;

interface Variant {
  key: string;
  label: string;
  args: (i: number) => string[];
  /** Measured in every round (the compared ones) or only in breakdown rounds. */
  main: boolean;
  /** Import probes: only in full mode (the trace gives the breakdown in quick mode too). */
  fullOnly?: boolean;
}

/** In-process socket phases against the hub: connect+upgrade, hello->welcome, ban->ack. */
async function socketPhases(url: string, token: string, ip: string): Promise<{ open: number; welcome: number; ack: number }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let tOpen = 0;
    let tWelcome = 0;
    const id = `bench${Math.random().toString(36).slice(2, 12)}`;
    const ws = new WebSocket(url, { headers: { authorization: `Bearer ${token}` }, perMessageDeflate: false });
    const timer = setTimeout(() => (ws.terminate(), reject(new Error("socket phases: no ack in 5 s"))), 5000);
    ws.on("error", (e) => (clearTimeout(timer), reject(e)));
    ws.on("open", () => {
      tOpen = performance.now();
      ws.send(JSON.stringify({ type: "hello", v: 1 }));
    });
    ws.on("message", (data: Buffer) => {
      const f = JSON.parse(data.toString("utf8"));
      if (f.type === "welcome") {
        tWelcome = performance.now();
        ws.send(JSON.stringify({ type: "ban", id, ip, jail: "bench", bantime: 600, detectedAt: Date.now() }));
      } else if (f.type === "ack" && f.id === id) {
        const tAck = performance.now();
        clearTimeout(timer);
        ws.terminate();
        resolve({ open: tOpen - t0, welcome: tWelcome - tOpen, ack: tAck - tWelcome });
      } else if (f.type === "error") {
        clearTimeout(timer);
        ws.terminate();
        reject(new Error(`hub error ${f.code}: ${f.message}`));
      }
    });
  });
}

/** What the trace preloads (trace-start.mjs, trace-tsx.mjs) report, plus the parent's spawn and exit times. */
interface Trace {
  boot: number;
  tsx: number;
  timeOrigin: number;
  connectCall?: number;
  connected?: number;
  writes: number[];
  reads: number[];
  wsLoad: number;
  exit: number;
  startEpoch: number;
  endEpoch: number;
}

function parseTrace(res: { stderr: string; startEpoch: number; endEpoch: number }): Trace {
  const line = res.stderr.split("\n").find((l) => l.startsWith("BSTRACE "));
  if (!line) throw new Error(`no BSTRACE line from the traced ban.ts: ${res.stderr.trim()}`);
  return { ...JSON.parse(line.slice(8)), startEpoch: res.startEpoch, endEpoch: res.endEpoch };
}

/** Timeline steps of a traced run (ms); NaN when a mark is missing. */
const TRACE_STEPS: Array<[string, (t: Trace) => number]> = [
  ["spawn -> process start (fork, exec, node's time origin)", (t) => t.timeOrigin - t.startEpoch],
  ["node bootstrap (-> first preload runs)", (t) => t.boot],
  ["tsx registration (`--import tsx`)", (t) => t.tsx - t.boot],
  ["load ban.ts + messages.ts (+ node:http) through tsx, parse args, read config and token (-> connect call)", (t) => (t.connectCall ?? NaN) - t.tsx],
  ["TCP connect", (t) => (t.connected ?? NaN) - (t.connectCall ?? NaN)],
  ["POST /v1/events -> ack (one round trip; the hub fsyncs its journal)", (t) => t.reads[0] - (t.connected ?? NaN)],
  ["ack -> process exit event", (t) => t.exit - t.reads[t.reads.length - 1]],
  ["exit event -> parent sees the exit", (t) => t.endEpoch - (t.timeOrigin + t.exit)],
  ["total (spawn -> parent sees exit)", (t) => t.endEpoch - t.startEpoch],
];

/** Part (a): process start -> ack, against the start-up floors, interleaved. */
async function partA(quick: boolean): Promise<string> {
  const n = quick ? 6 : 30;
  const nBreak = quick ? 3 : 15;
  const dir = await mkdtemp(join(tmpdir(), "banshare-bench-sender-"));
  let hub: HubProc | undefined;
  try {
    const tokens = await enrol(dir, [["sender", "node"], ["phases", "node"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", "127.0.0.1:0"]);
    const spool = join(dir, "spool");
    const banArgs = (i: number) => ["--import", "tsx", "ban.ts", "ban", `203.0.113.${1 + (i % 254)}`, "--jail", "sshd", "--bantime", "600", "--hub", hub!.url, "--token-file", tokens.sender, "--spool", spool, "--timeout", "5"];
    const variants: Variant[] = [
      { key: "node", label: "`node -e 0`", args: () => ["-e", "0"], main: true },
      { key: "empty", label: "`node --import tsx test/bench/empty.ts`", args: () => ["--import", "tsx", "test/bench/empty.ts"], main: true },
      { key: "ban", label: "`node --import tsx ban.ts ban IP` (-> ack, exit)", args: banArgs, main: true },
      { key: "tsxjs", fullOnly: true, label: "`node --import tsx test/bench/empty.mjs` (tsx registered, plain-JS entry)", args: () => ["--import", "tsx", "test/bench/empty.mjs"], main: false },
      { key: "ws", fullOnly: true, label: "`node --import tsx test/bench/import-ws.ts` (ws only)", args: () => ["--import", "tsx", "test/bench/import-ws.ts"], main: false },
      { key: "msg", fullOnly: true, label: "`node --import tsx test/bench/import-messages.ts` (messages.ts only)", args: () => ["--import", "tsx", "test/bench/import-messages.ts"], main: false },
      { key: "trace", label: "`ban.ts ban IP` with the trace preloads (test/bench/trace-*.mjs)", args: (i) => ["--import", "./test/bench/trace-start.mjs", "--import", "tsx", "--import", "./test/bench/trace-tsx.mjs", ...banArgs(i).slice(2)], main: false },
      { key: "help", fullOnly: true, label: "`node --import tsx ban.ts --help` (all imports, no socket)", args: () => ["--import", "tsx", "ban.ts", "--help"], main: false },
    ];
    if (quick) variants.splice(0, variants.length, ...variants.filter((v) => !v.fullOnly));
    const samples = new Map<string, number[]>(variants.map((v) => [v.key, []]));
    const traces: Trace[] = [];
    // One warm-up of each (page cache, tsx's transform cache), not counted.
    for (const v of variants) await timeProcess(NODE, v.args(0), { cwd: REPO_DIR });
    let banCount = 0;
    for (let r = 0; r < n; r++) {
      const todo = shuffled(variants.filter((v) => v.main || r < nBreak));
      for (const v of todo) {
        const res = await timeProcess(NODE, v.args(banCount), { cwd: REPO_DIR });
        if (v.key === "ban" || v.key === "trace") banCount++;
        if (res.code !== 0) throw new Error(`${v.label} exited ${res.code}: ${res.stderr.trim()}`);
        if (v.key === "trace") traces.push(parseTrace(res));
        if ((v.key === "ban" || v.key === "trace") && res.stderr.includes("spooled")) throw new Error(`ban.ts spooled instead of getting an ack: ${res.stderr.trim()}`);
        samples.get(v.key)!.push(res.ms);
      }
    }
    // Socket phases in a warm process: what the network part of ban.ts costs without start-up.
    const token = (await readFile(tokens.phases, "utf8")).trim();
    const phases = { open: [] as number[], welcome: [] as number[], ack: [] as number[] };
    await socketPhases(hub.url, token, "198.51.100.1"); // warm-up
    for (let i = 0; i < n; i++) {
      const p = await socketPhases(hub.url, token, `198.51.100.${2 + i}`);
      phases.open.push(p.open);
      phases.welcome.push(p.welcome);
      phases.ack.push(p.ack);
    }

    const s = Object.fromEntries([...samples].map(([k, v]) => [k, summarize(v)]));
    const ratio = s.ban.median / s.empty.median;
    const rel = (k: string) => `${(s[k].median / s.empty.median).toFixed(2)}x`;
    const d = (a: string, b: string) => fmtMs(s[a].median - s[b].median);
    const lines = [
      `### (a) \`ban.ts ban\` process start -> hub ack (exit)`,
      "",
      `Hub on 127.0.0.1 (plain ws, journal with fsync before ack). Each process is timed from spawn to exit; the variants run interleaved in shuffled order each round, ${n} rounds (the breakdown probes in the first ${nBreak}), after one unmeasured warm-up of each.`,
      "",
      summaryHeader("command", "median vs empty.ts"),
      ...variants.map((v) => summaryRow(v.label, s[v.key], rel(v.key))),
      "",
      `**Ratio of medians ban.ts / empty.ts: ${ratio.toFixed(2)}x** (target <= 1.25x: ${ratio <= 1.25 ? "met" : "missed"}); ban.ts / \`node -e 0\`: ${(s.ban.median / s.node.median).toFixed(2)}x.`,
      "",
      quick ? "(Quick mode: the import probes, \`empty.mjs\`, \`import-ws.ts\`, \`import-messages.ts\`, \`ban.ts --help\`, run in full mode only.)" : `Import costs from the probes above (differences of medians; noisy with n = ${nBreak}): ws ${d("ws", "empty")}, messages.ts ${d("msg", "empty")}, all of ban.ts's imports + argument parsing (\`--help\`) ${d("help", "empty")}, tsx registration ${d("tsxjs", "node")}.`,
      "",
      `Where the time goes: timeline of one \`ban.ts ban\`, measured inside the process without changing ban.ts: preloads given before and after \`--import tsx\` record when node finished booting and when tsx was registered, and wrap \`net.Socket\` to time the connect, each write and each read; process start and exit are seen by the parent (medians over ${traces.length} runs; the run total includes the two tiny preloads):`,
      "",
      "| step | median |",
      "| --- | --- |",
      ...TRACE_STEPS.map(([label, f]) => `| ${label} | ${fmtMs(summarize(traces.map(f).filter(Number.isFinite)).median)} |`),
      "",
      "For comparison, the WebSocket session agents use (upgrade, hello, welcome, ban, ack), timed inside one warm process (no start-up, JIT warm):",
      "",
      summaryHeader("phase"),
      summaryRow("TCP connect + HTTP upgrade (-> open)", summarize(phases.open)),
      summaryRow("hello -> welcome", summarize(phases.welcome)),
      summaryRow("ban -> ack (includes the hub's journal fsync)", summarize(phases.ack)),
    ];
    return lines.join("\n");
  } finally {
    await hub?.proc.stop("SIGTERM", 5000);
    await rm(dir, { recursive: true, force: true });
  }
}

/** Parses the timestamp of a Fail2Ban log line (`2026-11-27 03:49:56,123 ...`, local time). */
function f2bTime(line: string): number {
  const m = /^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d),(\d{3})/.exec(line);
  if (!m) return NaN;
  return new Date(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], +m[7]).getTime();
}

/** Part (b): failure line -> address in the kernel set of every other agent. */
async function partB(quick: boolean): Promise<string> {
  const rounds = quick ? 2 : 10;
  if (process.getuid?.() !== 0) return "### (b) Fail2Ban log line -> dropped on all other agents\n\nSkipped: needs root (network namespaces, ipset, fail2ban-server).";
  const dir = await mkdtemp(join(tmpdir(), "banshare-bench-f2b-"));
  const OTHERS = ["client2", "client3"];
  let topo: Topology | undefined;
  let hub: HubProc | undefined;
  let f2b: Fail2ban | undefined;
  const agents: Proc[] = [];
  try {
    topo = await createTopology(["hub", "client1", ...OTHERS], { prefix: "bssnd", subnet: 78 });
    const tokens = await enrol(dir, [["client1", "node"], ["client2", "node"], ["client3", "node"]]);
    const csv = (n: string) => join(dir, `${n}.csv`);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--csv", csv("hub"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") });
    for (const n of OTHERS) agents.push(await startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--csv", csv(n)], { netns: topo.ns(n) }));
    const config = join(dir, "ban.json");
    await writeFile(config, JSON.stringify({ hub: hub.url, "token-file": tokens.client1, timeout: 5, spool: join(dir, "spool"), insecure: true }));
    const log = join(dir, "sshd.log");
    f2b = await startFail2ban({
      dir: join(dir, "f2b"),
      netns: topo.ns("client1"),
      logFile: log,
      maxretry: 3,
      bantime: 600,
      actions: `banshare[banshare_dir=${REPO_DIR}, node=${NODE}, config=${config}]`,
    });
    const total: number[] = [];
    const toF2b: number[] = [];
    const f2bToHub: number[] = [];
    const hubToAgent: number[] = [];
    const agentToProbe: number[] = [];
    const base = 10 + Math.floor(Math.random() * 100);
    for (let r = 0; r < rounds; r++) {
      const ip = `203.0.113.${base + r}`;
      // Two failures first; the third line, the one that makes Fail2Ban ban, is the one timed.
      await appendFile(log, failureLines(ip, 2));
      await sleep(400);
      const wall0 = Date.now();
      const t0 = performance.now();
      await appendFile(log, failureLines(ip, 1));
      const seen = await Promise.all(OTHERS.map((n) => pollSet(topo!.ns(n), "banshare-v4", ip, 20_000)));
      const tAll = Math.max(...seen);
      total.push(tAll - t0);
      const wallAll = wall0 + (tAll - t0);
      // Breakdown from the logs' own timestamps (ms resolution, same clock).
      await sleep(100);
      const banLine = (await readFile(f2b.logTarget, "utf8")).split("\n").find((l) => l.includes(`Ban ${ip}`) && l.includes("NOTICE"));
      const tBan = banLine ? f2bTime(banLine) : NaN;
      const tHub = Date.parse(readCsv(csv("hub")).find((x) => x.action === "RECEIVE" && x.ip === ip)?.time ?? "");
      const tAgent = Math.max(...OTHERS.map((n) => Date.parse(readCsv(csv(n)).find((x) => x.action === "BLOCK" && x.ip === ip)?.time ?? "")));
      toF2b.push(tBan - wall0);
      f2bToHub.push(tHub - tBan);
      hubToAgent.push(tAgent - tHub);
      agentToProbe.push(wallAll - tAgent);
      await sleep(300);
    }
    const s = summarize(total);
    const med = (xs: number[]) => fmtMs(summarize(xs.filter(Number.isFinite)).median);
    return [
      "### (b) Fail2Ban log line -> dropped on all other agents",
      "",
      `Real fail2ban-server (pyinotify backend, maxretry 3) with the project's action in client1's namespace; hub and the ipset agents of client2 and client3 in namespaces of their own on a bridge. Two failure lines are written, then the timed third one; done when \`ipset test banshare-v4 IP\` succeeds in both client2 and client3 (polled every ~5 ms + fork time). ${rounds} rounds.`,
      "",
      summaryHeader("path"),
      summaryRow("log line -> in the kernel set of all other agents", s),
      "",
      `**Median ${fmtMs(s.median)}** (target < 1 s: ${s.median < 1000 ? "met" : "missed"}; the paper: 1-2 s).`,
      "",
      "Breakdown, medians, from the logs' timestamps (ms resolution):",
      "",
      "| step | median |",
      "| --- | --- |",
      `| line written -> Fail2Ban logs \`Ban\` (filter, actions thread) | ${med(toF2b)} |`,
      `| Fail2Ban \`Ban\` -> hub RECEIVE (action fork, ban.ts start, connect, POST) | ${med(f2bToHub)} |`,
      `| hub RECEIVE -> last agent BLOCK (fsync, relay, ipset restore) | ${med(hubToAgent)} |`,
      `| last agent BLOCK -> seen by the \`ipset test\` probe | ${med(agentToProbe)} |`,
    ].join("\n");
  } finally {
    await f2b?.stop();
    for (const a of agents) await a.stop("SIGTERM", 5000);
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    await rm(dir, { recursive: true, force: true });
  }
}

/** Runs both parts and returns the markdown section. */
export async function run(opts: { quick: boolean }): Promise<string> {
  const machine = machineLine();
  const a = await partA(opts.quick);
  const b = await partB(opts.quick);
  return [`Machine: ${machine}. Mode: ${opts.quick ? "quick" : "full"}.`, "", a, "", b].join("\n");
}
