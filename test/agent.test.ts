import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  cleanupCommands,
  iptablesChangeCommands,
  iptablesReconcileCommands,
  ipsetChangeScript,
  ipsetReconcileScript,
  KernelSession,
  ipsetSession,
  ipsetSetupCommands,
  nextDelay,
  nftChangeScript,
  nftReconcileScript,
  nftSession,
  nftSetupScript,
  parseArgs,
  remainingSeconds,
} from "../agent.ts";
import { parseAddress } from "../messages.ts";

const NOW = 1_800_000_000_000;
const cfg = { prefix: "banshare", ports: [] as number[], allow: [parseAddress("192.0.2.0/24")!, parseAddress("2001:db8::/32")!] };

describe("nextDelay()", () => {
  test("grows exponentially, is capped, and jitters within [50%, 100%] of the step", () => {
    assert.equal(nextDelay(0, 500, 30_000, () => 1), 500);
    assert.equal(nextDelay(0, 500, 30_000, () => 0), 250);
    assert.equal(nextDelay(3, 500, 30_000, () => 1), 4000);
    assert.equal(nextDelay(20, 500, 30_000, () => 1), 30_000);
    assert.equal(nextDelay(1000, 500, 30_000, () => 0), 15_000);
    const seen = new Set(Array.from({ length: 50 }, () => nextDelay(4)));
    assert.ok(seen.size > 10, "jitter spreads reconnects");
    for (const d of seen) assert.ok(d >= 4000 && d <= 8000);
  });
});

describe("remainingSeconds()", () => {
  test("rounds up, 0 for permanent, negative once over", () => {
    assert.equal(remainingSeconds(NOW + 1, NOW), 1);
    assert.equal(remainingSeconds(NOW + 600_000, NOW), 600);
    assert.equal(remainingSeconds(null, NOW), 0);
    assert.equal(remainingSeconds(NOW, NOW), -1);
  });
});

describe("ipset backend plans", () => {
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

describe("ipset session", () => {
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

describe("nftables backend plans", () => {
  test("setup adds table and sets without flushing them, and rewrites its chain's rules", () => {
    const s = nftSetupScript({ ...cfg, ports: [22] });
    assert.match(s, /^add set inet banshare v4 \{ type ipv4_addr; flags interval, timeout; size 2097152; \}$/m);
    assert.doesNotMatch(s, /flush set/);
    assert.match(s, /^flush chain inet banshare input$/m);
    assert.match(s, /^add rule inet banshare input ip saddr \{ 192\.0\.2\.0\/24 \} return$/m);
    assert.match(s, /^add rule inet banshare input tcp dport \{ 22 \} ip saddr @v4 drop$/m);
    assert.match(s, /^add rule inet banshare input tcp dport \{ 22 \} ip6 saddr @v6 drop$/m);
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

  test("the long-lived nft -i gets a batch as one line (one transaction), then its acknowledging list", () => {
    const kind = nftSession("banshare");
    assert.deepEqual(kind.argv, ["stdbuf", "-oL", "nft", "-i"]);
    const script = nftChangeScript("banshare", [{ ip: "203.0.113.7", until: undefined }], NOW);
    assert.equal(kind.frame(script), "add element inet banshare v4 { 203.0.113.7 }; delete element inet banshare v4 { 203.0.113.7 }\nlist chain inet banshare input\n");
    assert.equal(kind.frame(""), "\nlist chain inet banshare input\n");
    assert.equal(kind.isAck("}"), true);
    assert.equal(kind.isAck("\t}"), false, "the chain's closing brace is not the table's");
  });

  test("reconcile flushes and refills both sets in one atomic transaction", () => {
    const s = nftReconcileScript("banshare", new Map<string, number | null>([["203.0.113.7", null], ["203.0.113.8", NOW + 2000]]), NOW);
    assert.equal(s, "flush set inet banshare v4\nflush set inet banshare v6\nadd element inet banshare v4 { 203.0.113.7, 203.0.113.8 timeout 2s }\n");
  });
});

describe("iptables backend plans", () => {
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

describe("cleanupCommands()", () => {
  test("removes only the agent's own objects", () => {
    assert.deepEqual(cleanupCommands("nftables", "banshare"), [["nft", "delete", "table", "inet", "banshare"]]);
    const ipset = cleanupCommands("ipset", "banshare").map((c) => c.join(" "));
    assert.ok(ipset.includes("iptables -w -D INPUT -j banshare"));
    assert.ok(ipset.includes("ipset destroy banshare-v4"));
    assert.ok(ipset.every((c) => /banshare/.test(c)), "nothing but banshare objects");
    assert.deepEqual(cleanupCommands("dry-run", "banshare"), []);
  });
});

describe("agent parseArgs()", () => {
  test("turns flags into options", () => {
    const r = parseArgs(["--hub", "ws://10.0.0.1:7700,wss://hub2:7700", "--token-file", "/t", "--backend", "nftables", "--allow", "192.0.2.0/24", "--allow", "2001:db8::1", "--ports", "22,2222", "--heartbeat", "5"]);
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
    ];
    for (const [argv, re] of cases) assert.throws(() => parseArgs(argv), re, argv.join(" "));
  });

  test("--cleanup needs no hub", () => {
    assert.deepEqual(parseArgs(["--cleanup", "--backend", "nftables"]), { command: "cleanup", backend: "nftables", prefix: "banshare" });
  });
});
