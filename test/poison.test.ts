/**
 * Poisoned claims and a hostile hub, on the real kernel in network namespaces this test creates
 * and removes, for the ipset and nftables backends:
 * - claims the hub accepts but a kernel refuses as they are (a bantime above nft's timeout
 *   limit; an IPv6 /64 from one node and a /128 inside it from another: "conflicting
 *   intervals") leave every other ban enforced, on a connected agent (live events) and a fresh
 *   one (full sync);
 * - a kernel that refuses one entry (an element someone else put in the set overlaps it) costs
 *   that entry only: the rest of the batch lands, and the refusal is a REJECT row with the
 *   kernel's message;
 * - a compromised hub (test/fixtures/hostile-hub.mjs, a real WebSocket server) that sends
 *   loopback, multicast, broadcast, 0.0.0.0/8, 240.0.0.0/4, ff00::/8, 128.0.0.0/1 and NAT64
 *   addresses in events and sync frames, a sync of 150,000 events in one ~25 MB frame and endless
 *   `more: true` chunks gets none of them into the kernel and does not crash the agent; the
 *   valid entries of the same frames land.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { MAX_BANTIME_S, type FleetEvent } from "../messages.ts";
import { enrol, rows, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, startTcpListener, tcpProbe, type Topology } from "./lib/netns.ts";
import { REPO_ROOT, spawnProc, tsx, type Proc } from "./lib/proc.ts";
import { needs, type Requirement } from "./lib/skip.ts";

const PORT = 2222;
const CASES: Array<{ backend: "ipset" | "nftables"; reqs: Requirement[] }> = [
  { backend: "ipset", reqs: ["root", "netns", "ipv6", "ipset", "iptables", "ip6tables"] },
  { backend: "nftables", reqs: ["root", "netns", "ipv6", "nft"] },
];

/** The entries of the agent's sets in a namespace: address -> timeout left in seconds (null: none). */
async function kernelEntries(topo: Topology, node: string, backend: string): Promise<Map<string, number | null>> {
  const out = new Map<string, number | null>();
  if (backend === "ipset") {
    for (const set of ["banshare-v4", "banshare-v6"]) {
      const text = String((await topo.exec(node, "ipset", ["list", set], { reject: false })).stdout);
      for (const m of text.split("Members:\n")[1]?.matchAll(/^(\S+)(?: timeout (\d+))?/gm) ?? []) out.set(m[1], m[2] && m[2] !== "0" ? Number(m[2]) : null);
    }
    return out;
  }
  for (const set of ["v4", "v6", "v4net", "v6net"]) {
    const r = await topo.exec(node, "nft", ["-j", "list", "set", "inet", "banshare", set], { reject: false });
    if (r.exitCode !== 0) continue;
    const doc = JSON.parse(String(r.stdout)) as { nftables: Array<{ set?: { elem?: unknown[] } }> };
    const text = (v: any): string => (typeof v === "string" ? v : v.prefix ? `${v.prefix.addr}/${v.prefix.len}` : JSON.stringify(v));
    for (const e of doc.nftables.find((x) => x.set)?.set?.elem ?? []) {
      const el = (e as any).elem;
      if (el) out.set(text(el.val), el.timeout ?? null);
      else out.set(text(e), null);
    }
  }
  return out;
}

