/**
 * The soak's short form (`npm run soak -- --short`, test/soak.ts) as a test: a minute of steady
 * bans and unbans from three nodes while the hub and the agents are killed (SIGKILL) and started
 * again, then every agent's kernel set compared with the hub's claims and with what the senders
 * were acked or spooled; once with the hub on its journal, once with two hubs on a Redis that is
 * also killed and started again empty. It runs as its own process, as an operator would run it.
 */
import assert from "node:assert/strict";
import { describe, test, type TestContext } from "node:test";
import { tsx } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";
import type { SoakResult } from "./soak.ts";

/** Runs `test/soak.ts --short` with `extra` flags and checks its result: 0 differences. */
async function shortSoak(t: TestContext, extra: string[]): Promise<SoakResult> {
  const p = tsx("test/soak.ts", ["--short", ...extra], { name: "soak" });
  const info = await p.closed;
  const line = p.lines().find((l) => l.startsWith("soak result "));
  assert.ok(line, `the soak printed no result (exit ${info.code}):\n${p.output().slice(-4000)}`);
  const r = JSON.parse(line.slice("soak result ".length)) as SoakResult;
  for (const l of p.lines().filter((l) => /^soak: \d|^  /.test(l))) t.diagnostic(l);
  assert.ok(r.hubRestarts >= 2 && r.agentRestarts >= 1, `the schedule killed the hub and the agents: ${JSON.stringify(r)}`);
  assert.ok(r.bans.acked > 100 && r.unbans.acked > 50, `steady traffic: ${JSON.stringify(r)}`);
  assert.ok(r.bans.spooled + r.unbans.spooled > 0, "some events found the hub down and were spooled");
  assert.equal(r.refused, 0, "nothing refused");
  assert.equal(r.spoolLeft, 0, "every spooled event delivered");
  assert.deepEqual(r.details, [], "no difference between senders, hubs and kernels");
  assert.equal(r.differences, 0);
  for (const h of r.hubs) assert.equal(h, r.expected, "each hub's claims");
  for (const n of Object.keys(r.agents)) assert.equal(r.agents[n], r.expected, `${n}'s kernel set`);
  assert.equal(info.code, 0, p.output().slice(-2000));
  return r;
}

describe("soak (short form): nodes ban and unban while the hub and the agents are killed and restarted", needs(["root", "netns", "ipset", "iptables", "ip6tables", "curl"], "the soak"), () => {
  test("after a minute of traffic and SIGKILLs of the hub (journal) and the agents, every agent's kernel set equals the hub's claims and what the senders were acked: 0 differences", async (t) => {
    await shortSoak(t, []);
  });

  test("two hubs on a Redis that is also killed and started again empty: 0 differences (the hubs write the fleet state back)", needs(["redis-server"], "the soak on Redis"), async (t) => {
    const r = await shortSoak(t, ["--store", "redis"]);
    assert.equal(r.hubs.length, 2);
    assert.ok(r.storeLosses >= 1, "Redis was emptied during the run");
  });
});
