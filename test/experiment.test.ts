/**
 * `npm run experiment` (examples/experiment.ts), the paper's experiment with real sshd, Fail2Ban,
 * hydra and kernels in network namespaces: one round as a real process must block the attacker
 * on every client and lift the block again, as its exit code, its CSV files and its output say.
 * How fast is measured, not asserted. Its pure parts are checked without root.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { attackAddress, parseArgs, parseFail2banLog, stats, tickLabel, timelineSvg, type RoundResult } from "../examples/experiment.ts";
import { readCsv } from "./lib/fleet.ts";
import { listNamespaces, sweepStaleNamespaces } from "./lib/netns.ts";
import { tsx, type Proc } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

describe("experiment.ts pure parts: flags, Fail2Ban log lines, statistics and the timeline figure, without a kernel", () => {
  test("parseArgs() takes the documented flags and refuses others", () => {
    assert.deepEqual({ ...parseArgs([]), out: "" }, { rounds: 1, backend: "ipset", keep: false, out: "" });
    assert.equal(parseArgs(["--rounds", "5", "--backend", "nftables"]).rounds, 5);
    assert.throws(() => parseArgs(["--rounds", "0"]), /Expected --rounds to be a whole number from 1 to 150, got 0/);
    assert.throws(() => parseArgs(["--backend", "pf"]), /backend/);
    assert.throws(() => parseArgs(["--round", "2"]), /Unknown argument/);
  });

  test("parseFail2banLog() reads Found, Ban and Unban lines with their ms", () => {
    const log = [
      "2026-11-27 02:53:59,608 fail2ban.filter         [812]: INFO    [sshd] Found 10.77.0.101 - 2026-11-27 02:53:59",
      "2026-11-27 02:54:00,324 fail2ban.actions        [812]: NOTICE  [sshd] Ban 10.77.0.101",
      "2026-11-27 02:54:00,330 fail2ban.actions        [812]: NOTICE  [sshd] 10.77.0.101 already banned",
      "2026-11-27 02:54:02,601 fail2ban.actions        [812]: NOTICE  [sshd] Unban 10.77.0.101",
    ].join("\n");
    const events = parseFail2banLog(log);
    assert.deepEqual(events.map((e) => [e.kind, e.ip, e.jail]), [["Found", "10.77.0.101", "sshd"], ["Ban", "10.77.0.101", "sshd"], ["Unban", "10.77.0.101", "sshd"]]);
    assert.equal(events[1].time - events[0].time, 716);
  });

  test("stats() gives min, median and max, skipping missing values", () => {
    assert.deepEqual(stats([30, undefined, 10, 20]), { n: 3, min: 10, median: 20, max: 30 });
    assert.deepEqual(stats([4, 1, 3, 2]), { n: 4, min: 1, median: 3, max: 4 });
    assert.equal(stats([undefined]), undefined);
  });

  test("timelineSvg() draws one panel per round with a lane per node and an axis", () => {
    const t0 = Date.parse("2026-11-27T02:53:59.406Z");
    const at = (dt: number) => new Date(t0 + dt).toISOString();
    const row = (action: string, dt: number, rt = "", detail = "") => ({ time: at(dt), node: "", action, ip: attackAddress(1), origin: "client1", jail: "sshd", until: "", rt_ms: rt, detail });
    const r: RoundResult = {
      round: 1, ip: attackAddress(1), attackAt: t0, unbanAt: t0 + 3000, before: {}, afterBan: {}, afterUnban: {}, ok: true,
      failures: [200, 300, 400, 450, 500].map((d) => t0 + d), detectedAt: t0 + 500, bannedAt: t0 + 900, unbannedAt: t0 + 3100,
      hub: { receiveBan: row("RECEIVE", 1500, "1000", "ban from client1"), relayBan: row("RELAY", 1503, "1003", "ban seq 1") },
      block: { client2: row("BLOCK", 1510, "1010"), client3: row("BLOCK", 1512, "1012") }, schedule: {}, unblock: { client2: row("UNBLOCK", 3600) },
    };
    const svg = timelineSvg([r, { ...r, round: 2 }]);
    assert.match(svg, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    assert.match(svg, /<\/svg>\n$/);
    assert.equal(svg.match(/>Round \d/g)?.length, 2);
    for (const lane of ["attacker", "client1", "hub", "client2", "client3"]) assert.equal(svg.match(new RegExp(`>${lane}</text>`, "g"))?.length, 2, lane);
    assert.match(svg, />RT 1010 ms</);
    assert.equal(tickLabel(1500, 500, 4000), "1.5 s");
    assert.equal(tickLabel(200, 100, 1200), "200 ms");
  });
});

describe("npm run experiment, one round: hydra's attacker is blocked on every client, and unbanip opens them all again", needs(["root", "netns", "ipset", "iptables", "fail2ban-server", "fail2ban-client", "sshd", "hydra"], "experiment"), () => {
  let p: Proc | undefined;
  after(async () => {
    // On a timeout: SIGTERM makes the experiment remove what it made; a run killed harder leaves
    // namespaces of a dead PID, which the sweep removes.
    await p?.stop("SIGTERM", 20_000);
    sweepStaleNamespaces("bsexp");
  });

  test("hydra on client1 gets the attacker blocked on every client, and unbanip on client1 opens them all again", { timeout: 180_000 }, async () => {
    const out = await mkdtemp(join(tmpdir(), "banshare-experiment-"));
    try {
      const run = (p = tsx("examples/experiment.ts", ["--rounds", "1", "--out", out], { name: "experiment" }));
      const info = await run.closed;
      const text = run.output();
      assert.equal(info.code, 0, text);
      assert.match(text, /Table 1\./);
      assert.match(text, /All checks passed/);

      const ip = attackAddress(1);
      const [round] = readCsv(join(out, "response-times.csv")) as unknown as Array<Record<string, string>>;
      assert.equal(round.ip, ip);
      assert.equal(round.ok, "true", JSON.stringify(round));
      for (const c of ["client1", "client2", "client3"]) {
        assert.notEqual(round[`${c}_after_ban`], "connected", `${c} still let the attacker in`);
        assert.equal(round[`${c}_after_unban`], "connected", `${c} kept blocking after the unban`);
      }
      assert.ok(Number(round.failures) >= 5, `Fail2Ban banned after ${round.failures} failures`);

      const events = readCsv(join(out, "events.csv")) as unknown as Array<Record<string, string>>;
      const has = (node: string, action: string) => events.some((e) => e.node === node && e.action === action && e.ip === ip);
      for (const [node, action] of [["client1", "BLOCK"], ["hub", "RECEIVE"], ["hub", "RELAY"], ["client2", "BLOCK"], ["client3", "BLOCK"], ["client1", "UNBLOCK"], ["client2", "UNBLOCK"], ["client3", "UNBLOCK"]]) {
        assert.ok(has(node, action), `no ${action} row for ${node} in events.csv`);
      }
      for (const c of ["client2", "client3"]) {
        const block = readCsv(join(out, "logs", `${c}.csv`)).find((r) => r.action === "BLOCK" && r.ip === ip);
        assert.equal(block?.origin, "client1");
        assert.match(block?.rt_ms ?? "", /^\d+$/);
      }
      assert.match(readFileSync(join(out, "timeline.svg"), "utf8"), /<svg[^]*Round 1[^]*<\/svg>/);
      assert.ok(existsSync(join(out, "logs", "client1-fail2ban.log")));
      assert.deepEqual(listNamespaces().filter((n) => n.startsWith(`bsexp-${run.pid}-`)), [], "namespaces left behind");
    } finally {
      await rm(out, { recursive: true, force: true });
    }
  });
});
