import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { WebSocketServer, type WebSocket as ServerSocket } from "ws";
import {
  Allowlist,
  Applier,
  BACKEND_NAMES,
  BACKENDS,
  changesFor,
  cleanupCommands,
  countCommands,
  CsvLog,
  desiredState,
  HubLink,
  ipsetNames,
  main,
  makeBackend,
  Spool,
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
  nftChangeScript,
  nftReconcileScript,
  nftSession,
  nftSetupScript,
  parseArgs,
  remainingSeconds,
  type Row,
  agentMetricsText,
  enforcementFrame,
} from "../agent.ts";
import { countKernelEntries, kernelCountCommands, parseArgs as parseBanArgs } from "../ban.ts";
import { mergeClaim, parseAddress, parseNodeFrame, type BanFrame, type Claims, type FleetEvent, type UnbanFrame } from "../messages.ts";

const NOW = 1_800_000_000_000;
const cfg = { prefix: "banshare", ports: [] as number[], allow: [parseAddress("192.0.2.0/24")!, parseAddress("2001:db8::/32")!] };

describe("nextDelay(): reconnect delays grow exponentially to a cap, with jitter", () => {
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
    assert.equal(countKernelEntries("iptables", out), BACKENDS.iptables.listed!(out).length);
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

describe("Spool: forwarding ban.ts's spooled events over one connection", () => {
  test("sends each file once, deletes it on ack, keeps it on rate_limited, moves it aside on a refusal or when unreadable", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-spool-"));
    try {
      const frame = (id: string, ip: string): BanFrame => ({ type: "ban", id, ip, jail: "sshd", bantime: 600, detectedAt: Date.now() });
      await writeFile(join(dir, "1.json"), JSON.stringify(frame("a1", "203.0.113.1")));
      await writeFile(join(dir, "2.json"), JSON.stringify(frame("a2", "203.0.113.2")));
      await writeFile(join(dir, "3.json"), JSON.stringify(frame("a3", "203.0.113.3")));
      await writeFile(join(dir, "4.json"), "not json");
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
      assert.deepEqual((await readdir(join(dir, "rejected"))).sort(), ["3.json", "4.json"]);
      await spool.forward();
      assert.deepEqual(sent.map((f) => f.id), ["a1", "a2", "a3", "a2"], "a rate-limited event goes again next round");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
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

describe("agent errors by type: a UsageError makes main() print one line and exit 2", () => {
  test("parseArgs() refuses bad usage with a UsageError; main() prints its one line and exits 2", async () => {
    assert.throws(() => parseArgs(["--bogus"]), UsageError);
    assert.throws(() => parseArgs(["--hub", "http://x", "--token-file", "/t"]), UsageError);
    assert.throws(() => parseArgs(["--cleanup", "--backend", "pf"]), (e: Error) => e instanceof UsageError && !e.message.includes("\n"), "yargs' message in one line");
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
  const state = { backend: "ipset", hooks: [{ hook: "iptables INPUT", state: "present" as const, since: NOW - 1000 }, { hook: "ip6tables INPUT", state: "missing" as const, since: NOW }], missing: ["ip6tables INPUT hook\u0000"], missingSince: NOW, entries: 7, expected: 10, repairs: 2, lastRepair: { at: NOW, what: "x".repeat(300) } };

  test("enforcementFrame() makes a frame messages.ts accepts: drift from the counts, text cut to printable and bounded", () => {
    const f = enforcementFrame(state);
    assert.deepEqual([f.type, f.claims, f.entries, f.drift, f.repairs], ["enforcement", 10, 7, 3, 2]);
    assert.deepEqual(f.hooks.map((h) => [h.name, h.state]), [["iptables INPUT", "present"], ["ip6tables INPUT", "missing"]]);
    assert.equal(f.missing[0], "ip6tables INPUT hook?");
    const parsed = parseNodeFrame(JSON.stringify(f), NOW);
    assert.ok(parsed.ok, parsed.ok ? "" : parsed.message);
    assert.equal(enforcementFrame({ ...state, entries: undefined }).drift, 0, "no count, no drift claimed");
  });

  test("agentMetricsText() has the counts, the hooks missing and the DROP counters when read", () => {
    const text = agentMetricsText(state, { packets: 12, bytes: 720 });
    for (const line of ["banshare_agent_entries 7", "banshare_agent_claims 10", "banshare_agent_drift 3", "banshare_agent_hooks_missing 1", "banshare_agent_repairs_total 2", "banshare_agent_dropped_packets_total 12", "banshare_agent_dropped_bytes_total 720"]) assert.match(text, new RegExp(`^${line}$`, "m"));
    assert.doesNotMatch(agentMetricsText({ ...state, entries: undefined }, undefined), /banshare_agent_(entries|dropped)/);
  });
});
