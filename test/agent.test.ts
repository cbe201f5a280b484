import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { execa } from "execa";
import { needs } from "./lib/skip.ts";
import { WebSocketServer, type WebSocket as ServerSocket } from "ws";
import {
  Allowlist,
  Applier,
  BACKEND_NAMES,
  BACKENDS,
  backendHooks,
  changesFor,
  cleanupCommands,
  countDrift,
  Guard,
  ipsetHeaders,
  parseHooks,
  parseIptablesSave,
  countCommands,
  CsvLog,
  desiredState,
  HubLink,
  ipsetNames,
  main,
  makeBackend,
  Spool,
  HubAddresses,
  StateFile,
  UsageError,
  iptablesChangeCommands,
  iptablesReconcileCommands,
  ipsetChangeScript,
  ipsetReconcileScript,
  KernelSession,
  ipsetSession,
  ipsetSetupCommands,
  nextDelay,
  growingDelay,
  FAST_RECONNECTS,
  nftChangeScript,
  nftReconcileScript,
  nftSession,
  nftSetupScript,
  nftSetupSteps,
  nftSetName,
  NFT_SETS,
  type Command,
  nftTestScript,
  ipsetTestScript,
  IPSET_MAX_TIMEOUT_S,
  NFT_MAX_TIMEOUT_S,
  resolveOverlaps,
  splitRefused,
  KernelUnavailable,
  type Backend,
  type Change,
  parseArgs,
  remainingSeconds,
  type Row,
  agentMetricsText,
  enforcementFrame,
} from "../agent.ts";
import { kernelAddresses, kernelCountCommands, parseArgs as parseBanArgs } from "../ban.ts";
import { requireOrSkip } from "./lib/skip.ts";
import { contains, mergeClaim, parseAddress, parseNodeFrame, type BanFrame, type Claims, type FleetEvent, type UnbanFrame } from "../messages.ts";

const NOW = 1_800_000_000_000;
const cfg = { prefix: "banshare", ports: [] as number[], allow: [parseAddress("192.0.2.0/24")!, parseAddress("2001:db8::/32")!] };

describe("nextDelay(): a hub restart is retried every 0.25-1 s, a long outage backs off to 30 s, always with jitter", () => {
  test("the first FAST_RECONNECTS attempts are 0.25-1 s, uniformly jittered; then 1 s doubling to the cap", () => {
    assert.equal(nextDelay(0, () => 0), 250);
    assert.equal(nextDelay(0, () => 1), 1000);
    assert.equal(nextDelay(FAST_RECONNECTS - 1, () => 1), 1000);
    const fast = Array.from({ length: 200 }, () => nextDelay(3));
    for (const d of fast) assert.ok(d >= 250 && d <= 1000, `${d}`);
    assert.ok(new Set(fast).size > 50, "a fleet that lost its hub at once does not come back in lockstep");
    assert.equal(nextDelay(FAST_RECONNECTS, () => 1), 2000);
    assert.equal(nextDelay(FAST_RECONNECTS + 3, () => 1), 16_000);
    assert.equal(nextDelay(FAST_RECONNECTS + 20, () => 1), 30_000);
    assert.equal(nextDelay(10_000, () => 0), 15_000);
  });

  test("growingDelay() (after syncs that overflowed) grows exponentially at once, capped, jittered within [50%, 100%]", () => {
    assert.equal(growingDelay(0, 500, 30_000, () => 1), 500);
    assert.equal(growingDelay(0, 500, 30_000, () => 0), 250);
    assert.equal(growingDelay(3, 500, 30_000, () => 1), 4000);
    assert.equal(growingDelay(20, 500, 30_000, () => 1), 30_000);
    const seen = new Set(Array.from({ length: 50 }, () => growingDelay(4)));
    assert.ok(seen.size > 10);
    for (const d of seen) assert.ok(d >= 4000 && d <= 8000);
  });
});

describe("remainingSeconds(): a ban's kernel timeout rounds up, 0 when permanent", () => {
  test("rounds up, 0 for permanent, negative once over", () => {
    assert.equal(remainingSeconds(NOW + 1, NOW), 1);
    assert.equal(remainingSeconds(NOW + 600_000, NOW), 600);
    assert.equal(remainingSeconds(null, NOW), 0);
    assert.equal(remainingSeconds(NOW, NOW), -1);
  });
});

describe("ipset plans: sets survive a restart, a batch is one restore script, reconcile never leaves the kernel without bans", () => {
  test("setup creates sets with -exist (no flush) sized for a million bans, and rewrites only its own chain", () => {
    const cmds = ipsetSetupCommands({ ...cfg, ports: [22, 2222] });
    assert.deepEqual(cmds[0].argv, ["ipset", "-exist", "restore"]);
    assert.match(cmds[0].input!, /^create banshare-v4 hash:net family inet .*maxelem 2097152 timeout 0$/m);
    assert.match(cmds[0].input!, /^create banshare-v6 hash:net family inet6 /m);
    assert.doesNotMatch(cmds[0].input!, /flush|destroy/);
    assert.deepEqual(cmds[1].argv, ["iptables-restore", "--noflush"]);
    assert.equal(cmds[1].input, "*filter\n:banshare - [0:0]\n-A banshare -s 192.0.2.0/24 -j RETURN\n-A banshare -p tcp -m multiport --dports 22,2222 -m set --match-set banshare-v4 src -j DROP\nCOMMIT\n");
    assert.deepEqual(cmds[2].argv, ["ip6tables-restore", "--noflush"]);
    assert.match(cmds[2].input!, /-s 2001:db8::\/32 -j RETURN\n.*--match-set banshare-v6 src -j DROP/);
  });

  test("a batch of changes is one restore script with kernel timeouts", () => {
    const script = ipsetChangeScript("banshare", [
      { ip: "203.0.113.7", until: NOW + 600_000 },
      { ip: "2001:db8::7", until: null },
      { ip: "198.51.100.1", until: undefined },
      { ip: "198.51.100.2", until: NOW - 1 },
      { ip: "198.51.100.3", until: NOW + 100 * 86_400_000 },
    ], NOW);
    assert.equal(script, [
      "add banshare-v4 203.0.113.7 timeout 600",
      "add banshare-v6 2001:db8::7 timeout 0",
      "del banshare-v4 198.51.100.1",
      "del banshare-v4 198.51.100.2",
      "add banshare-v4 198.51.100.3 timeout 2147483",
      "",
    ].join("\n"));
  });

  test("reconcile fills a scratch set and swaps it in: never a moment without bans", () => {
    const script = ipsetReconcileScript("banshare", new Map<string, number | null>([["203.0.113.7", NOW + 60_000], ["2001:db8::9", null]]), NOW);
    assert.equal(script, [
      "create banshare-v4-tmp hash:net family inet hashsize 1024 maxelem 2097152 timeout 0",
      "flush banshare-v4-tmp",
      "add banshare-v4-tmp 203.0.113.7 timeout 60",
      "swap banshare-v4-tmp banshare-v4",
      "destroy banshare-v4-tmp",
      "create banshare-v6-tmp hash:net family inet6 hashsize 1024 maxelem 2097152 timeout 0",
      "flush banshare-v6-tmp",
      "add banshare-v6-tmp 2001:db8::9 timeout 0",
      "swap banshare-v6-tmp banshare-v6",
      "destroy banshare-v6-tmp",
      "",
    ].join("\n"));
  });
});

describe("ipset session: a batch goes to the long-lived ipset restore and is acknowledged by a list of the set", () => {
  test("a batch goes to the long-lived ipset restore as it is, then list -n of the set acknowledges it", () => {
    const kind = ipsetSession("banshare-v4");
    assert.deepEqual(kind.argv, ["stdbuf", "-oL", "ipset", "-exist", "restore"]);
    assert.equal(kind.frame("add banshare-v4 203.0.113.7 timeout 30\n"), "add banshare-v4 203.0.113.7 timeout 30\nlist -n banshare-v4\n");
    assert.equal(kind.frame(""), "list -n banshare-v4\n");
    assert.equal(kind.isAck("banshare-v4"), true);
    assert.equal(kind.isAck("banshare-v6"), false);
  });
});

describe("KernelSession: batches to one long-lived process, acknowledged on stdout", () => {
  // A stand-in speaking the same line protocol (the real ipset and nft -i are driven in
  // test/kernel.test.ts): "ack" answers ACK, "bad" writes an error and carries on like nft,
  // "die" exits like ipset on an error, "mute" is a failing acknowledging command.
  const STANDIN = `require("readline").createInterface({ input: process.stdin }).on("line", (l) => {
    if (l === "ack") process.stdout.write("ACK\\n");
    else if (l === "bad") process.stderr.write("Error: bad line\\n");
    else if (l === "die") process.exit(3);
    else if (l === "mute") process.stderr.write("Error: cannot list\\n");
  });`;
  const kind = { argv: [process.execPath, "-e", STANDIN], frame: (s: string) => (s === "mute" ? "bad\nmute\n" : `${s}\nack\n`), isAck: (l: string) => l === "ACK" };

  test("acknowledged batches resolve; an error line rejects that batch only, the process carries on", async () => {
    const session = new KernelSession(kind);
    try {
      await session.send("ok");
      await assert.rejects(session.send("bad"), /Error: bad line/);
      await session.send("ok");
    } finally {
      session.close();
    }
  });

  test("a process that exits fails its batch; the next batch starts a new one", async () => {
    const session = new KernelSession(kind);
    try {
      await assert.rejects(session.send("die"), /ended \(exit 3\)/);
      await session.send("ok");
    } finally {
      session.close();
    }
  });

  test("an error with no acknowledgement fails the batch within a second, not at the 60 s timeout", async () => {
    const session = new KernelSession(kind);
    try {
      await assert.rejects(session.send("mute"), /Error: bad line/);
      await session.send("ok");
    } finally {
      session.close();
    }
  });
});

