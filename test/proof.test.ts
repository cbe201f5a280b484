/**
 * The operator's proof, on real kernels in network namespaces: what the fleet decided is what
 * the kernel holds.
 *
 * - A Fail2Ban restart on the origin (its jail restarted, or the whole server stopped and
 *   started: both flush Fail2Ban's own rules before they put the bans back) leaves no moment
 *   the banned address gets in, because the origin's agent holds its own node's ban as well.
 * - Each agent reports how it enforces: `ban.ts status --fleet` (admin) shows every node's state
 *   and its repairs once a node's set was tampered with; the agent's own --metrics serve its counts
 *   and the packets its DROP rule dropped.
 */
import assert from "node:assert/strict";
import { appendFile, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { describeTimeline, gaps, startProbe, TAMPERS } from "./lib/enforce.ts";
import { failureLines, startFail2ban, REPO_DIR, type Fail2ban, type StartFail2banOptions } from "./lib/fail2ban.ts";
import { enrol, rows, runBan, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, startTcpListener, tcpProbe, type Topology } from "./lib/netns.ts";
import type { Proc } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

const PORT = 2222;

describe("a Fail2Ban restart on the origin", needs(["root", "netns", "ipset", "iptables", "ip6tables", "fail2ban-server", "fail2ban-client"], "fail2ban"), () => {
  let topo: Topology;
  let dir: string;
  let hub: HubProc;
  let agent: Proc;
  let f2b: Fail2ban;
  let f2bOpts: StartFail2banOptions;
  const csv = () => join(dir, "client1.csv");

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-proof-"));
    topo = await createTopology(["hub", "client1", "attacker"], { prefix: "bprf" });
    const tokens = await enrol(dir, [["client1", "node"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") });
    await startTcpListener(topo, "client1", PORT);
    agent = await startAgentProc("client1", ["--hub", hub.url, "--token-file", tokens.client1, "--backend", "ipset", "--csv", csv()], { netns: topo.ns("client1") });
    const config = join(dir, "ban.json");
    await writeFile(config, JSON.stringify({ hub: hub.url, "token-file": tokens.client1, timeout: 5, spool: join(dir, "spool"), insecure: true }));
    // Fail2Ban blocks locally with its stock iptables action (which it flushes on every restart)
    // and tells the fleet; its database puts the ban back after a restart, as on a real server.
    f2bOpts = {
      dir: join(dir, "f2b"),
      netns: topo.ns("client1"),
      logFile: join(dir, "sshd.log"),
      maxretry: 3,
      bantime: 600,
      db: "file",
      extraActionDirs: ["/etc/fail2ban"],
      actions: `iptables-allports[name=sshd]\nbanshare[banshare_dir=${REPO_DIR}, node=${process.execPath}, config=${config}]`,
    };
    f2b = await startFail2ban(f2bOpts);
  });

  after(async () => {
    await f2b?.stop();
    await agent?.stop("SIGTERM", 5000);
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("the origin's agent holds its own ban (BLOCK and SCHEDULE_UNBLOCK rows), and neither a jail restart nor a stop and start of Fail2Ban lets the attacker in", async (t) => {
    const attacker = topo.ip("attacker");
    const probe = await startProbe(topo, "attacker", "client1", PORT, { intervalMs: 50, timeoutMs: 40 });
    try {
      await probe.waitFor("open", 5000);
      await appendFile(f2bOpts.logFile, failureLines(attacker, 3));
      await waitFor(async () => (await f2b.banned()).includes(attacker), "Fail2Ban to ban the attacker", 20_000);
      const block = await waitFor(() => rows(csv(), "BLOCK", attacker)[0], "the origin's agent to block its own node's ban (a BLOCK row in client1's CSV)", 20_000);
      assert.equal(block.origin, "client1");
      assert.equal(rows(csv(), "SCHEDULE_UNBLOCK", attacker).length, 1);
      const held = (await topo.exec("client1", "ipset", ["test", "banshare-v4", attacker], { reject: false })).exitCode;
      assert.equal(held, 0, "the attacker is in the agent's set");
      const from = Date.now();
      await probe.waitFor("blocked", 5000, { since: from, consecutive: 3 });

      // The jail restarts: Fail2Ban's chain goes, then comes back with the ban from its database.
      await f2b.client(["restart", f2b.jail]);
      await waitFor(async () => (await f2b.banned()).includes(attacker), "the restarted jail to restore the ban", 20_000);
      // The whole server stops (its actions' rules flushed) and starts again from the same database.
      await f2b.stop();
      await new Promise((r) => setTimeout(r, 1000));
      f2b = await startFail2ban(f2bOpts);
      await waitFor(async () => (await f2b.banned()).includes(attacker), "the restarted server to restore the ban", 20_000);
      await new Promise((r) => setTimeout(r, 500));
      const timeline = await probe.stop();
      t.diagnostic(describeTimeline(timeline.filter((s) => s.at >= from - 500), from));
      assert.deepEqual(gaps(timeline, from), [], "the attacker got in while Fail2Ban restarted on the origin");
      assert.ok(timeline.filter((s) => s.at >= from).length > 20, "the probe kept probing through the restarts");
    } finally {
      await probe.stop();
    }
  });
});

describe("the operator's proof: enforcement reports", needs(["root", "netns", "ipset", "iptables", "ip6tables", "nft"], "kernel"), () => {
  let topo: Topology;
  let dir: string;
  let hub: HubProc;
  const agents: Proc[] = [];
  let tokens: Record<string, string>;
  const status = (...args: string[]) => runBan(["status", "--fleet", "--hub", hub.url, "--token-file", tokens.ops, "--timeout", "5", ...args], { netns: topo.ns("hub") });
  /** The agent's own /metrics, fetched inside its namespace. */
  const agentMetrics = async (n: string): Promise<string> => String((await topo.exec(n, process.execPath, ["-e", "fetch('http://127.0.0.1:9101/metrics').then((r) => r.text()).then((t) => process.stdout.write(t))"])).stdout);
  const sample = (text: string, name: string) => Number(new RegExp(`^${name} (\\d+)$`, "m").exec(text)?.[1] ?? NaN);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-proof-fleet-"));
    topo = await createTopology(["hub", "web1", "web2", "attacker"], { prefix: "bprq" });
    tokens = await enrol(dir, [["web1", "node"], ["web2", "node"], ["src", "node"], ["ops", "admin"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") });
    for (const n of ["web1", "web2"]) {
      await startTcpListener(topo, n, PORT);
      // web1 on ipset, web2 on nftables: both count what their DROP rules dropped.
      agents.push(await startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--backend", n === "web1" ? "ipset" : "nftables", "--metrics", "127.0.0.1:9101"], { netns: topo.ns(n) }));
    }
  });

  after(async () => {
    for (const a of agents) await a.stop("SIGTERM", 5000);
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("status --fleet lists every node enforcing (exit 0); after an ipset flush on web1 it shows web1's repair; the agent's /metrics counts entries, repairs and drops", async () => {
    const attacker = topo.ip("attacker");
    for (const ip of [attacker, "198.51.100.1", "198.51.100.2"]) {
      const r = await runBan(["ban", ip, "--jail", "sshd", "--bantime", "600", "--hub", hub.url, "--token-file", tokens.src, "--spool", join(dir, "spool")], { netns: topo.ns("hub") });
      assert.equal(r.code, 0, r.output);
    }
    for (const n of ["web1", "web2"]) await waitFor(async () => !(await tcpProbe(topo, "attacker", n, PORT, 400)), `${n} to drop the attacker`, 20_000);
    const enforcing = await waitFor(async () => {
      const r = await status();
      return r.code === 0 && /^2 of 2 node\(s\) enforcing/m.test(r.output) ? r : undefined;
    }, "status --fleet to report both nodes enforcing", 20_000);
    assert.match(enforcing.output, /^web1  enforcing  \(ipset, 3 entries \/ 3 claim\(s\), 0 repair\(s\); /m);
    assert.match(enforcing.output, /^web2  enforcing  \(nftables, /m);

    const before = await agentMetrics("web1");
    assert.equal(sample(before, "banshare_agent_entries"), 3);
    assert.equal(sample(before, "banshare_agent_claims"), 3);
    assert.equal(sample(before, "banshare_agent_drift"), 0);
    assert.equal(sample(before, "banshare_agent_hooks_missing"), 0);
    assert.ok(sample(before, "banshare_agent_dropped_packets_total") >= 1, `the attacker's dropped SYNs are counted:\n${before}`);
    const nft = await agentMetrics("web2");
    assert.ok(sample(nft, "banshare_agent_dropped_packets_total") >= 1, `nftables: the attacker's dropped SYNs are counted by the rules' counters:\n${nft}`);
    assert.ok(sample(nft, "banshare_agent_dropped_bytes_total") >= 40, nft);

    // The Guard sees the flushed set within a second and refills it: the report then shows the repair.
    await TAMPERS["ipset flush"](topo.ns("web1"));
    const repaired = await waitFor(async () => {
      const r = await status();
      return r.code === 0 && /^web1  enforcing  \(ipset, 3 entries \/ 3 claim\(s\), [1-9]\d* repair\(s\), last .* ago: /m.test(r.output) ? r : undefined;
    }, "status --fleet to report web1's repair, enforcing again", 20_000);
    assert.match(repaired.output, /^web2  enforcing  /m);
    assert.match(repaired.output, /^2 of 2 node\(s\) enforcing/m);
    const after = await agentMetrics("web1");
    assert.ok(sample(after, "banshare_agent_repairs_total") >= 1, `web1's repair is counted:\n${after}`);
    assert.equal(sample(after, "banshare_agent_entries"), 3);
    assert.equal(sample(after, "banshare_agent_drift"), 0);

    const help = await runBan(["--help"]);
    assert.match(help.output, /--fleet\s+status: every connected node's enforcement/);
  });
});
