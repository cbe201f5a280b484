/**
 * Security of what the clients send and trust (with security-fuzz, -limits and -tls): no token
 * over plain ws:// off loopback and none before the TLS handshake, an admin unban that lifts
 * every claim whatever its date, hub text escaped wherever it is written, a spool only the
 * agent's user can fill, `ban.ts list` at 200,000 claims, a per-node ceiling on live claims,
 * and an agent that follows its hub's name to a new address.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { chmod, chown, mkdir, mkdtemp, open, readdir, rm, symlink, writeFile } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { csvRow, type FleetEvent } from "../messages.ts";
import { enrol, freePort, readCsv, rows, runBan, startAgentProc, startFleet, startHubProc, waitFor, type Fleet } from "./lib/fleet.ts";
import { createTopology, type Topology } from "./lib/netns.ts";
import { onCleanup, REPO_ROOT, spawnProc, stopAll, tsx } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

/** Each test's limit: a client that hangs (one that connects where it should refuse) fails, not blocks the run. */
const LIMIT = { timeout: 180_000 };

/** Process-wide TCP and UDP counters of a namespace (`/proc/net/snmp` as seen inside it). */
async function sent(topo: Topology, node: string): Promise<{ tcpOpens: number; udpOut: number }> {
  const text = String((await topo.exec(node, "cat", ["/proc/net/snmp"])).stdout);
  const field = (proto: string, name: string) => {
    const [head, values] = text.split("\n").filter((l) => l.startsWith(`${proto}:`));
    return Number(values.split(/\s+/)[head.split(/\s+/).indexOf(name)]);
  };
  return { tcpOpens: field("Tcp", "ActiveOpens"), udpOut: field("Udp", "OutDatagrams") };
}