describe("nftables plans: sets survive a restart, each change replaces the element's timeout, reconcile is one atomic transaction", () => {
  test("setup adds table and sets without flushing them, and rewrites its chain's rules", () => {
    const s = nftSetupScript({ ...cfg, ports: [22] });
    // Addresses in hash sets (no interval flag: nft 1.0 reads an interval set back before every change), networks in interval sets.
    assert.match(s, /^add set inet banshare v4 \{ type ipv4_addr; flags timeout; size 2097152; \}$/m);
    assert.match(s, /^add set inet banshare v6 \{ type ipv6_addr; flags timeout; size 2097152; \}$/m);
    assert.match(s, /^add set inet banshare v4net \{ type ipv4_addr; flags interval, timeout; size 2097152; \}$/m);
    assert.match(s, /^add set inet banshare v6net \{ type ipv6_addr; flags interval, timeout; size 2097152; \}$/m);
    assert.doesNotMatch(s, /flush set/);
    assert.match(s, /^flush chain inet banshare input$/m);
    assert.match(s, /^add rule inet banshare input ip saddr \{ 192\.0\.2\.0\/24 \} return$/m);
    for (const [ip, set] of [["ip", "v4"], ["ip6", "v6"], ["ip", "v4net"], ["ip6", "v6net"]]) assert.match(s, new RegExp(`^add rule inet banshare input tcp dport \\{ 22 \\} ${ip} saddr @${set} counter drop$`, "m"));
  });

  test("setup replaces a table of the old layout (interval sets v4, v6, no v4net) in the same transaction, and leaves a current one alone", () => {
    const [migrate, setup] = nftSetupSteps(cfg) as Command[];
    assert.deepEqual(migrate.when, ["nft", "-t", "list", "table", "inet", "banshare"]);
    assert.deepEqual(migrate.unless, ["nft", "-t", "list", "set", "inet", "banshare", "v4net"]);
    assert.equal(migrate.input, `delete table inet banshare\n${nftSetupScript(cfg)}`);
    assert.deepEqual(setup, { argv: ["nft", "-f", "-"], input: nftSetupScript(cfg) });
  });

  test("addresses go to the hash sets, networks to the interval sets", () => {
    assert.deepEqual(["203.0.113.7", "2001:db8::1", "203.0.113.0/24", "2001:db8::/64"].map(nftSetName), ["v4", "v6", "v4net", "v6net"]);
    assert.deepEqual([...NFT_SETS], ["v4", "v6", "v4net", "v6net"]);
  });

  test("changes re-add each element so its timeout is replaced, in one transaction", () => {
    assert.equal(nftChangeScript("banshare", [{ ip: "203.0.113.7", until: NOW + 30_000 }, { ip: "2001:db8::1", until: undefined }], NOW), [
      "add element inet banshare v4 { 203.0.113.7 }",
      "delete element inet banshare v4 { 203.0.113.7 }",
      "add element inet banshare v4 { 203.0.113.7 timeout 30s }",
      "add element inet banshare v6 { 2001:db8::1 }",
      "delete element inet banshare v6 { 2001:db8::1 }",
      "",
    ].join("\n"));
  });

  test("the long-lived nft -i gets a batch as one line (one transaction), then an acknowledging command that lists nothing", () => {
    const kind = nftSession("banshare");
    assert.deepEqual(kind.argv, ["stdbuf", "-oL", "nft", "-i"]);
    const script = nftChangeScript("banshare", [{ ip: "203.0.113.7", until: undefined }], NOW);
    // Any listing of the table makes nft fetch every element of its sets; describe asks the kernel nothing.
    assert.equal(kind.frame(script), "add element inet banshare v4 { 203.0.113.7 }; delete element inet banshare v4 { 203.0.113.7 }\ndescribe meta length\n");
    assert.equal(kind.frame(""), "\ndescribe meta length\n");
    assert.equal(kind.isAck("meta expression, datatype integer (integer), 32 bits"), true);
    assert.equal(kind.isAck("}"), false, "a listing's closing brace is no acknowledgement");
  });

  test("reconcile flushes and refills both sets in one atomic transaction", () => {
    const s = nftReconcileScript("banshare", new Map<string, number | null>([["203.0.113.7", null], ["203.0.113.8", NOW + 2000]]), NOW);
    assert.equal(s, "flush set inet banshare v4\nflush set inet banshare v6\nflush set inet banshare v4net\nflush set inet banshare v6net\nadd element inet banshare v4 { 203.0.113.7, 203.0.113.8 timeout 2s }\n");
    const nets = nftReconcileScript("banshare", new Map<string, number | null>([["203.0.113.0/24", null], ["2001:db8::1", null]]), NOW);
    assert.match(nets, /^add element inet banshare v4net \{ 203\.0\.113\.0\/24 \}$/m);
    assert.match(nets, /^add element inet banshare v6 \{ 2001:db8::1 \}$/m);
    assert.equal((BACKENDS.nftables.fill!(cfg, new Map([["203.0.113.7", null]]), NOW, new Set())[0] as Command).input, "add element inet banshare v4 { 203.0.113.7 }\n", "fill adds without flushing");
  });
});

describe("iptables plans: rules change only where the chain differs, and reconcile rewrites it atomically, allowlist first", () => {
  test("one rule per address, added or deleted only when the chain's content differs", () => {
    const present = new Set(["203.0.113.1"]);
    const cmds = iptablesChangeCommands(cfg, [{ ip: "203.0.113.1", until: NOW + 1 }, { ip: "203.0.113.2", until: null }, { ip: "203.0.113.3", until: undefined }, { ip: "2001:db8::1", until: undefined }], present);
    assert.equal(cmds.length, 1);
    assert.deepEqual(cmds[0].argv, ["iptables-restore", "--noflush"]);
    assert.equal(cmds[0].input, "*filter\n-A banshare -s 203.0.113.2 -j DROP\nCOMMIT\n");
  });

  test("reconcile rewrites the chain atomically: allowlist first, then the drops", () => {
    const [v4, v6] = iptablesReconcileCommands(cfg, ["203.0.113.2", "2001:db8:1::5"]);
    assert.equal(v4.input, "*filter\n:banshare - [0:0]\n-A banshare -s 192.0.2.0/24 -j RETURN\n-A banshare -s 203.0.113.2 -j DROP\nCOMMIT\n");
    assert.match(v6.input!, /-A banshare -s 2001:db8:1::5 -j DROP/);
  });
});

describe("where the DROP is hooked in (--hook) and the enforcement check's readers", () => {
  const setupText = (b: "ipset" | "iptables", hooks?: ("input" | "forward" | "docker-user")[]) =>
    BACKENDS[b].setup({ ...cfg, hooks }).map((s) => ("argv" in s ? `${s.when ? `[when ${s.when.join(" ")}] ` : ""}${s.unless ? `[unless ${s.unless.join(" ")}] ` : ""}${s.argv.join(" ")}` : s.log));

  test("by default the chain is jumped to from INPUT and FORWARD, and from DOCKER-USER only when Docker made it; never created", () => {
    const steps = setupText("ipset");
    for (const bin of ["iptables", "ip6tables"]) {
      assert.ok(steps.includes(`[unless ${bin} -w -C INPUT -j banshare] ${bin} -w -I INPUT 1 -j banshare`), steps.join("\n"));
      assert.ok(steps.includes(`[unless ${bin} -w -C FORWARD -j banshare] ${bin} -w -I FORWARD 1 -j banshare`));
      assert.ok(steps.includes(`[when ${bin} -w -S DOCKER-USER] [unless ${bin} -w -C DOCKER-USER -j banshare] ${bin} -w -I DOCKER-USER 1 -j banshare`));
    }
    assert.ok(!steps.some((s) => /-N DOCKER-USER/.test(s)));
    assert.deepEqual(backendHooks("ipset"), ["input", "forward", "docker-user"]);
    assert.deepEqual(backendHooks("nftables"), ["input", "forward"]);
  });

  test("--hook none creates the sets only and takes the agent's jumps out of every hook chain", () => {
    const steps = setupText("ipset", []);
    assert.match(steps[0], /^ipset -exist restore$/);
    assert.ok(!steps.some((s) => /iptables-restore|-I /.test(s)), steps.join("\n"));
    assert.ok(steps.includes("[when iptables -w -C INPUT -j banshare] iptables -w -D INPUT -j banshare"));
    const nft = nftSetupScript({ ...cfg, hooks: [] });
    assert.match(nft, /^add set inet banshare v4 /m);
    assert.match(nft, /^delete chain inet banshare input$/m);
    assert.match(nft, /^delete chain inet banshare forward$/m);
    assert.doesNotMatch(nft, /saddr @v4/);
  });

  test("nftables hooks its chains input and forward, each dropping both families", () => {
    const nft = nftSetupScript({ ...cfg, hooks: ["forward"] });
    assert.match(nft, /^add chain inet banshare forward \{ type filter hook forward priority filter - 10; policy accept; \}$/m);
    for (const set of ["v6", "v6net"]) assert.match(nft, new RegExp(`^add rule inet banshare forward ip6 saddr @${set} counter drop$`, "m"));
    assert.match(nft, /^delete chain inet banshare input$/m);
  });

  test("parseHooks() takes iptables' and nft's spellings, comma lists, none alone; parseArgs passes them on", () => {
    assert.deepEqual(parseHooks(["INPUT,FORWARD", "DOCKER-USER"], "ipset"), ["input", "forward", "docker-user"]);
    assert.deepEqual(parseHooks(["input"], "nftables"), ["input"]);
    assert.deepEqual(parseHooks(["none"], "ipset"), []);
    assert.throws(() => parseHooks(["none,INPUT"], "ipset"), /none alone/);
    assert.throws(() => parseHooks(["OUTPUT"], "ipset"), /Expected --hook to be input, forward, docker-user or none, got "output"/);
    assert.throws(() => parseHooks(["docker-user"], "nftables"), /forward hook already runs before Docker/);
    const r = parseArgs(["--hub", "ws://127.0.0.1:1", "--token-file", "/t", "--hook", "INPUT", "--check-interval", "2"]);
    assert.ok(r.command === "run" && r.options.hooks?.join() === "input" && r.options.checkMs === 2000);
    const d = parseArgs(["--hub", "ws://127.0.0.1:1", "--token-file", "/t"]);
    assert.ok(d.command === "run" && d.options.hooks === undefined && d.options.checkMs === 10_000);
    assert.throws(() => parseArgs(["--hub", "ws://x", "--token-file", "/t", "--check-interval", "-1"]), /--check-interval/);
  });

  test("cleanup takes the jumps out of INPUT, FORWARD and DOCKER-USER", () => {
    const c = cleanupCommands("ipset", "banshare").map((a) => a.join(" "));
    for (const chain of ["INPUT", "FORWARD", "DOCKER-USER"]) assert.ok(c.includes(`iptables -w -D ${chain} -j banshare`) && c.includes(`ip6tables -w -D ${chain} -j banshare`), chain);
  });

  const SAVE = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n:banshare - [0:0]\n-A INPUT -j banshare\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j banshare\n-A DOCKER-USER -j RETURN\n-A banshare -s 192.0.2.0/24 -j RETURN\n-A banshare -m set --match-set banshare-v4 src -j DROP\nCOMMIT\n";
  const HEADERS = (n4: number, n6: number) => `Name: banshare-v4\nType: hash:net\nNumber of entries: ${n4}\nName: banshare-v6\nNumber of entries: ${n6}`;

  test("parseIptablesSave() and ipsetHeaders() read what the kernel lists", () => {
    const chains = parseIptablesSave(SAVE);
    assert.deepEqual(chains.get("FORWARD"), ["-j DOCKER-USER", "-j banshare"]);
    assert.deepEqual(chains.get("DOCKER-USER"), ["-j RETURN"]);
    assert.deepEqual([...ipsetHeaders(HEADERS(3, 0))], [["banshare-v4", 3], ["banshare-v6", 0]]);
  });

  test("the ipset check names each missing hook, rule and set; DOCKER-USER without the jump is missing, no DOCKER-USER is absent", () => {
    const r = BACKENDS.ipset.read!(cfg, { v4: HEADERS(3, 0), v6: "", ipt4: SAVE, ipt6: ":INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n" });
    assert.deepEqual(r.missing, ["iptables DOCKER-USER jump", "ip6tables chain banshare", "ip6tables INPUT jump", "ip6tables FORWARD jump"]);
    assert.equal(r.hooks.get("iptables INPUT"), "present");
    assert.equal(r.hooks.get("ip6tables DOCKER-USER"), "absent");
    assert.deepEqual(r.entries, { 4: 3, 6: 0 });
    const gone = BACKENDS.ipset.read!({ ...cfg, hooks: [] }, { v4: undefined, v6: undefined });
    assert.deepEqual(gone.missing, ["set banshare-v4", "set banshare-v6"]);
    const flushed = BACKENDS.ipset.read!(cfg, { v4: HEADERS(0, 0), ipt4: SAVE.replace(/^-A banshare -m set.*\n/m, ""), ipt6: SAVE.replace(/banshare-v4/, "banshare-v6") });
    assert.ok(flushed.missing.includes("iptables DROP rule for banshare-v4"), flushed.missing.join());
  });

  test("the nftables check reads `nft -t list ruleset`: the table, its sets, and each hook's chain with both drops", () => {
    const drops = ["ip saddr @v4", "ip6 saddr @v6", "ip saddr @v4net", "ip6 saddr @v6net"].map((m) => `\t\t${m} counter packets 3 bytes 180 drop\n`).join("");
    const sets = NFT_SETS.map((set) => `\tset ${set} {\n\t\ttype ipv4_addr\n\t}\n`).join("");
    const table = `table ip filter {\n}\ntable inet banshare {\n${sets}\tchain input {\n\t\ttype filter hook input priority filter - 10; policy accept;\n${drops}\t}\n}\n`;
    const r = BACKENDS.nftables.read!({ ...cfg, hooks: ["input", "forward"] }, { ruleset: table });
    assert.deepEqual(r.missing, ["nft forward chain"]);
    assert.equal(r.hooks.get("nft input"), "present");
    const oldLayout = table.replace(/\tset v4net \{[^}]*\}\n/, "").replace(/\t\tip saddr @v4net.*\n/, "");
    const old = BACKENDS.nftables.read!({ ...cfg, hooks: ["input"] }, { ruleset: oldLayout });
    assert.deepEqual(old.missing, ["set inet banshare v4net", "nft input chain"], "a table without the network sets, or a chain without their drops, is repaired");
    assert.deepEqual(BACKENDS.nftables.read!(cfg, { ruleset: "table ip filter {\n}\n" }).missing, ["table inet banshare"]);
    assert.equal(BACKENDS.nftables.read!(cfg, { ruleset: table }).entries, undefined, "nft sets are not counted: a listing costs seconds at 100k");
  });

  test("countDrift() compares the kernel's counts with what was applied, allowing for entries the kernel ends around now", () => {
    const held = new Map<string, number | null>([["203.0.113.1", null], ["203.0.113.2", NOW + 60_000], ["203.0.113.3", NOW + 1000], ["2001:db8::1", null]]);
    assert.equal(countDrift({ 4: 3, 6: 1 }, held, NOW, true), undefined);
    assert.equal(countDrift({ 4: 2, 6: 1 }, held, NOW, true), undefined, "the entry ending in a second may be gone already");
    assert.equal(countDrift({ 4: 0, 6: 1 }, held, NOW, true), "IPv4: 0 of 2-3 entries in the kernel");
    assert.equal(countDrift({ 4: 3, 6: 0 }, held, NOW, true), "IPv6: 0 of 1 entries in the kernel");
    assert.equal(countDrift({ 4: 2, 6: 1 }, held, NOW, false), "IPv4: 2 of 3 entries in the kernel", "rules without timeouts are counted exactly");
  });
});

