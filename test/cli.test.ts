/**
 * The operator's commands of ban.ts as real processes against a real hub on loopback: list
 * (table and JSON), status, unban --all-nodes, import of Fail2Ban's three outputs, and a real
 * Fail2Ban restart whose restored ban keeps its original end.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { BanList } from "../messages.ts";
import { f2bTime, REPO_DIR, startFail2ban } from "./lib/fail2ban.ts";
import { enrol, rows, runBan, startAgentProc, startFleet, startHubProc, waitFor, type Fleet, type HubProc } from "./lib/fleet.ts";
import { createTopology, type Topology } from "./lib/netns.ts";
import { REPO_ROOT, stopAll } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

const TSX = import.meta.resolve("tsx");

/** Runs ban.ts to completion with stdout and stderr apart. */
function runCli(args: string[], input?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, ["--import", TSX, join(REPO_ROOT, "ban.ts"), ...args], { cwd: REPO_ROOT, timeout: 120_000, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr });
    });
    child.stdin!.end(input ?? "");
  });
}

describe("ban.ts as a process: list, status, unban --all-nodes and import do what they print against a real hub", () => {
  let fleet: Fleet;
  let dir: string;
  let tokens: Record<string, string>;
  let hub: HubProc;
  const hubCsv = () => fleet.csv("hub");
  const cli = (node: string, ...args: string[]) => runCli([...args, "--hub", hub.url, "--token-file", tokens[node], "--timeout", "5"]);
  const cliIn = (node: string, input: string, ...args: string[]) => runCli([...args, "--hub", hub.url, "--token-file", tokens[node], "--timeout", "5"], input);
  const list = async (): Promise<BanList> => {
    const r = await cli("root", "list", "--json");
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout) as BanList;
  };
  const claimsOf = (l: BanList, ip: string) => l.bans.find((b) => b.ip === ip)?.claims ?? [];

  before(async () => {
    fleet = await startFleet({ nodes: [["web1", "node"], ["web2", "node"], ["f2b", "node"], ["watcher", "reader"], ["root", "admin"]], journal: true });
    ({ dir, hub, tokenFiles: tokens } = fleet);
  });

  after(() => fleet?.stop());

  test("list shows every node's claims, newest first, as a table and as the hub's JSON", async () => {
    const t0 = Math.floor(Date.now() / 1000) - 60;
    for (const [node, ip, bantime, time] of [["web1", "203.0.113.7", 600, t0], ["web2", "203.0.113.7", 1200, t0 + 1], ["web2", "198.51.100.23", -1, t0 + 2]] as const) {
      const r = await runCli(["ban", ip, "--bantime", String(bantime), "--time", String(time), "--hub", hub.url, "--token-file", tokens[node], "--spool", join(dir, "spool")]);
      assert.equal(r.code, 0, r.stderr);
    }
    const l = await list();
    const a = l.bans.find((b) => b.ip === "203.0.113.7")!;
    assert.equal(a.nodes, 2);
    assert.deepEqual(a.claims.map((c) => [c.origin, c.jail, c.detectedAt, c.until]).sort(), [["web1", "sshd", t0 * 1000, t0 * 1000 + 600_000], ["web2", "sshd", (t0 + 1) * 1000, (t0 + 1) * 1000 + 1_200_000]]);
    assert.ok(a.claims.every((c) => /^\d+$/.test(c.seq)));
    assert.deepEqual(claimsOf(l, "198.51.100.23").map((c) => [c.origin, c.until]), [["web2", null]]);
    assert.equal(l.count, l.bans.length);

    const text = await cli("root", "list");
    assert.equal(text.code, 0, text.stderr);
    const lines = text.stdout.trimEnd().split("\n");
    const at = (ip: string) => lines.findIndex((x) => x.startsWith(ip));
    assert.ok(at("198.51.100.23") > 0 && at("198.51.100.23") < at("203.0.113.7"), `newest first:\n${text.stdout}`);
    assert.match(lines[at("203.0.113.7")], /^203\.0\.113\.7\s+2\s+web2\s+sshd\s+\S+ \S+\s+\d+m\d\ds$/);
    assert.match(lines[at("203.0.113.7") + 1], /^\s+web1\s+sshd\s/);
    assert.match(lines[at("198.51.100.23")], /permanent$/);
    assert.match(lines.at(-1)!, /address\(es\) blocked/);
  });

  test("list is refused for a node's token, with the hub's reason", async () => {
    const r = await cli("web1", "list");
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.match(r.stderr, /^ban\.ts: hub refused: forbidden: Only an admin can list/);
    assert.equal(r.stderr.trim().split("\n").length, 1);
    assert.ok(rows(hubCsv(), "REJECT", "").some((x) => x.origin === "web1" && /forbidden/.test(x.detail)));
  });

  test("status reports the hub, the node, the agent's cursor and the fleet counts; exit 1 when the hub is stopped", async () => {
    const state = join(dir, "web1-agent.state");
    const agent = await startAgentProc("web1", ["--hub", hub.url, "--token-file", tokens.web1, "--backend", "dry-run", "--state", state]);
    await waitFor(() => existsSync(state), "the agent to save its state");
    const whoami = await (await fetch(hub.url.replace("ws", "http") + "/v1/whoami", { headers: { authorization: `Bearer ${readFileSync(tokens.web1, "utf8").trim()}` } })).json();
    assert.equal(whoami.node, "web1");
    const r = await cli("web1", "status", "--state", state, "--backend", "dry-run");
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, new RegExp(`^hub:\\s+${hub.url} reachable, \\d+ ms round trip; hub id ${whoami.hub}, seq \\d+$`, "m"));
    assert.match(r.stdout, /^node:\s+web1 \(role node\)$/m);
    assert.match(r.stdout, new RegExp(`^fleet:\\s+${whoami.blocked} address\\(es\\) blocked by ${whoami.claims} claim\\(s\\) \\(what this node's agent holds\\)$`, "m"));
    assert.match(r.stdout, new RegExp(`^agent:\\s+cursor ${whoami.hub}:\\d+, \\d+ claim\\(s\\); \\d+ event\\(s\\) behind the hub \\(${state.replace(/[.]/g, "\\.")}`, "m"));
    assert.match(r.stdout, /^kernel:\s+dry-run backend/m);
    await agent.stop("SIGTERM", 5000);

    const gone = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0"]);
    await gone.proc.stop("SIGTERM", 5000);
    const down = await runCli(["status", "--backend", "dry-run", "--hub", gone.url, "--token-file", tokens.web1, "--timeout", "2"]);
    assert.equal(down.code, 1);
    assert.match(down.stdout, new RegExp(`^hub:\\s+${gone.url} unreachable: .*ECONNREFUSED`, "m"));
    assert.doesNotMatch(down.stdout, /^node:/m);
  });

  test("unban --all-nodes by an admin lifts every node's claim; a node's is refused and not spooled", async () => {
    const ip = "192.0.2.99";
    for (const node of ["web1", "web2"]) assert.equal((await cli(node, "ban", ip, "--spool", join(dir, "spool"))).code, 0);
    assert.equal(claimsOf(await list(), ip).length, 2);
    const spool = join(dir, "web1-all-spool");
    const refused = await cli("web1", "unban", ip, "--all-nodes", "--spool", spool);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /forbidden: Only an admin can unban for every node/);
    assert.equal(existsSync(spool), false, "a refused admin unban was spooled");
    assert.equal(claimsOf(await list(), ip).length, 2);
    const ok = await cli("root", "unban", ip, "--all-nodes");
    assert.equal(ok.code, 0, ok.stderr);
    assert.deepEqual(claimsOf(await list(), ip), []);
    assert.ok(rows(hubCsv(), "RECEIVE", ip).some((x) => x.origin === "*"));
  });

  test("import of `fail2ban-client banned` output publishes each jail's addresses with --bantime", async () => {
    const before = Date.now();
    const r = await cliIn("web1", "[{'sshd': ['192.0.2.1', '198.51.100.7']}, {'recidive': ['198.51.100.8', '999.1.1.1']}, {'empty': []}]\n", "import", "-", "--bantime", "3600");
    assert.equal(r.code, 1, "a bad address makes the exit 1");
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, /^ban\.ts: import: line 1: .*"999\.1\.1\.1"/);
    assert.match(r.stdout, /^imported 3 of 3 ban\(s\) to .* as web1 \(1 bad line\(s\)\)$/m);
    const l = await list();
    for (const [ip, jail] of [["192.0.2.1", "sshd"], ["198.51.100.7", "sshd"], ["198.51.100.8", "recidive"]]) {
      const [c] = claimsOf(l, ip);
      assert.equal(c?.origin, "web1", ip);
      assert.equal(c.jail, jail);
      assert.ok(c.detectedAt >= before - 1000 && c.detectedAt <= Date.now());
      assert.equal(c.until! - c.detectedAt, 3_600_000);
    }
  });

  test("import of `get JAIL banip --with-time` output keeps each ban's original start and bantime; a second import changes nothing", async () => {
    const start = Math.floor(Date.now() / 1000) * 1000 - 7_200_000;
    const input = [
      `192.0.2.40 \t${f2bTime(start)} + 86400 = ${f2bTime(start + 86_400_000)}`,
      `192.0.2.41 \t${f2bTime(start + 1000)} + -1 = 9999-12-31 23:59:59`,
      `192.0.2.42 \t${f2bTime(start)} + 600 = ${f2bTime(start + 600_000)}`,
      "",
    ].join("\n");
    const file = join(dir, "with-time.txt");
    await writeFile(file, input);
    const r = await cli("web2", "import", file, "--jail", "recidive");
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^imported 2 of 2 ban\(s\) .* \(1 already over, skipped\)$/m);
    const l = await list();
    assert.deepEqual(claimsOf(l, "192.0.2.40").map((c) => [c.origin, c.jail, c.detectedAt, c.until]), [["web2", "recidive", start, start + 86_400_000]]);
    assert.deepEqual(claimsOf(l, "192.0.2.41").map((c) => [c.detectedAt, c.until]), [[start + 1000, null]]);
    assert.deepEqual(claimsOf(l, "192.0.2.42"), [], "a ban that already ended was imported");
    const again = await cli("web2", "import", file, "--jail", "recidive");
    assert.equal(again.code, 0, again.stderr);
    assert.equal((await list()).seq, l.seq, "importing the same bans again changed the hub");
  });

  test("import of a plain address list takes --bantime and now; bad lines are reported and the rest imported", async () => {
    const r = await cliIn("web1", "# from the old blocklist\n192.0.2.60\n\n2001:db8::60  # v6\nnot-an-address\n192.0.2.61\n", "import", "--bantime", "900");
    assert.equal(r.code, 1);
    assert.deepEqual(r.stderr.trim().split("\n").map((x) => x.replace(/: Expected.*/, "")), ["ban.ts: import: line 5"]);
    assert.match(r.stdout, /^imported 3 of 3 ban\(s\)/m);
    const l = await list();
    for (const ip of ["192.0.2.60", "2001:db8::60", "192.0.2.61"]) {
      const [c] = claimsOf(l, ip);
      assert.equal(c?.until! - c.detectedAt, 900_000, ip);
    }
    const reader = await cliIn("watcher", "192.0.2.62\n", "import");
    assert.equal(reader.code, 1);
    assert.match(reader.stderr, /reader role and cannot publish; nothing imported/);
  });

  test("a ban Fail2Ban restores after a restart keeps its original detection time and end", needs(["root", "fail2ban-server", "fail2ban-client"], "fail2ban"), async () => {
    const ip = "192.0.2.77";
    const config = join(dir, "f2b-ban.json");
    await writeFile(config, JSON.stringify({ hub: hub.url, "token-file": tokens.f2b, timeout: 5, spool: join(dir, "f2b-spool") }));
    const record = join(dir, "f2b-record.txt");
    const opts = {
      dir: join(dir, "f2b"),
      logFile: join(dir, "f2b-sshd.log"),
      bantime: 600,
      db: "file" as const,
      actions: `banshare[banshare_dir=${REPO_DIR}, node=${process.execPath}, config=${config}]\nrecord[file=${record}]`,
    };
    let f2b = await startFail2ban(opts);
    try {
      await f2b.client(["set", f2b.jail, "banip", ip]);
      const [first] = claimsOf(await list(), ip);
      assert.equal(first?.origin, "f2b");
      assert.equal(first.until! - first.detectedAt, 600_000);
      // Restart a second later: a ban re-sent with "now" would start (and end) later.
      await new Promise((r) => setTimeout(r, 1500));
      await f2b.stop();
      f2b = await startFail2ban(opts);
      await waitFor(() => existsSync(record) && readFileSync(record, "utf8").includes(`ban ${ip} sshd 600 1`), "Fail2Ban to restore the ban", 20_000);
      // (Not any ERROR: the helper's readiness poll may ask for the jail before it exists.)
      assert.doesNotMatch(readFileSync(f2b.logTarget, "utf8"), /ERROR\s.*(banshare|Failed to execute|returned \d)/, "the banshare action failed on the restored ban");
      assert.equal(existsSync(join(dir, "f2b-spool")), false, "the restored ban was spooled, not sent");
      assert.deepEqual(claimsOf(await list(), ip), [first], "the restored ban changed the claim");
      // Taken once; the restored one is a trace that says nothing changes.
      await waitFor(() => rows(hubCsv(), "RECEIVE", ip).length === 2, "the hub's row for the restored ban");
      const [taken, restored] = rows(hubCsv(), "RECEIVE", ip);
      assert.doesNotMatch(taken.detail, /nothing changes/);
      assert.match(restored.detail, /no newer than the claim f2b holds \(a ban Fail2Ban restored after a restart, or a late one\); nothing changes$/, "the restored ban was taken as a new one");
    } finally {
      await f2b.stop();
    }
  });
});

