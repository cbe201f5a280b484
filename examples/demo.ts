/**
 * banshare demo: one hub, three agents and one ban, on this machine, then the paper's Table 1.
 *
 *   npm run demo                 # dry-run agents: nothing is changed on this machine
 *   npm run demo -- --keep DIR   # keep the logs in DIR
 *   npm run demo -- --serve      # then keep the fleet up (status page) until Ctrl-C
 *
 * Starts hub.ts (with --escalate 2 --quorum 2 --trust client1) and three agent.ts processes
 * (client1..3, dry-run backend) on loopback and prints the status page's address. client1's
 * "Fail2Ban" bans a TEST-NET address with ban.ts; client2 and client3 block it; it is unbanned,
 * and banned again: a repeat offender, blocked twice as long on every node. Then client2 bans
 * another address alone (held by the quorum) until client3 bans it too. Prints the merged CSV
 * logs of all nodes as a table (timestamp, node, action, IP, description) with the response
 * times, and the fleet's ban list.
 *
 * @module
 */

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { addNode } from "../hub.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const IP = "203.0.113.7";
/** The address two untrusted nodes must agree on (--quorum 2). */
const IP2 = "198.51.100.23";
const CLIENTS = ["client1", "client2", "client3"];

interface Row {
  time: string;
  node: string;
  action: string;
  ip: string;
  origin: string;
  jail: string;
  until: string;
  rt_ms: string;
  detail: string;
}

function readRows(path: string): Row[] {
  if (!existsSync(path)) return [];
  const [head, ...lines] = readFileSync(path, "utf8").trim().split("\n");
  const cols = head.split(",") as (keyof Row)[];
  return lines.map((l) => {
    // The demo's rows hold no quoted commas except in `detail`, the last column.
    const cells = l.split(",");
    const row = Object.fromEntries(cols.map((c, i) => [c, i === cols.length - 1 ? cells.slice(i).join(",").replace(/^"|"$/g, "") : cells[i]])) as unknown as Row;
    return row;
  });
}

