/**
 * Enforcement that heals itself, on the real kernel inside namespaces this test creates: a hub,
 * an agent host a1 and an attacker that probes a1 over TCP every ~100 ms (test/lib/enforce.ts).
 * With the attacker banned, each thing that rewrites a firewall behind the agent's back
 * (`iptables -F`, the INPUT jump deleted, `ipset flush`, `ipset destroy`, an `iptables-restore` of
 * the rules saved before the agent started, `nft flush ruleset`, the nftables table or set
 * emptied, Docker starting) must leave the attacker blocked again without restarting the agent,
 * with a REPAIR row in its CSV. A "container" routed behind a1 through FORWARD and a DOCKER-USER
 * chain built as dockerd builds it is protected too. Last, a reboot (rules and sets gone) while
 * the hub is down: the agent restarted with its --state file keeps the attacker out from the
 * moment it reports its restore. Times are printed as diagnostics, never asserted.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test, type TestContext } from "node:test";
import { describeTimeline, dockerPath, gaps, snapshotRuleset, startProbe, TAMPER_HITS, TAMPERS, type DockerPath, type Probe, type TamperName } from "./lib/enforce.ts";
import { enrol, readCsv, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, startTcpListener, type Topology } from "./lib/netns.ts";
import { tsx, type Proc } from "./lib/proc.ts";
import { needs, type Requirement } from "./lib/skip.ts";

const PORT = 2222;
type Backend = "ipset" | "nftables" | "iptables";
const BACKENDS: Array<{ backend: Backend; reqs: Requirement[]; tampers: TamperName[] }> = [
  { backend: "ipset", reqs: ["root", "netns", "ipv6", "ipset", "iptables", "ip6tables", "nft"], tampers: ["iptables -F", "iptables -D INPUT", "ipset flush", "ipset destroy", "iptables-restore", "nft flush ruleset"] },
  { backend: "nftables", reqs: ["root", "netns", "ipv6", "nft", "iptables"], tampers: ["nft flush ruleset", "nft delete table"] },
  // The paper's way, one rule per address: the cheap cases.
  { backend: "iptables", reqs: ["root", "netns", "ipv6", "iptables", "ip6tables", "nft"], tampers: ["iptables -F", "iptables-restore"] },
];

/** The time in an agent's log line (`2026-...Z agent: ...`), in ms. */
function lineTime(line: string): number {
  const t = Date.parse(line.slice(0, 24));
  assert.ok(Number.isFinite(t), `no time in ${JSON.stringify(line)}`);
  return t;
}