describe("ban.ts status compares the kernel set's addresses with the hub's, not only their count", needs(["root", "netns", "ipset", "iptables"]), () => {
  let topo: Topology | undefined;
  let dir: string;
  after(async () => {
    await stopAll();
    await topo?.destroy();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("an ipset holding as many entries as the hub blocks, but other addresses: status names the 1 missing and 1 extra", async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-status-"));
    const tokens = await enrol(dir, [["pub", "node"], ["a1", "node"]]);
    topo = await createTopology(["hub", "a1"], { prefix: "bst" });
    const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") });
    for (const ip of ["198.51.100.7", "198.51.100.8"]) {
      const r = await runBan(["ban", ip, "--hub", hub.url, "--token-file", tokens.pub, "--spool", join(dir, "spool")], { netns: topo.ns("a1") });
      assert.equal(r.code, 0, r.output);
    }
    const agent = await startAgentProc("a1", ["--hub", hub.url, "--token-file", tokens.a1, "--backend", "ipset"], { netns: topo.ns("a1") });
    const status = () => runBan(["status", "--backend", "ipset", "--hub", hub.url, "--token-file", tokens.a1], { netns: topo!.ns("a1") });
    assert.match((await status()).output, /^kernel:\s+2 entries in ipset banshare-v4, banshare-v6 \(hub: 2 blocked\): in step: the same addresses$/m);
    // The agent stopped (its entries stay), someone swaps one entry: the count still matches.
    await agent.stop();
    await topo.exec("a1", "ipset", ["del", "banshare-v4", "198.51.100.8"]);
    await topo.exec("a1", "ipset", ["add", "banshare-v4", "203.0.113.9", "timeout", "600"]);
    const r = await status();
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /^kernel:\s+2 entries in ipset banshare-v4, banshare-v6 \(hub: 2 blocked\): 1 missing \(198\.51\.100\.8\), 1 extra \(203\.0\.113\.9\)/m);
    await hub.proc.stop();
  });
});
