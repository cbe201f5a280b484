/**
 * Issue 14, items 1 and 5: the hub's journal on a disk that fills up or turns read-only, and
 * damaged files. The journal lives on a small tmpfs this test mounts (and unmounts, also on
 * failure); the disk is filled with a real file, turned read-only with `mount -o remount,ro`.
 * Publishers are raw WebSocket clients; what survived is read from the journal, /healthz, a
 * full sync, a resuming client and a restart. Needs root (mount); skips with the reason otherwise.
 */
import assert from "node:assert/strict";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statfsSync, writeFileSync, writeSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, describe, test } from "node:test";
import { CsvFile as AgentCsvFile } from "../agent.ts";
import { CsvFile as HubCsvFile, readJournal } from "../hub.ts";
import { CSV_HEADER } from "../messages.ts";
import type { FleetEvent } from "../messages.ts";
import { connectNode, type HubClient } from "./lib/client.ts";
import { enrol, runBan, startAgentProc, startHubProc, waitFor, type HubProc } from "./lib/fleet.ts";
import { onCleanup, runSync, stopAll } from "./lib/proc.ts";
import { needs } from "./lib/skip.ts";

type Frame = Record<string, unknown>;

/** A tmpfs of `size` mounted on a fresh folder; `close()` unmounts it and removes the folder (also at exit). */
function mountTmpfs(size: string): { dir: string; remount(mode: "ro" | "rw"): void; close(): void } {
  const dir = mkdtempSync(join(tmpdir(), "banshare-tmpfs-"));
  const m = runSync("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", dir]);
  if (m.status !== 0) throw new Error(`mount tmpfs on ${dir}: ${m.stderr.trim()}`);
  let mounted = true;
  const close = () => {
    if (mounted && runSync("umount", [dir]).status !== 0) runSync("umount", ["-l", dir]);
    mounted = false;
    rmSync(dir, { recursive: true, force: true });
  };
  const unregister = onCleanup(close);
  return {
    dir,
    remount: (mode) => {
      const r = runSync("mount", ["-o", `remount,${mode}`, dir]);
      if (r.status !== 0) throw new Error(`remount,${mode} ${dir}: ${r.stderr.trim()}`);
    },
    close: () => {
      close();
      unregister();
    },
  };
}

/** Writes zeros to `path` until the filesystem is full (ENOSPC): what a runaway log does to a disk. */
function fillDisk(path: string): void {
  const fd = openSync(path, "w");
  const chunk = Buffer.alloc(4096);
  try {
    for (;;) writeSync(fd, chunk);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOSPC") throw e;
  } finally {
    closeSync(fd);
  }
}

/** Writes zeros to `path` until `leave` bytes are free on its filesystem. */
function fillDiskTo(path: string, leave: number): void {
  const free = statfsSync(path.replace(/\/[^/]+$/, ""));
  const bytes = free.bavail * free.bsize - leave;
  const fd = openSync(path, "w");
  try {
    for (let done = 0; done < bytes; done += 65536) writeSync(fd, Buffer.alloc(Math.min(65536, bytes - done)));
  } finally {
    closeSync(fd);
  }
}

const ban = (id: string, ip: string, detectedAt = Date.now()): Frame => ({ type: "ban", id, ip, jail: "sshd", bantime: 3600, detectedAt });

/** Sends one frame and waits for its answer: the ack's seq, or the error frame's code. */
async function publishOne(pub: HubClient, f: Frame): Promise<{ seq?: string; code?: string }> {
  pub.send(f);
  const a = await pub.next((x) => (x.type === "ack" || x.type === "error") && x.id === f.id, `the answer to ${f.id}`);
  return a.type === "ack" ? { seq: a.seq } : { code: a.code };
}

/** The token of node `name`, enrolled beside the token file `hub` was started with. */
function tokenOf(hub: HubProc, name: string): string {
  const tokens = hub.proc.argv[hub.proc.argv.indexOf("--tokens") + 1];
  return readFileSync(join(dirname(tokens), `${name}.token`), "utf8").trim();
}

