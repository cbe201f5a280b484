/**
 * Benchmark: Fail2Ban's ban -> the address in every other server's kernel set, and the time
 * Fail2Ban's action takes, per Node binary (`BANSHARE_BENCH_NODES`, colon-separated; default:
 * the one running the benchmark), all in one run.
 *
 *   BANSHARE_BENCH_NODES=/usr/bin/node:/opt/node24/node_modules/.bin/node npm run bench -- f2bfleet
 *
 * Deployed as the README deploys it: hub, and on each of client1..3 an ipset agent with
 * `--spool`, in network namespaces on a bridge; real fail2ban-server in client1's namespace with
 * the project's action, whose ban.ts hands each ban to client1's agent. (1) A failure line makes
 * Fail2Ban ban; measured from the timestamp of its `Ban` line (its log, ms resolution) to the
 * address answering `ipset test` in both client2 and client3 (polled every ~5 ms + fork time).
 * (2) The exact command the action runs, timed from spawn to exit inside client1's namespace
 * (`ip netns exec` included): hub reachable; hub blackholed (its port dropped by iptables in its
 * namespace); hub blackholed and no agent (ban.ts falls back to the POST, --connect-timeout
 * 0.3 s, then the spool).
 */
import { appendFile, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { execFileSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { failureLines, startFail2ban, REPO_DIR, type Fail2ban } from "../lib/fail2ban.ts";
import { enrol, startAgentProc, startHubProc, type HubProc } from "../lib/fleet.ts";
import { createTopology, type Topology } from "../lib/netns.ts";
import { runSync, type Proc } from "../lib/proc.ts";
import { nodeBinaries } from "./startup.bench.ts";
import { fmtMs, machineLine, pollSet, sleep, summarize, timeProcess } from "./stats-sender.ts";

export const title = "Fail2Ban's ban -> every other server's kernel set, and the action's run time, per Node version";

/** Fail2Ban's log time (local time, ms) as epoch ms. */
function f2bTime(line: string): number {
  const m = /^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d),(\d{3})/.exec(line);
  return m ? new Date(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], +m[7]).getTime() : NaN;
}

interface Row {
  version: string;
  banToSets: number[];
  reachable: number[];
  blackholed: number[];
  noAgent: number[];
}

async function measure(node: string, version: string, rounds: number, subnet: number): Promise<Row> {
  const dir = await mkdtemp(join(tmpdir(), "banshare-bench-f2bfleet-"));
  const CLIENTS = ["client1", "client2", "client3"];
  const OTHERS = CLIENTS.slice(1);
  let topo: Topology | undefined;
  let hub: HubProc | undefined;
  let f2b: Fail2ban | undefined;
  const agents: Proc[] = [];
  const row: Row = { version, banToSets: [], reachable: [], blackholed: [], noAgent: [] };
  let holed = false;
  const blackhole = (on: boolean) => {
    runSync("ip", ["netns", "exec", topo!.ns("hub"), "iptables", on ? "-I" : "-D", "INPUT", "-p", "tcp", "--dport", "7700", "-j", "DROP"]);
    holed = on;
  };
  try {
    topo = await createTopology(["hub", ...CLIENTS], { prefix: "bsf2f", subnet });
    const tokens = await enrol(dir, CLIENTS.map((n) => [n, "node"] as [string, "node"]));
    const opts = (ns: string) => ({ netns: ns, node });
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `${topo.ip("hub")}:7700`], opts(topo.ns("hub")));
    for (const n of CLIENTS) agents.push(await startAgentProc(n, ["--hub", hub.url, "--insecure", "--token-file", tokens[n], "--spool", join(dir, `${n}-spool`), "--heartbeat", "5"], opts(topo.ns(n))));
    const config = join(dir, "ban.json");
    await writeFile(config, JSON.stringify({ hub: hub.url, "token-file": tokens.client1, spool: join(dir, "client1-spool"), insecure: true }));
    const log = join(dir, "sshd.log");
    f2b = await startFail2ban({ dir: join(dir, "f2b"), netns: topo.ns("client1"), logFile: log, maxretry: 2, bantime: 600, actions: `banshare[banshare_dir=${REPO_DIR}, node=${node}, config=${config}]` });
    const base = 10 + Math.floor(Math.random() * 50);
    for (let r = 0; r < rounds; r++) {
      const ip = `203.0.113.${base + r}`;
      const wall0 = Date.now();
      const t0 = performance.now();
      await appendFile(log, failureLines(ip, 2));
      const tAll = Math.max(...(await Promise.all(OTHERS.map((n) => pollSet(topo!.ns(n), "banshare-v4", ip, 20_000)))));
      await sleep(100);
      const banLine = (await readFile(f2b.logTarget, "utf8")).split("\n").find((l) => l.includes(`Ban ${ip}`) && l.includes("NOTICE"));
      row.banToSets.push(wall0 + (tAll - t0) - (banLine ? f2bTime(banLine) : NaN));
      await sleep(200);
    }
    // The action's own command, as Fail2Ban runs it (cd into banshare, node by path, --config).
    const action = (ip: string, spool?: string) => ["netns", "exec", topo!.ns("client1"), "sh", "-c", `cd '${REPO_DIR}' && '${node}' --import tsx ban.ts ban ${ip} --jail sshd --bantime 600 --time ${Date.now() / 1000} --restored 0 --config '${config}'${spool ? ` --spool '${spool}'` : ""}`];
    const timed = async (into: number[], ip: string, spool?: string) => {
      const r = await timeProcess("ip", action(ip, spool));
      if (r.code !== 0) throw new Error(`the action exited ${r.code}: ${r.stderr.trim()}`);
      into.push(r.ms);
    };
    for (let r = 0; r < rounds; r++) await timed(row.reachable, `198.51.100.${10 + r}`);
    blackhole(true);
    for (let r = 0; r < rounds; r++) await timed(row.blackholed, `198.51.100.${60 + r}`);
    for (let r = 0; r < rounds; r++) await timed(row.noAgent, `198.51.100.${110 + r}`, join(dir, "no-agent-spool"));
    blackhole(false);
    return row;
  } finally {
    if (holed) blackhole(false);
    await f2b?.stop();
    for (const a of agents) await a.stop("SIGTERM", 5000);
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    await rm(dir, { recursive: true, force: true });
  }
}

export async function run(opts: { quick: boolean }): Promise<string> {
  if (process.getuid?.() !== 0) return "Skipped: needs root (network namespaces, ipset, iptables, fail2ban-server).";
  const rounds = opts.quick ? 3 : 15;
  const rows: Row[] = [];
  let subnet = 81;
  for (const bin of nodeBinaries()) rows.push(await measure(bin, execFileSync(bin, ["--version"], { encoding: "utf8", timeout: 10_000 }).trim(), rounds, subnet++));
  const cell = (xs: number[]) => {
    const s = summarize(xs);
    return `${fmtMs(s.median)} (p90 ${fmtMs([...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * 0.9))])})`;
  };
  return [
    `${machineLine()}. ${rounds} bans per Node version; median (p90).`,
    "",
    "| Node | Fail2Ban `Ban` line -> in client2's and client3's sets | action, hub reachable | action, hub blackholed | action, hub blackholed, no agent |",
    "| --- | ---: | ---: | ---: | ---: |",
    ...rows.map((r) => `| ${r.version} | ${cell(r.banToSets)} | ${cell(r.reachable)} | ${cell(r.blackholed)} | ${cell(r.noAgent)} |`),
    "",
    "Goals: Fail2Ban's ban -> every other kernel under 200 ms median on Node 24; the action with the hub blackholed under 300 ms.",
    "",
  ].join("\n");
}