function start(name: string, script: string, args: string[]): { proc: ChildProcess; output: () => string } {
  const proc = spawn(process.execPath, ["--import", "tsx", join(ROOT, script), ...args], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stdout!.on("data", (d) => (out += d));
  proc.stderr!.on("data", (d) => (out += d));
  proc.on("error", (e) => (out += `${name}: ${e.message}\n`));
  return { proc, output: () => out };
}

async function waitFor(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function run(script: string, args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((done) => {
    const { proc, output } = start(script, script, args);
    proc.on("close", (code) => done({ code, output: output() }));
  });
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { keep: { type: "string" }, serve: { type: "boolean" } } });
  const dir = values.keep ? resolve(values.keep) : await mkdtemp(join(tmpdir(), "banshare-demo-"));
  await mkdir(dir, { recursive: true });
  const procs: ChildProcess[] = [];
  const stopAll = () => procs.forEach((p) => p.exitCode === null && p.kill("SIGTERM"));
  process.once("SIGINT", () => {
    stopAll();
    process.exitCode = 130;
  });
  // However the demo ends (an error, its output pipe closed, a signal), its hub and agents end too.
  process.on("exit", () => {
    stopAll();
    if (!values.keep) rmSync(dir, { recursive: true, force: true });
  });
  process.once("SIGTERM", () => process.exit(143));
  process.once("SIGHUP", () => process.exit(129));
  // `npm run demo | head`: a reader that went away ends the demo quietly.
  process.stdout.on("error", (e: NodeJS.ErrnoException) => process.exit(e.code === "EPIPE" ? 0 : 1));
  try {
    const tokens = join(dir, "tokens");
    await rm(tokens, { force: true });
    for (const n of CLIENTS) await writeFile(join(dir, `${n}.token`), (await addNode(tokens, n, "node")) + "\n", { mode: 0o600 });
    await writeFile(join(dir, "viewer.token"), (await addNode(tokens, "viewer", "reader")) + "\n", { mode: 0o600 });
    await writeFile(join(dir, "admin.token"), (await addNode(tokens, "admin", "admin")) + "\n", { mode: 0o600 });
    for (const f of ["hub.csv", ...CLIENTS.map((c) => `${c}.csv`), "journal.jsonl"]) await rm(join(dir, f), { force: true });

    console.log("banshare demo: one hub, three agents (dry-run: this machine's firewall is not touched), one ban\n");
    // client1 plays the paper's Client 1 (trusted: its bans go out at once); the others need a
    // second node to agree (--quorum 2); repeat offenders get twice the ban (--escalate 2).
    const hub = start("hub", "hub.ts", ["--tokens", tokens, "--state", join(dir, "journal.jsonl"), "--csv", join(dir, "hub.csv"), "--listen", "127.0.0.1:0", "--escalate", "2", "--quorum", "2", "--trust", "client1"]);
    procs.push(hub.proc);
    await waitFor("the hub to listen", () => /listening on ws:\/\/127\.0\.0\.1:\d+/.test(hub.output()));
    const url = /listening on (ws:\/\/127\.0\.0\.1:\d+)/.exec(hub.output())![1];
    console.log(`  status     ${url.replace(/^ws/, "http")}/  (log in with the reader token in ${join(dir, "viewer.token")}${values.serve ? "" : "; npm run demo -- --serve keeps it up"})`);
    console.log(`  hub        ${url}  --escalate 2 --quorum 2 --trust client1`);
    const agents = CLIENTS.map((n) => {
      const a = start(n, "agent.ts", ["--hub", url, "--token-file", join(dir, `${n}.token`), "--backend", "dry-run", "--csv", join(dir, `${n}.csv`), "--spool", join(dir, `${n}-spool`)]);
      procs.push(a.proc);
      return a;
    });
    await waitFor("three agents to sync", () => agents.every((a) => /synced:/.test(a.output())));
    console.log(`  agents     ${CLIENTS.join(", ")} connected and synced`);

    console.log(`\n  Fail2Ban on client1 bans ${IP} (jail sshd, bantime 7200 s): ban.ts ban ${IP} ...`);
    const banned = await run("ban.ts", ["ban", IP, "--jail", "sshd", "--bantime", "7200", "--hub", url, "--token-file", join(dir, "client1.token"), "--spool", join(dir, "client1-spool")]);
    if (banned.code !== 0) throw new Error(`ban.ts exited ${banned.code}: ${banned.output.trim()}`);
    await waitFor("client2 and client3 to block it", () => ["client2", "client3"].every((n) => readRows(join(dir, `${n}.csv`)).some((r) => r.action === "BLOCK" && r.ip === IP)));
    console.log(`  Fail2Ban on client1 unbans it early: ban.ts unban ${IP} ...`);
    const unbanned = await run("ban.ts", ["unban", IP, "--jail", "sshd", "--hub", url, "--token-file", join(dir, "client1.token"), "--spool", join(dir, "client1-spool")]);
    if (unbanned.code !== 0) throw new Error(`ban.ts exited ${unbanned.code}: ${unbanned.output.trim()}`);
    await waitFor("client2 and client3 to unblock it", () => ["client2", "client3"].every((n) => readRows(join(dir, `${n}.csv`)).some((r) => r.action === "UNBLOCK" && r.ip === IP)));

    console.log(`  The address comes back and Fail2Ban on client1 bans it again: a repeat offender (--escalate 2)`);
    const again = await run("ban.ts", ["ban", IP, "--jail", "sshd", "--bantime", "7200", "--hub", url, "--token-file", join(dir, "client1.token"), "--spool", join(dir, "client1-spool")]);
    if (again.code !== 0) throw new Error(`ban.ts exited ${again.code}: ${again.output.trim()}`);
    await waitFor("every client to block it again", () => CLIENTS.every((n) => readRows(join(dir, `${n}.csv`)).filter((r) => r.action === "BLOCK" && r.ip === IP).length >= (n === "client1" ? 1 : 2)));

    console.log(`  Fail2Ban on client2 bans ${IP2}; client2 is not trusted, so the hub holds it (--quorum 2) ...`);
    const held = await run("ban.ts", ["ban", IP2, "--jail", "sshd", "--bantime", "600", "--hub", url, "--token-file", join(dir, "client2.token"), "--spool", join(dir, "client2-spool")]);
    if (held.code !== 0) throw new Error(`ban.ts exited ${held.code}: ${held.output.trim()}`);
    await waitFor("the hub to hold it", () => readRows(join(dir, "hub.csv")).some((r) => r.action === "HOLD" && r.ip === IP2));
    console.log(`  ... until Fail2Ban on client3 bans it too: now every client blocks it`);
    const second = await run("ban.ts", ["ban", IP2, "--jail", "sshd", "--bantime", "600", "--hub", url, "--token-file", join(dir, "client3.token"), "--spool", join(dir, "client3-spool")]);
    if (second.code !== 0) throw new Error(`ban.ts exited ${second.code}: ${second.output.trim()}`);
    await waitFor("every client to block it", () => CLIENTS.every((n) => readRows(join(dir, `${n}.csv`)).some((r) => r.action === "BLOCK" && r.ip === IP2)));
    const list = await run("ban.ts", ["list", "--hub", url, "--token-file", join(dir, "admin.token")]);
    if (!values.serve) {
      stopAll();
      await Promise.all(procs.map((p) => (p.exitCode === null ? new Promise((r) => p.once("exit", r)) : undefined)));
    }

    // The merged logs, like the paper's Table 1. Each client's own Fail2Ban does its local
    // blocking; what banshare logs for it is what the hub received from it.
    const ours = (r: Row) => r.ip === IP || r.ip === IP2;
    const hubRows = readRows(join(dir, "hub.csv")).filter(ours);
    const table: Array<{ time: string; node: string; action: string; ip: string; description: string; rt: string }> = [];
    for (const r of hubRows) {
      if (r.action === "RECEIVE") {
        const unban = /^unban/.test(r.detail);
        table.push({ time: r.time, node: r.origin, action: unban ? "UNBLOCK" : "BLOCK", ip: r.ip, description: unban ? "Fail2Ban unban, sent to hub" : "Fail2Ban ban, sent to hub", rt: "" });
      } else if (r.action === "RELAY" || r.action === "HOLD" || r.action === "ESCALATE") {
        table.push({ time: r.time, node: "hub", action: r.action, ip: r.ip, description: r.detail, rt: r.action === "RELAY" ? r.rt_ms : "" });
      }
    }
    for (const n of CLIENTS) {
      for (const r of readRows(join(dir, `${n}.csv`)).filter(ours)) {
        const description = r.action === "BLOCK" ? `Received from hub broadcast (${r.origin})` : r.action === "SCHEDULE_UNBLOCK" ? `Timed unblock at ${r.until.slice(11, 19)} UTC (${r.detail})` : r.action === "UNBLOCK" ? "Unban received from hub" : r.detail;
        table.push({ time: r.time, node: n, action: r.action, ip: r.ip, description, rt: r.rt_ms });
      }
    }
    table.sort((a, b) => a.time.localeCompare(b.time));
    const w = { time: 12, node: 8, action: 16, ip: 15 };
    console.log("\nTable 1. Synchronized IP blocking events (merged CSV logs of all nodes)\n");
    console.log(`${"Timestamp".padEnd(w.time)}  ${"Node".padEnd(w.node)}  ${"Action".padEnd(w.action)}  ${"IP Address".padEnd(w.ip)}  ${"RT (ms)".padStart(7)}  Description`);
    for (const r of table) console.log(`${r.time.slice(11, 23).padEnd(w.time)}  ${r.node.padEnd(w.node)}  ${r.action.padEnd(w.action)}  ${r.ip.padEnd(w.ip)}  ${r.rt.padStart(7)}  ${r.description}`);

    // The paper's figure: client1's first ban, blocked by client2 and client3.
    const rts = ["client2", "client3"].map((n) => `${n} ${table.find((r) => r.node === n && r.action === "BLOCK" && r.ip === IP)?.rt} ms`);
    console.log(`\nResponse time RT = T(block) - T(detect) of client1's first ban; here T(detect) is when ban.ts read its`);
    console.log(`arguments on client1 (under Fail2Ban the action passes --time <time>, the moment Fail2Ban decided to ban):`);
    console.log(`  ${rts.join(", ")}  (the paper: about 1-2 s)`);
    console.log(`\nThe fleet's bans now (ban.ts list, admin token):\n`);
    console.log(list.code === 0 ? list.output.trimEnd().replace(/^/gm, "  ") : `  ban.ts list failed (exit ${list.code}): ${list.output.trim()}`);
    if (values.serve) {
      console.log(`\nThe fleet stays up: open ${url.replace(/^ws/, "http")}/ and log in with the token in ${join(dir, "viewer.token")}.`);
      console.log(`Try: node --import tsx ban.ts ban 192.0.2.44 --hub ${url} --token-file ${join(dir, "client1.token")}`);
      console.log("Ctrl-C stops it.");
      await new Promise<void>((resolve) => process.once("SIGINT", () => resolve()));
      process.exitCode = 0;
      stopAll();
      await Promise.all(procs.map((p) => (p.exitCode === null ? new Promise((r) => p.once("exit", r)) : undefined)));
    }
    console.log(values.keep ? `\nLogs: ${dir} (hub.csv, client*.csv, journal.jsonl).` : "\nKeep the logs with: npm run demo -- --keep DIR");
    if (!values.keep) await rm(dir, { recursive: true, force: true });
  } catch (e) {
    stopAll();
    process.stderr.write(`demo: ${(e as Error).message}\n`);
    process.exitCode = 1;
  }
}

await main();