/** /healthz as node `pub` sees it (a stranger is told only whether the hub is up). */
async function healthz(hub: HubProc): Promise<{ status: number; body: Record<string, unknown> }> {
  const r = await fetch(`http://127.0.0.1:${hub.port}/healthz`, { headers: { authorization: `Bearer ${tokenOf(hub, "pub")}` } });
  return { status: r.status, body: await r.json() };
}

/** banshare_store_up, as the reader `viewer` reads /metrics. */
async function storeUp(hub: HubProc): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${hub.port}/metrics`, { headers: { authorization: `Bearer ${tokenOf(hub, "viewer")}` } })).text();
  return Number(/^banshare_store_up (\d)$/m.exec(text)?.[1]);
}

/** The events of the full sync a fresh client of `tokenFile` gets. */
async function fullSync(url: string, tokenFile: string): Promise<FleetEvent[]> {
  const c = await connectNode(url, { file: tokenFile }, { hello: { want: "events" } });
  await c.next((f) => f.type === "sync" && !f.more, "the end of the full sync");
  c.close();
  return c.frames.filter((f) => f.type === "sync").flatMap((f) => f.events as FleetEvent[]);
}

/** Every line of the journal after the header is a whole event: nothing torn or damaged left behind. */
async function journalIsWhole(path: string): Promise<FleetEvent[]> {
  const text = readFileSync(path, "utf8");
  assert.ok(text.endsWith("\n"), "the journal ends in the middle of a line");
  const j = (await readJournal(path))!;
  assert.equal(j.skipped, 0, "the journal holds a torn or damaged line");
  return j.events;
}

/** The i-th address of 10.201.0.0/16. */
const addr = (i: number) => `10.201.${i >> 8}.${i & 255}`;

describe("a full or read-only disk under the hub's journal: only events whole on disk are acked, a refused one is spooled, and the hub recovers by itself", needs(["root"], "root (mount a tmpfs)"), () => {
  const dirs: string[] = [];
  after(async () => {
    await stopAll();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  /** Tokens in a plain temp folder; the journal on a fresh tmpfs of `size`. */
  const setup = async (size: string) => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-disk-"));
    dirs.push(dir);
    const tokens = await enrol(dir, [["pub", "node"], ["agent1", "node"], ["viewer", "reader"]]);
    const disk = mountTmpfs(size);
    const journal = join(disk.dir, "journal.jsonl");
    const start = () => startHubProc(["--tokens", join(dir, "tokens"), "--state", journal, "--listen", "127.0.0.1:0", "--rate", "100000", "--burst", "100000"]);
    return { dir, tokens, disk, journal, start };
  };

  test("a full disk: a ban that does not fit is refused, never acked; seqs stay consecutive; room again, the next ban is acked without a restart and a resuming agent misses nothing", async (t) => {
    const s = await setup("256k");
    t.after(() => s.disk.close());
    let hub = await s.start();
    const watcher = await connectNode(hub.url, { file: s.tokens.agent1 }, { hello: { want: "events" } });
    const pub = await connectNode(hub.url, { file: s.tokens.pub }, { hello: true });
    const acked = new Map<string, string>();
    for (let i = 0; i < 20; i++) {
      const a = await publishOne(pub, ban(`b${i}`, addr(i)));
      assert.ok(a.seq, `ban ${i} was refused on an empty disk: ${a.code}`);
      acked.set(addr(i), a.seq);
    }
    fillDisk(join(s.disk.dir, "filler"));
    // The journal's last page may still hold a few lines; past it every ban is refused.
    let refused = 0;
    let i = 20;
    for (; i < 200 && refused < 3; i++) {
      const a = await publishOne(pub, ban(`b${i}`, addr(i)));
      if (a.seq) acked.set(addr(i), a.seq);
      else {
        assert.equal(a.code, "internal", "a refusal for a full disk is a hub-side error (the sender spools it)");
        refused++;
      }
    }
    assert.equal(refused, 3, "no ban was refused on a full disk");
    const down = await healthz(hub);
    assert.equal(down.status, 503);
    assert.equal(down.body.store, "down");
    assert.match(String(down.body.error), /no space left on device|short write/i);
    assert.equal(await storeUp(hub), 0);
    assert.match(hub.proc.output(), /error: cannot write the journal .*refusing events until it can/);
    // Nothing torn stays behind: every line is a whole event, and they are exactly the acked ones.
    assert.deepEqual(new Set((await journalIsWhole(s.journal)).map((e) => e.ip)), new Set(acked.keys()));

    // ban.ts is refused too, and spools the ban for the agent to deliver.
    const spoolDir = join(s.dir, "spool");
    const viaBanTs = "10.201.9.9";
    const r = await runBan(["ban", viaBanTs, "--hub", hub.url, "--token-file", s.tokens.pub, "--spool", spoolDir, "--timeout", "5"]);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /spooled the ban of 10\.201\.9\.9/);

    rmSync(join(s.disk.dir, "filler"));
    await waitFor(async () => (await healthz(hub)).status === 200, "/healthz ok again once the disk has room");
    const next = await publishOne(pub, ban("after", "10.201.8.8"));
    assert.ok(next.seq, `the first ban after the disk has room was refused: ${next.code}`);
    acked.set("10.201.8.8", next.seq);
    assert.match(hub.proc.output(), /the journal .* can be written again/);

    // The spooled ban goes in through a real agent's spool, once the hub can store it.
    const agent = await startAgentProc("agent-pub", ["--hub", hub.url, "--token-file", s.tokens.pub, "--backend", "dry-run", "--spool", spoolDir]);
    await waitFor(() => readdirSync(spoolDir).filter((f) => f.endsWith(".json")).length === 0, "the spool delivered");
    await agent.stop();
    await waitFor(() => watcher.frames.some((f) => f.type === "event" && f.ip === viaBanTs), "the spooled ban relayed");

    // Every seq the watcher saw is new and consecutive: a refused ban's seq was never shown to anyone.
    const seen = watcher.frames.filter((f) => f.type === "event").map((f) => Number(f.seq));
    assert.deepEqual(seen, Array.from({ length: seen.length }, (_, k) => k + 1), "relayed seqs are not 1, 2, 3...");
    assert.equal(seen.length, acked.size + 1);

    // A restart keeps every acked ban; a client resuming from the last seq it saw gets the next ban, and only it.
    const last = String(seen[seen.length - 1]);
    watcher.close();
    pub.close();
    await hub.proc.stop();
    hub = await s.start();
    const synced = new Set((await fullSync(hub.url, s.tokens.agent1)).map((e) => e.ip));
    for (const ip of [...acked.keys(), viaBanTs]) assert.ok(synced.has(ip), `acked ban ${ip} lost at the restart`);
    const resumer = await connectNode(hub.url, { file: s.tokens.agent1 }, { hello: { want: "events", cursor: { hub: String((await healthz(hub)).body.hub), seq: last } } });
    await resumer.next((f) => f.type === "sync", "the resume");
    const pub2 = await connectNode(hub.url, { file: s.tokens.pub }, { hello: true });
    const fresh = await publishOne(pub2, ban("fresh", "10.201.7.7"));
    assert.equal(fresh.seq, String(Number(last) + 1));
    const got = await resumer.next((f) => f.type === "event" && f.ip === "10.201.7.7", "the fresh ban at the resumed client");
    assert.equal(got.seq, fresh.seq);
    assert.deepEqual(resumer.frames.filter((f) => f.type === "sync").flatMap((f) => f.events), [], "the resume replayed events");
    resumer.close();
    pub2.close();
    await hub.proc.stop();
  });

  test("ban.ts with the hub away and its spool's disk full: exit 1 with one line saying so, and no half-written file in the spool", async (t) => {
    const s = await setup("64k");
    t.after(() => s.disk.close());
    const gone = await s.start();
    await gone.proc.stop();
    const spoolDir = join(s.disk.dir, "spool");
    runSync("mkdir", ["-m", "700", spoolDir]);
    fillDisk(join(s.disk.dir, "filler"));
    const r = await runBan(["ban", "10.201.6.6", "--hub", gone.url, "--token-file", s.tokens.pub, "--spool", spoolDir, "--timeout", "2"]);
    assert.equal(r.code, 1, r.output);
    assert.match(r.output, /could not send the ban of 10\.201\.6\.6 .* nor spool it: .*no space left on device/i);
    assert.deepEqual(readdirSync(spoolDir), [], "a temp file was left in the spool");
  });

  test("a restart with less free space than the journal: the start-up rewrite fails, the journal is kept as it was (one log line), and nothing acked is lost", async (t) => {
    const s = await setup("1m");
    t.after(() => s.disk.close());
    let hub = await s.start();
    const pub = await connectNode(hub.url, { file: s.tokens.pub }, { hello: true });
    const now = Date.now();
    for (let i = 0; i < 300; i++) pub.send(ban(`c${i}`, addr(i), now + i));
    await pub.acks(300);
    pub.close();
    await hub.proc.stop();
    const size = readFileSync(s.journal).length;
    // Leave a little less room than the journal needs for its rewrite.
    fillDisk(join(s.disk.dir, "filler"));
    const df = runSync("df", ["--output=avail", "-B1", s.disk.dir]).stdout.trim().split("\n").pop();
    t.diagnostic(`journal ${size} bytes, ${df} bytes free`);
    assert.ok(Number(df) < size);

    hub = await s.start();
    assert.match(hub.proc.output(), /warning: could not compact .*keeping it as it is/);
    assert.equal((await healthz(hub)).body.claims, 300);
    assert.equal((await journalIsWhole(s.journal)).length, 300, "the journal lost acked events at the start");
    assert.ok(!existsSync(`${s.journal}.tmp`), "the failed rewrite's temp file was left behind");
    await hub.proc.stop();

    rmSync(join(s.disk.dir, "filler"));
    hub = await s.start();
    assert.doesNotMatch(hub.proc.output(), /could not compact/);
    assert.equal((await healthz(hub)).body.claims, 300);
    assert.equal((await fullSync(hub.url, s.tokens.agent1)).length, 300);
    await hub.proc.stop();
  });

  test("a compaction as the journal grows, with too little room for the new file: the journal is kept as it was, acks go on, and a restart has every acked ban", async (t) => {
    const s = await setup("8m");
    t.after(() => s.disk.close());
    let hub = await s.start();
    const pub = await connectNode(hub.url, { file: s.tokens.pub }, { hello: true });
    const LIVE = 2500;
    const last = new Map<string, string>();
    const now = Date.now();
    let n = 0;
    /** `count` more bans round the LIVE addresses, each newer than the last on its address; waits for every ack. */
    const burst = async (count: number) => {
      const from = pub.acked.size;
      for (let i = 0; i < count; i++, n++) {
        const ip = addr(n % LIVE);
        last.set(ip, `g${n}`);
        pub.send(ban(`g${n}`, ip, now + n));
      }
      await pub.acks(from + count, 60_000);
    };
    await burst(9_500);
    // Room for some more lines, not for the compacted file (LIVE lines, about half a MB).
    const lineBytes = readFileSync(s.journal).length / 9_500;
    fillDiskTo(join(s.disk.dir, "filler"), Math.round((LIVE * lineBytes) / 2));
    await burst(700);
    await waitFor(() => /warning: could not compact .*keeping it as it is/.test(hub.proc.output()), "the failed compaction's warning");
    assert.ok(!existsSync(`${s.journal}.tmp`), "the failed compaction's temp file was left behind");
    await burst(50);
    pub.close();
    await hub.proc.stop();
    const kept = await journalIsWhole(s.journal);
    assert.equal(kept.length, n, "the journal lost acked lines");

    rmSync(join(s.disk.dir, "filler"));
    hub = await s.start();
    const synced = new Map((await fullSync(hub.url, s.tokens.agent1)).map((e) => [e.ip, e.id]));
    assert.equal(synced.size, LIVE);
    for (const [ip, id] of last) assert.equal(synced.get(ip), id, `${ip}: the newest acked ban was lost`);
    await hub.proc.stop();
  });

  test("the filesystem turns read-only mid-stream: bans are refused (ban.ts spools), /healthz and /metrics say so, and once writable again the hub takes bans without a restart", async (t) => {
    const s = await setup("4m");
    t.after(() => s.disk.close());
    const hub = await s.start();
    const pub = await connectNode(hub.url, { file: s.tokens.pub }, { hello: true });
    for (let i = 0; i < 10; i++) assert.ok((await publishOne(pub, ban(`r${i}`, addr(i)))).seq);
    // The hub holds the journal open only while it writes, so a quiet hub's disk can be remounted.
    await waitFor(() => {
      try {
        s.disk.remount("ro");
        return true;
      } catch {
        return false;
      }
    }, "mount -o remount,ro of the journal's filesystem");
    const refused = await publishOne(pub, ban("ro1", "10.201.5.1"));
    assert.equal(refused.code, "internal");
    const down = await healthz(hub);
    assert.equal(down.status, 503);
    assert.match(String(down.body.error), /read-only file system/i);
    assert.equal(await storeUp(hub), 0);
    const spoolDir = join(s.dir, "spool");
    const r = await runBan(["ban", "10.201.5.2", "--hub", hub.url, "--token-file", s.tokens.pub, "--spool", spoolDir, "--timeout", "5"]);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /spooled the ban of 10\.201\.5\.2/);
    assert.equal(readdirSync(spoolDir).filter((f) => f.endsWith(".json")).length, 1);

    s.disk.remount("rw");
    await waitFor(async () => (await healthz(hub)).status === 200, "/healthz ok once the disk is writable", 30_000);
    assert.equal(await storeUp(hub), 1);
    const again = await publishOne(pub, ban("ro2", "10.201.5.3"));
    assert.equal(again.seq, "11", "the first ban after the disk came back did not get the next seq");
    const events = await journalIsWhole(s.journal);
    assert.deepEqual(events.map((e) => e.seq), Array.from({ length: 11 }, (_, k) => String(k + 1)));
    pub.close();
    await hub.proc.stop();
  });
});

describe("damaged files: a damaged journal line or token file costs only itself", () => {
  const dirs: string[] = [];
  after(async () => {
    await stopAll();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  test("a journal line with a flipped bit or bad JSON is skipped with one log line each; the hub serves every other ban", async (t) => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-damaged-"));
    dirs.push(dir);
    const tokens = await enrol(dir, [["pub", "node"], ["agent1", "node"]]);
    const journal = join(dir, "journal.jsonl");
    const start = () => startHubProc(["--tokens", join(dir, "tokens"), "--state", journal, "--listen", "127.0.0.1:0"]);
    let hub = await start();
    const pub = await connectNode(hub.url, { file: tokens.pub }, { hello: true });
    const ips = Array.from({ length: 22 }, (_, i) => `198.51.100.${i + 1}`);
    ips.forEach((ip, i) => pub.send(ban(`d${i}`, ip)));
    await pub.acks(ips.length);
    pub.close();
    await hub.proc.stop();

    // One bit flipped in one line's address ("." 0x2e -> "/" 0x2f); another line's JSON cut.
    const lines = readFileSync(journal, "utf8").split("\n");
    const flipped = lines.findIndex((l) => l.includes('"198.51.100.7"'));
    lines[flipped] = lines[flipped].replace('"198.51.100.7"', '"198.51.100/7"');
    const cut = lines.findIndex((l) => l.includes('"198.51.100.9"'));
    lines[cut] = lines[cut].slice(0, 40);
    writeFileSync(journal, lines.join("\n"));

    hub = await start();
    const out = hub.proc.output();
    assert.match(out, new RegExp(`line ${flipped + 1}: event ip "198\\.51\\.100/7": skipped`));
    assert.match(out, new RegExp(`line ${cut + 1}: not JSON: skipped`));
    assert.match(out, /warning: skipped 2 torn or corrupt line\(s\)/);
    const synced = (await fullSync(hub.url, tokens.agent1)).map((e) => e.ip).sort();
    assert.deepEqual(synced, ips.filter((ip) => ip !== "198.51.100.7" && ip !== "198.51.100.9").sort());
    await hub.proc.stop();
    t.diagnostic(`${synced.length} of ${ips.length} bans served`);
  });

  test("a flipped bit in the journal's header: the hub starts with a new id (agents take a full sync) and serves every event", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-damaged-"));
    dirs.push(dir);
    const tokens = await enrol(dir, [["pub", "node"], ["agent1", "node"]]);
    const journal = join(dir, "journal.jsonl");
    const start = () => startHubProc(["--tokens", join(dir, "tokens"), "--state", journal, "--listen", "127.0.0.1:0"]);
    let hub = await start();
    const before = String((await healthz(hub)).body.hub);
    const pub = await connectNode(hub.url, { file: tokens.pub }, { hello: true });
    const ips = ["198.51.100.31", "198.51.100.32", "198.51.100.33"];
    ips.forEach((ip, i) => pub.send(ban(`h${i}`, ip)));
    await pub.acks(ips.length);
    pub.close();
    await hub.proc.stop();
    // "l" (0x6c) -> "m" (0x6d) in the magic word.
    writeFileSync(journal, readFileSync(journal, "utf8").replace('"banshare-journal"', '"banshare-journam"'));
    hub = await start();
    assert.match(hub.proc.output(), /line 1: the header is damaged; the hub takes a new id, and every agent a full sync: skipped/);
    const h = await healthz(hub);
    assert.notEqual(h.body.hub, before);
    assert.equal(h.body.seq, "3", "the seq goes on from the events");
    assert.deepEqual((await fullSync(hub.url, tokens.agent1)).map((e) => e.ip).sort(), ips);
    await hub.proc.stop();
  });

  test("many damaged lines: the first ten are listed, the rest summed up in one line", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-damaged-"));
    dirs.push(dir);
    await enrol(dir, [["pub", "node"]]);
    const journal = join(dir, "journal.jsonl");
    const good = { seq: "1", kind: "ban", ip: "198.51.100.1", origin: "pub", jail: "sshd", until: Date.now() + 3_600_000, detectedAt: Date.now(), id: "g", relayedAt: Date.now() };
    const bad = Array.from({ length: 25 }, (_, i) => JSON.stringify({ ...good, seq: String(i + 2), ip: `198.51.100.${i + 2}x` }));
    writeFileSync(journal, [JSON.stringify({ journal: "banshare-journal", v: 1, hub: "h-damaged", seq: 0 }), JSON.stringify(good), ...bad, ""].join("\n"));
    const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--state", journal, "--listen", "127.0.0.1:0"]);
    const out = hub.proc.output();
    assert.equal(out.match(/: skipped$/gm)?.length, 10, out);
    assert.match(out, /warning: skipped 25 torn or corrupt line\(s\) in .* \(the first 10 listed above\); every other event is kept/);
    assert.equal((await healthz(hub)).body.claims, 1);
    await hub.proc.stop();
  });

  test("SIGHUP with the token file empty (an editor rewriting it): the reload is refused with one log line and every node keeps its access", async () => {
    const dir = await mkdtemp(join(tmpdir(), "banshare-damaged-"));
    dirs.push(dir);
    const tokens = await enrol(dir, [["pub", "node"], ["agent1", "node"]]);
    const hub = await startHubProc(["--tokens", join(dir, "tokens"), "--listen", "127.0.0.1:0"]);
    const agent = await connectNode(hub.url, { file: tokens.agent1 }, { hello: { want: "events" } });
    const list = readFileSync(join(dir, "tokens"), "utf8");
    writeFileSync(join(dir, "tokens"), "");
    hub.proc.signal("SIGHUP");
    await hub.proc.waitForLine(/SIGHUP: /);
    assert.match(hub.proc.output(), /SIGHUP: kept the old token list: .*lists no node/);
    const pub = await connectNode(hub.url, { file: tokens.pub }, { hello: true });
    assert.ok((await publishOne(pub, ban("hup", "198.51.100.50"))).seq, "a node was locked out by an empty token file");
    await agent.next((f) => f.type === "event" && f.ip === "198.51.100.50", "the ban at the connected agent");
    // Garbage is refused the same way; the real list loads again.
    writeFileSync(join(dir, "tokens"), "pub 1234\n");
    hub.proc.signal("SIGHUP");
    await waitFor(() => (hub.proc.output().match(/SIGHUP: kept the old token list/g) ?? []).length === 2, "the second refusal");
    writeFileSync(join(dir, "tokens"), list);
    hub.proc.signal("SIGHUP");
    await hub.proc.waitForLine(/loaded 2 node\(s\)/);
    assert.equal(agent.ws.readyState, agent.ws.OPEN, "the agent was dropped");
    agent.close();
    pub.close();
    await hub.proc.stop();
  });
});

describe("the --csv files of hub and agent on a full disk: rows wait, no torn row stays, writing resumes by itself", needs(["root"], "root (mount a tmpfs)"), () => {
  for (const [who, Csv] of [["hub", HubCsvFile], ["agent", AgentCsvFile]] as const) {
    test(`${who}: rows written while the disk is full appear, whole and in order, once it has room`, async () => {
      const fs = mountTmpfs("64k");
      const lines: string[] = [];
      const csv = new Csv(join(fs.dir, "log.csv"), (l) => lines.push(l));
      const text = () => (existsSync(join(fs.dir, "log.csv")) ? readFileSync(join(fs.dir, "log.csv"), "utf8") : "");
      const row = (i: number) => `2026-12-02T00:00:00.000Z,web1,BLOCK,203.0.113.${i % 250},web2,sshd,,${i},row ${i} ${"x".repeat(60)}\n`;
      try {
        for (let i = 0; i < 10; i++) csv.write(row(i));
        await waitFor(async () => text().split("\n").length === 12 || undefined, "the first rows on disk");
        fillDisk(join(fs.dir, "filler"));
        for (let i = 10; i < 200; i++) csv.write(row(i));
        await waitFor(async () => lines.some((l) => /^warning: cannot write .*log\.csv: .*ENOSPC/.test(l)) || undefined, "the warning");
        assert.ok(text().endsWith("\n"), "no torn row on disk while it is full");
        rmSync(join(fs.dir, "filler"));
        await waitFor(async () => text().split("\n").length === 202 || undefined, "every row on disk once it has room", 10_000);
        await csv.close();
        const rows = readFileSync(join(fs.dir, "log.csv"), "utf8").trimEnd().split("\n");
        assert.equal(rows[0], CSV_HEADER);
        assert.deepEqual(rows.slice(1), Array.from({ length: 200 }, (_, i) => row(i).trimEnd()));
        assert.ok(lines.some((l) => /log\.csv is written again$/.test(l)), lines.join("\n"));
      } finally {
        await csv.close();
        fs.close();
      }
    });
  }
});
