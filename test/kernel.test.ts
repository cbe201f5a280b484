/**
 * The real kernel firewall, inside network namespaces this test creates and removes: a hub and
 * two agents on a bridge, an attacker and an admin host. For each backend (ipset, nftables,
 * iptables) a ban must make the attacker's TCP connects to both agents' hosts fail, the unban
 * must restore them, kernel timeouts must expire, allowlisted and the hub's own addresses must
 * never be blocked, and --cleanup must remove everything the agent made.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { enrol, rows, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, startTcpListener, tcpProbe, type Topology } from "./lib/netns.ts";
import { tsx, type Proc } from "./lib/proc.ts";
import { needs, type Requirement } from "./lib/skip.ts";

const PORT = 2222;
const BACKENDS: Array<{ backend: "ipset" | "nftables" | "iptables"; reqs: Requirement[] }> = [
  { backend: "ipset", reqs: ["root", "netns", "ipv6", "ipset", "iptables", "ip6tables"] },
  { backend: "nftables", reqs: ["root", "netns", "ipv6", "nft"] },
  { backend: "iptables", reqs: ["root", "netns", "ipv6", "iptables", "ip6tables"] },
];

/** What the kernel of a namespace holds for the agent, as one comparable text. */
async function kernelState(topo: Topology, node: string, backend: string): Promise<string> {
  const run = async (cmd: string, args: string[]) => (await topo.exec(node, cmd, args, { reject: false })).stdout as string;
  if (backend === "nftables") return run("nft", ["list", "table", "inet", "banshare"]);
  const chain = (await run("iptables", ["-S", "banshare"])) + (await run("ip6tables", ["-S", "banshare"]));
  return backend === "ipset" ? chain + (await run("ipset", ["list", "banshare-v4"])) + (await run("ipset", ["list", "banshare-v6"])) : chain;
}

