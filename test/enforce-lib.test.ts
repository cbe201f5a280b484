/**
 * test/lib/enforce.ts on the real kernel, without banshare: the probe sees a Docker-published
 * port through FORWARD, a DROP in DOCKER-USER blocks it, a DROP in INPUT does not (the hole
 * issue 13 describes), a tampering opens it again, and dockerd's start puts its own rules above
 * anything at the top of FORWARD. Then each tampering of the table against hand-made copies of
 * the objects banshare's agent makes, to show it removes what it claims to.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  banshareObjects,
  describeTimeline,
  dockerPath,
  dockerRestart,
  gaps,
  snapshotRuleset,
  startProbe,
  TAMPER_HITS,
  TAMPERS,
  timeToState,
  type DockerPath,
  type Probe,
  type TamperName,
} from "./lib/enforce.ts";
import { createTopology, startTcpListener, tcpProbe, type Topology } from "./lib/netns.ts";
import { needs } from "./lib/skip.ts";

describe("gaps() and timeToState() read a probe's timeline", () => {
  const tl = (states: string) => [...states].map((c, i) => ({ at: 1000 + i * 100, state: c === "o" ? ("open" as const) : ("blocked" as const), how: c === "o" ? ("connected" as const) : ("timeout" as const), ms: 1 }));

  test("gaps() returns the runs of open samples from a moment on", () => {
    const t = tl("oobbobbboo"); // at 1000 .. 1900
    assert.deepEqual(gaps(t, 1200), [
      { from: 1400, to: 1500, samples: 1, ongoing: false },
      { from: 1800, to: 1900, samples: 2, ongoing: true },
    ]);
    assert.deepEqual(gaps(t, 0)[0], { from: 1000, to: 1200, samples: 2, ongoing: false });
    assert.deepEqual(gaps(tl("bbbb"), 0), []);
  });

  test("timeToState() is the time to the first sample of the final run of a state", () => {
    assert.equal(timeToState(tl("oobbobbbbb"), 1050, "blocked"), 450); // the final blocked run starts at 1500
    assert.equal(timeToState(tl("bbbbb"), 1150, "blocked"), 50); // never changed: the next sample
    assert.equal(timeToState(tl("bbbbo"), 1000, "blocked"), undefined); // ends open
    assert.equal(timeToState(tl("oooo"), 1000, "open"), 0);
  });

  test("describeTimeline() folds runs into one line", () => {
    assert.equal(describeTimeline(tl("oobbb"), 1100), "-100 open×2, +100 blocked×3 (timeout)");
  });
});

describe("the probe and the Docker path on the real kernel", needs(["root", "netns", "iptables", "ip6tables"], "enforce-lib kernel"), () => {
  let topo: Topology;
  let docker: DockerPath;
  let probe: Probe;
  let host: string; // the host's namespace
  const ipt = async (args: string[]) => (await topo.exec("host", "iptables", ["-w", ...args])).stdout as string;

  before(async () => {
    topo = await createTopology(["attacker", "host"], { prefix: "bsenf" });
    host = topo.ns("host");
    docker = await dockerPath(topo, "host");
    await snapshotRuleset(host); // Docker's rules and nothing else: the "rules file" of iptables-restore
    probe = await startProbe(topo, "attacker", "host", docker.port);
  });

  after(async () => {
    await probe?.stop();
    await docker?.destroy();
    await topo?.destroy();
  });

  test("the attacker reaches the published port; the container sees its own address (routed, not proxied)", async () => {
    await probe.waitFor("open", 5000, { since: 0, consecutive: 3 });
    assert.ok(docker.listener.accepts().includes(topo.ip("attacker")), `container saw ${docker.listener.accepts().slice(0, 3).join(", ")}`);
    assert.notEqual(docker.containerIp, topo.ip("host"));
  });

  test("a DROP only in INPUT blocks the host's own port but not the Docker path", async () => {
    await startTcpListener(topo, "host", 2222);
    assert.equal(await tcpProbe(topo, "attacker", "host", 2222), true);
    await ipt(["-I", "INPUT", "1", "-s", topo.ip("attacker"), "-j", "DROP"]);
    const t = Date.now();
    try {
      assert.equal(await tcpProbe(topo, "attacker", "host", 2222, 300), false, "INPUT's DROP blocks the host's own service");
      await probe.waitFor("open", 5000, { since: t, consecutive: 5 });
      assert.deepEqual(probe.timeline().filter((s) => s.at >= t && s.state === "blocked"), [], describeTimeline(probe.timeline(), t));
    } finally {
      await ipt(["-D", "INPUT", "-s", topo.ip("attacker"), "-j", "DROP"]);
    }
  });

  test("a DROP in DOCKER-USER blocks the Docker path within a second; iptables-restore of the saved rules opens it again", async (t) => {
    await ipt(["-I", "DOCKER-USER", "1", "-s", topo.ip("attacker"), "-j", "DROP"]);
    const banned = Date.now();
    await probe.waitFor("blocked", 1000, { since: banned });
    await probe.waitFor("blocked", 2000, { since: banned, consecutive: 5 });
    const firstBlocked = probe.timeline().find((s) => s.at >= banned && s.state === "blocked")!;
    assert.equal(firstBlocked.how, "timeout", "a DROP reads as a connect timeout");

    const tampered = Date.now();
    await TAMPERS["iptables-restore"](host);
    await probe.waitFor("open", 2000, { since: tampered, consecutive: 3 });
    const tl = await probe.stop();
    const g = gaps(tl, banned);
    assert.equal(g.length, 1, describeTimeline(tl, banned));
    assert.ok(g[0].ongoing && g[0].from >= tampered, describeTimeline(tl, banned));
    assert.equal(gaps(tl.filter((s) => s.at < tampered), banned).length, 0, "blocked from the DROP until the tampering");
    assert.equal(timeToState(tl, tampered, "open"), g[0].from - tampered);
    t.diagnostic(`timeline from the DROP: ${describeTimeline(tl, banned)}`);
    t.diagnostic(`blocked ${timeToState(tl.filter((s) => s.at < tampered), banned, "blocked")} ms after the DROP, open ${timeToState(tl, tampered, "open")} ms after the tampering`);
    probe = await startProbe(topo, "attacker", "host", docker.port);
  });

  test("dockerRestart() puts Docker's ACCEPT above a DROP at the top of FORWARD, and keeps DOCKER-USER's rules", async () => {
    await ipt(["-I", "FORWARD", "1", "-s", topo.ip("attacker"), "-j", "DROP"]);
    const t1 = Date.now();
    await probe.waitFor("blocked", 2000, { since: t1, consecutive: 3 });
    await dockerRestart(host);
    const first = (await ipt(["-S", "FORWARD"])).split("\n")[1]; // [0] is "-P FORWARD DROP"
    assert.equal(first, "-A FORWARD -j DOCKER-USER");
    const t2 = Date.now();
    await probe.waitFor("open", 2000, { since: t2, consecutive: 3 }); // the FORWARD DROP now comes after Docker's ACCEPT

    await dockerRestart(host, undefined, { fresh: false }); // its rules are there: the FORWARD DROP stays below them
    assert.equal((await ipt(["-S", "FORWARD"])).split("\n")[7], `-A FORWARD -s ${topo.ip("attacker")}/32 -j DROP`);

    await ipt(["-I", "DOCKER-USER", "1", "-s", topo.ip("attacker"), "-j", "DROP"]);
    const t3 = Date.now();
    await probe.waitFor("blocked", 2000, { since: t3, consecutive: 3 });
    await docker.restart();
    const t4 = Date.now();
    await probe.waitFor("blocked", 2000, { since: t4, consecutive: 5 });
    assert.deepEqual(probe.openSince(t3), [], describeTimeline(probe.timeline(), t3));
    const user = await ipt(["-S", "DOCKER-USER"]);
    assert.match(user, /-A DOCKER-USER -s \S+ -j DROP\n-A DOCKER-USER -j RETURN/);
  });
});

describe("each tampering removes what it targets", needs(["root", "netns", "iptables", "ip6tables", "ipset", "nft"], "enforce-lib tampers"), () => {
  let topo: Topology;
  let ns: string;
  const o = banshareObjects();
  const run = async (cmd: string, args: string[], input?: string) => (await topo.exec("a1", cmd, args, { input, reject: false })) as { exitCode: number; stdout: string };
  const ok = async (cmd: string, args: string[]) => (await run(cmd, args)).exitCode === 0;

  /** By hand, what the ipset and nftables backends set up (agent.ts: ipsetSetupCommands, jumpCommands, nftSetupScript), plus hooks in DOCKER-USER. */
  async function build() {
    await run("nft", ["flush", "ruleset"]);
    await run("ipset", ["destroy"]);
    await run("iptables", ["-w", "-N", "DOCKER-USER"]); // Docker's hook, as dockerRestart() makes it
    await run("iptables", ["-w", "-I", "FORWARD", "1", "-j", "DOCKER-USER"]);
    for (const [bin, fam, set, addr] of [["iptables", "inet", o.sets.v4, "10.66.0.9"], ["ip6tables", "inet6", o.sets.v6, "fd00:66::9"]] as const) {
      await run("ipset", ["create", set, "hash:net", "family", fam, "timeout", "0"]);
      await run("ipset", ["add", set, addr]);
      await run(`${bin}-restore`, ["--noflush"], `*filter\n:${o.chain} - [0:0]\n-A ${o.chain} -m set --match-set ${set} src -j DROP\nCOMMIT\n`);
      await run(bin, ["-w", "-I", "INPUT", "1", ...o.inputJump]);
      await run(bin, ["-w", "-N", "DOCKER-USER"]); // exists in v4 already
      await run(bin, ["-w", "-I", "DOCKER-USER", "1", "-j", o.chain]);
    }
    await run("nft", ["-f", "-"], `table inet ${o.nftTable} {\n set v4 { type ipv4_addr; flags interval,timeout; elements = { 10.66.0.9 } }\n chain input { type filter hook input priority filter - 10; ip saddr @v4 drop; }\n}\n`);
  }
  /** Which of the objects are there (read-only checks, run at once). */
  const state = async () => {
    const [inputJump, inputJump6, userJump, chainRule, chain, set, setMember, nftTable, forward] = await Promise.all([
      ok("iptables", ["-w", "-C", "INPUT", ...o.inputJump]),
      ok("ip6tables", ["-w", "-C", "INPUT", ...o.inputJump]),
      ok("iptables", ["-w", "-C", "DOCKER-USER", "-j", o.chain]),
      ok("iptables", ["-w", "-C", o.chain, "-m", "set", "--match-set", o.sets.v4, "src", "-j", "DROP"]),
      ok("iptables", ["-w", "-S", o.chain]),
      ok("ipset", ["list", "-n", o.sets.v4]),
      ok("ipset", ["test", o.sets.v4, "10.66.0.9"]),
      ok("nft", ["list", "table", "inet", o.nftTable]),
      run("iptables", ["-w", "-S", "FORWARD"]),
    ]);
    return { inputJump, inputJump6, userJump, chainRule, chain, set, setMember, nftTable, dockerUserFirst: forward.stdout.split("\n")[1] === "-A FORWARD -j DOCKER-USER" };
  };
  type State = Awaited<ReturnType<typeof state>>;
  const all: State = { inputJump: true, inputJump6: true, userJump: true, chainRule: true, chain: true, set: true, setMember: true, nftTable: true, dockerUserFirst: true };
  const EXPECT: Record<TamperName, Partial<State>> = {
    "iptables -F": { inputJump: false, inputJump6: false, userJump: false, chainRule: false, dockerUserFirst: false },
    "iptables -D INPUT": { inputJump: false, inputJump6: false },
    "iptables -D DOCKER-USER": { userJump: false },
    "ipset flush": { setMember: false },
    "ipset destroy": { inputJump: false, inputJump6: false, userJump: false, chainRule: false, dockerUserFirst: false, set: false, setMember: false },
    "iptables-restore": { inputJump: false, inputJump6: false, userJump: false, chainRule: false, chain: false, dockerUserFirst: false },
    "nft flush ruleset": { inputJump: false, inputJump6: false, userJump: false, chainRule: false, chain: false, dockerUserFirst: false, nftTable: false },
    "nft delete table": { nftTable: false },
    "docker restart": {},
  };

  before(async () => {
    topo = await createTopology(["a1"], { prefix: "bsenf" });
    ns = topo.ns("a1");
    await snapshotRuleset(ns); // nothing yet: restore = an empty filter table
  });
  after(() => topo?.destroy());

  for (const name of Object.keys(TAMPERS) as TamperName[]) {
    test(`${name} (hits ${TAMPER_HITS[name].join(", ")})`, async () => {
      await build();
      assert.deepEqual(await state(), all, "the hand-made banshare objects are all there");
      if (name === "docker restart") await run("iptables", ["-w", "-I", "FORWARD", "1", "-j", o.chain]);
      await TAMPERS[name](ns);
      assert.deepEqual(await state(), { ...all, ...EXPECT[name] });
      if (name === "docker restart") assert.equal((await run("iptables", ["-w", "-S", "FORWARD"])).stdout.split("\n").indexOf(`-A FORWARD -j ${o.chain}`), 7, "below Docker's six rules");
    });
  }
});
