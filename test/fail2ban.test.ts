/**
 * Real Fail2Ban: fail2ban-server runs in client1's namespace with the project's
 * fail2ban/action.d/banshare.conf and filter for `sshd -E` logs. Failure lines appended to the
 * log it watches must make the attacker's address dropped by the kernels of the other
 * namespaces (and held by client1's own agent); `fail2ban-client set sshd unbanip` must lift it there again.
 */
import assert from "node:assert/strict";
import { appendFile, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { failureLines, startFail2ban, REPO_DIR, type Fail2ban } from "./lib/fail2ban.ts";
import { enrol, rows, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { createTopology, startTcpListener, tcpProbe, type Topology } from "./lib/netns.ts";
import type { Proc } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

const PORT = 2222;

describe("Fail2Ban's banshare action on the real kernel: sshd failures on one client drop the attacker on the others, and unbanip lifts it", needs(["root", "netns", "ipset", "iptables", "ip6tables", "fail2ban-server", "fail2ban-client"], "fail2ban"), () => {
  let topo: Topology;
  let dir: string;
  let hub: HubProc;
  let f2b: Fail2ban;
  const agents: Proc[] = [];
  const OTHERS = ["client2", "client3"];
  const csv = (n: string) => join(dir, `${n}.csv`);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-f2b-"));
    topo = await createTopology(["hub", "client1", ...OTHERS, "attacker"], { prefix: "bf2b" });
    const tokens = await enrol(dir, [["client1", "node"], ["client2", "node"], ["client3", "node"]]);
    hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", join(dir, "journal.jsonl"), "--csv", join(dir, "hub.csv"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") });
    for (const n of ["client1", ...OTHERS]) {
      await startTcpListener(topo, n, PORT);
      agents.push(await startAgentProc(n, ["--hub", hub.url, "--token-file", tokens[n], "--csv", csv(n)], { netns: topo.ns(n) }));
    }
    // The sender's config file, as a user would write /etc/banshare/ban.json.
    const config = join(dir, "ban.json");
    await writeFile(config, JSON.stringify({ hub: hub.url, "token-file": tokens.client1, timeout: 5, spool: join(dir, "spool"), insecure: true }));
    f2b = await startFail2ban({
      dir: join(dir, "f2b"),
      netns: topo.ns("client1"),
      logFile: join(dir, "sshd.log"),
      maxretry: 3,
      bantime: 600,
      actions: `banshare[banshare_dir=${REPO_DIR}, node=${process.execPath}, config=${config}]`,
    });
  });

  after(async () => {
    await f2b?.stop();
    for (const a of agents) await a.stop("SIGTERM", 5000);
    await hub?.proc.stop("SIGTERM", 5000);
    await topo?.destroy();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("sshd failures on client1 get the attacker dropped on client2 and client3; unbanip lifts it", async () => {
    const attacker = topo.ip("attacker");
    for (const n of OTHERS) assert.equal(await tcpProbe(topo, "attacker", n, PORT), true, `attacker reaches ${n} before`);
    await appendFile(join(dir, "sshd.log"), failureLines(attacker, 3));
    await waitFor(async () => (await f2b.banned()).includes(attacker), "Fail2Ban to ban the attacker", 20_000);
    for (const n of OTHERS) {
      await waitFor(async () => !(await tcpProbe(topo, "attacker", n, PORT, 400)), `${n} to drop the attacker`, 20_000);
      const [row] = rows(csv(n), "BLOCK", attacker);
      assert.equal(row.origin, "client1");
      assert.equal(row.jail, "sshd");
      assert.match(row.rt_ms, /^\d+$/);
    }
    // The origin's agent holds its own node's ban too (the paper's "Client 1 BLOCK" row).
    const own = await waitFor(() => rows(csv("client1"), "BLOCK", attacker)[0], "client1's agent to block its own node's ban", 20_000);
    assert.equal(own.origin, "client1");
    const received = rows(join(dir, "hub.csv"), "RECEIVE", attacker)[0];
    assert.ok(received, "the hub logged the ban");

    await f2b.client(["set", f2b.jail, "unbanip", attacker]);
    for (const n of OTHERS) await waitFor(() => tcpProbe(topo, "attacker", n, PORT), `${n} to let the attacker in again`, 20_000);
  });
});
