/**
 * The hub's status page, in a real browser: a hub and a dry-run agent as real processes, ban.ts
 * as a real process, headless Chromium driven by playwright-core. The page logs in with a reader
 * token (sent as a WebSocket subprotocol, kept in sessionStorage), then shows the agent, a ban
 * and its event, and the agent's response time without a reload; a node token is refused on
 * the page. A screenshot is saved to test/artifacts/ (gitignored). Without Chromium the browser
 * suite skips and says why (and fails under CI=true); the socket checks run everywhere.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { BrowserContext, Page } from "playwright-core";
import WebSocket from "ws";
import { connectNode } from "./lib/client.ts";
import { runBan, startFleet, startHubProc, waitFor, type Fleet, type HubProc } from "./lib/fleet.ts";
import { REPO_ROOT, stopAll } from "./lib/proc.ts";
import { History } from "../hub.ts";
import { MAX_STATUS_EVENTS, type FleetEvent } from "../messages.ts";
import { chromiumPath, needs } from "./lib/skip.ts";

const IP = "192.0.2.10";
const ARTIFACTS = join(REPO_ROOT, "test", "artifacts");

interface World {
  dir: string;
  hub: HubProc;
  http: string;
  tokens: Record<string, string>;
}

/** Enrols web1 (the agent), web2 (a sender) and a reader; starts the hub (with a journal: `journal`) and web1's dry-run agent. */
async function startWorld(journal = false): Promise<World & { fleet: Fleet }> {
  const fleet = await startFleet({ nodes: [["web1", "node"], ["web2", "node"], ["viewer", "reader"]], agents: ["web1"], csv: false, heartbeat: 5, hubArgs: ["--escalate", "2"], journal });
  const tokens = Object.fromEntries(Object.keys(fleet.tokenFiles).map((n) => [n, fleet.token(n)]));
  return { dir: fleet.dir, hub: fleet.hub, http: fleet.http, tokens, fleet };
}

/** A raw status-page socket: token as a subprotocol, frames collected. */
const watcher = (url: string, token: string) => connectNode(url, token, { subprotocol: true, timeoutMs: 5000 });

describe("History", () => {
  const ev = (n: number, held = false): FleetEvent => ({ seq: String(n), kind: "ban", ip: `192.0.2.${n % 250}`, origin: "web1", jail: "sshd", until: null, detectedAt: n, relayedAt: n, id: `e${n}`, ...(held ? { held } : {}) });

  test("load() keeps the newest by relay time from a store read in any order; relayed() keeps the newest of a burst; held claims never", () => {
    const h = new History();
    for (const n of [5, 1, 3, 2, 4]) h.load(ev(n));
    h.load(ev(6, true));
    h.loaded();
    assert.deepEqual(h.events().map((e) => e.seq), ["1", "2", "3", "4", "5"]);
    const burst = Array.from({ length: 100_000 }, (_, i) => ev(10 + i, i % 2 === 1));
    h.relayed(burst);
    const kept = h.events();
    assert.equal(kept.length, MAX_STATUS_EVENTS);
    assert.ok(kept.every((e) => !e.held));
    assert.equal(kept.at(-1)!.seq, String(10 + 99_998));
    for (let i = 0; i < 1000; i++) h.relayed([ev(200_000 + i)]);
    assert.equal(h.events().length, MAX_STATUS_EVENTS);
    assert.equal(h.events()[0].seq, String(200_800));
  });
});