describe("cleanupCommands(): --cleanup removes only the agent's own objects", () => {
  test("removes only the agent's own objects", () => {
    assert.deepEqual(cleanupCommands("nftables", "banshare"), [["nft", "delete", "table", "inet", "banshare"]]);
    const ipset = cleanupCommands("ipset", "banshare").map((c) => c.join(" "));
    assert.ok(ipset.includes("iptables -w -D INPUT -j banshare"));
    assert.ok(ipset.includes("ipset destroy banshare-v4"));
    assert.ok(ipset.every((c) => /banshare/.test(c)), "nothing but banshare objects");
    assert.deepEqual(cleanupCommands("dry-run", "banshare"), []);
  });
});

describe("agent parseArgs(): flags become options, bad flags are one sentence, --cleanup needs no hub", () => {
  test("refuses a plain ws:// hub off loopback unless --insecure, before it connects anywhere", () => {
    for (const hub of ["ws://10.0.0.1:7700", "ws://hub.example:7700", "ws://[2001:db8::1]:7700", "wss://hub.example:7700,ws://198.51.100.1:7700"]) {
      assert.throws(() => parseArgs(["--hub", hub, "--token-file", "/t"]), (e: Error) => e instanceof UsageError && /^Expected a wss:\/\/ hub off this host, got "ws:\/\/[^"]+": plain ws:\/\/ would send the token in clear .*--insecure/.test(e.message) && !e.message.includes("\n"), hub);
      assert.equal(parseArgs(["--hub", hub, "--token-file", "/t", "--insecure"]).command, "run");
    }
    for (const hub of ["ws://127.0.0.1:7700", "ws://127.1.2.3:7700", "ws://localhost:7700", "ws://[::1]:7700", "wss://hub.example:7700"]) assert.equal(parseArgs(["--hub", hub, "--token-file", "/t"]).command, "run", hub);
  });

  test("turns flags into options", () => {
    const r = parseArgs(["--hub", "ws://10.0.0.1:7700,wss://hub2:7700", "--token-file", "/t", "--backend", "nftables", "--allow", "192.0.2.0/24", "--allow", "2001:db8::1", "--ports", "22,2222", "--heartbeat", "5", "--insecure"]);
    assert.equal(r.command, "run");
    if (r.command !== "run") return;
    assert.deepEqual(r.options.hubs, ["ws://10.0.0.1:7700", "wss://hub2:7700"]);
    assert.equal(r.options.backend, "nftables");
    assert.deepEqual(r.options.allow, ["192.0.2.0/24", "2001:db8::1"]);
    assert.deepEqual(r.options.ports, [22, 2222]);
    assert.equal(r.options.heartbeatMs, 5000);
  });

  test("refuses bad flags with one sentence", () => {
    const cases: Array<[string[], RegExp]> = [
      [["--token-file", "/t"], /--hub/],
      [["--hub", "http://x", "--token-file", "/t"], /ws:\/\//],
      [["--hub", "ws://x"], /--token-file/],
      [["--hub", "ws://x", "--token-file", "/t", "--allow", "1.2.3.4; rm"], /--allow/],
      [["--hub", "ws://x", "--token-file", "/t", "--ports", "22,99999"], /--ports/],
      [["--hub", "ws://x", "--token-file", "/t", "--backend", "pf"], /backend|Invalid values/],
      [["--hub", "ws://x", "--token-file", "/t", "--bogus"], /Unknown argument/],
      [["--cleanup", "--prefix=Bad;name"], /--prefix/],
      [["--hub", "ws://x", "--token-file", "/t", "--metrics", "9101"], /--metrics/],
      [["--hub", "ws://x", "--token-file", "/t", "--metrics", "127.0.0.1:70000"], /--metrics/],
    ];
    for (const [argv, re] of cases) assert.throws(() => parseArgs(argv), re, argv.join(" "));
  });

  test("--cleanup needs no hub", () => {
    assert.deepEqual(parseArgs(["--cleanup", "--backend", "nftables"]), { command: "cleanup", backend: "nftables", prefix: "banshare" });
  });
});

/** A fleet event as the hub relays it. */
function ev(kind: "ban" | "unban", ip: string, detectedAt: number, until: number | null, origin = "web1", seq = "1"): FleetEvent {
  return { seq, kind, ip, origin, jail: "sshd", until, detectedAt, id: `${origin}-${ip}-${detectedAt}-${kind}`, relayedAt: detectedAt };
}

function claimsOf(...events: FleetEvent[]): Claims {
  const claims: Claims = new Map();
  for (const e of events) mergeClaim(claims, e);
  return claims;
}

describe("desiredState() and changesFor(): what the kernel should hold, and the diff to get there", () => {
  const allow = new Allowlist([parseAddress("192.0.2.0/24")!]);

  test("desiredState() blocks what the claims ban now, never an allowlisted address or one whose ban is over or lifted", () => {
    const claims = claimsOf(
      ev("ban", "203.0.113.1", NOW - 1000, NOW + 60_000),
      ev("ban", "203.0.113.2", NOW - 1000, null),
      ev("ban", "203.0.113.3", NOW - 120_000, NOW - 60_000),
      ev("ban", "192.0.2.9", NOW - 1000, null),
      ev("ban", "203.0.113.4", NOW - 2000, null),
      ev("unban", "203.0.113.4", NOW - 1000, null),
    );
    assert.deepEqual([...desiredState(claims, allow, NOW)], [["203.0.113.1", NOW + 60_000], ["203.0.113.2", null]]);
    assert.deepEqual([...desiredState(claims, allow, NOW, ["203.0.113.2", "203.0.113.3", "198.51.100.1"])], [["203.0.113.2", null]], "only the addresses asked about");
  });

  test("changesFor() over given addresses compares only those: unblock when no longer desired, block when new or its end changed", () => {
    const applied = new Map<string, number | null>([["203.0.113.1", NOW + 1000], ["203.0.113.2", null], ["203.0.113.3", null]]);
    const desired = new Map<string, number | null>([["203.0.113.1", NOW + 5000], ["203.0.113.2", null], ["203.0.113.4", null]]);
    assert.deepEqual(changesFor(desired, applied, ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4", "203.0.113.5"]), [
      { ip: "203.0.113.1", until: NOW + 5000 },
      { ip: "203.0.113.3", until: undefined },
      { ip: "203.0.113.4", until: null },
    ]);
    assert.deepEqual(changesFor(desired, applied, []), [], "no address, no change");
  });

  test("changesFor() over both maps in full: unblocks first, then new blocks and changed ends", () => {
    const applied = new Map<string, number | null>([["203.0.113.1", NOW + 1000], ["203.0.113.3", null]]);
    const desired = new Map<string, number | null>([["203.0.113.4", null], ["203.0.113.1", NOW + 1000]]);
    assert.deepEqual(changesFor(desired, applied), [{ ip: "203.0.113.3", until: undefined }, { ip: "203.0.113.4", until: null }]);
    assert.deepEqual(changesFor(applied, applied), []);
  });

  test("Allowlist.reason() names the range that protects an address, refuses what is not an address, and stays right past its cache limit", () => {
    const small = new Allowlist([parseAddress("192.0.2.0/24")!, parseAddress("2001:db8::/32")!], () => 2);
    for (let round = 0; round < 3; round++) {
      assert.equal(small.reason("192.0.2.7"), "allowlisted (192.0.2.0/24)");
      assert.equal(small.reason("2001:db8::1"), "allowlisted (2001:db8::/32)");
      assert.equal(small.reason("203.0.113.1"), undefined);
      assert.equal(small.reason("not-an-ip"), "not an address");
    }
  });
});

describe("BACKENDS: one plan table entry per firewall", () => {
  test("every backend in the table is a --backend choice, and cleanup and counting read the table", () => {
    assert.deepEqual(BACKEND_NAMES, ["ipset", "nftables", "iptables", "dry-run"]);
    for (const b of BACKEND_NAMES) {
      const r = parseArgs(["--cleanup", "--backend", b, "--prefix", "bx"]);
      assert.deepEqual(r, { command: "cleanup", backend: b, prefix: "bx" });
      assert.deepEqual(cleanupCommands(b, "bx"), BACKENDS[b].cleanup("bx"));
      assert.deepEqual(countCommands(b, "bx"), BACKENDS[b].count("bx"));
      for (const argv of [...cleanupCommands(b, "bx"), ...countCommands(b, "bx")]) assert.ok(argv.some((a) => a.startsWith("bx")), `${argv.join(" ")} names only the agent's own objects`);
    }
  });

  test("a backend with a long-lived session changes the kernel with one command, the session's one-shot fallback", () => {
    for (const b of BACKEND_NAMES) {
      if (!BACKENDS[b].session) continue;
      const steps = BACKENDS[b].change(cfg, [{ ip: "203.0.113.7", until: null }], NOW, new Set());
      assert.equal(steps.length, 1, b);
      assert.ok("argv" in steps[0] && steps[0].input, b);
    }
  });
});

describe("ban.ts's copy of the agent's backend table stays in step", () => {
  // ban.ts shares nothing with agent.ts but messages.ts (single-file rule): its status command
  // keeps its own copy of the backend names, the counting commands and the set names in them.
  test("ban.ts status takes exactly the agent's backends", () => {
    const base = ["status", "--hub", "ws://127.0.0.1:1", "--token-file", "/t"];
    for (const b of BACKEND_NAMES) assert.equal((parseBanArgs([...base, "--backend", b]) as { backend: string }).backend, b);
    const m = /Expected --backend to be (.*), got "pf"/.exec((() => {
      try {
        parseBanArgs([...base, "--backend", "pf"]);
      } catch (e) {
        return (e as Error).message;
      }
      return "";
    })());
    assert.ok(m, "ban.ts names its backends when refusing one");
    assert.deepEqual(m[1].split(", "), BACKEND_NAMES);
  });

  test("ban.ts's kernelCountCommands() are the agent's count plan, for every backend and prefix", () => {
    for (const b of BACKEND_NAMES) {
      for (const prefix of ["banshare", "bench3"]) assert.deepEqual(kernelCountCommands(b, prefix), countCommands(b, prefix), `${b} ${prefix}`);
    }
    assert.deepEqual(countCommands("ipset", "banshare").map((argv) => argv.at(-1)), Object.values(ipsetNames("banshare")), "the ipset sets the agent creates");
  });

  test("ban.ts counts the iptables rules the agent reads back as its own", () => {
    const out = "-N banshare\n-A banshare -s 192.0.2.0/24 -j RETURN\n-A banshare -s 203.0.113.7/32 -j DROP\n-A banshare -s 2001:db8::7/128 -p tcp -m multiport --dports 22 -j DROP\n";
    assert.deepEqual(BACKENDS.iptables.listed!(out), ["203.0.113.7", "2001:db8::7"]);
    assert.deepEqual(kernelAddresses("iptables", out), BACKENDS.iptables.listed!(out));
  });
});

describe("Applier: claims in, kernel changes and CSV rows out (dry-run backend)", () => {
  const start = (onApplied?: (changes: unknown[], live: Map<string, FleetEvent>) => void) => {
    const lines: string[] = [];
    const rows: Row[] = [];
    const log = (l: string) => lines.push(l);
    const applier = new Applier({ backend: makeBackend("dry-run", cfg, log), backendName: "dry-run", allow: new Allowlist(cfg.allow), record: (r) => rows.push(r), log, onApplied });
    return { applier, lines, rows };
  };
  const until = (pred: () => boolean) => new Promise<void>((resolve, reject) => {
    const end = Date.now() + 5000;
    const tick = () => (pred() ? resolve() : Date.now() > end ? reject(new Error("timed out")) : setTimeout(tick, 5));
    tick();
  });

  test("a full sync reconciles once; live events then go in batches, with BLOCK, SCHEDULE_UNBLOCK, UNBLOCK and REJECT rows", async () => {
    const now = Date.now();
    const reported: string[] = [];
    const { applier, lines, rows } = start((changes, live) => reported.push(...live.keys()));
    try {
      applier.sync([ev("ban", "203.0.113.1", now - 1000, now + 600_000), ev("ban", "192.0.2.5", now - 1000, null)], true);
      await until(() => lines.some((l) => l.startsWith("synced:")));
      assert.ok(lines.includes("dry-run: would make the kernel hold exactly 1 address(es)"), lines.join("\n"));
      assert.ok(lines.includes("synced: 1 address(es) blocked (dry-run)"));
      assert.deepEqual(rows.map((r) => `${r.action} ${r.ip}`), ["REJECT 192.0.2.5", "BLOCK 203.0.113.1", "SCHEDULE_UNBLOCK 203.0.113.1"]);
      assert.equal(rows[0].detail, "allowlisted (192.0.2.0/24)");

      rows.length = 0;
      applier.take([ev("ban", "203.0.113.2", now, null, "web2", "7")], true);
      await until(() => lines.some((l) => l.startsWith("blocked 203.0.113.2")));
      assert.ok(lines.includes("dry-run: would block 203.0.113.2 until never"));
      assert.deepEqual(reported, ["203.0.113.2"], "the live event's response time goes to the hub");
      applier.take([ev("unban", "203.0.113.1", now + 1, null, "web1", "8")]);
      await until(() => lines.includes("unblocked 203.0.113.1"));
      assert.deepEqual(rows.map((r) => `${r.action} ${r.ip} ${r.detail}`), ["BLOCK 203.0.113.2 event: banned by web2", "UNBLOCK 203.0.113.1 event: unbanned by web1"]);
      assert.deepEqual(reported, ["203.0.113.2"], "a synced or non-live event is not reported");
    } finally {
      await applier.close();
    }
  });

  test("restore() takes a saved state as what the kernel holds: the reconcile after the next sync logs no change", async () => {
    const now = Date.now();
    const { applier, lines, rows } = start();
    try {
      const saved = [ev("ban", "203.0.113.1", now - 1000, null)];
      applier.restore(saved, now);
      assert.equal(applier.claims.size, 1);
      applier.sync([], false);
      await until(() => lines.some((l) => l.startsWith("synced:")));
      assert.ok(lines.includes("synced: 1 address(es) blocked (dry-run)"));
      assert.deepEqual(rows, []);
    } finally {
      await applier.close();
    }
  });

  test("restore() puts the saved claims into the kernel in one batch, not the expired ones, and writes no row", async () => {
    const now = Date.now();
    const { applier, lines, rows } = start();
    try {
      const n = await applier.restore([ev("ban", "203.0.113.1", now - 1000, null), ev("ban", "203.0.113.2", now - 9000, now - 1000), ev("ban", "192.0.2.9", now - 1000, null)], now);
      assert.equal(n, 1, "one address: the other ban is over, the third address allowlisted");
      assert.deepEqual(lines, ["dry-run: would put 1 address(es) back into the kernel"]);
      assert.deepEqual(rows, []);
      assert.deepEqual([...applier.held().keys()], ["203.0.113.1"]);
    } finally {
      await applier.close();
    }
  });

  test("a Guard over a backend without a check (dry-run) stays idle and reports what was applied", async () => {
    const { applier } = start();
    const backend = makeBackend("dry-run", cfg, () => {});
    const guard = new Guard({ backend, backendName: "dry-run", applier, prefix: "banshare", record: () => {}, log: () => {}, checkMs: 5000 });
    try {
      guard.start();
      await guard.check();
      assert.deepEqual(guard.snapshot(), { backend: "dry-run", hooks: [], missing: [], missingSince: undefined, entries: undefined, expected: 0, drift: 0, repairs: 0, lastRepair: undefined, lastCheck: undefined });
    } finally {
      await guard.close();
      await applier.close();
    }
  });

  test("sweep() unblocks what ended", async () => {
    const now = Date.now();
    const { applier, lines, rows } = start();
    try {
      applier.take([ev("ban", "203.0.113.9", now - 1000, now + 300)]);
      await until(() => lines.some((l) => l.startsWith("blocked 203.0.113.9")));
      await new Promise((r) => setTimeout(r, 400));
      applier.sweep(Date.now());
      await until(() => lines.includes("unblocked 203.0.113.9"));
      assert.equal(rows.at(-1)?.action, "UNBLOCK");
      assert.equal(rows.at(-1)?.detail, "ban ended");
    } finally {
      await applier.close();
    }
  });
});

describe("timeouts are capped to each kernel's limit", () => {
  test("nft writes at most NFT_MAX_TIMEOUT_S seconds (nft 1.0.6 refuses 100,000,000 s and more), ipset at most IPSET_MAX_TIMEOUT_S", () => {
    assert.equal(NFT_MAX_TIMEOUT_S, 99_999_999);
    const tenYears = NOW + 10 * 365 * 86_400_000;
    assert.match(nftChangeScript("banshare", [{ ip: "203.0.113.7", until: tenYears }], NOW), /\{ 203\.0\.113\.7 timeout 99999999s \}/);
    assert.match(nftReconcileScript("banshare", new Map([["203.0.113.7", tenYears]]), NOW), /^add element inet banshare v4 \{ 203\.0\.113\.7 timeout 99999999s \}\n$/m);
    assert.match(ipsetReconcileScript("banshare", new Map([["203.0.113.7", tenYears]]), NOW), new RegExp(`add banshare-v4-tmp 203\\.0\\.113\\.7 timeout ${IPSET_MAX_TIMEOUT_S}\n`));
    assert.equal(BACKENDS.nftables.maxTimeoutS, NFT_MAX_TIMEOUT_S);
    assert.equal(BACKENDS.ipset.maxTimeoutS, IPSET_MAX_TIMEOUT_S);
    assert.equal(BACKENDS.iptables.maxTimeoutS, undefined, "agent-side expiry: no kernel timeout");
  });

  test("the test scripts try entries in scratch sets only, made and removed again", () => {
    const entries: Change[] = [{ ip: "203.0.113.7", until: NOW + 30_000 }, { ip: "2001:db8::/64", until: null }];
    assert.equal(nftTestScript("banshare", entries, NOW), [
      "add set inet banshare test4 { type ipv4_addr; flags timeout; size 2097152; }",
      "add element inet banshare test4 { 203.0.113.7 timeout 30s }",
      "delete set inet banshare test4",
      "add set inet banshare test6net { type ipv6_addr; flags interval, timeout; size 2097152; }",
      "add element inet banshare test6net { 2001:db8::/64 }",
      "delete set inet banshare test6net",
      "",
    ].join("\n"));
    const ipset = ipsetTestScript("banshare", entries.slice(0, 1), NOW);
    assert.equal(ipset, "create banshare-v4-test hash:net family inet hashsize 1024 maxelem 2097152 timeout 0\nflush banshare-v4-test\nadd banshare-v4-test 203.0.113.7 timeout 30\ndestroy banshare-v4-test\n");
    assert.deepEqual(BACKENDS.ipset.testCleanup!("banshare"), [["ipset", "destroy", "banshare-v4-test"], ["ipset", "destroy", "banshare-v6-test"]]);
  });
});

describe("splitRefused(): one bad entry never blocks the rest", () => {
  test("halves a failing batch down to the entries that fail alone, in order, with their messages", async () => {
    const tried: number[][] = [];
    const bad = new Set([3, 10]);
    const items = Array.from({ length: 16 }, (_, i) => i);
    const landed: number[] = [];
    const refused = await splitRefused(items, async (part) => {
      tried.push(part);
      const b = part.find((i) => bad.has(i));
      if (b !== undefined) throw new Error(`Error: refused ${b}`);
      landed.push(...part);
    });
    assert.deepEqual(refused, [{ item: 3, message: "Error: refused 3" }, { item: 10, message: "Error: refused 10" }]);
    assert.deepEqual(landed, items.filter((i) => !bad.has(i)), "every other entry landed, in order");
    assert.ok(tried.length <= 2 * 2 * Math.log2(items.length) + 1, `${tried.length} attempts`);
    assert.deepEqual(await splitRefused([], async () => assert.fail("nothing to try")), []);
  });
});

describe("resolveOverlaps(): the covering network wins", () => {
  test("an entry inside a blocked network is left out; the network lasts as long as the longest entry inside it", () => {
    const desired = new Map<string, number | null>([
      ["2001:db8:1::/64", NOW + 60_000],
      ["2001:db8:1::5", NOW + 600_000],
      ["2001:db8:1:0:ffff::/80", NOW + 1000],
      ["2001:db8:2::5", NOW + 5000],
      ["198.51.100.0/24", NOW + 1000],
      ["198.51.100.7", null],
      ["198.51.101.7", NOW + 1000],
    ]);
    assert.deepEqual([...resolveOverlaps(desired)], [
      ["2001:db8:1::/64", NOW + 600_000],
      ["2001:db8:2::5", NOW + 5000],
      ["198.51.100.0/24", null],
      ["198.51.101.7", NOW + 1000],
    ]);
    const nested = new Map<string, number | null>([["2001:db8::/48", NOW + 1], ["2001:db8::/64", NOW + 2], ["2001:db8::1", NOW + 3]]);
    assert.deepEqual([...resolveOverlaps(nested)], [["2001:db8::/48", NOW + 3]], "the broadest network holds them all");
    const plain = new Map<string, number | null>([["203.0.113.1", null]]);
    assert.equal(resolveOverlaps(plain), plain, "no network: the same map, nothing computed");
  });
});

/**
 * A kernel in memory behind the Backend seam, with a real kernel's two refusals: a timeout over
 * its limit, and an interval set's conflicting intervals (the real ones are in test/poison.test.ts).
 */
class MemoryKernel implements Backend {
  readonly held = new Map<string, number | null>();
  readonly calls: string[] = [];
  missing = false;
  constructor(readonly maxTimeoutS = 1000, private readonly limitS = 5000) {}
  async setup() {}
  close() {}
  private refuses(c: Change, now: number, held: Map<string, number | null>): string | undefined {
    if (c.until === undefined) return undefined;
    if (c.until !== null && c.until - now > this.limitS * 1000) return "Error: value too large";
    const a = parseAddress(c.ip)!;
    for (const ip of held.keys()) if (ip !== c.ip && (contains(parseAddress(ip)!, a) || contains(a, parseAddress(ip)!))) return "Error: conflicting intervals specified";
    return undefined;
  }
  async apply(changes: Change[], now: number) {
    if (this.missing) throw new KernelUnavailable("no such set");
    this.calls.push(`apply ${changes.map((c) => c.ip).join(" ")}`);
    return splitRefused(changes, async (part) => {
      const next = new Map(this.held);
      for (const c of part) {
        const why = this.refuses(c, now, next);
        if (why) throw new Error(why);
        if (c.until === undefined) next.delete(c.ip);
        else next.set(c.ip, c.until === null ? null : Math.min(c.until, now + this.maxTimeoutS * 1000));
      }
      this.held.clear();
      for (const [k, v] of next) this.held.set(k, v);
    }).then((r) => r.map((x) => ({ change: x.item, message: x.message })));
  }
  async reconcile(desired: Map<string, number | null>, now: number) {
    this.calls.push(`reconcile ${desired.size}`);
    this.held.clear();
    const refused = await this.apply([...desired].map(([ip, until]) => ({ ip, until })), now);
    return refused;
  }
  async fill(desired: Map<string, number | null>, now: number) {
    this.calls.push(`fill ${desired.size}`);
    return this.apply([...desired].filter(([ip]) => !this.held.has(ip)).map(([ip, until]) => ({ ip, until })), now);
  }
}

describe("Applier: refused entries, capped timeouts and overlapping networks", () => {
  const start = (kernel: Backend) => {
    const lines: string[] = [];
    const rows: Row[] = [];
    const log = (l: string) => lines.push(l);
    const applier = new Applier({ backend: kernel, backendName: "memory", allow: new Allowlist([]), record: (r) => rows.push(r), log });
    return { applier, lines, rows };
  };
  const settle = () => new Promise((r) => setTimeout(r, 30));

  test("a refused entry is one REJECT row and one log line, is not tried again until its claim changes, and the rest lands", async () => {
    const now = Date.now();
    const kernel = new MemoryKernel(1000, 5000);
    const { applier, lines, rows } = start(kernel);
    try {
      applier.sync([ev("ban", "203.0.113.1", now, now + 60_000), ev("ban", "203.0.113.2", now, now + 9_000_000), ev("ban", "203.0.113.3", now, null)], true);
      await settle();
      assert.deepEqual([...kernel.held.keys()].sort(), ["203.0.113.1", "203.0.113.3"]);
      assert.ok(lines.includes("synced: 2 address(es) blocked (memory), 1 refused by the kernel"), lines.join("\n"));
      const rejects = () => rows.filter((r) => r.action === "REJECT");
      assert.equal(rejects().length, 1);
      assert.equal(rejects()[0].ip, "203.0.113.2");
      assert.equal(rejects()[0].detail, "kernel refused: Error: value too large");
      // Other events and sweeps do not try it again.
      applier.take([ev("ban", "203.0.113.4", now, null, "web2")]);
      applier.sweep(Date.now());
      await settle();
      assert.ok(kernel.held.has("203.0.113.4"));
      assert.equal(kernel.calls.filter((c) => c.includes("203.0.113.2")).length, 1, "tried once, in the reconcile");
      assert.equal(rejects().length, 1, "logged once");
      assert.equal(applier.refused.get("203.0.113.2")?.message, "Error: value too large");
      // A new claim on it is tried again, and lands.
      applier.take([ev("ban", "203.0.113.2", now + 1, now + 60_000)]);
      await settle();
      assert.ok(kernel.held.has("203.0.113.2"));
      assert.equal(applier.refused.has("203.0.113.2"), false);
    } finally {
      await applier.close();
    }
  });

  test("restore() from the state file: an entry the kernel refuses costs only itself, with one REJECT row; the rest is enforced", async () => {
    const now = Date.now();
    const kernel = new MemoryKernel(1000, 5000);
    const { applier, rows } = start(kernel);
    try {
      const n = await applier.restore([ev("ban", "203.0.113.1", now - 1000, null), ev("ban", "203.0.113.2", now - 1000, now + 9_000_000), ev("ban", "203.0.113.3", now - 1000, now + 60_000)], now);
      assert.equal(n, 2);
      assert.deepEqual([...kernel.held.keys()].sort(), ["203.0.113.1", "203.0.113.3"]);
      assert.deepEqual(rows.filter((r) => r.action === "REJECT").map((r) => [r.ip, r.detail]), [["203.0.113.2", "kernel refused: Error: value too large"]]);
    } finally {
      await applier.close();
    }
  });

  test("makeBackend(): a fill the kernel refuses is split, and only the refused entries are returned (nftables, in a namespace)", needs(["root", "netns", "nft"], "kernel"), async () => {
    const ns = `bsfill-${process.pid}`;
    await execa("ip", ["netns", "add", ns]);
    try {
      const script = join(tmpdir(), `bsfill-${process.pid}.mts`);
      await writeFile(script, [
        `import { makeBackend } from ${JSON.stringify(join(process.cwd(), "agent.ts"))};`,
        `const b = makeBackend("nftables", { prefix: "banshare", ports: [], allow: [] }, () => {});`,
        `await b.setup();`,
        `const now = Date.now();`,
        `const refused = await b.fill(new Map([["203.0.113.1", null], ["203.0.113.0/28", null], ["203.0.113.8/29", now + 60000], ["2001:db8::1", null]]), now);`,
        `console.log(JSON.stringify(refused.map((r) => r.change.ip)));`,
        `b.close();`,
      ].join("\n"));
      try {
        // The /29 lies inside the /28: an interval set refuses it; the rest lands.
        const r = await execa("ip", ["netns", "exec", ns, process.execPath, "--import", "tsx", script], { cwd: process.cwd(), reject: false, timeout: 30_000 });
        assert.equal(r.exitCode, 0, r.stderr);
        assert.deepEqual(JSON.parse(r.stdout.trim().split("\n").at(-1)!), ["203.0.113.8/29"]);
        const listed = (await execa("ip", ["netns", "exec", ns, "nft", "list", "table", "inet", "banshare"])).stdout;
        for (const want of ["203.0.113.1", "203.0.113.0/28", "2001:db8::1"]) assert.ok(listed.includes(want), `${want} in the kernel:\n${listed}`);
      } finally {
        await rm(script, { force: true });
      }
    } finally {
      await execa("ip", ["netns", "del", ns], { reject: false });
    }
  });

  test("a batch that fails because the firewall's objects are missing is not blamed on its entries: the kernel is reconciled again later", async () => {
    const now = Date.now();
    const kernel = new MemoryKernel();
    const { applier, lines, rows } = start(kernel);
    try {
      kernel.missing = true;
      applier.take([ev("ban", "203.0.113.1", now, null)]);
      await settle();
      assert.ok(lines.some((l) => /^error: applying 1 change\(s\) failed, reconciling in 5 s: no such set$/.test(l)), lines.join("\n"));
      assert.equal(rows.filter((r) => r.action === "REJECT").length, 0);
      assert.equal(applier.refused.size, 0);
    } finally {
      await applier.close();
    }
  });

  test("a ban longer than the kernel's cap is renewed before its capped timeout ends, while its claim lasts, with no new CSV rows", async () => {
    const now = Date.now();
    const kernel = new MemoryKernel(0.2, 1e9);
    const { applier, lines, rows } = start(kernel);
    try {
      applier.take([ev("ban", "203.0.113.1", now, now + 30 * 86_400_000), ev("ban", "203.0.113.2", now, now + 100)]);
      await settle();
      const first = kernel.held.get("203.0.113.1")!;
      assert.ok(first <= Date.now() + 200, "capped");
      await new Promise((r) => setTimeout(r, 150));
      applier.sweep(Date.now());
      await settle();
      assert.ok(kernel.held.get("203.0.113.1")! > first, "renewed");
      assert.ok(lines.includes("renewed the capped kernel timeout of 1 address(es)"), lines.join("\n"));
      assert.deepEqual(rows.filter((r) => r.ip === "203.0.113.1").map((r) => r.action), ["BLOCK", "SCHEDULE_UNBLOCK"], "a renewal writes no row");
    } finally {
      await applier.close();
    }
  });

  test("an IPv6 /64 from one node and a /128 inside it from another: the /64 is held, lasting as long as the /128, which comes back when the /64's claim ends", async () => {
    const now = Date.now();
    const kernel = new MemoryKernel(1e6, 1e9);
    const { applier, rows } = start(kernel);
    try {
      applier.take([ev("ban", "2001:db8:1::5", now, now + 600_000, "web1"), ev("ban", "203.0.113.9", now, null, "web1")]);
      await settle();
      applier.take([ev("ban", "2001:db8:1::/64", now, now + 300, "web2")]);
      await settle();
      assert.deepEqual([...kernel.held].sort(), [["2001:db8:1::/64", now + 600_000], ["203.0.113.9", null]]);
      assert.equal(rows.filter((r) => r.action === "UNBLOCK").length, 0, "the /128 is still blocked (by the /64): no UNBLOCK row");
      assert.equal(rows.filter((r) => r.action === "REJECT").length, 0);
      await new Promise((r) => setTimeout(r, 350));
      applier.sweep(Date.now());
      await settle();
      assert.deepEqual([...kernel.held].sort(), [["2001:db8:1::5", now + 600_000], ["203.0.113.9", null]], "the /64's claim ended: the /128 is back with its own end");
      // A full sync with both gives the same.
      applier.sync([ev("ban", "2001:db8:1::5", now, now + 600_000, "web1"), ev("ban", "2001:db8:1::/64", now, now + 60_000, "web2")], true);
      await settle();
      assert.deepEqual([...kernel.held], [["2001:db8:1::/64", now + 600_000]]);
    } finally {
      await applier.close();
    }
  });
});

describe("StateFile: the --state file reads back what was saved, and a file that is not one loads as nothing", () => {
  test("save() writes what load() reads back; a file that is not a state file loads as nothing, with a warning", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-state-"));
    try {
      const path = join(dir, "agent.state");
      const claims = claimsOf(ev("ban", "203.0.113.1", NOW, null));
      const lines: string[] = [];
      let cursor: { hub: string; seq: string } | undefined;
      const state = new StateFile(path, (l) => lines.push(l), () => ({ cursor, claims }));
      assert.equal(await state.load(), undefined, "no file yet");
      await state.save();
      assert.equal(existsSync(path), false, "nothing to save before the first cursor");
      cursor = { hub: "h1", seq: "42" };
      await state.close();
      const back = await new StateFile(path, (l) => lines.push(l), () => ({ cursor: undefined, claims: new Map() })).load();
      assert.deepEqual(back?.cursor, cursor);
      assert.deepEqual(back?.claims, [...claims.get("203.0.113.1")!.values()]);
      await writeFile(path, "{}\n");
      assert.equal(await state.load(), undefined);
      assert.match(lines.join("\n"), /is not a banshare agent state file/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("StateFile: a damaged --state file costs only the lines that are damaged", () => {
  test("a flipped bit in one claim, a cut line, or a damaged cursor line: every other claim loads, with one warning", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-state-"));
    try {
      const path = join(dir, "agent.state");
      const ips = ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"];
      const claims = claimsOf(...ips.map((ip, i) => ev("ban", ip, NOW + i, null)));
      const lines: string[] = [];
      await new StateFile(path, (l) => lines.push(l), () => ({ cursor: { hub: "h1", seq: "42" }, claims })).close();
      const text = readFileSync(path, "utf8");
      assert.equal(text.trim().split("\n").length, 1 + ips.length, "one line for the cursor, one per claim");
      const load = async (t: string) => {
        await writeFile(path, t);
        return new StateFile(path, (l) => lines.push(l), () => ({ cursor: undefined, claims: new Map() })).load();
      };
      // "." (0x2e) -> "/" (0x2f) in one address; another line cut short.
      const damaged = text.replace('"203.0.113.2"', '"203.0.113/2"').replace(/\n(\{[^\n]*"203\.0\.113\.3"[^\n]*)\n/, (_m: string, l: string) => `\n${l.slice(0, 30)}\n`);
      lines.length = 0;
      const back = await load(damaged);
      assert.deepEqual(back?.cursor, { hub: "h1", seq: "42" });
      assert.deepEqual(back?.claims.map((c) => c.ip), ["203.0.113.1", "203.0.113.4"]);
      assert.equal(lines.length, 1, lines.join("\n"));
      assert.match(lines[0], /skipped 2 damaged line\(s\) \(line 3: event ip "203\.0\.113\/2"\); every other claim is kept$/);
      // The cursor's line damaged: the claims still go back into the kernel; a full sync follows.
      lines.length = 0;
      const noCursor = await load(text.replace('"cursor"', '"cursXr"'));
      assert.equal(noCursor?.cursor, undefined);
      assert.equal(noCursor?.claims.length, ips.length);
      assert.match(lines[0], /skipped 1 damaged line\(s\) \(line 1: not a cursor\); every other claim is kept, and a full sync follows$/);
      // A file of the one-object format earlier versions wrote still loads.
      const v1 = JSON.stringify({ v: 1, cursor: { hub: "h0", seq: "7" }, claims: [...claims.get("203.0.113.1")!.values()] }) + "\n";
      assert.deepEqual((await load(v1))?.claims.map((c) => c.ip), ["203.0.113.1"]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("Spool: forwarding ban.ts's spooled events over one connection", () => {
  test("sends each file once, deletes it on ack, keeps it on rate_limited, moves it aside on a refusal or when unreadable", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-spool-"));
    try {
      const frame = (id: string, ip: string): BanFrame => ({ type: "ban", id, ip, jail: "sshd", bantime: 600, detectedAt: Date.now() });
      await writeFile(join(dir, "1.json"), JSON.stringify(frame("a1", "203.0.113.1")));
      await writeFile(join(dir, "2.json"), JSON.stringify(frame("a2", "203.0.113.2")));
      await writeFile(join(dir, "3.json"), JSON.stringify(frame("a3", "203.0.113.3")));
      await writeFile(join(dir, "4.json"), "not json");
      // Damaged files: empty, and one bit flipped in the address ("." 0x2e -> "/" 0x2f).
      await writeFile(join(dir, "5.json"), "");
      await writeFile(join(dir, "6.json"), JSON.stringify(frame("a6", "203.0.113.6")).replace("203.0.113.6", "203.0.113/6"));
      const sent: Array<BanFrame | UnbanFrame> = [];
      const spool = new Spool(dir, (f) => sent.push(f), () => {});
      await spool.forward();
      assert.deepEqual(sent.map((f) => f.id), ["a1", "a2", "a3"]);
      await spool.forward();
      assert.equal(sent.length, 3, "not sent twice while unanswered");
      spool.acked("a1");
      spool.refused("a2", "rate_limited");
      spool.refused("a3", "protected");
      await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual((await readdir(dir)).sort(), ["2.json", "rejected"]);
      assert.deepEqual((await readdir(join(dir, "rejected"))).sort(), ["3.json", "4.json", "5.json", "6.json"]);
      await spool.forward();
      assert.deepEqual(sent.map((f) => f.id), ["a1", "a2", "a3", "a2"], "a rate-limited event goes again next round");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("Spool and HubAddresses against a local user and a moving hub", () => {
  test("Spool.forward() sends nothing from a directory others can write to or own, and skips files of other users or links", async (t) => {
    if (requireOrSkip(t, ["root"])) return;
    const { chmod, chown, symlink } = await import("node:fs/promises");
    const dir = await mkdtemp(join(tmpdir(), "banshare-spool-"));
    try {
      const frame = (id: string): BanFrame => ({ type: "ban", id, ip: "203.0.113.1", jail: "sshd", bantime: 600, detectedAt: Date.now() });
      await writeFile(join(dir, "own.json"), JSON.stringify(frame("own")));
      await writeFile(join(dir, "nobody.json"), JSON.stringify(frame("nobody")));
      await chown(join(dir, "nobody.json"), 65534, 65534);
      await writeFile(join(dir, "..target"), JSON.stringify(frame("linked")));
      await symlink(join(dir, "..target"), join(dir, "link.json"));
      const sent: string[] = [];
      const lines: string[] = [];
      const spool = new Spool(dir, (f) => sent.push(f.id), (l) => lines.push(l));
      await chmod(dir, 0o777);
      await spool.forward();
      await spool.forward();
      assert.deepEqual(sent, [], "forwarded from a world-writable directory");
      assert.deepEqual(lines, [`error: not forwarding the spool: ${dir} is writable by its group (mode 0777): chmod 700 it`], "one line, not one per round");
      await chmod(dir, 0o700);
      await chown(dir, 65534, 65534);
      await spool.forward();
      assert.deepEqual(sent, []);
      assert.match(lines.at(-1)!, /not forwarding the spool: .* belongs to uid 65534, not to this user \(uid 0\): chown it$/);
      await chown(dir, 0, 0);
      lines.length = 0;
      await spool.forward();
      await spool.forward();
      assert.deepEqual(sent, ["own"], "only the agent's own regular file goes");
      assert.deepEqual(lines.sort(), ["warning: skipping spool file link.json: it is not a regular file", "warning: skipping spool file nobody.json: it belongs to uid 65534, not to the agent's (uid 0)"]);
      assert.deepEqual((await readdir(dir)).sort(), ["..target", "link.json", "nobody.json", "own.json"], "skipped files stay where they are");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("HubAddresses resolves the hubs again, adds each new address, and keeps the last known ones when a name stops resolving", async () => {
    let answer: string[] | Error = ["192.0.2.10"];
    const lines: string[] = [];
    const hubs = new HubAddresses(["wss://hub.example:7700", "ws://127.0.0.1:7700"], (l) => lines.push(l), async (host) => {
      assert.equal(host, "hub.example");
      if (answer instanceof Error) throw answer;
      return answer;
    });
    assert.deepEqual((await hubs.refresh()).map((a) => a.text), ["192.0.2.10", "127.0.0.1"]);
    answer = ["192.0.2.10", "2001:db8::10"];
    assert.deepEqual((await hubs.refresh()).map((a) => a.text), ["2001:db8::10"]);
    assert.deepEqual(lines, ["the hub hub.example has new address(es) 2001:db8::10: never blocked from now on"]);
    answer = Object.assign(new Error("getaddrinfo ENOTFOUND hub.example"), { code: "ENOTFOUND" });
    assert.deepEqual(await hubs.refresh(), []);
    assert.deepEqual(await hubs.refresh(), []);
    assert.deepEqual(lines.slice(1), ["warning: cannot resolve the hub hub.example (ENOTFOUND); keeping its last known address(es) 192.0.2.10, 2001:db8::10 out of every ban"], "one line while it keeps failing");
    assert.deepEqual(hubs.all().map((a) => a.text).sort(), ["127.0.0.1", "192.0.2.10", "2001:db8::10"]);
    answer = ["198.51.100.10"];
    assert.deepEqual((await hubs.refresh()).map((a) => a.text), ["198.51.100.10"]);
    assert.equal(lines[2], "the hub hub.example resolves again: 198.51.100.10");
    assert.deepEqual(hubs.all().map((a) => a.text).sort(), ["127.0.0.1", "192.0.2.10", "198.51.100.10", "2001:db8::10"], "an old address stays protected");
    const allow = new Allowlist([]);
    assert.equal(allow.reason("198.51.100.10"), undefined);
    assert.equal(allow.add(parseAddress("198.51.100.10")!), true);
    assert.equal(allow.add(parseAddress("198.51.100.10")!), false);
    assert.equal(allow.reason("198.51.100.10"), "allowlisted (198.51.100.10)", "the cached answer is dropped");
  });
});

describe("HubLink: a Session per connection, thrown away on close", () => {
  // A stand-in hub on a real WebSocket that plays a script per connection (the real hub is
  // driven in test/fleet.test.ts and test/faults.test.ts).
  test("a sync cut off mid-chunks is dropped with its connection; the next connection syncs afresh, then live events move the cursor", async () => {
    const now = Date.now();
    const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await new Promise((r) => wss.once("listening", r));
    const hellos: Array<{ cursor?: unknown }> = [];
    const welcome = (seq: string) => ({ type: "welcome", v: 1, hub: "h1", node: "web9", role: "node", seq });
    let conns = 0;
    wss.on("connection", (sock: ServerSocket) => {
      const n = ++conns;
      sock.once("message", (data) => {
        hellos.push(JSON.parse(String(data)));
        const send = (f: object) => sock.send(JSON.stringify(f));
        send(welcome(n === 1 ? "5" : "6"));
        if (n === 1) {
          send({ type: "sync", full: true, seq: "5", more: true, events: [ev("ban", "203.0.113.1", now, null)] });
          setTimeout(() => sock.terminate(), 50);
          return;
        }
        send({ type: "sync", full: true, seq: "6", events: [ev("ban", "203.0.113.2", now, null, "web1", "6")] });
        send({ type: "event", ...ev("ban", "203.0.113.3", now, null, "web2", "7") });
      });
    });
    const lines: string[] = [];
    const log = (l: string) => lines.push(l);
    const applier = new Applier({ backend: makeBackend("dry-run", cfg, log), backendName: "dry-run", allow: new Allowlist([]), record: () => {}, log });
    const csv = await CsvLog.open(undefined, "agent", log);
    const link: HubLink = new HubLink({ hubs: [`ws://127.0.0.1:${(wss.address() as { port: number }).port}`], heartbeatMs: 60_000, token: "t".repeat(16), log, applier, csv, state: new StateFile(undefined, log, () => ({ cursor: link.cursor, claims: applier.claims })) });
    try {
      link.connect();
      const end = Date.now() + 10_000;
      while (link.cursor?.seq !== "7" && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(link.cursor, { hub: "h1", seq: "7" }, lines.join("\n"));
      assert.equal(hellos.length, 2);
      assert.equal(hellos[1].cursor, undefined, "the cut-off sync gave no cursor");
      assert.deepEqual([...applier.claims.keys()].sort(), ["203.0.113.2", "203.0.113.3"], "nothing of the first connection's partial sync");
      assert.equal(csv.node, "web9", "rows carry the name the hub welcomed us with");
      assert.ok(lines.some((l) => /^disconnected from ws:\/\/127\.0\.0\.1:\d+ \(1006\); retrying/.test(l)), lines.join("\n"));
    } finally {
      link.close();
      await applier.close();
      await new Promise((r) => wss.close(r));
    }
  });
});

/** A scripted hub on a real WebSocket: `script(send, n)` plays connection n (1-based) after its hello. */
async function scriptedHub(script: (send: (f: object) => void, n: number, sock: ServerSocket) => void) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((r) => wss.once("listening", r));
  let conns = 0;
  wss.on("connection", (sock: ServerSocket) => {
    const n = ++conns;
    sock.on("error", () => {});
    sock.once("message", () => {
      const send = (f: object) => sock.readyState === sock.OPEN && sock.send(JSON.stringify(f));
      send({ type: "welcome", v: 1, hub: "h1", node: "web9", role: "node", seq: "1" });
      script(send, n, sock);
    });
  });
  return { url: `ws://127.0.0.1:${(wss.address() as { port: number }).port}`, conns: () => conns, close: () => new Promise((r) => wss.close(r)) };
}

/** A HubLink with a dry-run applier and a real CSV file, against `url`. */
async function linkTo(url: string, dir: string, extra: Partial<ConstructorParameters<typeof HubLink>[0]> = {}) {
  const lines: string[] = [];
  const log = (l: string) => lines.push(l);
  const csv = await CsvLog.open(join(dir, "agent.csv"), "agent", log);
  const applier = new Applier({ backend: makeBackend("dry-run", cfg, log), backendName: "dry-run", allow: new Allowlist([]), record: (r) => csv.record(r), log });
  const link: HubLink = new HubLink({ hubs: [url], heartbeatMs: 60_000, token: "t".repeat(16), log, applier, csv, state: new StateFile(undefined, log, () => ({ cursor: link.cursor, claims: applier.claims })), ...extra });
  return {
    link, applier, lines,
    rows: async () => {
      await new Promise((r) => setTimeout(r, 20));
      const text = await readFile(join(dir, "agent.csv"), "utf8");
      return text.trim().split("\n").slice(1);
    },
    close: async () => {
      link.close();
      await applier.close();
      await csv.close();
    },
  };
}

async function until(pred: () => boolean, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe("Session: what the hub sends is checked as strictly as the hub checks nodes", () => {
  const HOSTILE = ["127.0.0.53", "224.0.0.251", "255.255.255.255", "0.1.2.3", "240.0.0.1", "128.0.0.0/1", "ff02::1", "64:ff9b::/96", "100.64.0.0/10", "2001:db8::/32"];

  test("a sync and live events with refused addresses apply everything else; each refused ban is a REJECT row and a log line", async () => {
    const now = Date.now();
    const dir = await mkdtemp(join(tmpdir(), "banshare-admit-"));
    const hub = await scriptedHub((send) => {
      const bad = HOSTILE.map((ip, i) => ev("ban", ip, now, null, "evil", String(i + 1)));
      send({ type: "sync", full: true, seq: "20", more: true, events: [bad[0], ev("ban", "203.0.113.1", now, null), ...bad.slice(1, 5), { kind: "nonsense" }] });
      send({ type: "sync", full: true, seq: "20", events: [...bad.slice(5), ev("ban", "2001:db8:1::/64", now, null)] });
      setTimeout(() => {
        send({ type: "event", ...ev("ban", "127.0.0.1", now, null, "evil", "21") });
        send({ type: "event", ...ev("ban", "203.0.113.2", now, null, "web2", "22") });
        send({ type: "sync", full: false, seq: "24", events: [ev("ban", "ff05::1", now, null, "evil", "23"), ev("ban", "203.0.113.3", now, null, "web2", "24")] });
      }, 50);
    });
    const agent = await linkTo(hub.url, dir);
    try {
      agent.link.connect();
      await until(() => agent.link.cursor?.seq === "24", "the cursor to reach seq 24");
      assert.deepEqual([...agent.applier.claims.keys()].sort(), ["2001:db8:1::/64", "203.0.113.1", "203.0.113.2", "203.0.113.3"]);
      const rejects = (await agent.rows()).filter((r) => r.includes(",REJECT,"));
      for (const ip of [...HOSTILE, "127.0.0.1", "ff05::1"]) assert.ok(rejects.some((r) => r.includes(`,${ip},`) && r.includes("from the hub: Refusing to ban")), `REJECT row for ${ip}`);
      assert.ok(rejects.some((r) => /1 malformed event\(s\) in a sync frame from the hub: event kind ""nonsense""/.test(r)), rejects.join("\n"));
      assert.ok(agent.lines.some((l) => l.startsWith("warning: ignoring the hub's ban of 64:ff9b::/96 from evil: Refusing to ban 64:ff9b::/96")), agent.lines.join("\n"));
      assert.ok(agent.lines.some((l) => /^full sync: 2 event\(s\) at seq 20$/.test(l)), agent.lines.join("\n"));
    } finally {
      await agent.close();
      await hub.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("--max-prefix-v4/-v6 set the agent's limits; broader networks from the hub are refused", async () => {
    const r = parseArgs(["--hub", "ws://127.0.0.1:1", "--token-file", "/t", "--max-prefix-v4", "24", "--max-prefix-v6", "48"]);
    assert.ok(r.command === "run");
    if (r.command !== "run") return;
    assert.deepEqual(r.options.maxPrefix, { v4: 24, v6: 48 });
    assert.deepEqual((parseArgs(["--hub", "ws://127.0.0.1:1", "--token-file", "/t"]) as { options: { maxPrefix: unknown } }).options.maxPrefix, { v4: 32, v6: 64 });
    assert.throws(() => parseArgs(["--hub", "ws://127.0.0.1:1", "--token-file", "/t", "--max-prefix-v4", "33"]), /Expected --max-prefix-v4 to be a prefix length 0-32, got 33/);
    const now = Date.now();
    const dir = await mkdtemp(join(tmpdir(), "banshare-admit-"));
    const hub = await scriptedHub((send) => send({ type: "sync", full: true, seq: "3", events: [ev("ban", "198.51.100.0/24", now, null), ev("ban", "198.51.0.0/16", now, null, "web2"), ev("ban", "2001:db8::/48", now, null, "web3")] }));
    const agent = await linkTo(hub.url, dir, { maxPrefix: { v4: 24, v6: 48 } });
    try {
      agent.link.connect();
      await until(() => agent.link.cursor?.seq === "3", "the sync");
      assert.deepEqual([...agent.applier.claims.keys()].sort(), ["198.51.100.0/24", "2001:db8::/48"]);
    } finally {
      await agent.close();
      await hub.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("a sync of 200,000 events in one frame (about 40 MB) is taken whole: no spread push to overflow the stack", async () => {
    const now = Date.now();
    const dir = await mkdtemp(join(tmpdir(), "banshare-bigsync-"));
    const N = 200_000;
    const hub = await scriptedHub((send) => {
      const events = Array.from({ length: N }, (_, i) => ev("ban", i % 2 ? `127.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}` : `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`, now, null, "web1", String(i + 1)));
      send({ type: "sync", full: true, seq: String(N), events });
    });
    const agent = await linkTo(hub.url, dir);
    try {
      agent.link.connect();
      await until(() => agent.link.cursor?.seq === String(N), "the big sync", 60_000);
      assert.equal(agent.applier.claims.size, N / 2, "the loopback half refused, the rest taken");
      assert.ok(agent.lines.some((l) => l === "warning: ignored 99990 more event(s) of that frame from the hub (REJECT rows in the CSV)"), agent.lines.slice(0, 20).join("\n"));
    } finally {
      await agent.close();
      await hub.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  test("a sync past its bound (events, or bytes of endless more: true chunks) drops the connection, keeps the claims, and backs off more each time", async () => {
    const now = Date.now();
    const dir = await mkdtemp(join(tmpdir(), "banshare-endless-"));
    const at: number[] = [];
    const hub = await scriptedHub((send, n, sock) => {
      at.push(Date.now());
      if (n <= 2) setTimeout(() => sock.terminate(), 50);
      if (n === 1) return send({ type: "sync", full: true, seq: "1", events: [ev("ban", "203.0.113.1", now, null)] });
      if (n === 2) return;
      if (n === 3) return send({ type: "sync", full: true, seq: "9", events: Array.from({ length: 101 }, (_, i) => ev("ban", `198.51.100.${i}`, now, null)) });
      // Endless chunks of nothing new.
      const timer = setInterval(() => send({ type: "sync", full: true, seq: "9", more: true, events: [] }), 1);
      sock.on("close", () => clearInterval(timer));
    });
    const agent = await linkTo(hub.url, dir, { syncLimits: { events: 100, bytes: 100_000 } });
    try {
      agent.link.connect();
      await until(() => at.length >= 6, "three oversized syncs", 30_000).catch((e) => assert.fail(`${e.message}: ${agent.lines.join("\n")}`));
      assert.deepEqual([...agent.applier.claims.keys()], ["203.0.113.1"], "what the first sync brought stays; nothing of the oversized ones");
      assert.equal(agent.link.cursor?.seq, "1");
      assert.ok(agent.lines.some((l) => /^error: the sync from ws:\S+ exceeds 100 events or 100000 bytes \(101 events/.test(l)), agent.lines.join("\n"));
      assert.ok(agent.lines.some((l) => /^error: the sync from ws:\S+ exceeds 100 events or 100000 bytes \(0 events, 1\d{5} bytes so far\)/.test(l)), agent.lines.join("\n"));
      const gaps = at.slice(3).map((t, i) => t - at[i + 2]);
      assert.ok(gaps[2] > gaps[0], `the backoff grows across oversized syncs: ${gaps.join(", ")} ms`);
    } finally {
      await agent.close();
      await hub.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("agent errors by type: a UsageError makes main() print one line and exit 2", () => {
  test("parseArgs() refuses bad usage with a UsageError; main() prints its one line and exits 2", async () => {
    assert.throws(() => parseArgs(["--bogus"]), UsageError);
    assert.throws(() => parseArgs(["--hub", "http://x", "--token-file", "/t"]), UsageError);
    assert.throws(() => parseArgs(["--cleanup", "--backend", "pf"]), (e: Error) => e instanceof UsageError && !e.message.includes("\n"), "yargs' message in one line");
    // A one-value flag given twice is one usage line, not a TypeError further on; repeatable ones repeat.
    for (const argv of [["--backend", "dry-run", "--backend", "ipset", "--hub", "ws://127.0.0.1:1", "--token-file", "/t"], ["--cleanup", "--backend", "ipset", "--backend", "nftables"], ["--hub", "ws://a:1", "--hub", "ws://b:1", "--token-file", "/t"], ["--hub", "ws://a:1", "--token-file", "/t", "--heartbeat", "5", "--heartbeat", "6"]]) {
      const flag = argv.find((a, i) => argv.indexOf(a) !== i)!;
      assert.throws(() => parseArgs(argv), (e: Error) => e instanceof UsageError && e.message.startsWith(`Expected ${flag} once, got it 2 times`) && !e.message.includes("\n"), argv.join(" "));
    }
    const twice = parseArgs(["--hub", "ws://127.0.0.1:1", "--token-file", "/t", "--allow", "192.0.2.1", "--allow", "192.0.2.2", "--hook", "input", "--hook", "forward"]);
    assert.ok(twice.command === "run" && twice.options.allow.length === 2 && twice.options.hooks?.length === 2);
    const write = process.stderr.write.bind(process.stderr);
    let err = "";
    process.stderr.write = ((s: string) => ((err += s), true)) as typeof process.stderr.write;
    try {
      await main(["--hub", "ws://127.0.0.1:1"]);
      assert.equal(process.exitCode, 2);
      assert.equal(err, "agent.ts: Expected --token-file FILE (or BANSHARE_TOKEN_FILE), got none\n");
    } finally {
      process.stderr.write = write;
      process.exitCode = undefined;
    }
  });
});

describe("enforcement reports", () => {
  const NOW = 1_800_000_000_000;
  const state = { backend: "ipset", hooks: [{ hook: "iptables INPUT", state: "present" as const, since: NOW - 1000 }, { hook: "ip6tables INPUT", state: "missing" as const, since: NOW }], missing: ["ip6tables INPUT hook\u0000"], missingSince: NOW, entries: 7, expected: 10, drift: 3, repairs: 2, lastRepair: { at: NOW, what: "x".repeat(300) } };

  test("enforcementFrame() makes a frame messages.ts accepts: the Guard's drift, text cut to printable and bounded", () => {
    const f = enforcementFrame(state);
    assert.deepEqual([f.type, f.claims, f.entries, f.drift, f.repairs], ["enforcement", 10, 7, 3, 2]);
    assert.deepEqual(f.hooks.map((h) => [h.name, h.state]), [["iptables INPUT", "present"], ["ip6tables INPUT", "missing"]]);
    assert.equal(f.missing[0], "ip6tables INPUT hook?");
    const parsed = parseNodeFrame(JSON.stringify(f), NOW);
    assert.ok(parsed.ok, parsed.ok ? "" : parsed.message);
    assert.equal(enforcementFrame({ ...state, entries: undefined, drift: undefined }).drift, 0, "no count compared, no drift claimed");
  });

  test("agentMetricsText() has the counts, the hooks missing and the DROP counters when read", () => {
    const text = agentMetricsText(state, { packets: 12, bytes: 720 });
    for (const line of ["banshare_agent_entries 7", "banshare_agent_claims 10", "banshare_agent_drift 3", "banshare_agent_hooks_missing 1", "banshare_agent_repairs_total 2", "banshare_agent_dropped_packets_total 12", "banshare_agent_dropped_bytes_total 720"]) assert.match(text, new RegExp(`^${line}$`, "m"));
    assert.doesNotMatch(agentMetricsText({ ...state, entries: undefined }, undefined), /banshare_agent_(entries|dropped)/);
  });
});