for (const { backend, reqs, tampers } of BACKENDS) {
  describe(`${backend}: the agent restores what others remove from the firewall`, needs(reqs, `${backend} enforcement`), () => {
    let topo: Topology;
    let dir: string;
    let hub: HubProc;
    let tokens: Record<string, string>;
    let agent: Proc;
    let probe: Probe;
    let docker: DockerPath | undefined;
    let ns: string;
    const csv = () => join(dir, "a1.csv");
    const statePath = () => join(dir, "a1.state");
    const repairs = () => readCsv(csv()).filter((r) => r.action === "REPAIR");
    const agentArgs = () => ["--hub", hub.url, "--token-file", tokens.a1, "--backend", backend, "--csv", csv(), "--state", statePath(), "--heartbeat", "2"];
    const hubArgs = () => ["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `${topo.ip("hub")}:7700`, "--heartbeat", "2"];
    const ban = async (ip: string) => {
      const p = tsx("ban.ts", ["ban", ip, "--jail", "sshd", "--bantime", "3600", "--hub", hub.url, "--token-file", tokens.web0, "--spool", join(dir, "spool")], { netns: topo.ns("hub"), name: `ban ${ip}` });
      assert.equal((await p.closed).code, 0, p.output());
    };

    /**
     * Runs a tampering while the probe runs; resolves once the attacker has been blocked for 5
     * samples in a row after it and a new REPAIR row is in the CSV. Prints how long the attacker
     * got in and when the agent's repair line came.
     */
    async function survive(t: TestContext, name: string, tamper: () => Promise<void>, p = probe): Promise<void> {
      await p.waitFor("blocked", 15_000, { consecutive: 3 });
      const before = repairs().length;
      const lines = agent.lines().length;
      const start = Date.now();
      await tamper();
      const done = Date.now();
      await p.waitFor("blocked", 15_000, { since: done, consecutive: 5 });
      await waitFor(() => repairs().length > before, `a REPAIR row after ${name}`, 10_000);
      const tl = p.timeline();
      const g = gaps(tl, start);
      const repaired = agent.lines().slice(lines).find((l) => / agent: repaired: /.test(l));
      t.diagnostic(`${backend} ${name}: attacker got in ${g.reduce((n, x) => n + x.samples, 0)} sample(s), last open ${g.length ? g.at(-1)!.to - done : 0} ms after the tampering ended (${done - start} ms to run it); agent repaired ${repaired ? lineTime(repaired) - done : "?"} ms after: ${repaired?.replace(/^.* agent: /, "")}`);
      t.diagnostic(`timeline from the tampering: ${describeTimeline(tl.filter((s) => s.at >= start - 300), start)}`);
      assert.ok(!g.at(-1)?.ongoing, describeTimeline(tl, start));
      const row = repairs().at(-1)!;
      assert.match(row.detail, /restored hooks and \d+ entries/);
    }

    before(async () => {
      dir = await mkdtemp(join(tmpdir(), `banshare-enforce-${backend}-`));
      topo = await createTopology(["hub", "a1", "attacker"], { prefix: `be${backend.slice(0, 3)}` });
      ns = topo.ns("a1");
      // The "rules file" a firewall reload loads: what the host had before banshare.
      await snapshotRuleset(ns);
      tokens = await enrol(dir, [["web0", "node"], ["a1", "node"]]);
      hub = await startHubProc(hubArgs(), { netns: topo.ns("hub") });
      await startTcpListener(topo, "a1", PORT);
      agent = await startAgentProc("a1", agentArgs(), { netns: ns });
      probe = await startProbe(topo, "attacker", "a1", PORT);
      await probe.waitFor("open", 10_000, { consecutive: 2 });
      await ban(topo.ip("attacker"));
      await probe.waitFor("blocked", 15_000, { consecutive: 3 });
    });

    after(async () => {
      await probe?.stop();
      await agent?.stop("SIGTERM", 5000);
      await hub?.proc.stop("SIGTERM", 5000);
      await docker?.destroy();
      await topo?.destroy();
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    for (const name of tampers) {
      assert.ok(TAMPER_HITS[name].includes(backend), `${name} does not hit ${backend}`);
      test(`${name}: the attacker is blocked again without a restart, and a REPAIR row says what was missing`, async (t) => {
        await survive(t, name, async () => {
          if (name !== "ipset destroy") return TAMPERS[name](ns);
          // An admin's `iptables -F; ipset destroy`: run while the agent is not scheduled, or it
          // may hook the sets in again between the two and the destroy fails ("in use").
          process.kill(agent.pid, "SIGSTOP");
          try {
            await TAMPERS[name](ns);
          } finally {
            process.kill(agent.pid, "SIGCONT");
          }
        });
      });
    }

    if (backend === "nftables") {
      test("nft flush set: the emptied set is filled again without a restart", async (t) => {
        await survive(t, "nft flush set", async () => void (await topo.exec("a1", "nft", ["flush", "set", "inet", "banshare", "v4"])));
      });
    }

    test("Docker starting (DOCKER-USER appears, FORWARD rewritten) leaves a published port protected; a Docker restart and a deleted DOCKER-USER jump too", async (t) => {
      // The agent came first, as on a boot where it starts before dockerd.
      const earlier = repairs().length;
      const started = Date.now();
      docker = await dockerPath(topo, "a1");
      const ready = Date.now();
      const toContainer = await startProbe(topo, "attacker", "a1", docker.port);
      try {
        await toContainer.waitFor("blocked", 15_000, { since: ready, consecutive: 5 });
        if (backend !== "nftables") await waitFor(() => repairs().some((r) => /DOCKER-USER/.test(r.detail)), "a REPAIR row hooking DOCKER-USER");
        t.diagnostic(`${backend} docker start: dockerd's rules took ${ready - started} ms; the container's port blocked ${toContainer.timeline().find((s) => s.at >= ready && s.state === "blocked")!.at - ready} ms after; repairs: ${repairs().slice(earlier).map((r) => r.detail).join(" | ") || "none needed"}`);
        const restart = Date.now();
        await docker.restart();
        await toContainer.waitFor("blocked", 15_000, { since: Date.now(), consecutive: 5 });
        t.diagnostic(`${backend} docker restart: ${describeTimeline(toContainer.timeline().filter((s) => s.at >= restart - 300), restart)}`);
        if (backend !== "nftables") await survive(t, "iptables -D DOCKER-USER", () => TAMPERS["iptables -D DOCKER-USER"](ns), toContainer);
      } finally {
        await toContainer.stop();
      }
    });

    test("a reboot while the hub is down: the restarted agent restores its state file and keeps the attacker out from its start", async (t) => {
      await waitFor(() => existsSync(statePath()) && readFileSync(statePath(), "utf8").includes(topo.ip("attacker")), "the ban in the state file");
      await agent.stop("SIGTERM", 5000);
      await hub.proc.stop("SIGTERM", 5000);
      // The reboot: every rule, table and set gone.
      await topo.exec("a1", "nft", ["flush", "ruleset"]);
      await topo.exec("a1", "ipset", ["destroy"], { reject: false });
      const wiped = Date.now();
      await probe.waitFor("open", 10_000, { since: wiped, consecutive: 2 });
      agent = tsx("agent.ts", agentArgs(), { netns: ns, name: "a1" });
      const line = await agent.waitForLine(/ agent: restored: [1-9]\d* address/, 20_000);
      const ready = lineTime(line);
      await agent.waitForLine(/disconnected from|retrying/, 15_000);
      await new Promise((r) => setTimeout(r, 1500));
      const tl = probe.timeline();
      t.diagnostic(`${backend} reboot: ${line.replace(/^.* agent: /, "")}; probe from the agent's start: ${describeTimeline(tl.filter((s) => s.at >= wiped), ready)}`);
      assert.deepEqual(gaps(tl, ready), [], describeTimeline(tl.filter((s) => s.at >= wiped), ready));
      assert.equal(tl.at(-1)?.state, "blocked");
    });
  });
}
