/**
 * Security, part 3 of 3 (with security-fuzz and security-limits): TLS with gen-cert (right CA,
 * wrong CA, plain ws:// against the TLS port), and no plain ws:// off loopback.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { request as httpsRequest } from "node:https";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { delta, refusedByReason, rows, runBan, startAgentProc, startFleet, waitFor, type Fleet, type HubProc } from "./lib/fleet.ts";
import { tsx } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

// ---------------------------------------------------------------------------------------------
// TLS

/** GET over https with a private CA. */
function httpsGet(url: string, ca: string, tokenFile?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = tokenFile ? { authorization: `Bearer ${readFileSync(tokenFile, "utf8").trim()}` } : {};
    const req = httpsRequest(url, { ca, headers }, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve(body));
    });
    req.on("error", reject);
    req.end();
  });
}

describe("security: over TLS only a hub certified by the given CA is trusted, and plain ws:// is refused with a clear error", needs(["openssl"], "security: TLS"), () => {
  let fleet: Fleet;
  let dir: string;
  let hub: HubProc;
  let tokens: Record<string, string>;
  let ca: string;
  const csv = (n: string) => fleet.csv(n);
  const metrics = async () => refusedByReason(await httpsGet(`https://127.0.0.1:${hub.port}/metrics`, ca, tokens.viewer));
  const healthz = async () => JSON.parse(await httpsGet(`https://127.0.0.1:${hub.port}/healthz`, ca, tokens.viewer));
  const ban = (args: string[], spool: string) => runBan([...args, "--token-file", tokens.web, "--spool", join(dir, spool), "--timeout", "5"]);

  before(async () => {
    const genCerts = async (at: string) => {
      for (const d of ["tls", "other"]) {
        const p = tsx("hub.ts", ["gen-cert", "--dir", join(at, d), "--host", "127.0.0.1", "--host", "localhost", "--days", "2"], { name: `gen-cert ${d}` });
        assert.equal((await p.closed).code, 0, p.output());
      }
    };
    fleet = await startFleet({
      nodes: [["web", "node"], ["good", "node"], ["wrongca", "node"], ["plain", "node"], ["viewer", "reader"]],
      prepare: genCerts,
      hubArgs: (at) => ["--tls-cert", join(at, "tls", "hub.pem"), "--tls-key", join(at, "tls", "hub.key"), "--heartbeat", "5"],
    });
    ({ dir, hub, tokenFiles: tokens } = fleet);
    ca = readFileSync(join(dir, "tls", "ca.pem"), "utf8");
    assert.match(hub.url, /^wss:\/\//);
  });

  after(() => fleet?.stop());

  test("an agent and ban.ts with --ca work end to end over wss://", async () => {
    await startAgentProc("good", ["--hub", hub.url, "--token-file", tokens.good, "--ca", join(dir, "tls", "ca.pem"), "--backend", "dry-run", "--csv", csv("good"), "--heartbeat", "5"]);
    const r = await ban(["ban", "203.0.113.10", "--hub", hub.url, "--ca", join(dir, "tls", "ca.pem")], "good-spool");
    assert.equal(r.code, 0, r.output);
    assert.equal(r.output, "");
    await waitFor(() => rows(csv("good"), "BLOCK", "203.0.113.10").length, "the agent to block the ban it got over wss://");
  });

  test("with another CA's certificate the agent logs what to fix and gets nothing; ban.ts fails (exit 1) naming --ca, and keeps the ban", async () => {
    const before = await healthz();
    const agentSpool = join(dir, "wrongca-agent-spool");
    const agent = tsx("agent.ts", ["--hub", hub.url, "--token-file", tokens.wrongca, "--ca", join(dir, "other", "ca.pem"), "--backend", "dry-run", "--csv", csv("wrongca"), "--heartbeat", "5", "--spool", agentSpool], { name: "wrongca" });
    await agent.waitForLine(/error: wss:\/\/127\.0\.0\.1:\d+: the hub's certificate is not signed by a CA this side trusts \(\w+\): give --ca/, 15_000);
    // A certificate this side cannot verify is a set-up error, not an outage: Fail2Ban's log must
    // show it (exit 1, one line naming --ca), though the ban is still spooled for an agent set up right.
    for (const extra of [["--ca", join(dir, "other", "ca.pem")], []]) {
      const spool = `wrong-ca-spool-${extra.length}`;
      const r = await ban(["ban", "203.0.113.11", "--hub", hub.url, ...extra], spool);
      assert.equal(r.code, 1, r.output);
      assert.match(r.output, /^ban\.ts: error: could not send \(wss:\/\/127\.0\.0\.1:\d+: the hub's certificate is not signed by a CA this side trusts \(\w+\): give --ca the hub's ca\.pem[^\n]*; spooled the ban of 203\.0\.113\.11/);
      assert.equal(r.output.trim().split("\n").length, 1);
      assert.equal((await readdir(join(dir, spool))).filter((f) => f.endsWith(".json")).length, 1);
    }
    // Handed to the agent with the wrong CA: it keeps the ban, and ban.ts says why it cannot go on.
    const h = await ban(["ban", "203.0.113.14", "--hub", hub.url], "wrongca-agent-spool");
    assert.equal(h.code, 1, h.output);
    assert.match(h.output, /^ban\.ts: the agent holds the ban of 203\.0\.113\.14 but cannot deliver it: wss:\/\/127\.0\.0\.1:\d+: the hub's certificate is not signed by a CA this side trusts \(\w+\): give --ca/);
    assert.equal((await readdir(agentSpool)).filter((f) => f.endsWith(".json")).length, 1);
    // A ban from a node that does trust the hub: the wrong-CA agent never receives it.
    assert.equal((await ban(["ban", "203.0.113.12", "--hub", hub.url, "--ca", join(dir, "tls", "ca.pem")], "ok-spool")).code, 0);
    await waitFor(() => rows(csv("good"), "BLOCK", "203.0.113.12").length, "the trusting agent to get the ban");
    const after = await healthz();
    assert.equal(Number(after.seq), Number(before.seq) + 1, "the unverified ban.ts reached the hub");
    assert.doesNotMatch(agent.output(), /connected to|synced/);
    assert.equal(rows(csv("wrongca"), "BLOCK", "203.0.113.12").length, 0);
    await waitFor(() => hub.proc.lines().some((l) => /refused connection from 127\.0\.0\.1:\d+: TLS handshake failed: /.test(l)), "the hub to log the failed handshake");
    await agent.stop("SIGTERM", 5000);
  });

  test("a plain ws:// client to the TLS port is refused with an error that says to use wss://", async () => {
    const before = await metrics();
    const plainUrl = hub.url.replace(/^wss:/, "ws:");
    const r = await ban(["ban", "203.0.113.13", "--hub", plainUrl], "plain-spool");
    assert.equal(r.code, 1, r.output);
    assert.match(r.output, /^ban\.ts: .*HTTP 400.*wss:\/\//);
    assert.equal(r.output.trim().split("\n").length, 1);
    assert.equal(existsSync(join(dir, "plain-spool")), false, "a ban sent to the wrong scheme was spooled");
    const agent = tsx("agent.ts", ["--hub", plainUrl, "--token-file", tokens.plain, "--backend", "dry-run", "--heartbeat", "5"], { name: "plain" });
    await agent.waitForLine(/refused the connection: HTTP 400 .*wss:\/\//, 15_000);
    await agent.stop("SIGTERM", 5000);
    await waitFor(() => hub.proc.lines().some((l) => /refused connection from 127\.0\.0\.1:\d+: plain HTTP/.test(l)), "the hub to log the plain request");
    assert.ok((delta(await metrics(), before).tls ?? 0) >= 2, "plain requests on the TLS port are not counted");
    assert.equal(hub.proc.exitInfo(), undefined);
  });

  test("a hub refuses to serve plain ws:// off loopback without --insecure", async () => {
    const p = tsx("hub.ts", ["--tokens", join(dir, "tokens"), "--listen", "0.0.0.0:0"], { name: "hub-plain" });
    const info = await p.closed;
    assert.equal(info.code, 2, p.output());
    assert.equal(p.output().trim().split("\n").length, 1, p.output());
    assert.match(p.output(), /^hub\.ts: Expected --tls-cert and --tls-key to listen on 0\.0\.0\.0 .*--insecure/);
  });
});
