import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { parseArgs, spool, toFrame, UsageError } from "../ban.ts";

const NOW = 1_800_000_000_000;
const base = ["--hub", "ws://127.0.0.1:7700", "--token-file", "/etc/banshare/token"];

describe("ban parseArgs()", () => {
  test("turns a Fail2Ban call into send options", () => {
    const o = parseArgs(["ban", "203.0.113.7", "--jail", "sshd", "--bantime", "3600", "--time", "1799999999.5", ...base], {}, {}, NOW);
    assert.notEqual(o, "help");
    if (o === "help") return;
    assert.equal(o.command, "ban");
    assert.equal(o.ip, "203.0.113.7");
    assert.equal(o.bantime, 3600);
    assert.equal(o.detectedAt, 1_799_999_999_500);
    assert.deepEqual(o.hubs, ["ws://127.0.0.1:7700"]);
    assert.equal(o.timeoutMs, 5000);
    assert.deepEqual(toFrame(o, "x1"), { type: "ban", id: "x1", ip: "203.0.113.7", jail: "sshd", bantime: 3600, detectedAt: 1_799_999_999_500 });
  });

  test("command line beats environment beats config file", () => {
    const config = { hub: "ws://config:1", tokenFile: "/config-token", timeout: 9, spool: "/spool-from-config" };
    const env = { BANSHARE_HUB: "ws://env:1" };
    const o = parseArgs(["unban", "2001:DB8::7", "--timeout", "2"], env, config, NOW);
    if (o === "help") return assert.fail("help");
    assert.deepEqual(o.hubs, ["ws://env:1"]);
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
    ];
    for (const [argv, re] of cases) {
      const args = argv.includes("--hub") ? [...argv, "--token-file", "/t"] : [...argv, ...base];
      assert.throws(() => parseArgs(args, {}, {}, NOW), (e: Error) => e instanceof UsageError && re.test(e.message) && !e.message.includes("\n"), argv.join(" "));
    }
    assert.throws(() => parseArgs(["ban", "203.0.113.7"], {}, {}, NOW), /--hub/);
  });
});

describe("spool()", () => {
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

test("parseArgs() takes Fail2Ban's permanent `--bantime -1` as a value", () => {
  const o = parseArgs(["ban", "203.0.113.7", "--bantime", "-1", ...base], {}, {}, NOW);
  assert.ok(o !== "help" && o.bantime === -1);
});