describe("status socket: a reader token as a subprotocol watches the fleet live; bad frames, node tokens and wrong tokens are refused, and no token is logged", () => {
  let w: World;
  before(async () => {
    w = await startWorld();
  });
  after(async () => {
    await stopAll();
    await rm(w.dir, { recursive: true, force: true });
  });

  test("a reader token as a subprotocol gets banshare.v1, a welcome, status frames and live events", async () => {
    const { ws, frames, next } = await watcher(w.hub.url, w.tokens.viewer);
    assert.equal(ws.protocol, "banshare.v1", "the hub selects banshare.v1, never the token's subprotocol");
    ws.send(JSON.stringify({ type: "hello", v: 1, want: "status" }));
    const welcome = await next((f) => f.type === "welcome");
    assert.deepEqual([welcome.node, welcome.role], ["viewer", "reader"]);
    const status = await next((f) => f.type === "status" && f.conns.some((c: any) => c.name === "web1"));
    const agent = status.conns.find((c: any) => c.name === "web1");
    assert.equal(agent.kind, "events");
    assert.equal(agent.lag, 0);
    assert.equal(status.conns.find((c: any) => c.name === "viewer").kind, "status");
    const r = await runBan(["ban", "198.51.100.23", "--jail", "sshd", "--bantime", "600", "--hub", w.hub.url, "--token-file", join(w.dir, "web2.token"), "--spool", join(w.dir, "spool")]);
    assert.equal(r.code, 0, r.output);
    const ev = await next((f) => f.type === "event" && f.ip === "198.51.100.23");
    assert.equal(ev.origin, "web2");
    const later = await next((f) => f.type === "status" && f.bans.some((b: any) => b.ip === "198.51.100.23") && f.rt.some((x: any) => x.node === "web1"), "a status frame with the ban and web1's response time");
    assert.equal(later.bansTotal, 1);
    assert.equal(later.bans[0].claims, 1);
    assert.ok(later.rt.every((x: any) => Number.isInteger(x.rtMs) && x.rtMs >= 0));
    assert.equal(frames.filter((f) => f.type === "error").length, 0);
    ws.close();
  });

  test("bad frames from a watcher are refused like any other, and the hub stays up", async () => {
    const { ws, next, frames } = await watcher(w.hub.url, w.tokens.viewer);
    ws.send(JSON.stringify({ type: "hello", v: 1, want: "status" }));
    await next((f) => f.type === "welcome");
    const sends: Array<[unknown, string]> = [
      ["not json", "bad_frame"],
      [{ type: "status" }, "bad_frame"],
      [{ type: "applied", events: [{ seq: "1", ip: IP, rtMs: 5, at: Date.now() }] }, "forbidden"],
      [{ type: "applied", events: [{ seq: "1", ip: "<img src=x>", rtMs: 5, at: Date.now() }] }, "bad_frame"],
      [{ type: "ban", id: "w1", ip: IP, jail: "sshd", bantime: 60, detectedAt: Date.now() }, "forbidden"],
      [{ type: "hello", v: 1, want: "status" }, "bad_frame"],
    ];
    for (const [f, code] of sends) {
      const before = frames.filter((x) => x.type === "error").length;
      ws.send(typeof f === "string" ? f : JSON.stringify(f));
      const err = await waitFor(() => frames.filter((x) => x.type === "error")[before], `an error for ${JSON.stringify(f)}`, 5000);
      assert.equal(err.code, code, JSON.stringify(f));
    }
    ws.close();
    assert.equal((await fetch(`${w.http}/healthz`)).status, 200);
  });

  test("a watcher sending hundreds of seeded garbage frames gets an error for each and keeps its status frames", async () => {
    const { ws, next, frames } = await watcher(w.hub.url, w.tokens.viewer);
    ws.send(JSON.stringify({ type: "hello", v: 1, want: "status" }));
    await next((f) => f.type === "welcome");
    let x = 0x5ec0de;
    const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) / 2 ** 32);
    const pick = <T>(a: T[]): T => a[Math.floor(rnd() * a.length)];
    const rec = () => ({ seq: String(Math.floor(rnd() * 100)), ip: "192.0.2.10", rtMs: 5, at: Date.now() });
    const junk = () => pick<unknown>([null, -1, 1.5, "", "x".repeat(Math.floor(rnd() * 300)), [], {}, "<script>alert(1)</script>", "__proto__", 2 ** 60]);
    const garbage = (): string | Buffer => {
      switch (Math.floor(rnd() * 7)) {
        case 0:
          return Buffer.from(Array.from({ length: Math.floor(rnd() * 200) }, () => Math.floor(rnd() * 256)));
        case 1:
          return JSON.stringify({ type: "applied", events: [{ ...rec(), [pick(["seq", "ip", "rtMs", "at"])]: junk() }] });
        case 2:
          return JSON.stringify({ type: "applied", events: pick<unknown>([junk(), Array.from({ length: 101 }, rec)]) });
        case 3:
          return JSON.stringify({ type: pick(["status", "Status", "welcome", "event", "sync", "applied "]), want: "status" });
        case 4:
          return JSON.stringify({ type: "hello", v: 1, want: pick(["status", "events", junk()]) });
        case 5:
          return JSON.stringify({ type: "applied", events: [rec()] }).slice(0, Math.floor(rnd() * 40));
        default:
          return JSON.stringify({ type: "applied", events: [rec()], pad: "x".repeat(17_000) });
      }
    };
    const N = 300;
    for (let i = 0; i < N; i++) {
      const g = garbage();
      ws.send(g, { binary: Buffer.isBuffer(g) });
    }
    await waitFor(() => frames.filter((f) => f.type === "error").length >= N, `${N} error frames`, 10_000);
    const seen = frames.length;
    await waitFor(() => frames.slice(seen).some((f) => f.type === "status"), "a status frame after the garbage", 5000);
    assert.equal(ws.readyState, WebSocket.OPEN);
    assert.equal((await fetch(`${w.http}/healthz`)).status, 200);
    ws.close();
  });

  test("a node token may not watch; a wrong token is refused at the upgrade; no token is ever logged", async () => {
    const { ws, next } = await watcher(w.hub.url, w.tokens.web2);
    ws.send(JSON.stringify({ type: "hello", v: 1, want: "status" }));
    const err = await next((f) => f.type === "error");
    assert.equal(err.code, "forbidden");
    assert.match(err.message, /reader or admin/);
    await waitFor(() => ws.readyState === WebSocket.CLOSED, "the hub to close the socket", 5000);
    await assert.rejects(watcher(w.hub.url, "x".repeat(43)), /401/);
    const out = w.hub.proc.output();
    for (const t of Object.values(w.tokens)) assert.ok(!out.includes(t), "a token appears in the hub's log");
  });

  test("GET / is the static page with a Content-Security-Policy; TRACE / is not", async () => {
    const res = await fetch(`${w.http}/`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /^text\/html/);
    assert.match(res.headers.get("content-security-policy") ?? "", /default-src 'none'; script-src 'self'/);
    const html = await res.text();
    assert.match(html, /<meta name="viewport"/);
    assert.doesNotMatch(html, /<script>|style=|web1|viewer/, "no inline script or style, no data in the page");
    assert.equal((await fetch(`${w.http}/status.js`)).status, 200);
    assert.equal((await fetch(`${w.http}/`, { method: "TRACE" }).catch(() => ({ status: 405 }))).status !== 200, true);
  });
});