/** A stand-in HTTP "hub" on loopback answering every request with `answer(method, path, body)`. */
async function fakeHttpHub(answer: (method: string, path: string, body: string) => { status: number; body: string }): Promise<{ url: string; server: Server }> {
  const server = createServer((req, res) => {
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      const a = answer(req.method ?? "", req.url ?? "", body);
      res.writeHead(a.status, { "content-type": "application/json" }).end(a.body);
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { url: `ws://127.0.0.1:${(server.address() as { port: number }).port}`, server };
}

/** A ban event as a hub sends it. */
function ev(ip: string, seq: number, origin = "web", now = Date.now()): FleetEvent {
  return { seq: String(seq), kind: "ban", ip, origin, jail: "sshd", until: now + 600_000, detectedAt: now, id: `${origin}-${seq}`, relayedAt: now };
}

// ---------------------------------------------------------------------------------------------
// Item 3: the token and plain ws://

describe("security: no token over plain ws:// off loopback without --insecure, and none before the TLS handshake over wss://", needs(["root", "netns", "openssl"], "security: clients' transport"), () => {
  let topo: Topology;
  let dir: string;
  let tokens: Record<string, string>;
  let capture: string;
  const hubIp = () => topo.ip("hub");
  const strict = { BANSHARE_INSECURE: null };

  before(async () => {
    topo = await createTopology(["hub", "node"], { subnet: 93 });
    dir = await mkdtemp(join(tmpdir(), "banshare-clients-"));
    tokens = await enrol(dir, [["web", "node"], ["tls", "node"]]);
    const cert = tsx("hub.ts", ["gen-cert", "--dir", join(dir, "tls"), "--host", hubIp(), "--days", "2"], { name: "gen-cert" });
    assert.equal((await cert.closed).code, 0, cert.output());
    await startHubProc(["--tokens", join(dir, "tokens"), "--csv", join(dir, "hub.csv"), "--listen", `${hubIp()}:7700`], { netns: topo.ns("hub") });
    await startHubProc(["--tokens", join(dir, "tokens"), "--listen", `${hubIp()}:7702`, "--tls-cert", join(dir, "tls", "hub.pem"), "--tls-key", join(dir, "tls", "hub.key")], { netns: topo.ns("hub"), name: "tls-hub" });
    // A TCP relay in front of the TLS hub that keeps every byte the client sends.
    capture = join(dir, "wire.bin");
    const relay = `const net=require("net"),fs=require("fs");const [h,p,th,tp,out]=process.argv.slice(1);
net.createServer((c)=>{const u=net.connect(+tp,th);c.on("data",(d)=>{fs.appendFileSync(out,d);u.write(d)});u.on("data",(d)=>c.write(d));
for(const s of [c,u]){s.on("error",()=>{});s.on("close",()=>{c.destroy();u.destroy()})}}).listen(+p,h,()=>console.log("relay listening"));`;
    const proxy = spawnProc(process.execPath, ["-e", relay, hubIp(), "7701", hubIp(), "7702", capture], { netns: topo.ns("hub"), name: "relay" });
    await proxy.waitForLine(/relay listening/, 10_000);
  });

  after(async () => {
    await stopAll();
    await topo?.destroy();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("ban.ts refuses a ws:// hub at a non-loopback address in one line, exit 2, before any connection; nothing is spooled", LIMIT, async () => {
    const before = await sent(topo, "node");
    for (const cmd of [["ban", "192.0.2.31"], ["unban", "192.0.2.31"], ["list"], ["status", "--backend", "dry-run"]]) {
      const spool = cmd[0] === "ban" || cmd[0] === "unban" ? ["--spool", join(dir, "spool")] : [];
      const r = await runBan([...cmd, "--hub", `ws://${hubIp()}:7700`, "--token-file", tokens.web, ...spool, "--timeout", "2"], { netns: topo.ns("node"), env: strict });
      assert.equal(r.code, 2, r.output);
      assert.match(r.output, new RegExp(`^ban\\.ts: Expected a wss:// hub off this host, got "ws://${hubIp().replace(/\./g, "\\.")}:7700": plain ws:// would send the token in clear \\(use wss:// with --ca, or --insecure on a network you trust\\)\\n$`));
    }
    assert.deepEqual(await sent(topo, "node"), before, "a connection or datagram left the node");
    assert.equal(existsSync(join(dir, "spool")), false);
    assert.equal(rows(join(dir, "hub.csv"), "RECEIVE", "192.0.2.31").length, 0);
  });

  test("agent.ts refuses it too (exit 2, one line, no connection); with --insecure it connects and warns", LIMIT, async () => {
    const before = await sent(topo, "node");
    const agent = tsx("agent.ts", ["--hub", `ws://${hubIp()}:7700`, "--token-file", tokens.web, "--backend", "dry-run"], { netns: topo.ns("node"), env: strict, name: "agent-plain" });
    assert.equal((await agent.closed).code, 2, agent.output());
    assert.match(agent.output(), /^agent\.ts: Expected a wss:\/\/ hub off this host, got "ws:\/\/10\.93\.0\.1:7700": plain ws:\/\/ would send the token in clear .*--insecure.*\n$/);
    assert.deepEqual(await sent(topo, "node"), before, "a connection or datagram left the node");
    const insecure = await startAgentProc("agent-insecure", ["--hub", `ws://${hubIp()}:7700`, "--token-file", tokens.web, "--backend", "dry-run", "--insecure"], { netns: topo.ns("node"), env: strict });
    assert.match(insecure.output(), /warning: --insecure: ws:\/\/10\.93\.0\.1:7700 is plain ws:\/\/: the token and the bans cross the network unencrypted/);
    await insecure.stop();
    const r = await runBan(["ban", "192.0.2.32", "--hub", `ws://${hubIp()}:7700`, "--token-file", tokens.web, "--spool", join(dir, "spool"), "--insecure"], { netns: topo.ns("node"), env: strict });
    assert.equal(r.code, 0, r.output);
    assert.ok((await sent(topo, "node")).tcpOpens > before.tcpOpens, "the counters see a connection (so the refusals above are proven)");
    await waitFor(() => rows(join(dir, "hub.csv"), "RECEIVE", "192.0.2.32").length, "the hub to receive the --insecure ban");
  });

  test("over wss:// the first byte on the wire is the TLS handshake and the token never appears in clear", LIMIT, async () => {
    const ca = join(dir, "tls", "ca.pem");
    const r = await runBan(["ban", "192.0.2.33", "--hub", `wss://${hubIp()}:7701`, "--ca", ca, "--token-file", tokens.tls, "--spool", join(dir, "spool")], { netns: topo.ns("node"), env: strict });
    assert.equal(r.code, 0, r.output);
    const agent = await startAgentProc("agent-tls", ["--hub", `wss://${hubIp()}:7701`, "--ca", ca, "--token-file", tokens.tls, "--backend", "dry-run"], { netns: topo.ns("node"), env: strict });
    await agent.stop();
    const wire = readFileSync(capture);
    assert.ok(wire.length > 500, "the relay saw the traffic");
    assert.equal(wire[0], 0x16, "the client's first byte is a TLS handshake record");
    const token = readFileSync(tokens.tls, "utf8").trim();
    assert.equal(wire.includes(token), false, "the token crossed the wire in clear");
    assert.equal(wire.includes("uthorization"), false, "an HTTP header crossed the wire in clear");
    const size = wire.length;
    const refused = await runBan(["ban", "192.0.2.34", "--hub", `ws://${hubIp()}:7701`, "--token-file", tokens.tls, "--spool", join(dir, "spool")], { netns: topo.ns("node"), env: strict });
    assert.equal(refused.code, 2, "ws:// to the TLS hub's port is refused before it connects");
    assert.equal(readFileSync(capture).length, size);
  });
});

// ---------------------------------------------------------------------------------------------
// Item 7: an admin's unban for every node

describe("security: an admin's unban for every node lifts claims dated ahead of it, and ban.ts says when one is left", () => {
  let fleet: Fleet;
  before(async () => {
    fleet = await startFleet({ nodes: [["web", "node"], ["db", "node"], ["ops", "admin"]], heartbeat: 5 });
    await fleet.startAgent("db");
  });
  after(() => fleet?.stop());
  const list = async () => {
    const r = await runBan(["list", "--json", "--hub", fleet.hub.url, "--token-file", fleet.tokenFiles.ops]);
    assert.equal(r.code, 0, r.output);
    return JSON.parse(r.output) as { bans: Array<{ ip: string; claims: Array<{ origin: string }> }> };
  };

  test("a 10-year ban dated 4 minutes ahead is lifted with the others; a later ban of that node counts again", LIMIT, async () => {
    const ip = "192.0.2.70";
    const ahead = Math.floor(Date.now() / 1000) + 240;
    assert.equal((await fleet.ban("web", "ban", ip, "--bantime", "315360000", "--time", String(ahead))).code, 0);
    assert.equal((await fleet.ban("db", "ban", ip, "--bantime", "600")).code, 0);
    await waitFor(() => rows(fleet.csv("db"), "BLOCK", ip).length, "db's agent to block it");
    const u = await fleet.ban("ops", "unban", ip, "--all-nodes");
    assert.deepEqual(u, { code: 0, output: "" });
    assert.equal((await list()).bans.find((b) => b.ip === ip), undefined, "a claim survived the admin's unban");
    await waitFor(() => rows(fleet.csv("db"), "UNBLOCK", ip).length, "db's agent to unblock it");
    // The hub dates web's ban at its own receive time (its clock is the fleet's reference), so
    // the admin's later unban lifts it as any other; no claim is left dated after the unban.
    // The lift ended what stood; web's next ban (its clock still ahead) is a new claim.
    assert.equal((await fleet.ban("web", "ban", ip, "--bantime", "600", "--time", String(ahead + 5))).code, 0);
    assert.deepEqual((await list()).bans.find((b) => b.ip === ip)?.claims.map((c) => c.origin), ["web"]);
    await waitFor(() => rows(fleet.csv("db"), "BLOCK", ip).length === 2, "db's agent to block it again");
  });

  test("ban.ts unban --all-nodes exits 1 when the hub's ack says claims are left, or does not say", LIMIT, async () => {
    let remaining: number | undefined;
    const { url, server } = await fakeHttpHub((_m, _p, body) => ({ status: 200, body: JSON.stringify({ type: "ack", id: JSON.parse(body).id, seq: "9", ...(remaining === undefined ? {} : { remaining }) }) }));
    try {
      const unban = () => runBan(["unban", "192.0.2.71", "--all-nodes", "--hub", url, "--token-file", fleet.tokenFiles.ops, "--spool", join(fleet.dir, "ops-spool")]);
      remaining = 2;
      let r = await unban();
      assert.equal(r.code, 1, r.output);
      assert.match(r.output, /^ban\.ts: the hub acked the unban of 192\.0\.2\.71 for every node, but 2 claim\(s\) on it are still live: check with ban\.ts list.*\n$/);
      remaining = undefined;
      r = await unban();
      assert.equal(r.code, 1, r.output);
      assert.match(r.output, /did not say whether a claim is left/);
      remaining = 0;
      assert.deepEqual(await unban(), { code: 0, output: "" });
    } finally {
      server.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Item 9: text a hub or a node chose, in logs, CSV and ban.ts's output

describe("security: what a hostile hub or node writes cannot forge a log line, a CSV row or a spreadsheet formula", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-text-"));
  });
  after(async () => {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
  });

  test("the agent escapes a hostile hub's role and error message in its log, and its node name in the CSV", LIMIT, async () => {
    const [tokenFile] = [join(dir, "web.token")];
    await writeFile(tokenFile, "t".repeat(43) + "\n", { mode: 0o600 });
    const forged = "2026-12-02T06:00:00.000Z agent: FORGED";
    const formula = '=HYPERLINK("http://198.51.100.9/","x")';
    const scenario = {
      connections: [[
        { send: { type: "welcome", v: 1, hub: "evil", node: formula, role: `node\n${forged} role line`, seq: "1" } },
        { send: { type: "error", code: "bad_frame", message: `nope\n${forged} error line\x1b[2J\u2028` } },
        { send: { type: "sync", full: true, seq: "2", events: [ev("192.0.2.90", 2)] } },
      ]],
    };
    await writeFile(join(dir, "scenario.json"), JSON.stringify(scenario));
    const port = await freePort();
    const fake = spawnProc(process.execPath, [join(REPO_ROOT, "test/fixtures/hostile-hub.mjs"), "127.0.0.1", String(port), join(dir, "scenario.json")], { name: "hostile-hub" });
    await fake.waitForLine(/hostile hub listening/, 10_000);
    const csv = join(dir, "agent.csv");
    const agent = await startAgentProc("agent", ["--hub", `ws://127.0.0.1:${port}`, "--token-file", tokenFile, "--backend", "dry-run", "--csv", csv]);
    await waitFor(() => rows(csv, "BLOCK", "192.0.2.90").length, "the BLOCK row");
    await agent.stop();
    const out = agent.output();
    assert.equal(agent.lines().filter((l) => l.startsWith(forged)).length, 0, `a forged log line:\n${out}`);
    assert.ok(agent.lines().some((l) => l.includes(`(node\\n${forged} role line)`)), out);
    assert.ok(agent.lines().some((l) => l.includes(`nope\\n${forged} error line\\x1b[2J\\u2028`)), out);
    assert.doesNotMatch(out, /[\x1b\u2028]/);
    const text = readFileSync(csv, "utf8");
    assert.doesNotMatch(text, /(^|,)"?=HYPERLINK/m, "a cell a spreadsheet runs as a formula");
    assert.equal(text.trimEnd().split("\n").length, readCsv(csv).length + 1, "every row is one line");
    assert.ok(text.includes(`,"'${formula.replace(/"/g, '""')}",BLOCK,192.0.2.90,`), `the node name stays text, guarded by a ':\n${text}`);
    assert.equal(rows(csv, "BLOCK", "192.0.2.90")[0].node, formula, "and reads back as the name itself");
  });

  test("csvRow(), which the hub's and the agent's CSV writers share, keeps each row one line and each formula text", LIMIT, () => {
    const row = csvRow({ time: 0, node: '=HYPERLINK("http://198.51.100.9/","x")', action: "REJECT", ip: "192.0.2.93", origin: "+cmd", jail: "@SUM(A1)", until: null, rtMs: -12, detail: "-2+3\n1970-01-01T00:00:00.000Z,web,BLOCK,192.0.2.94,,,,,\t\r\x1b[2J" });
    assert.equal(row, `1970-01-01T00:00:00.000Z,"'=HYPERLINK(""http://198.51.100.9/"",""x"")",REJECT,192.0.2.93,'+cmd,'@SUM(A1),never,-12,"'-2+3\\n1970-01-01T00:00:00.000Z,web,BLOCK,192.0.2.94,,,,,\\t\\r\\x1b[2J"\n`);
    assert.equal(csvRow({ time: 0, node: "web", action: "BLOCK", ip: "2001:db8::1", detail: "\tx" }), "1970-01-01T00:00:00.000Z,web,BLOCK,2001:db8::1,,,,,'\\tx\n");
  });

  test("ban.ts list and status --fleet print a hostile hub's strings with their control characters escaped", LIMIT, async () => {
    const now = Date.now();
    const bans = { hub: "h\x1b]0;owned\x07", seq: "1", now, count: 1, bans: [{ ip: "192.0.2.92\nFORGED", nodes: 1, claims: [{ origin: "web\x1b[2J", jail: "sshd", until: now + 60_000, detectedAt: now, seq: "1" }] }] };
    const nodes = { hub: "h", now, nodes: [{ node: "web\nFORGED 1 of 1 node(s) enforcing", remote: "127.0.0.1:1", since: now, verdict: { ok: true, text: "enforcing\x1b[32m" }, enforcement: { at: now, backend: "ipset", entries: 1, claims: 1, repairs: 0 } }] };
    const { url, server } = await fakeHttpHub((_m, path) => ({ status: 200, body: JSON.stringify(path === "/v1/bans" ? bans : nodes) }));
    try {
      const token = join(dir, "t.token");
      await writeFile(token, "t".repeat(43), { mode: 0o600 });
      const l = await runBan(["list", "--hub", url, "--token-file", token]);
      assert.equal(l.code, 0, l.output);
      assert.equal(l.output.trimEnd().split("\n").length, 3, l.output);
      assert.doesNotMatch(l.output, /\x1b/);
      assert.match(l.output, /192\.0\.2\.92\\nFORGED +1 +web\\x1b\[2J/);
      const f = await runBan(["status", "--fleet", "--hub", url, "--token-file", token]);
      assert.equal(f.output.trimEnd().split("\n").length, 2, f.output);
      assert.doesNotMatch(f.output, /\x1b|^FORGED/m);
    } finally {
      server.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Item 10: the spool belongs to the agent's user

describe("security: a spool directory others can write to, or files of other users in it, are never forwarded", needs(["root"], "security: spool ownership"), () => {
  let fleet: Fleet;
  before(async () => {
    fleet = await startFleet({ nodes: [["web", "node"]], heartbeat: 5 });
  });
  after(() => fleet?.stop());
  const received = (ip: string) => rows(fleet.csv("hub"), "RECEIVE", ip).length;
  const event = (ip: string) => JSON.stringify({ type: "ban", id: `sp-${ip.replace(/\W/g, "")}`, ip, jail: "sshd", bantime: 600, detectedAt: Date.now() }) + "\n";

  test("the agent refuses a world-writable spool in one line, forwards once it is 0700, and skips a file of another user", LIMIT, async () => {
    const dir = join(fleet.dir, "spool");
    await mkdir(dir);
    await chmod(dir, 0o777);
    await writeFile(join(dir, "1-a.json"), event("192.0.2.100"));
    const agent = await fleet.startAgent("web", ["--spool", dir]);
    await agent.waitForLine(/error: not forwarding the spool: .*spool is writable by its group \(mode 0777\): chmod 700 it$/, 10_000);
    await new Promise((r) => setTimeout(r, 6000)); // a second round of the spool (every 5 s)
    assert.equal(received("192.0.2.100"), 0, "forwarded from a world-writable spool");
    assert.equal(agent.lines().filter((l) => /not forwarding the spool/.test(l)).length, 1, "one line, not one per round");
    await writeFile(join(dir, "2-b.json"), event("192.0.2.101"));
    await chown(join(dir, "2-b.json"), 65534, 65534);
    await chmod(dir, 0o700);
    await waitFor(() => received("192.0.2.100"), "the agent to forward its own file once the directory is safe");
    await agent.waitForLine(/warning: skipping spool file 2-b\.json: it belongs to uid 65534, not to the agent's \(uid 0\)/, 10_000);
    assert.equal(received("192.0.2.101"), 0, "forwarded a file of another user");
    await waitFor(async () => !(await readdir(dir)).includes("1-a.json"), "the delivered file to go");
    assert.ok((await readdir(dir)).includes("2-b.json"), "the skipped file stays where it is");
  });

  test("ban.ts will not spool into a directory the agent would refuse: exit 1, nothing written", LIMIT, async () => {
    const loose = join(fleet.dir, "loose-spool");
    await mkdir(loose);
    await chmod(loose, 0o757);
    const gone = `ws://127.0.0.1:${await freePort()}`;
    const r = await runBan(["ban", "192.0.2.102", "--hub", gone, "--token-file", fleet.tokenFiles.web, "--spool", loose, "--timeout", "1"]);
    assert.equal(r.code, 1, r.output);
    assert.match(r.output, /^ban\.ts: could not send the ban of 192\.0\.2\.102 \(.*ECONNREFUSED.*\) nor spool it: .*loose-spool is writable by other users \(mode 0757\): chmod 700 it\n$/);
    assert.deepEqual(await readdir(loose), []);
    await symlink(loose, join(fleet.dir, "link-spool"));
    await chmod(loose, 0o700);
    const l = await runBan(["ban", "192.0.2.102", "--hub", gone, "--token-file", fleet.tokenFiles.web, "--spool", join(fleet.dir, "link-spool"), "--timeout", "1"]);
    assert.equal(l.code, 1, l.output);
    assert.match(l.output, /nor spool it: .*link-spool is not a directory/);
  });
});

// ---------------------------------------------------------------------------------------------
// Items 11 and 12: 200,000 claims, and the per-node ceiling

/** Writes a journal of `count` live bans by `origin` (10.x.y.z), as a hub that held them would. */
async function seedJournal(path: string, count: number, origin: string): Promise<void> {
  const fh = await open(path, "w", 0o600);
  const now = Date.now();
  let chunk = JSON.stringify({ journal: "banshare-journal", v: 1, hub: "seeded", seq: count }) + "\n";
  for (let i = 0; i < count; i++) {
    chunk += JSON.stringify({ seq: String(i + 1), kind: "ban", ip: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`, origin, jail: "sshd", until: now + 3_600_000, detectedAt: now - 1000, id: `seed-${i}`, relayedAt: now - 1000 }) + "\n";
    if (chunk.length > 1 << 20) {
      await fh.write(chunk);
      chunk = "";
    }
  }
  await fh.write(chunk);
  await fh.close();
}

describe("security: ban.ts list at 200,000 claims, and one node's claims bounded by --max-claims-per-node", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-claims-"));
  });
  after(async () => {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
  });

  test("a hub holding 200,000 claims of one node lists them all, and refuses that node a new address at the default ceiling", LIMIT, async () => {
    const at = join(dir, "big");
    await mkdir(at);
    const tokens = await enrol(at, [["seed", "node"], ["web", "node"], ["ops", "admin"]]);
    await seedJournal(join(at, "journal.jsonl"), 200_000, "seed");
    const hub = await startHubProc(["--tokens", join(at, "tokens"), "--state", join(at, "journal.jsonl"), "--listen", "127.0.0.1:0"]);
    const out = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      const child = execFile(process.execPath, ["--import", "tsx", join(REPO_ROOT, "ban.ts"), "list", "--hub", hub.url, "--token-file", tokens.ops, "--timeout", "60"], { cwd: REPO_ROOT, timeout: 120_000, maxBuffer: 256 << 20 }, (err, stdout, stderr) => resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
      child.stdin?.end();
    });
    assert.equal(out.code, 0, out.stderr);
    assert.equal(out.stderr, "");
    const lines = out.stdout.trimEnd().split("\n");
    assert.equal(lines.length, 200_002);
    assert.match(lines.at(-1)!, /^200000 address\(es\) blocked, 200000 claim\(s\); hub seeded, seq 200000$/);
    const spool = join(at, "seed-spool");
    const ban = (node: string, ip: string) => runBan(["ban", ip, "--hub", hub.url, "--token-file", tokens[node], "--spool", spool, "--timeout", "5"]);
    const refused = await ban("seed", "192.0.2.200");
    assert.equal(refused.code, 1, refused.output);
    assert.match(refused.output, /^ban\.ts: hub refused the ban: claim_limit: Node seed already claims 200000 address\(es\), the limit \(--max-claims-per-node 100000\); a ban of a new address waits until some of them end or an admin lifts them\n$/);
    assert.equal(existsSync(spool), false, "a ban over the ceiling is not spooled");
    assert.deepEqual(await ban("seed", "10.0.0.7"), { code: 0, output: "" }, "a node at its ceiling still renews what it claims");
    assert.deepEqual(await ban("web", "192.0.2.200"), { code: 0, output: "" }, "other nodes are not held back");
  });

  test("--max-claims-per-node 3: the fourth address is refused with claim_limit, counted in /metrics, and allowed once one claim is lifted", LIMIT, async () => {
    const at = join(dir, "small");
    await mkdir(at);
    const tokens = await enrol(at, [["web", "node"], ["viewer", "reader"]]);
    const hub = await startHubProc(["--tokens", join(at, "tokens"), "--csv", join(at, "hub.csv"), "--listen", "127.0.0.1:0", "--max-claims-per-node", "3"]);
    const send = (...args: string[]) => runBan([...args, "--hub", hub.url, "--token-file", tokens.web, "--spool", join(at, "spool"), "--timeout", "5"]);
    for (const n of [1, 2, 3]) assert.equal((await send("ban", `198.51.100.${n}`)).code, 0);
    const fourth = await send("ban", "198.51.100.4");
    assert.equal(fourth.code, 1, fourth.output);
    assert.match(fourth.output, /claim_limit: Node web already claims 3 address\(es\), the limit \(--max-claims-per-node 3\)/);
    assert.equal(rows(join(at, "hub.csv"), "REJECT", "198.51.100.4").length, 1);
    const metrics = await (await fetch(`${hub.url.replace(/^ws/, "http")}/metrics`, { headers: { authorization: `Bearer ${readFileSync(tokens.viewer, "utf8").trim()}` } })).text();
    assert.match(metrics, /^banshare_refused_total\{reason="claim_limit"\} 1$/m);
    assert.equal((await send("unban", "198.51.100.2")).code, 0);
    assert.equal((await send("ban", "198.51.100.4")).code, 0, "room again once a claim is lifted");
    const bad = tsx("hub.ts", ["--tokens", join(at, "tokens"), "--max-claims-per-node", "0"], { name: "hub-bad" });
    assert.equal((await bad.closed).code, 2);
    assert.match(bad.output(), /^hub\.ts: Expected --max-claims-per-node to be a whole number of at least 1, got 0\n$/);
  });
});

// ---------------------------------------------------------------------------------------------
// Item 12: a hub whose name moves

describe("security: the agent resolves its hub's name again and never blocks an address the hub had or has", needs(["root", "netns"], "security: hub name"), () => {
  let topo: Topology;
  let dir: string;
  let etc: string;
  before(async () => {
    topo = await createTopology(["h1", "h2", "a1"], { subnet: 94 });
    dir = await mkdtemp(join(tmpdir(), "banshare-hubname-"));
    // `ip netns exec` bind-mounts /etc/netns/NS/* over /etc: the agent's own hosts file and a
    // resolver that answers at once (nothing listens on the namespace's loopback port 53).
    etc = join("/etc/netns", topo.ns("a1"));
    await mkdir(etc, { recursive: true });
    onCleanup(() => rmSync(etc, { recursive: true, force: true }));
    await writeFile(join(etc, "resolv.conf"), "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n");
  });
  after(async () => {
    await stopAll();
    await topo?.destroy();
    if (etc) await rm(etc, { recursive: true, force: true });
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("after the name moves to a new address the agent unblocks it and refuses bans of old and new; a name that stops resolving keeps both", LIMIT, async () => {
    const [ip1, ip2] = [topo.ip("h1"), topo.ip("h2")];
    const hosts = (line: string) => writeFile(join(etc, "hosts"), `127.0.0.1 localhost\n${line}\n`);
    await hosts(`${ip1} hub.test`);
    const trigger = (k: string) => join(dir, `go-${k}`);
    const welcome = { send: { type: "welcome", v: 1, hub: "h", node: "a1", role: "node", seq: "1" } };
    const play = async (name: string, connections: unknown[]) => {
      await writeFile(join(dir, `${name}.json`), JSON.stringify({ connections }));
      const p = spawnProc(process.execPath, [join(REPO_ROOT, "test/fixtures/hostile-hub.mjs"), topo.ip(name), "7701", join(dir, `${name}.json`)], { netns: topo.ns(name), name });
      await p.waitForLine(/hostile hub listening/, 10_000);
      return p;
    };
    await play("h1", [
      [welcome, { send: { type: "sync", full: true, seq: "2", events: [ev(ip2, 2, "evil"), ev("203.0.113.5", 3)] } }, { untilFile: trigger("1") }, { close: true }],
      [welcome, { send: { type: "sync", full: true, seq: "9", events: [ev(ip2, 9, "evil")] } }],
    ]);
    await play("h2", [[welcome, { send: { type: "sync", full: true, seq: "5", events: [ev(ip2, 5, "evil"), ev(ip1, 6, "evil"), ev("203.0.113.6", 7)] } }, { untilFile: trigger("2") }, { close: true }]]);
    const csv = join(dir, "a1.csv");
    const token = join(dir, "a1.token");
    await writeFile(token, "t".repeat(43), { mode: 0o600 });
    const agent = await startAgentProc("a1", ["--hub", "ws://hub.test:7701", "--token-file", token, "--backend", "dry-run", "--csv", csv, "--heartbeat", "2"], { netns: topo.ns("a1") });
    await waitFor(() => rows(csv, "BLOCK", ip2).length, `the first hub's ban of ${ip2} (no hub's address yet)`);

    await hosts(`${ip2} hub.test`);
    await writeFile(trigger("1"), "");
    await agent.waitForLine(new RegExp(`the hub hub\\.test has new address\\(es\\) ${ip2.replace(/\./g, "\\.")}: never blocked from now on`), 15_000);
    await waitFor(() => rows(csv, "UNBLOCK", ip2).length, `the agent to unblock ${ip2}, the hub's new address`);
    await waitFor(() => rows(csv, "BLOCK", "203.0.113.6").length, "the second hub's sync");
    assert.equal(rows(csv, "REJECT", ip2).length, 1, "the new hub's ban of its own address is refused");
    assert.equal(rows(csv, "REJECT", ip1).length, 1, "the old address stays protected");

    await hosts("");
    await writeFile(trigger("2"), "");
    await agent.waitForLine(new RegExp(`warning: cannot resolve the hub hub\\.test \\(\\w+\\); keeping its last known address\\(es\\) ${ip1.replace(/\./g, "\\.")}, ${ip2.replace(/\./g, "\\.")} out of every ban`), 20_000);
    await hosts(`${ip1} hub.test`);
    await waitFor(() => rows(csv, "REJECT", ip2).length === 2, `the first hub's ban of ${ip2} refused on reconnect`, 60_000);
    assert.equal(rows(csv, "BLOCK", ip2).length, 1);
    assert.equal(agent.exitInfo(), undefined);
  });
});
