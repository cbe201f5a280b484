/**
 * A hub restart (stopped, down a few seconds, started again on its journal): the agents retry
 * at a restart's pace (every 0.25-1 s, jittered), so each is back within about a second of the
 * hub listening, resumes from its cursor, and takes a ban published right after the restart.
 * The old backoff (0.5 s doubling to 30 s) had them wait 4-8 s more after an 8 s outage.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { rows, startFleet, startHubProc, waitFor, type Fleet } from "./lib/fleet.ts";
import { createTopology } from "./lib/netns.ts";
import { runSync, tsx } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

const AGENTS = ["a1", "a2", "a3"];
const DOWN_MS = 8000;

describe("agents come back within about a second of a hub restart", () => {
  let fleet: Fleet;

  before(async () => {
    fleet = await startFleet({ nodes: [["pub", "node"], ...AGENTS.map((n) => [n, "node"] as [string, "node"])], journal: true, agents: AGENTS });
  });
  after(() => fleet?.stop());

  test("stopped for 8 s and started again: every retry is at most 1 s apart, each agent resumes, and a ban made after the restart reaches all", async (t) => {
    assert.equal((await fleet.ban("pub", "ban", "203.0.113.50")).code, 0);
    for (const n of AGENTS) await waitFor(() => rows(fleet.csv(n), "BLOCK", "203.0.113.50").length, `${n} to block the first ban`);
    const mark = Object.fromEntries(AGENTS.map((n) => [n, fleet.agents[n].lines().length]));
    await fleet.hub.proc.stop("SIGTERM", 5000);
    await new Promise((r) => setTimeout(r, DOWN_MS));
    fleet.hub = await startHubProc(fleet.hubArgs);
    const listening = Date.now();
    for (const n of AGENTS) await waitFor(() => fleet.agents[n].lines().slice(mark[n]).some((l) => /resumed after seq/.test(l)), `${n} to resume from its cursor`, 20_000);
    const back = Date.now() - listening;
    t.diagnostic(`all ${AGENTS.length} agents resumed ${back} ms after the hub listened again (the hub was down ${DOWN_MS} ms)`);
    for (const n of AGENTS) {
      const retries = fleet.agents[n].lines().slice(mark[n]).flatMap((l) => {
        const m = / in (\d+) ms$/.exec(l);
        return m && /retrying/.test(l) ? [Number(m[1])] : [];
      });
      // Down 8 s: at 0.25-1 s apiece that is 8 or more retries, none longer than a second.
      assert.ok(retries.length >= DOWN_MS / 1000, `${n} retried only ${retries.length} times: ${retries.join(", ")}`);
      assert.ok(retries.every((d) => d >= 250 && d <= 1000), `${n} waited ${retries.join(", ")} ms between retries`);
    }
    assert.equal((await fleet.ban("pub", "ban", "203.0.113.51")).code, 0);
    for (const n of AGENTS) await waitFor(() => rows(fleet.csv(n), "BLOCK", "203.0.113.51").length, `${n} to block the ban made after the restart`);
  });
});

describe("an agent whose --ca or --token-file cannot be read says which option, before it touches the kernel", () => {
  test("one line naming the option and the path, exit 1, no set created (ipset backend, in a namespace of its own)", needs(["root", "netns", "ipset"], "agent start-up"), async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-cafile-"));
    const topo = await createTopology(["web"], { prefix: "bca" });
    try {
      await writeFile(join(dir, "token"), "t".repeat(32), { mode: 0o600 });
      for (const [flag, args] of [["ca", ["--token-file", join(dir, "token"), "--ca", join(dir, "missing-ca.pem")]], ["token-file", ["--token-file", join(dir, "missing-token")]]] as const) {
        const agent = tsx("agent.ts", ["--hub", "wss://127.0.0.1:1", ...args, "--backend", "ipset", "--prefix", "bsca"], { name: `agent-${flag}`, netns: topo.ns("web") });
        const info = await agent.closed;
        assert.equal(info.code, 1, agent.output());
        assert.match(agent.output().trim(), new RegExp(`^agent\\.ts: Expected --${flag} \\S+missing-\\S+ \\(or "${flag}" in --config\\) to be a file the agent can read: ENOENT`));
        assert.equal(agent.output().trim().split("\n").length, 1);
        const sets = runSync("ip", ["netns", "exec", topo.ns("web"), "ipset", "list", "-n"]).stdout;
        assert.doesNotMatch(sets, /bsca/, "the agent created its sets before failing");
      }
    } finally {
      await topo.destroy();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