describe("status page: in Chromium a reader sees nodes, bans, events and response times live, and a node or wrong token gets a visible error", needs(["chromium"]), () => {
  let w: World;
  let profile: string;
  let browser: BrowserContext;
  const problems: string[] = [];

  /** A fresh tab (its own sessionStorage) on the status page, recording console errors and CSP violations. */
  const open = async (): Promise<Page> => {
    const page = await browser.newPage();
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(m.text());
    });
    page.on("pageerror", (e) => problems.push(e.message));
    const res = await page.goto(`${w.http}/`);
    assert.equal(res?.status(), 200);
    return page;
  };
  const logIn = async (page: Page, token: string) => {
    await page.locator("#token").fill(token);
    await page.locator("#login button[type=submit]").click();
  };

  before(async () => {
    w = await startWorld();
    profile = await mkdtemp(join(tmpdir(), "banshare-chromium-"));
    const { chromium } = await import("playwright-core");
    browser = await chromium.launchPersistentContext(profile, {
      executablePath: chromiumPath(),
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
      viewport: { width: 1280, height: 900 },
    });
  });

  after(async () => {
    await browser?.close();
    await stopAll();
    await rm(w.dir, { recursive: true, force: true });
    await rm(profile, { recursive: true, force: true });
  });

  test("a reader sees the agent, a new ban, its event and the agent's response time without a reload", async () => {
    const page = await open();
    await page.locator("#login").waitFor({ state: "visible" });
    await logIn(page, w.tokens.viewer);
    await page.locator("#conn", { hasText: "connected as viewer (reader)" }).waitFor();
    const row = page.locator('#nodes tr[data-name="web1"]');
    await row.waitFor();
    assert.match(await row.innerText(), /web1\s+node\s+agent\s+127\.0\.0\.1:\d+/);
    assert.equal(await page.evaluate(() => sessionStorage.getItem("banshare.token")), w.tokens.viewer);
    assert.ok(!page.url().includes(w.tokens.viewer), "the token is in the URL");
    // A marker that a reload would wipe.
    await page.evaluate(() => ((window as unknown as { marker: number }).marker = 42));

    const r = await runBan(["ban", IP, "--jail", "sshd", "--bantime", "600", "--hub", w.hub.url, "--token-file", join(w.dir, "web2.token"), "--spool", join(w.dir, "spool")]);
    assert.equal(r.code, 0, r.output);

    const ban = page.locator(`#bans tr[data-ip="${IP}"]`);
    await ban.waitFor({ timeout: 10_000 });
    assert.match(await ban.innerText(), new RegExp(`${IP.replace(/\./g, "\\.")}\\s+web2\\s+sshd\\s+.*ago\\s+(9|10) min.*\\s+1$`));
    assert.match(await page.locator("#ban-count").innerText(), /^1$/);
    const ev = page.locator(`#events li[data-ip="${IP}"]`);
    await ev.waitFor({ timeout: 10_000 });
    assert.match(await ev.innerText(), /ban\s+192\.0\.2\.10\s+by web2 \(sshd\)/);
    const rt = page.locator('#nodes tr[data-name="web1"] td.rt');
    await waitFor(async () => /^\d+ ms \(median \d+\)$/.test(await rt.innerText()), "web1's response time on the page", 10_000);
    await page.locator('#legend li[data-node="web1"]').waitFor();
    // web1's response time, and the event's detection -> the hub.
    assert.deepEqual((await page.locator("#chart svg circle title").allTextContents()).map((t) => t.replace(/: .*/, "")).sort(), ["to the hub", "web1"]);
    assert.equal(await page.evaluate(() => (window as unknown as { marker: number }).marker), 42, "the page reloaded");

    await mkdir(ARTIFACTS, { recursive: true });
    const shot = join(ARTIFACTS, "status-page.png");
    await page.screenshot({ path: shot, fullPage: true });
    await page.setViewportSize({ width: 390, height: 844 });
    const phone = join(ARTIFACTS, "status-page-phone.png");
    await page.screenshot({ path: phone, fullPage: true });
    assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth + 1), "the page scrolls sideways on a phone");
    process.stderr.write(`status page screenshots: ${shot}, ${phone}\n`);
    assert.deepEqual(problems, [], "console errors or CSP violations");
    await page.close();
  });

  test("each agent's enforcement shows in the Nodes table: enforcing, drift N, hook missing since, as text only", async () => {
    const page = await open();
    await logIn(page, w.tokens.viewer);
    // web1 runs the dry-run backend: it reports, and enforces nothing.
    const web1 = page.locator('#nodes tr[data-name="web1"] td.enforcement');
    await web1.filter({ hasText: "dry-run: not enforcing" }).waitFor({ timeout: 10_000 });
    // web2 as an agent over a real socket, reporting what a tampered server would.
    const agent = await connectNode(w.hub.url, w.tokens.web2, { timeoutMs: 5000 });
    agent.ws.send(JSON.stringify({ type: "hello", v: 1, want: "events" }));
    await agent.next((f) => f.type === "sync");
    const report = (over: object) => agent.ws.send(JSON.stringify({ type: "enforcement", backend: "ipset", hooks: [{ name: "iptables INPUT", state: "present", since: Date.now() }], entries: 4, claims: 4, drift: 0, missing: [], repairs: 0, ...over }));
    const web2 = page.locator('#nodes tr[data-name="web2"] td.enforcement');
    report({});
    await web2.filter({ hasText: /^enforcing$/ }).waitFor({ timeout: 10_000 });
    report({ entries: 0, drift: 4 });
    await web2.filter({ hasText: /^drift 4$/ }).waitFor({ timeout: 10_000 });
    const since = Date.now() - 5000;
    report({ hooks: [{ name: "iptables INPUT", state: "missing", since }], missing: ["iptables INPUT hook"], missingSince: since });
    await web2.filter({ hasText: `hook missing since ${new Date(since).toISOString()} (iptables INPUT)` }).waitFor({ timeout: 10_000 });
    assert.match((await web2.first().getAttribute("class")) ?? "", /\bban\b/, "a missing hook is shown as a problem");
    // A report's text goes in as text: markup in it stays text (the frame's names allow none, the page adds none).
    assert.equal(await page.locator("#nodes td.enforcement *").count(), 0);
    assert.deepEqual(problems, [], "console errors or CSP violations");
    agent.ws.close();
    await page.close();
  });

  test("a repeat offender's longer ban shows in the bans list and the event stream", async () => {
    const page = await open();
    await logIn(page, w.tokens.viewer);
    const ip = "198.51.100.77";
    const send = (cmd: "ban" | "unban") => runBan([cmd, ip, "--jail", "sshd", ...(cmd === "ban" ? ["--bantime", "600"] : []), "--hub", w.hub.url, "--token-file", join(w.dir, "web2.token"), "--spool", join(w.dir, "spool")]);
    for (const cmd of ["ban", "unban", "ban"] as const) assert.equal((await send(cmd)).code, 0);
    const ban = page.locator(`#bans tr[data-ip="${ip}"]`);
    await ban.filter({ hasText: "repeat offender, x2" }).waitFor({ timeout: 10_000 });
    assert.match(await ban.innerText(), /web2 \(repeat offender, x2\)\s+sshd\s+.*ago\s+(19|20) min/);
    await page.locator(`#events li[data-ip="${ip}"]`, { hasText: "repeat offender: ban x2 on every node" }).waitFor({ timeout: 10_000 });
    assert.deepEqual(problems, [], "console errors or CSP violations");
    await page.close();
  });

  test("a node token is refused with a visible error and the form comes back", async () => {
    const page = await open();
    await logIn(page, w.tokens.web2);
    const error = page.locator("#error");
    await error.waitFor({ state: "visible" });
    await waitFor(async () => /node role; the status page needs a reader or admin token/.test(await error.innerText()), "the hub's refusal on the page", 5000);
    await page.locator("#login").waitFor({ state: "visible" });
    assert.equal(await page.locator("#status").isVisible(), false);
    assert.equal(await page.evaluate(() => sessionStorage.getItem("banshare.token")), null);
    await page.close();
  });

  test("a wrong token is refused with a visible error", async () => {
    const page = await open();
    await logIn(page, "not-a-token-of-this-fleet");
    await page.locator("#error", { hasText: "refused" }).waitFor();
    await page.locator("#login").waitFor({ state: "visible" });
    await page.close();
  });
});