for (const { backend, reqs } of BACKENDS) {
  describe(`${backend} backend on the real kernel: a ban drops the attacker on every host and ends on time, allowlisted addresses are never blocked, bans outlive an agent restart, --cleanup removes them`, needs(reqs, `${backend} backend`), () => {
    let topo: Topology;
    let dir: string;
    let hub: HubProc;
    let tokens: Record<string, string>;
    const agents: Record<string, Proc> = {};
    const csv = (n: string) => join(dir, `${n}.csv`);
    const AGENTS = ["a1", "a2"];

    /** Bans from node web0, which has no agent: every agent gets the event. */
    const send = async (cmd: "ban" | "unban", ip: string, bantime = 600) => {
      const p = tsx("ban.ts", [cmd, ip, "--jail", "sshd", ...(cmd === "ban" ? ["--bantime", String(bantime)] : []), "--hub", hub.url, "--token-file", tokens.web0, "--spool", join(dir, "spool")], { netns: topo.ns("hub"), name: `ban ${ip}` });
      const info = await p.closed;
      assert.equal(info.code, 0, p.output());
    };
    const reachable = (from: string, to: string, family: 4 | 6 = 4) => tcpProbe(topo, from, to, PORT, 400, { family });
    const waitBlocked = (from: string, to: string, family: 4 | 6 = 4) => waitFor(async () => !(await reachable(from, to, family)), `${from} -> ${to} (IPv${family}) to be blocked`);
    const waitOpen = (from: string, to: string, family: 4 | 6 = 4) => waitFor(() => reachable(from, to, family), `${from} -> ${to} (IPv${family}) to be open`);
    const startAgent = (n: string) =>
      startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--backend", backend, "--csv", csv(n), "--allow", `${topo.ip("admin")}/32`, "--heartbeat", "2"], { netns: topo.ns(n) });

    before(async () => {
      dir = await mkdtemp(join(tmpdir(), `banshare-kernel-${backend}-`));
      topo = await createTopology(["hub", ...AGENTS, "attacker", "admin"], { prefix: `bk${backend.slice(0, 3)}` });
      tokens = await enrol(dir, [["web0", "node"], ["a1", "node"], ["a2", "node"]]);
      hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `${topo.ip("hub")}:7700`, "--heartbeat", "2"], { netns: topo.ns("hub") });
      for (const n of AGENTS) {
        await startTcpListener(topo, n, PORT);
        agents[n] = await startAgent(n);
      }
    });

    after(async () => {
      for (const p of Object.values(agents)) await p.stop("SIGTERM", 5000);
      await hub?.proc.stop("SIGTERM", 5000);
      await topo?.destroy();
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    test("a ban drops the attacker's IPv4 and IPv6 connects on every agent's host; the unban restores them", async () => {
      for (const n of AGENTS) {
        assert.equal(await reachable("attacker", n, 4), true, `attacker reaches ${n} before the ban`);
        assert.equal(await reachable("attacker", n, 6), true, `attacker reaches ${n} over IPv6 before the ban`);
      }
      await send("ban", topo.ip("attacker"));
      await send("ban", topo.ip6("attacker"));
      for (const n of AGENTS) {
        await waitBlocked("attacker", n, 4);
        await waitBlocked("attacker", n, 6);
        assert.equal(await reachable("admin", n), true, `an unbanned host still reaches ${n}`);
        assert.match(await kernelState(topo, n, backend), new RegExp(topo.ip("attacker").replace(/\./g, "\\.")));
        assert.equal(rows(csv(n), "BLOCK", topo.ip("attacker")).length, 1);
      }
      // The operator's view on that server: its kernel holds what the hub says the fleet blocks.
      const status = tsx("ban.ts", ["status", "--backend", backend, "--hub", hub.url, "--token-file", tokens.a1], { netns: topo.ns("a1"), name: "status a1" });
      assert.equal((await status.closed).code, 0, status.output());
      assert.match(status.output(), /kernel:\s+2 entries in .*\(hub: 2 blocked\): in step/, status.output());
      await send("unban", topo.ip("attacker"));
      await send("unban", topo.ip6("attacker"));
      for (const n of AGENTS) {
        await waitOpen("attacker", n, 4);
        await waitOpen("attacker", n, 6);
        await waitFor(() => rows(csv(n), "UNBLOCK", topo.ip("attacker")).length, `UNBLOCK row on ${n}`);
      }
    });

    if (backend !== "iptables") {
      const tool = backend === "ipset" ? "ipset" : "nft";
      test(`an agent whose ${tool} process is killed keeps applying bans (falls back, then starts a new one)`, async () => {
        // The agent feeds one long-lived `ipset restore` or `nft -i`; find it among its children.
        const children = async () => String((await topo.exec("a1", "pgrep", ["-P", String(agents.a1.pid), "-x", tool], { reject: false })).stdout).split("\n").filter(Boolean);
        await send("ban", topo.ip("attacker"));
        await waitBlocked("attacker", "a1");
        const [pid] = await children();
        assert.ok(pid, `the agent has no long-lived ${tool} process`);
        process.kill(Number(pid), "SIGKILL");
        await send("unban", topo.ip("attacker"));
        await waitOpen("attacker", "a1");
        await send("ban", topo.ip6("attacker"));
        await waitBlocked("attacker", "a1", 6);
        const [next] = await children();
        assert.ok(next && next !== pid, `no new ${tool} process after the kill`);
        await send("unban", topo.ip6("attacker"));
        await waitOpen("attacker", "a1", 6);
      });
    }

    test("a ban ends by itself when its time is up", async () => {
      await send("ban", topo.ip("attacker"), 2);
      for (const n of AGENTS) await waitBlocked("attacker", n);
      for (const n of AGENTS) await waitOpen("attacker", n);
      for (const n of AGENTS) await waitFor(() => rows(csv(n), "UNBLOCK", topo.ip("attacker")).some((r) => /ended/.test(r.detail)), `"ban ended" on ${n}`);
    });

    test("allowlisted and hub addresses are never blocked, whatever arrives", async () => {
      // The hub refuses a ban of its own address outright (it is protected)...
      const refused = tsx("ban.ts", ["ban", topo.ip("hub"), "--hub", hub.url, "--token-file", tokens.web0, "--spool", join(dir, "spool")], { netns: topo.ns("hub"), name: "ban hub" });
      assert.equal((await refused.closed).code, 1, refused.output());
      assert.match(refused.output(), /protected/);
      // ...and an address allowlisted on the agents is accepted by the hub but never applied by them.
      await send("ban", topo.ip("admin"));
      for (const n of AGENTS) {
        await waitFor(() => rows(csv(n), "REJECT", topo.ip("admin")).length, `REJECT row on ${n}`);
        assert.equal(await reachable("admin", n), true, `admin still reaches ${n}`);
        assert.equal(await reachable("hub", n), true, `hub still reaches ${n}`);
        assert.equal(rows(csv(n), "BLOCK", topo.ip("admin")).length, 0);
        assert.doesNotMatch(await kernelState(topo, n, backend).then((s) => s.replace(/-s \S+ -j RETURN|saddr (\{[^}]*\}|\S+) return/g, "")), new RegExp(`\\b${topo.ip("admin").replace(/\./g, "\\.")}\\b`));
      }
      await send("unban", topo.ip("admin"));
    });

    test("stopping and restarting an agent leaves its bans enforcing (no flush on start)", async () => {
      await send("ban", topo.ip("attacker"));
      await waitBlocked("attacker", "a1");
      await agents.a1.stop("SIGTERM", 5000);
      assert.equal(await reachable("attacker", "a1"), false, "ban lifted when the agent stopped");
      await hub.proc.stop("SIGTERM", 5000);
      // Hub down and agent starting: the kernel keeps what it had.
      const restarted = tsx("agent.ts", ["--hub", hub.url, "--token-file", tokens.a1, "--backend", backend, "--csv", csv("a1"), "--allow", `${topo.ip("admin")}/32`, "--heartbeat", "2"], { netns: topo.ns("a1"), name: "a1" });
      agents.a1 = restarted;
      await restarted.waitForLine(/disconnected from|retrying/, 15_000);
      assert.equal(await reachable("attacker", "a1"), false, "the agent flushed on start");
      hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `${topo.ip("hub")}:7700`, "--heartbeat", "2"], { netns: topo.ns("hub") });
      await restarted.waitForLine(/synced: \d+ address/, 20_000);
      assert.equal(await reachable("attacker", "a1"), false, "the reconcile lost the ban");
      await send("unban", topo.ip("attacker"));
      await waitOpen("attacker", "a1");
    });

    test("--cleanup removes every object the agent created", async () => {
      for (const n of AGENTS) await agents[n].stop("SIGTERM", 5000);
      for (const n of AGENTS) {
        assert.notEqual(await kernelState(topo, n, backend), "", "nothing to clean up");
        const p = tsx("agent.ts", ["--cleanup", "--backend", backend], { netns: topo.ns(n), name: `cleanup ${n}` });
        assert.equal((await p.closed).code, 0, p.output());
        assert.equal(await kernelState(topo, n, backend), "", `left behind on ${n}`);
        const input = (await topo.exec(n, "iptables", ["-S", "INPUT"], { reject: false })).stdout as string;
        assert.doesNotMatch(input, /banshare/);
      }
    });
  });
}

