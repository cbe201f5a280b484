/**
 * What the README's deploy section has a new sysadmin run: `add-node --out` writes the token
 * 0600 and never over another file; `gen-cert` covers the hub's own names as well, so the
 * README's checks on the hub itself work; ban.ts says so when a token file others can read is used.
 */
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import { chmod, mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { runBan, startFleet, type Fleet } from "./lib/fleet.ts";
import { tsx } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

async function hub(args: string[]): Promise<{ code: number | null; output: string }> {
  const p = tsx("hub.ts", args, { name: `hub ${args[0]}` });
  const info = await p.closed;
  return { code: info.code, output: p.output() };
}

describe("the deploy section's commands", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "banshare-deploy-"));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  test("add-node --out writes the token to a new file of mode 600, and refuses an existing one (exit 2, the token list unchanged)", async () => {
    const tokens = join(dir, "tokens");
    const r = await hub(["add-node", "web1", "--tokens", tokens, "--out", join(dir, "web1.token")]);
    assert.equal(r.code, 0, r.output);
    assert.doesNotMatch(r.output, /^[A-Za-z0-9_-]{20,}$/m, "the token was printed too");
    assert.equal((await stat(join(dir, "web1.token"))).mode & 0o777, 0o600);
    assert.match(await readFile(join(dir, "web1.token"), "utf8"), /^\S{16,}\n$/);
    const before = await readFile(tokens, "utf8");
    const again = await hub(["add-node", "web2", "--tokens", tokens, "--out", join(dir, "web1.token")]);
    assert.equal(again.code, 2, again.output);
    assert.match(again.output.trim(), /^hub\.ts: Expected --out \S+web1\.token to be a new file, got one that exists/);
    assert.equal(await readFile(tokens, "utf8"), before);
  });

  test("gen-cert covers the --host names and localhost, 127.0.0.1 and ::1, and says so", needs(["openssl"]), async () => {
    const r = await hub(["gen-cert", "--dir", join(dir, "tls"), "--host", "hub.example.net"]);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /hub\.pem covers hub\.example\.net, localhost, 127\.0\.0\.1, ::1/);
    const cert = new X509Certificate(await readFile(join(dir, "tls", "hub.pem")));
    assert.equal(cert.subjectAltName, "DNS:hub.example.net, DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1");
    assert.ok(cert.checkIP("127.0.0.1") && cert.checkHost("hub.example.net"));
  });
});

describe("ban.ts warns about a token file others can read", () => {
  let fleet: Fleet;
  before(async () => {
    fleet = await startFleet({ nodes: [["web1", "node"]] });
  });
  after(() => fleet?.stop());

  test("mode 644: the ban is sent, with one warning line naming the file and chmod 600", async () => {
    await chmod(fleet.tokenFiles.web1, 0o644);
    const r = await runBan(["ban", "203.0.113.70", "--hub", fleet.hub.url, "--token-file", fleet.tokenFiles.web1, "--spool", join(fleet.dir, "no-agent-spool")]);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output.trim(), /^ban\.ts: warning: \S+ is readable by every user \(mode 0644\): chmod 600 it$/);
    await chmod(fleet.tokenFiles.web1, 0o600);
    const quiet = await runBan(["ban", "203.0.113.71", "--hub", fleet.hub.url, "--token-file", fleet.tokenFiles.web1, "--spool", join(fleet.dir, "no-agent-spool")]);
    assert.equal(quiet.output, "");
  });
});
