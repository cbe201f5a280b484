/**
 * The agent's CSV log with a real hub, real agents and ban.ts as real processes: a BLOCK row
 * carries `rt_ms` only for a live event. An agent restarted without a state file gets the
 * fleet's bans in a full sync: their BLOCK rows say so and leave `rt_ms` empty, so response-time
 * statistics read from the CSV (examples/experiment.ts) count live events only.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { rows, startFleet, waitFor, type Fleet } from "./lib/fleet.ts";

const IP = "203.0.113.41";

describe("agent CSV: rt_ms only for live events, never for what a sync brings", () => {
  let fleet: Fleet;
  before(async () => {
    fleet = await startFleet({ nodes: [["web1", "node"], ["web2", "node"]], agents: ["web1"] });
  });
  after(async () => {
    await fleet.stop();
  });

  test("a live ban's BLOCK has rt_ms; after a restart without a state file the sync's BLOCK says sync and has none", async () => {
    const r = await fleet.ban("web2", "ban", IP, "--jail", "sshd", "--bantime", "600");
    assert.equal(r.code, 0, r.output);
    const csv = fleet.csv("web1");
    const [live] = await waitFor(() => (rows(csv, "BLOCK", IP).length ? rows(csv, "BLOCK", IP) : undefined), "web1's live BLOCK row");
    assert.match(live.rt_ms, /^\d+$/, "a live event's BLOCK has a response time");
    assert.match(live.detail, /^event: banned by web2$/);

    await fleet.agents.web1.stop();
    // Long enough that a response time taken from the sync would stand out.
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await fleet.startAgent("web1");
    const synced = await waitFor(() => rows(csv, "BLOCK", IP)[1], "web1's BLOCK row after the restart");
    assert.match(synced.detail, /^sync: banned by web2 \(already banned when this agent synced; no response time\)$/);
    assert.equal(synced.rt_ms, "", `a synced entry has no response time, got ${synced.rt_ms} ms`);
  });
});
