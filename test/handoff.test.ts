/**
 * ban.ts hands each event to the local agent on `<spool>/agent.sock`; the agent holds the hub
 * connection and the spool, and answers once the event is durable. So Fail2Ban's action never
 * waits on the network: with the hub blackholed (its packets dropped, not refused), real
 * Fail2Ban bans three addresses in a row without the seconds of --timeout between them, every
 * ban is kept, and each reaches the hub once the path is back. Without an agent, ban.ts gives a
 * blackholed hub --connect-timeout, then spools. The hub's refusals still reach Fail2Ban's log.
 */
import assert from "node:assert/strict";
import { appendFile, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { failureLines, startFail2ban, REPO_DIR, type Fail2ban } from "./lib/fail2ban.ts";
import { enrol, rows, runBan, startFleet, startHubProc, waitFor, type Fleet, type HubProc } from "./lib/fleet.ts";
import { createTopology, type Topology } from "./lib/netns.ts";
import { runSync, tsx, type Proc } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

const spooled = async (dir: string) => (await readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith(".json"));

describe("ban.ts hands events to the local agent (loopback hub)", () => {
  let fleet: Fleet;
  let spoolDir: string;

  before(async () => {
    fleet = await startFleet({ nodes: [["web1", "node"], ["root", "admin"]], journal: true, hubArgs: ["--protect", "198.51.100.0/24"] });
    spoolDir = join(fleet.dir, "web1-spool");
    const agent = tsx("agent.ts", ["--hub", fleet.hub.url, "--token-file", fleet.tokenFiles.web1, "--backend", "dry-run", "--csv", fleet.csv("web1"), "--spool", spoolDir], { name: "web1" });
    await agent.waitForLine(/synced: \d+ address/, 20_000);
    assert.match(agent.output(), /taking events from ban\.ts on .*agent\.sock/);
  });
  after(() => fleet?.stop());

  test("the agent publishes it on its connection: the hub has it, no spool file stays, and ban.ts needs no token of its own", async () => {
    // A token file that does not exist: only the agent's connection can have carried the ban.
    const r = await runBan(["ban", "203.0.113.20", "--hub", fleet.hub.url, "--token-file", join(fleet.dir, "missing-token"), "--spool", spoolDir]);
    assert.equal(r.code, 0, r.output);
    assert.equal(r.output, "");
    await waitFor(() => rows(fleet.csv("hub"), "RECEIVE", "203.0.113.20").length, "the hub to receive the ban from web1");
    assert.equal(rows(fleet.csv("hub"), "RECEIVE", "203.0.113.20")[0].origin, "web1");
    await waitFor(async () => (await spooled(spoolDir)).length === 0, "the agent to remove the acked event's spool file");
    const u = await runBan(["unban", "203.0.113.20", "--hub", fleet.hub.url, "--token-file", join(fleet.dir, "missing-token"), "--spool", spoolDir]);
    assert.equal(u.code, 0, u.output);
    await waitFor(() => rows(fleet.csv("web1"), "UNBLOCK", "203.0.113.20").length, "the unban to come back to the agent");
  });

  test("a refusal by the hub still fails the action with the hub's reason (exit 1), and nothing is left to deliver", async () => {
    const r = await runBan(["ban", "198.51.100.7", "--hub", fleet.hub.url, "--token-file", join(fleet.dir, "missing-token"), "--spool", spoolDir]);
    assert.equal(r.code, 1, r.output);
    assert.match(r.output, /^ban\.ts: hub refused the ban: protected: .*198\.51\.100/);
    assert.equal(r.output.trim().split("\n").length, 1);
    await waitFor(async () => (await spooled(spoolDir)).length === 0, "the refused event's spool file to go");
  });
});

describe("a ban Fail2Ban restores after a restart leaves a trace at the hub", () => {
  test("the same ban sent again with --restored 1 is a RECEIVE row and a log line saying nothing changes", async () => {
    const fleet = await startFleet({ nodes: [["web1", "node"]], journal: true });
    try {
      const t = String(Math.floor(Date.now() / 1000) - 60);
      for (const restored of ["0", "1"]) assert.equal((await fleet.ban("web1", "ban", "203.0.113.60", "--time", t, "--restored", restored)).code, 0);
      await waitFor(() => rows(fleet.csv("hub"), "RECEIVE", "203.0.113.60").length === 2, "two RECEIVE rows");
      const [first, again] = rows(fleet.csv("hub"), "RECEIVE", "203.0.113.60");
      assert.doesNotMatch(first.detail, /nothing changes/);
      assert.match(again.detail, /^ban from web1 \(.*\): no newer than the claim web1 holds \(a ban Fail2Ban restored after a restart, or a late one\); nothing changes$/);
      assert.ok(fleet.hub.proc.lines().some((l) => /ban of 203\.0\.113\.60 from web1: no newer than the claim web1 holds .*nothing changes/.test(l)));
    } finally {
      await fleet.stop();
    }
  });
});

describe("a blackholed hub never holds up Fail2Ban", needs(["root", "netns", "iptables", "fail2ban-server", "fail2ban-client"], "fail2ban"), () => {
  let topo: Topology;
  let dir: string;
  let hub: HubProc;
  let agent: Proc;
  let f2b: Fail2ban;
  let tokens: Record<string, string>;
  let config: string;
  const spoolDir = () => join(dir, "spool");
  const blackhole = (on: boolean) => runSync("ip", ["netns", "exec", topo.ns("hub"), "iptables", on ? "-I" : "-D", "INPUT", "-p", "tcp", "--dport", "7700", "-j", "DROP"]);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-handoff-"));
    topo = await createTopology(["hub", "web"], { prefix: "bho" });
    tokens = await enrol(dir, [["web", "node"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--csv", join(dir, "hub.csv"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") });
    agent = tsx("agent.ts", ["--hub", hub.url, "--insecure", "--token-file", tokens.web, "--backend", "dry-run", "--csv", join(dir, "web.csv"), "--spool", spoolDir(), "--heartbeat", "2"], { name: "web", netns: topo.ns("web") });
    await agent.waitForLine(/synced: \d+ address/, 20_000);
    config = join(dir, "ban.json");
    await writeFile(config, JSON.stringify({ hub: hub.url, "token-file": tokens.web, spool: spoolDir(), insecure: true }));
    f2b = await startFail2ban({
      dir: join(dir, "f2b"),
      netns: topo.ns("web"),
      logFile: join(dir, "sshd.log"),
      maxretry: 2,
      // record runs after banshare for each ban: its lines say every banshare action has ended.
      actions: `banshare[banshare_dir=${REPO_DIR}, node=${process.execPath}, config=${config}]\nrecord[file=${join(dir, "record.txt")}]`,
    });
  });

  after(async () => {
    await f2b?.stop();
    await agent?.stop("SIGTERM", 5000);
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("real Fail2Ban bans three addresses in a row at once; each ban is kept and reaches the hub when the path is back", async (t) => {
    blackhole(true);
    let holed = true;
    try {
      const ips = ["203.0.113.31", "203.0.113.32", "203.0.113.33"];
      await appendFile(join(dir, "sshd.log"), ips.map((ip) => failureLines(ip, 2)).join(""));
      await waitFor(async () => (await f2b.banned()).length === 3, "Fail2Ban to ban all three", 30_000);
      // Fail2Ban runs the actions one after another: its "Ban" lines are as far apart as an action
      // takes. Waiting on the hub, each would take the sender's whole --timeout (5 s before the
      // hand-off); 3 s for all three is far above a hand-off and far below one timeout.
      const log = await readFile(f2b.logTarget, "utf8");
      const times = [...log.matchAll(/^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*NOTICE\s+\[sshd\] Ban (\S+)/gm)].map((m) => Date.parse(m[1].replace(" ", "T").replace(",", ".")));
      assert.equal(times.length, 3, log);
      t.diagnostic(`Fail2Ban's three Ban lines with the hub blackholed: ${times[1] - times[0]} and ${times[2] - times[1]} ms apart`);
      assert.ok(times[2] - times[0] < 3000, `Fail2Ban took ${times[2] - times[0]} ms for three bans with the hub blackholed`);
      // Every action ended well (Fail2Ban logs a failed action as an error), and each ban waits in the agent's spool.
      await waitFor(async () => (await readFile(join(dir, "record.txt"), "utf8").catch(() => "")).trim().split("\n").length === 3, "the three actions to end");
      assert.doesNotMatch(await readFile(f2b.logTarget, "utf8"), /ERROR|returned/);
      assert.equal((await spooled(spoolDir())).length, 3);
      assert.equal(rows(join(dir, "hub.csv"), "RECEIVE", ips[0]).length, 0, "the blackholed hub received a ban");
      blackhole(false);
      holed = false;
      for (const ip of ips) await waitFor(() => rows(join(dir, "hub.csv"), "RECEIVE", ip).length, `the hub to receive ${ip} once the path is back`, 60_000);
      await waitFor(async () => (await spooled(spoolDir())).length === 0, "the delivered events' spool files to go", 20_000);
    } finally {
      if (holed) blackhole(false);
    }
  });

  test("without an agent, ban.ts gives a blackholed hub --connect-timeout, then spools (exit 0)", async () => {
    blackhole(true);
    try {
      const own = join(dir, "no-agent-spool");
      const r = await runBan(["ban", "203.0.113.40", "--config", config, "--spool", own], { netns: topo.ns("web") });
      assert.equal(r.code, 0, r.output);
      assert.match(r.output, /^ban\.ts: warning: could not send \(no connection to ws:\/\/[\d.]+:7700 within 300 ms \(--connect-timeout\); no agent[^)]*\); spooled the ban of 203\.0\.113\.40/);
      assert.equal((await spooled(own)).length, 1);
    } finally {
      blackhole(false);
    }
  });
});
