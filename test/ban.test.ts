/**
 * ban.ts's pure core: the Fail2Ban action's flags, the operator's commands, the frames they send,
 * the spool, and the import, list and status text. No hub, no process: see cli.test.ts for those.
 */
import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { compareAddresses, formatBanTable, formatDifference, formatDuration, importFrame, kernelAddresses, kernelCountCommands, kernelListCommands, parseArgs, parseImport, spool, toFrame, UsageError, type SendOptions } from "../ban.ts";
import type { BanList } from "../messages.ts";
import { f2bTime } from "./lib/fail2ban.ts";
import { requireOrSkip } from "./lib/skip.ts";

const NOW = 1_800_000_000_000;
const base = ["--hub", "ws://127.0.0.1:7700", "--token-file", "/etc/banshare/token"];

/** parseArgs() of a ban or unban: its send options (or "help"). */
function parseSend(...args: Parameters<typeof parseArgs>): SendOptions | "help" {
  const o = parseArgs(...args);
  if (o !== "help" && o.command !== "ban" && o.command !== "unban") assert.fail(`expected ban or unban options, got ${o.command}`);
  return o;
}

describe("ban.ts parseArgs(): a Fail2Ban call becomes send options, and bad input is one sentence (exit 2)", () => {
  test("turns a Fail2Ban call into send options", () => {
    const o = parseSend(["ban", "203.0.113.7", "--jail", "sshd", "--bantime", "3600", "--time", "1799999999.5", ...base], {}, {}, NOW);
    assert.notEqual(o, "help");
    if (o === "help") return;
    assert.equal(o.command, "ban");
    assert.equal(o.ip, "203.0.113.7");
    assert.equal(o.bantime, 3600);
    assert.equal(o.detectedAt, 1_799_999_999_500);
    assert.deepEqual(o.hubs, ["ws://127.0.0.1:7700"]);
    assert.equal(o.timeoutMs, 2000);
    assert.equal(o.connectTimeoutMs, 300);
    assert.deepEqual(toFrame(o, "x1"), { type: "ban", id: "x1", ip: "203.0.113.7", jail: "sshd", bantime: 3600, detectedAt: 1_799_999_999_500 });
  });

  test("command line beats environment beats config file", () => {
    const config = { hub: "wss://config:1", tokenFile: "/config-token", timeout: 9, spool: "/spool-from-config" };
    const env = { BANSHARE_HUB: "wss://env:1" };
    const o = parseSend(["unban", "2001:DB8::7", "--timeout", "2"], env, config, NOW);
    if (o === "help") return assert.fail("help");
    assert.deepEqual(o.hubs, ["wss://env:1"]);
    assert.equal(o.tokenFile, "/config-token");
    assert.equal(o.timeoutMs, 2000);
    assert.equal(o.spoolDir, "/spool-from-config");
    assert.equal(o.ip, "2001:db8::7");
    assert.equal(toFrame(o, "y").type, "unban");
  });

  test("refuses invalid input with one sentence (exit 2)", () => {
    const cases: Array<[string[], RegExp]> = [
      [["ban"], /IP address/],
      [["block", "203.0.113.7"], /ban or unban/],
      [["ban", "1.2.3.4; rm -rf /"], /address/],
      [["ban", "-F"], /Unknown option|address/],
      [["ban", "1.2.3.4\n5.6.7.8"], /address/],
      [["ban", "127.0.0.1"], /loopback/],
      [["ban", "0.0.0.0/0"], /unspecified/],
      [["ban", "203.0.113.7", "203.0.113.8"], /one IP/],
      [["ban", "203.0.113.7", "--bantime", "ten"], /--bantime/],
      [["ban", "203.0.113.7", "--bantime", "0"], /--bantime/],
      [["ban", "203.0.113.7", "--bantime", "-5"], /--bantime/],
      [["ban", "203.0.113.7", "--jail", "a b"], /--jail/],
      [["ban", "203.0.113.7", "--timeout", "-1"], /--timeout/],
      [["ban", "203.0.113.7", "--time", String(NOW / 1000 + 3600)], /--time/],
      [["ban", "203.0.113.7", "--hub", "http://x"], /ws:\/\//],
      [["ban", "203.0.113.7", "--nope"], /Unknown option/],
      [["ban", "203.0.113.7", "--jail", "sshd", "--jail", "nginx"], /^Expected --jail once, got it 2 times$/],
      [["ban", "203.0.113.7", "--bantime", "-1", "--bantime=60"], /^Expected --bantime once/],
    ];
    for (const [argv, re] of cases) {
      const args = argv.includes("--hub") ? [...argv, "--token-file", "/t"] : [...argv, ...base];
      assert.throws(() => parseArgs(args, {}, {}, NOW), (e: Error) => e instanceof UsageError && re.test(e.message) && !e.message.includes("\n"), argv.join(" "));
    }
    assert.throws(() => parseArgs(["ban", "203.0.113.7"], {}, {}, NOW), /--hub/);
  });

  test("parseArgs() takes Fail2Ban's permanent `--bantime -1` as a value", () => {
    const o = parseSend(["ban", "203.0.113.7", "--bantime", "-1", ...base], {}, {}, NOW);
    assert.ok(o !== "help" && o.bantime === -1);
  });
});

describe("ban.ts spool(): an event the hub did not ack waits on disk for the agent", () => {
  test("writes the frame atomically as one JSON file named by detection time", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-spool-"));
    try {
      const frame = { type: "ban" as const, id: "abc", ip: "203.0.113.7", jail: "sshd", bantime: 60, detectedAt: NOW };
      const path = await spool(join(dir, "spool"), frame);
      assert.equal(path, join(dir, "spool", `${NOW}-abc.json`));
      assert.deepEqual(JSON.parse(await readFile(path, "utf8")), frame);
      assert.deepEqual(await readdir(join(dir, "spool")), [`${NOW}-abc.json`], "no temp file left behind");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("ban.ts pure helpers: import, list and status turn text into frames and tables without a hub", () => {
  test("parseImport() reads the three Fail2Ban outputs, one error per bad line", () => {
    const now = 1_800_000_000_000;
    const d = { jail: "sshd", bantime: 600, now };
    const literal = parseImport("[{'sshd': ['192.0.2.1', '198.51.100.7']}, {'recidive': ['192.0.2.1', 'nope']}, {'x': []}]\n", d);
    assert.equal(literal.errors.length, 1);
    assert.match(literal.errors[0], /^line 1: .*"nope"/);
    assert.deepEqual(literal.items.map((x) => [x.ip, x.jail, x.bantime, x.detectedAt]).sort(), [["192.0.2.1", "sshd", 600, now], ["198.51.100.7", "sshd", 600, now]]);
    const start = now - 3_600_000;
    const timed = parseImport(`192.0.2.9 \t${f2bTime(start)} + 86400 = x\n`.replace(" = x", ` = ${f2bTime(start + 86_400_000)}`) + `192.0.2.10 \t${f2bTime(start)} + -1 = 9999-12-31 23:59:59\n192.0.2.11 \t${f2bTime(start)} + 60 = ${f2bTime(start + 60_000)}\n`, d);
    assert.deepEqual(timed.errors, []);
    assert.equal(timed.over, 1, "the ban that ended is skipped and counted");
    assert.deepEqual(timed.items.map((x) => [x.ip, x.bantime, x.detectedAt]), [["192.0.2.9", 86400, start], ["192.0.2.10", -1, start]]);
    const plain = parseImport("# a comment\n192.0.2.20\n\n2001:DB8::1 192.0.2.21 # two\nfoo\n127.0.0.1\n", d);
    assert.deepEqual(plain.items.map((x) => x.ip), ["192.0.2.20", "2001:db8::1", "192.0.2.21"]);
    assert.equal(plain.errors.length, 2);
    assert.match(plain.errors[0], /^line 5: Expected addresses/);
    assert.match(plain.errors[1], /^line 6: .*loopback/);
    assert.match(parseImport("[{'sshd': ['192.0.2.1']", d).errors[0], /^line 1: Expected/);
  });

  test("parseArgs() takes a restored ban's rounded <time> as the earliest time that rounds to it", () => {
    const base = ["--hub", "ws://127.0.0.1:1", "--token-file", "/t"];
    const fresh = parseSend(["ban", "192.0.2.1", "--time", "1799999999.764", ...base], {}, {}, 1_800_000_000_000);
    const restored = parseSend(["ban", "192.0.2.1", "--time", "1800000000", "--restored", "1", ...base], {}, {}, 1_800_000_000_000);
    assert.ok(fresh !== "help" && restored !== "help");
    assert.equal(fresh.detectedAt, 1_799_999_999_764);
    assert.equal(restored.detectedAt, 1_799_999_999_500);
    assert.ok(restored.detectedAt <= fresh.detectedAt, "a restored ban is never newer than the original");
    assert.throws(() => parseArgs(["ban", "192.0.2.1", "--restored", "yes", ...base]), /--restored/);
    assert.throws(() => parseArgs(["ban", "192.0.2.1", "--json", ...base]), /--json with ban/);
    assert.equal((parseArgs(["list", ...base]) as { command: string }).command, "list", "list is one of the commands, not an unknown one");
  });

  test("formatBanTable() lists addresses newest first with time left by the hub's clock", () => {
    const list: BanList = {
      hub: "h",
      seq: "3",
      now: 1_000_000,
      count: 2,
      bans: [
        { ip: "192.0.2.1", nodes: 2, claims: [{ origin: "a", jail: "sshd", until: 1_600_000, detectedAt: 1000, seq: "1" }, { origin: "b", jail: "sshd", until: null, detectedAt: 3000, seq: "2" }] },
        { ip: "192.0.2.2", nodes: 1, claims: [{ origin: "a", jail: "sshd", until: 1_060_000, detectedAt: 2000, seq: "3" }] },
      ],
    };
    const lines = formatBanTable(list).trimEnd().split("\n");
    assert.match(lines[0], /^ADDRESS\s+NODES\s+ORIGIN\s+JAIL\s+DETECTED \(UTC\)\s+LEFT$/);
    assert.match(lines[1], /^192\.0\.2\.1\s+2\s+b\s+sshd\s+.*permanent$/);
    assert.match(lines[2], /^\s+a\s+sshd\s+.*10m00s$/);
    assert.match(lines[3], /^192\.0\.2\.2\s+1\s+a\s+.*1m00s$/);
    assert.match(lines[4], /^2 address\(es\) blocked, 3 claim\(s\)/);
    assert.equal(formatDuration(90_061_000), "1d01h");
  });

  test("kernelAddresses() reads what the agent's backend sets hold, in canonical text", () => {
    assert.deepEqual(kernelCountCommands("ipset", "banshare"), [["ipset", "list", "-terse", "banshare-v4"], ["ipset", "list", "-terse", "banshare-v6"]]);
    assert.deepEqual(kernelListCommands("ipset", "banshare"), [["ipset", "list", "banshare-v4"], ["ipset", "list", "banshare-v6"]]);
    const ipset = "Name: banshare-v6\nType: hash:net\nHeader: family inet6 hashsize 1024 maxelem 2097152 timeout 0\nSize in memory: 552\nReferences: 1\nNumber of entries: 2\nMembers:\n2001:db8::7 timeout 3599\n2001:db8:1::/64 timeout 0\n";
    assert.deepEqual(kernelAddresses("ipset", ipset), ["2001:db8::7", "2001:db8:1::/64"]);
    assert.deepEqual(kernelAddresses("ipset", "Name: banshare-v4\nNumber of entries: 0\nMembers:\n"), []);
    const nft = { nftables: [{ metainfo: {} }, { set: { name: "v4", elem: [{ elem: { val: "192.0.2.1", timeout: 600, expires: 590 } }, { elem: { val: { prefix: { addr: "198.51.100.0", len: 24 } } } }, "192.0.2.9"] } }] };
    assert.deepEqual(kernelAddresses("nftables", JSON.stringify(nft)), ["192.0.2.1", "198.51.100.0/24", "192.0.2.9"]);
    assert.deepEqual(kernelAddresses("nftables", JSON.stringify({ nftables: [{ metainfo: {} }, { set: { name: "v6" } }] })), []);
    assert.deepEqual(kernelAddresses("iptables", "-N banshare\n-A banshare -s 198.51.100.0/24 -j RETURN\n-A banshare -s 192.0.2.1/32 -j DROP\n"), ["192.0.2.1"]);
    assert.throws(() => kernelAddresses("ipset", "ipset v7.17: The set with the given name does not exist"), /Members/);
  });

  test("compareAddresses() says which addresses the kernel misses and which it holds extra, not only how many", () => {
    // Same count, different contents: what a count alone calls in step.
    const d = compareAddresses(["192.0.2.1", "192.0.2.2", "203.0.113.9"], ["192.0.2.1", "198.51.100.7", "198.51.100.8"]);
    assert.deepEqual(d, { missing: ["198.51.100.7", "198.51.100.8"], extra: ["192.0.2.2", "203.0.113.9"] });
    assert.equal(formatDifference(d), "2 missing (198.51.100.7, 198.51.100.8), 2 extra (192.0.2.2, 203.0.113.9)");
    // An address inside a network the kernel blocks is covered, as the agent does it.
    assert.deepEqual(compareAddresses(["2001:db8::/64"], ["2001:db8::/64", "2001:db8::7"]), { missing: [], extra: [] });
    assert.equal(formatDifference({ missing: [], extra: [] }), "in step: the same addresses");
    assert.equal(formatDifference({ missing: Array.from({ length: 7 }, (_, i) => `192.0.2.${i}`), extra: [] }, 2), "7 missing (192.0.2.0, 192.0.2.1, ...)");
  });

  test("importFrame() derives the frame's id from its content: the same ban imported twice is the same event", () => {
    const x = { line: 3, ip: "192.0.2.1", jail: "sshd", bantime: 600, detectedAt: NOW };
    const f = importFrame(x);
    assert.deepEqual({ ...f, id: "" }, { type: "ban", id: "", ip: "192.0.2.1", jail: "sshd", bantime: 600, detectedAt: NOW });
    assert.match(f.id, /^imp-[A-Za-z0-9_-]{24}$/);
    assert.equal(importFrame({ ...x, line: 9 }).id, f.id, "the input line is not part of the ban");
    for (const other of [{ ip: "192.0.2.2" }, { jail: "recidive" }, { bantime: 601 }, { detectedAt: NOW + 1 }]) assert.notEqual(importFrame({ ...x, ...other }).id, f.id, JSON.stringify(other));
  });

  test("formatDuration() rounds to the second and shows the two largest units", () => {
    assert.deepEqual([0, 499, 42_000, 598_000, 3_600_000 + 5 * 60_000, 86_400_000 * 2 + 3 * 3_600_000, -5000].map(formatDuration), ["0s", "0s", "42s", "9m58s", "1h05m", "2d03h", "0s"]);
  });

  test("kernelCountCommands() asks each backend for the agent's objects; dry-run has none", () => {
    assert.deepEqual(kernelCountCommands("nftables", "bs"), ["v4", "v6", "v4net", "v6net"].map((set) => ["nft", "-j", "list", "set", "inet", "bs", set]));
    assert.deepEqual(kernelCountCommands("iptables", "bs"), [["iptables", "-w", "-S", "bs"], ["ip6tables", "-w", "-S", "bs"]]);
    assert.deepEqual(kernelCountCommands("dry-run", "bs"), []);
  });
});

describe("ban.ts parseArgs(): the operator's commands take their own flags only", () => {
  test("list, status and import get their options and defaults", () => {
    assert.deepEqual(parseArgs(["list", "--json", ...base], {}, {}, NOW), { command: "list", json: true, hubs: ["ws://127.0.0.1:7700"], tokenFile: "/etc/banshare/token", timeoutMs: 2000, connectTimeoutMs: 300, ca: undefined });
    assert.deepEqual(parseArgs(["status", "--state", "/s", "--backend", "nftables", "--prefix", "bs", ...base], {}, {}, NOW), { command: "status", statePath: "/s", backend: "nftables", prefix: "bs", hubs: ["ws://127.0.0.1:7700"], tokenFile: "/etc/banshare/token", timeoutMs: 2000, connectTimeoutMs: 300, ca: undefined });
    const status = parseArgs(["status", ...base], { BANSHARE_BACKEND: "iptables" }, {}, NOW);
    assert.ok(status !== "help" && status.command === "status" && status.backend === "iptables" && status.prefix === "banshare");
    assert.deepEqual(parseArgs(["import", "bans.txt", "--jail", "recidive", "--bantime", "-1", "--concurrency", "2", ...base], {}, {}, NOW), { command: "import", file: "bans.txt", jail: "recidive", bantime: -1, concurrency: 2, hubs: ["ws://127.0.0.1:7700"], tokenFile: "/etc/banshare/token", timeoutMs: 2000, connectTimeoutMs: 300, ca: undefined });
    const stdin = parseArgs(["import", ...base], {}, {}, NOW);
    assert.ok(stdin !== "help" && stdin.command === "import" && stdin.file === "-" && stdin.concurrency === 8 && stdin.bantime === 600);
    assert.equal(parseArgs(["--help"]), "help");
  });

  test("a flag of another command, a bad backend or prefix, or an extra operand is a UsageError of one line", () => {
    const cases: Array<[string[], RegExp]> = [
      [["list", "--state", "/s"], /--state with list: it is an option of status/],
      [["status", "--json"], /--json with status/],
      [["import", "--spool", "/s"], /--spool with import: it is an option of ban and unban/],
      [["status", "--backend", "pf"], /--backend to be ipset, nftables, iptables, dry-run/],
      [["status", "--prefix", "Bad!"], /--prefix/],
      [["list", "extra"], /no operand after list/],
      [["import", "a", "b"], /one FILE/],
      [["import", "--concurrency", "65"], /--concurrency/],
      [[], /got none/],
    ];
    for (const [argv, re] of cases) assert.throws(() => parseArgs([...argv, ...base], {}, {}, NOW), (e: Error) => e instanceof UsageError && re.test(e.message) && !e.message.includes("\n"), argv.join(" "));
    // The environment and a shared --config may hold other commands' flags: only the command line is checked.
    assert.doesNotThrow(() => parseArgs(["list", ...base], { BANSHARE_STATE: "/s" }, { spool: "/x" }, NOW));
  });
});

describe("ban.ts against hostile input: plain ws:// off this host, hub text, huge lists, an unsafe spool", () => {
  test("parseArgs() refuses a plain ws:// hub off loopback unless --insecure (flag, environment or config)", () => {
    const token = ["--token-file", "/t"];
    for (const hub of ["ws://10.1.2.3:7700", "ws://hub.example:7700", "ws://[2001:db8::1]:7700", "wss://hub.example,ws://198.51.100.1:7700"]) {
      for (const cmd of [["ban", "192.0.2.1"], ["unban", "192.0.2.1", "--all-nodes"], ["list"], ["status"], ["import"]]) {
        assert.throws(() => parseArgs([...cmd, "--hub", hub, ...token], {}, {}, NOW), (e: Error) => e instanceof UsageError && /^Expected a wss:\/\/ hub off this host, got "ws:\/\/.*in clear.*--insecure/.test(e.message) && !e.message.includes("\n"), `${cmd[0]} ${hub}`);
      }
      assert.doesNotThrow(() => parseArgs(["ban", "192.0.2.1", "--hub", hub, "--insecure", ...token], {}, {}, NOW));
      assert.doesNotThrow(() => parseArgs(["ban", "192.0.2.1", "--hub", hub, ...token], { BANSHARE_INSECURE: "true" }, {}, NOW));
      assert.doesNotThrow(() => parseArgs(["ban", "192.0.2.1", "--hub", hub, ...token], {}, { insecure: true }, NOW));
    }
    for (const hub of ["ws://127.0.0.1:7700", "ws://127.8.9.1:7700", "ws://localhost:7700", "ws://[::1]:7700", "wss://hub.example:7700", "wss://198.51.100.1:7700"]) {
      assert.doesNotThrow(() => parseArgs(["ban", "192.0.2.1", "--hub", hub, ...token], {}, {}, NOW), hub);
    }
  });

  test("formatBanTable() lists 200,000 claims (a spread of that many arguments throws a RangeError)", () => {
    const n = 200_000;
    const bans = Array.from({ length: n }, (_, i) => ({ ip: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`, nodes: 1, claims: [{ origin: "web", jail: "sshd", until: 2_000_000, detectedAt: 1000 + i, seq: String(i + 1) }] }));
    const text = formatBanTable({ hub: "h", seq: String(n), now: 1_000_000, count: n, bans });
    const lines = text.trimEnd().split("\n");
    assert.equal(lines.length, n + 2);
    assert.match(lines[1], /^10\.3\.13\.63\s+1\s+web\s+sshd\s/, "the newest first");
    assert.equal(lines.at(-1), `${n} address(es) blocked, ${n} claim(s); hub h, seq ${n}`);
  });

  test("formatBanTable() prints the hub's strings with their control characters escaped", () => {
    const list = { hub: "h\x1b]0;owned\x07", seq: "1", now: 1_000_000, count: 1, bans: [{ ip: "192.0.2.1\nFORGED 6.6.6.6", nodes: 1, claims: [{ origin: "web\r\x1b[2J", jail: "ssh\u2028d", until: null, detectedAt: 1000, seq: "1" }] }] } as unknown as BanList;
    const text = formatBanTable(list);
    assert.equal(text.trimEnd().split("\n").length, 3, text);
    assert.doesNotMatch(text, /[\x00-\x09\x0b-\x1f\x7f\u2028]/);
    assert.match(text, /192\.0\.2\.1\\nFORGED 6\.6\.6\.6/);
    assert.match(text, /web\\r\\x1b\[2J/);
    assert.match(text, /ssh\\u2028d/);
    assert.match(text, /hub h\\x1b\]0;owned\\x07/);
  });

  test("spool() refuses a directory others can write to or another user owns, and writes nothing there", async (t) => {
    if (requireOrSkip(t, ["root"])) return;
    const dir = await mkdtemp(join(tmpdir(), "banshare-spool-"));
    try {
      const frame = { type: "ban" as const, id: "x1", ip: "192.0.2.1", jail: "sshd", bantime: 600, detectedAt: NOW };
      const { chmod, chown, mkdir, symlink } = await import("node:fs/promises");
      const loose = join(dir, "loose");
      await mkdir(loose);
      for (const [mode, re] of [[0o777, /writable by its group \(mode 0777\): chmod 700 it/], [0o703, /writable by other users \(mode 0703\)/], [0o1777, /mode 1777/]] as const) {
        await chmod(loose, mode);
        await assert.rejects(spool(loose, frame), re);
      }
      const foreign = join(dir, "foreign");
      await mkdir(foreign, { mode: 0o700 });
      await chown(foreign, 65534, 65534);
      await assert.rejects(spool(foreign, frame), /belongs to uid 65534, not to this user \(uid 0\): chown it/);
      await symlink(foreign, join(dir, "link"));
      await assert.rejects(spool(join(dir, "link"), frame), /is not a directory/);
      assert.deepEqual([await readdir(loose), await readdir(foreign)], [[], []]);
      const fine = join(dir, "fine");
      assert.match(await spool(fine, frame), /fine\/1800000000000-x1\.json$/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
