/**
 * Benchmark 3 (issue 6): 10,000 distinct bans published in one burst -> all in an agent's kernel
 * set (ipset, in a network namespace), against the paper's way (one `iptables -I INPUT -s IP -j
 * DROP` process per address) measured in the same run.
 */

import { createTopology } from "../lib/netns.ts";
import { benchIp, fmt, nowMs, stats, statsHeader, statsRow } from "./lib.ts";
import { runSender, startFleet, until } from "./fleet.ts";

export const title = "3. Burst: 10,000 bans in one burst -> all in an agent's kernel set";

const BURST = 10_000;

/** Counts the addresses the agent applied so far and when it reached `target`. */
function appliedCount(lines: readonly string[]): { count: number; at: number } {
  let count = 0;
  let at = 0;
  for (const l of lines) {
    let m = /^APPLIED \S+ \S+ ([\d.]+)$/.exec(l);
    if (m) {
      count++;
      at = Number(m[1]);
      continue;
    }
    m = /^BATCH \S+ (\d+) ([\d.]+)$/.exec(l);
    if (m) {
      count += Number(m[1]);
      at = Number(m[2]);
    }
  }
  return { count, at };
}

export async function run({ quick }: { quick: boolean }): Promise<string> {
  const runs = quick ? 3 : 5;
  const fleet = await startFleet({ agents: 1, backend: "ipset", workers: 1, hubArgs: ["--rate", "1000000", "--burst", "1000000"], subnet: 80 });
  const total: number[] = [];
  const acked: number[] = [];
  const kernelCounts: number[] = [];
  try {
    const w = fleet.workers[0];
    for (let r = 0; r < runs; r++) {
      const before = appliedCount(w.lines()).count;
      const lines = await runSender(fleet, ["burst", String(BURST), String(30 + r)]);
      const start = Number(/^START ([\d.]+)/.exec(lines.find((l) => l.startsWith("START"))!)![1]);
      const ack = /^ACKED (\d+) ([\d.]+)/.exec(lines.find((l) => l.startsWith("ACKED"))!)!;
      if (Number(ack[1]) !== BURST) throw new Error(`hub acked ${ack[1]} of ${BURST}`);
      acked.push(Number(ack[2]) - start);
      const ok = await until(() => appliedCount(w.lines()).count - before >= BURST, 30_000);
      if (!ok) throw new Error(`agent applied ${appliedCount(w.lines()).count - before} of ${BURST} within 30 s`);
      total.push(appliedCount(w.lines()).at - start);
      const t = await fleet.topo!.exec("w0", "ipset", ["list", "-terse", "bb0a0-v4"]);
      kernelCounts.push(Number(/Number of entries: (\d+)/.exec(String(t.stdout))?.[1]));
    }
  } finally {
    await fleet.stop();
  }

  // The paper's way, in a namespace of its own: one iptables process per address.
  const paperN = quick ? 300 : 2000;
  const topo = await createTopology(["paper"], { prefix: "bsbpaper", subnet: 81 });
  const per: number[] = [];
  let paperTotal = 0;
  try {
    const t0 = nowMs();
    for (let i = 0; i < paperN; i++) {
      const t = nowMs();
      await topo.exec("paper", "iptables", ["-w", "-I", "INPUT", "-s", benchIp(i, 40), "-j", "DROP"]);
      per.push(nowMs() - t);
    }
    paperTotal = nowMs() - t0;
  } finally {
    await topo.destroy();
  }
  const perMedian = stats(per).median;
  const paperExtrapolated = (paperTotal / paperN) * BURST;
  const ratio = paperExtrapolated / stats(total).median;
  const med = stats(total).median;
  return [
    `## ${title}`,
    "",
    `Command: \`npm run bench -- ${quick ? "--quick " : ""}burst\`. A raw WebSocket client writes ${BURST.toLocaleString("en")} ban frames for distinct addresses at once (pipelined, no waiting for acks) to a hub with \`--rate 1000000 --burst 1000000\` and a journal; one real agent (ipset backend, in its own network namespace) applies them. Measured from the first frame written to the agent logging the last batch as applied (its \`ipset -exist restore\` returned); then \`ipset list -terse\` in the agent's namespace confirms the count. ${runs} bursts of new addresses into the same set.`,
    "",
    statsHeader(["path", "figure"]),
    statsRow(["banshare, ipset", `${BURST.toLocaleString("en")} bans: first frame -> all in the kernel set`], total),
    statsRow(["banshare, ipset", "first frame -> hub acked the last (journal fsynced)"], acked),
    statsRow(["paper: `iptables -w -I INPUT -s IP -j DROP`", "one address (one process)"], per),
    "",
    `Kernel set size after each burst: ${kernelCounts.join(", ")} (expected ${kernelCounts.map((_, i) => (i + 1) * BURST).join(", ")}).`,
    "",
    `The paper's way, timed in the same run: ${paperN.toLocaleString("en")} addresses, one \`iptables -w -I\` process each (run via \`ip netns exec\` into a namespace of their own, which adds a little per process), took ${fmt(paperTotal)} ms (median ${fmt(perMedian)} ms per address). ${paperN < BURST ? `Extrapolated linearly to ${BURST.toLocaleString("en")}: **${(paperExtrapolated / 1000).toFixed(1)} s**. Linear is generous to it: each insert rewrites a ruleset that keeps growing, so the real figure is higher.` : ""}`,
    "",
    `Target: under 1 s: **${med < 1000 ? "met" : "missed"}** (median ${fmt(med)} ms, max ${fmt(stats(total).max)} ms). At least 50x faster than the paper's way: **${ratio >= 50 ? "met" : "missed"}** (${Math.round(ratio)}x, median against the extrapolated ${BURST.toLocaleString("en")}).`,
    "",
  ].join("\n");
}