for (const { backend, reqs } of CASES) {
  describe(`poisoned claims and a hostile hub: ${backend} backend on the real kernel`, needs(reqs, `${backend} backend`), () => {
    let topo: Topology;
    let dir: string;
    let hub: HubProc;
    let tokens: Record<string, string>;
    const agents: Record<string, Proc> = {};
    const csv = (n: string) => join(dir, `${n}.csv`);

    const send = async (from: string, ip: string, bantime: number) => {
      const p = tsx("ban.ts", ["ban", ip, "--jail", "sshd", "--bantime", String(bantime), "--hub", hub.url, "--token-file", tokens[from], "--spool", join(dir, `${from}-spool`)], { netns: topo.ns("hub"), name: `ban ${ip}` });
      assert.equal((await p.closed).code, 0, p.output());
    };
    const reachable = (to: string, family: 4 | 6) => tcpProbe(topo, "attacker", to, PORT, 400, { family });
    const agentArgs = (n: string, hubUrl: string) => ["--hub", hubUrl, "--token-file", tokens[n] ?? tokens.a1, "--backend", backend, "--csv", csv(n), "--heartbeat", "2"];

    before(async () => {
      dir = await mkdtemp(join(tmpdir(), `banshare-poison-${backend}-`));
      topo = await createTopology(["hub", "a1", "a2", "a3", "a4", "attacker"], { prefix: `bp${backend.slice(0, 3)}` });
      tokens = await enrol(dir, [["web1", "node"], ["web2", "node"], ["a1", "node"], ["a2", "node"], ["a3", "node"], ["a4", "node"]]);
      hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--listen", `${topo.ip("hub")}:7700`, "--heartbeat", "2"], { netns: topo.ns("hub") });
      for (const n of ["a1", "a2", "a3"]) await startTcpListener(topo, n, PORT);
    });

    after(async () => {
      for (const p of Object.values(agents)) await p.stop("SIGTERM", 5000);
      await hub?.proc.stop("SIGTERM", 5000);
      await topo?.destroy();
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    test("a bantime above nft's timeout limit and a /128 inside another node's /64 leave every other ban enforced, on a connected agent and a fresh one", async () => {
      agents.a1 = await startAgentProc("a1", agentArgs("a1", hub.url), { netns: topo.ns("a1") });
      // web1 and web2 have no agent: a1 (connected) gets each claim as a live event.
      await send("web1", "2001:db8:77::/64", 600);
      await send("web2", "2001:db8:77::5", 7200);
      await send("web1", "198.51.100.9", MAX_BANTIME_S);
      await send("web2", topo.ip("attacker"), 600);
      await send("web2", topo.ip6("attacker"), 600);
      await send("web1", "203.0.113.50", 600);
      // a2 starts now: everything arrives in its full sync, one reconcile.
      agents.a2 = await startAgentProc("a2", agentArgs("a2", hub.url), { netns: topo.ns("a2") });
      const cap = backend === "nftables" ? 99_999_999 : 2_147_483;
      for (const n of ["a1", "a2"]) {
        await waitFor(async () => !(await reachable(n, 4)) && !(await reachable(n, 6)), `the attacker blocked on ${n}`);
        const held = await waitFor(async () => {
          const k = await kernelEntries(topo, n, backend);
          return k.has("203.0.113.50") && k.has("198.51.100.9") && k.has("2001:db8:77::/64") ? k : undefined;
        }, `every ban in ${n}'s kernel`);
        assert.equal(held.has("2001:db8:77::5"), false, `${n}: the /128 is left out while the /64 covering it is blocked`);
        assert.ok(held.get("2001:db8:77::/64")! > 3600, `${n}: the /64's kernel entry lasts as long as the /128 inside it (${held.get("2001:db8:77::/64")} s left)`);
        const long = held.get("198.51.100.9")!;
        assert.ok(long <= cap && long > cap - 120, `${n}: the 10-year ban is capped at the kernel's limit (${long} s)`);
        assert.doesNotMatch(agents[n].output(), /reconcile failed|kernel refused/, `${n}: ${agents[n].output()}`);
        assert.equal(rows(csv(n), "REJECT", "198.51.100.9").length + rows(csv(n), "REJECT", "2001:db8:77::5").length, 0);
      }
    });

    if (backend === "nftables") {
      test("an entry the kernel refuses (an element someone else added overlaps it) costs only itself: the rest of its batch lands, with one REJECT row", async () => {
        // Networks go to the interval set v6net, where a network inside another is refused; addresses go to hash sets.
        await topo.exec("a1", "nft", ["add", "element", "inet", "banshare", "v6net", "{ 2001:db8:88::/64 }"]);
        // One ban.ts run per address, sent together: the agent applies what arrives in one batch.
        await Promise.all([send("web1", "2001:db8:88::/96", 600), send("web1", "203.0.113.60", 600), send("web2", "2001:db8:89::1", 600)]);
        await waitFor(async () => {
          const k = await kernelEntries(topo, "a1", "nftables");
          return k.has("203.0.113.60") && k.has("2001:db8:89::1");
        }, "the valid entries in a1's kernel");
        const rejected = await waitFor(() => rows(csv("a1"), "REJECT", "2001:db8:88::/96"), "a REJECT row for the refused entry");
        assert.equal(rejected.length, 1);
        assert.match(rejected[0].detail, /^kernel refused: .*interval overlaps with an existing one/);
        assert.equal(rows(csv("a2"), "REJECT", "2001:db8:88::/96").length, 0, "a2's kernel took it");
      });
    }

    test("a hostile hub's loopback, multicast, broadcast, reserved, NAT64 and too-broad addresses, a 25 MB sync and endless chunks reach no kernel and crash no agent; valid entries in the same frames land", async () => {
      const now = Date.now();
      const e = (ip: string, seq: number, origin = "evil"): FleetEvent => ({ seq: String(seq), kind: "ban", ip, origin, jail: "sshd", until: now + 600_000, detectedAt: now, id: `${origin}-${seq}`, relayedAt: now });
      const HOSTILE = ["127.0.0.53", "224.0.0.251", "239.255.255.250", "255.255.255.255", "0.1.2.3", "240.0.0.1", "128.0.0.0/1", "ff02::fb", "ff00::/8", "64:ff9b::/96", "64:ff9b::7f00:35", "::1", "fe80::1"];
      const VALID = ["203.0.113.10", "203.0.113.11", "203.0.113.12", "2001:db8:99::12"];
      const loopback = Array.from({ length: 150_000 }, (_, i) => e(`127.${1 + ((i >> 16) & 255)}.${(i >> 8) & 255}.${i & 255}`, 100 + i));
      const trigger = (k: string) => join(dir, `go-${k}`);
      const welcome = { send: { type: "welcome", v: 1, hub: "evil-hub", node: "a3", role: "node", seq: "1" } };
      const scenario = {
        connections: [
          [
            welcome,
            { send: { type: "sync", full: true, seq: "2", more: true, events: [e(VALID[0], 2, "web1"), ...HOSTILE.map((ip, i) => e(ip, 3 + i)), { kind: "bogus" }] } },
            { send: { type: "sync", full: true, seq: "3", events: [...loopback, e(VALID[1], 99, "web1")] } },
            { send: { type: "event", ...e("127.0.0.1", 200_000) } },
            { send: { type: "event", ...e("224.0.0.1", 200_001) } },
            { send: { type: "event", ...e(VALID[2], 200_002, "web1") } },
            { send: { type: "sync", full: false, seq: "200004", events: [e("64:ff9b::e000:1", 200_003), e(VALID[3], 200_004, "web2")] } },
            { untilFile: trigger("1") },
            { close: true },
          ],
          [welcome, { endless: { type: "sync", full: true, seq: "9", more: true, events: [e("203.0.113.99", 9, "web1"), ...HOSTILE.map((ip, i) => e(ip, 10 + i))] } }, { untilFile: trigger("2") }, { close: true }],
          [welcome],
        ],
      };
      await writeFile(join(dir, "scenario.json"), JSON.stringify(scenario));
      const fake = spawnProc(process.execPath, [join(REPO_ROOT, "test/fixtures/hostile-hub.mjs"), topo.ip("hub"), "7701", join(dir, "scenario.json")], { netns: topo.ns("hub"), name: "hostile-hub" });
      await fake.waitForLine(/hostile hub listening/, 10_000);
      const agent = tsx("agent.ts", agentArgs("a3", `ws://${topo.ip("hub")}:7701`), { netns: topo.ns("a3"), name: "a3" });
      agents.a3 = agent;
      const alive = () => assert.equal(agent.exitInfo(), undefined, `the agent ended: ${agent.output().slice(-3000)}`);
      const exactlyValid = async (what: string) => {
        const k = await kernelEntries(topo, "a3", backend);
        assert.deepEqual([...k.keys()].sort(), [...VALID].sort(), `${what}: a3's kernel holds the valid entries and nothing else`);
      };

      await waitFor(async () => (await kernelEntries(topo, "a3", backend)).has(VALID[3]) || agent.exitInfo(), "the valid entries in a3's kernel", 60_000);
      alive();
      await exactlyValid("after the hostile sync and events");
      for (const ip of ["127.0.0.53", "128.0.0.0/1", "64:ff9b::/96", "255.255.255.255", "127.0.0.1"]) assert.equal(rows(csv("a3"), "REJECT", ip).length, 1, `one REJECT row for ${ip}`);
      assert.equal(await reachable("a3", 4), true, "the attacker was never banned here");

      // Endless chunks: the agent stays up, its kernel unchanged, until the hub gives up.
      await writeFile(trigger("1"), "");
      await fake.waitForLine(/connection 2/, 20_000);
      await new Promise((r) => setTimeout(r, 3000));
      alive();
      await exactlyValid("during endless chunks");
      await writeFile(trigger("2"), "");
      await fake.waitForLine(/connection 3/, 40_000);
      alive();
      await exactlyValid("after endless chunks");
      assert.doesNotMatch(agent.output(), /Maximum call stack|RangeError|heap out of memory/);
      await fake.stop("SIGTERM", 5000);
    });
  });
}