describe("status page history: a page opened after the events, and after a hub restart, shows them and charts them; a long y label fits", needs(["chromium"]), () => {
  let w: World & { fleet: Fleet };
  let profile: string;
  let browser: BrowserContext;
  const problems: string[] = [];
  const BANNED = "198.51.100.61";
  const LIFTED = "198.51.100.62";

  const open = async (): Promise<Page> => {
    const page = await browser.newPage();
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(m.text());
    });
    page.on("pageerror", (e) => problems.push(e.message));
    assert.equal((await page.goto(`${w.http}/`))?.status(), 200);
    await page.locator("#token").fill(w.tokens.viewer);
    await page.locator("#login button[type=submit]").click();
    await page.locator("#conn", { hasText: "connected as viewer (reader)" }).waitFor();
    return page;
  };
  /** The page's event list, as text, and its chart's series. */
  const shows = async (page: Page, what: string) => {
    await page.locator(`#events li[data-ip="${BANNED}"]`).waitFor({ timeout: 10_000 });
    const lines = await page.locator("#events li").allInnerTexts();
    assert.ok(lines.some((l) => /ban\s+198\.51\.100\.61\s+by web2 \(sshd\)[\s\S]*to the hub in \d+ ms/.test(l)), `${what}: the ban in ${JSON.stringify(lines)}`);
    assert.ok(lines.some((l) => /unban\s+198\.51\.100\.62\s+by web2 \(recidive\)/.test(l)), `${what}: the unban in ${JSON.stringify(lines)}`);
    await page.locator('#legend li[data-node="to the hub"]').waitFor({ timeout: 10_000 });
    assert.ok((await page.locator("#chart svg circle").count()) >= 2, `${what}: the events on the chart`);
  };

  before(async () => {
    w = await startWorld(true);
    profile = await mkdtemp(join(tmpdir(), "banshare-chromium-"));
    const { chromium } = await import("playwright-core");
    browser = await chromium.launchPersistentContext(profile, {
      executablePath: chromiumPath(),
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
      viewport: { width: 1280, height: 900 },
    });
  });

  after(async () => {
    await browser?.close();
    await stopAll();
    await rm(w.dir, { recursive: true, force: true });
    await rm(profile, { recursive: true, force: true });
  });

  test("events that happened before the page opened are listed with origin, jail, time and response time, also after the hub restarts", async () => {
    for (const args of [["ban", BANNED, "--jail", "sshd", "--bantime", "600"], ["ban", LIFTED, "--jail", "recidive", "--bantime", "600"], ["unban", LIFTED, "--jail", "recidive"]]) {
      const r = await w.fleet.ban("web2", ...args);
      assert.equal(r.code, 0, r.output);
    }
    const before = await open();
    await shows(before, "a page opened after the events");
    await before.close();

    await w.hub.proc.stop();
    w.hub = await startHubProc(w.fleet.hubArgs);
    const after = await open();
    await shows(after, "a page opened after the hub restarted");
    assert.deepEqual(problems, [], "console errors or CSP violations");
    await after.close();
  });

  test("a five-digit y-axis label is drawn whole inside the chart", async () => {
    const page = await open();
    // web2 as an agent over a real socket, reporting a response time of 23 s.
    const agent = await connectNode(w.hub.url, w.tokens.web2, { timeoutMs: 5000 });
    agent.ws.send(JSON.stringify({ type: "hello", v: 1, want: "events" }));
    await agent.next((f) => f.type === "sync");
    agent.ws.send(JSON.stringify({ type: "applied", events: [{ seq: "1", ip: BANNED, rtMs: 23332, at: Date.now() }] }));
    await page.locator('#legend li[data-node="web2"]').waitFor({ timeout: 10_000 });
    const label = page.locator("#chart svg text", { hasText: /^\d{5} ms$/ });
    await label.waitFor({ timeout: 10_000 });
    const [text, box, chart] = await Promise.all([label.textContent(), label.boundingBox(), page.locator("#chart svg").boundingBox()]);
    assert.ok(box && chart, "the label and the chart are rendered");
    assert.ok(box.x >= chart.x - 0.5, `the label "${text}" starts ${chart.x - box.x} px left of the chart: clipped`);
    assert.ok(box.x + box.width <= chart.x + chart.width + 0.5, `the label "${text}" ends past the chart`);
    await mkdir(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, "status-page-history.png"), fullPage: true });
    assert.deepEqual(problems, [], "console errors or CSP violations");
    agent.ws.close();
    await page.close();
  });
});
