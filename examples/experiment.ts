/**
 * The paper's experiment, for real: a hub and three SSH servers with Fail2Ban in network
 * namespaces, a brute-force attack on client1, and the merged logs as the paper's Table 1.
 *
 *   npm run experiment                       # as root: one round
 *   npm run experiment -- --rounds 5         # five attacks, each from a new address
 *   npm run experiment -- --keep             # leave it all up to look around; Ctrl-C removes it
 *
 * Builds namespaces `hub`, `client1..3` and `attacker` on one bridge (10.77.0.0/24). Each client
 * runs a real sshd on port 22 (password logins on, but every login refused: `DenyUsers *`, so
 * only failures happen), a real fail2ban-server watching sshd's `-E` log with the project's
 * `sshd-file` filter and two actions (Fail2Ban's own `iptables-multiport`, then
 * `fail2ban/action.d/banshare.conf`), and an agent (`--backend`, default ipset). The hub runs
 * in `hub`. Each round the attacker takes a new address (10.77.0.101, .102, ...), hydra
 * brute-forces client1's sshd from it until Fail2Ban bans it, then the script checks that the
 * attacker's TCP connects to port 22 fail on all three clients, unbans the address with
 * `fail2ban-client set sshd unbanip` on client1 and checks they work again everywhere.
 *
 * Prints the merged logs (Fail2Ban's on client1, the hub's and the agents' CSV) like Table 1
 * and the response times (min/median/max over the rounds), and writes `events.csv`,
 * `response-times.csv`, `timeline.svg` and the raw logs (`logs/`) to `--out`. Everything it
 * creates (namespaces, processes, its temporary directory) is removed at the end, also on
 * failure or Ctrl-C. Exit 0 when every check of every round passed, 1 otherwise, 2 on bad flags.
 *
 * @module
 */

import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import yargs from "yargs";
import { startFail2ban, REPO_DIR, type Fail2ban } from "../test/lib/fail2ban.ts";
import { enrol, readCsv, startAgentProc, startHubProc, waitFor, type HubProc, type Row } from "../test/lib/fleet.ts";
import { createTopology, tcpConnect, type ConnectResult, type Topology } from "../test/lib/netns.ts";
import { onCleanup, runCleanupNow, runSync, spawnProc, type Proc } from "../test/lib/proc.ts";
import { missing, which, type Requirement } from "../test/lib/skip.ts";

// ---------------------------------------------------------------------------
// Types and constants

export type Backend = "ipset" | "nftables" | "iptables";

/** What `parseArgs` makes of the command line. */
export interface Options {
  rounds: number;
  backend: Backend;
  keep: boolean;
  out: string;
}

export const CLIENTS = ["client1", "client2", "client3"] as const;
export type Client = (typeof CLIENTS)[number];
/** The clients that learn of the ban only through banshare. */
const OTHERS = ["client2", "client3"] as const;
/** Timeline lanes, top to bottom. */
export const LANES = ["attacker", "client1", "hub", "client2", "client3"] as const;
export type Lane = (typeof LANES)[number];

const SSH_PORT = 22;
/** Fail2Ban's defaults (jail.conf): 5 failures within 10 minutes ban for 10 minutes. */
const MAXRETRY = 5;
const FINDTIME_S = 600;
const BANTIME_S = 600;
/** Round r attacks from 10.77.0.(ATTACK_BASE + r). */
const ATTACK_BASE = 100;
const MAX_ROUNDS = 150;
const SUBNET = "10.77.0";
const HYDRA_USERS = ["root", "admin", "ubuntu", "oracle"];
const HYDRA_PASSWORDS = ["123456", "password", "admin", "root", "qwerty", "letmein"];

/** One CSV-able line of the merged log: the paper's Table 1 plus the response time. */
export interface TableRow {
  time: number;
  node: string;
  action: string;
  ip: string;
  rtMs: string;
  description: string;
}

/** One line of Fail2Ban's log that concerns an address. */
export interface Fail2banEvent {
  time: number;
  jail: string;
  kind: "Found" | "Ban" | "Unban";
  ip: string;
}

/** What one round saw: the times it took itself, and what the probes answered. */
export interface RoundRecord {
  round: number;
  ip: string;
  /** When hydra started (undefined: the round failed before). */
  attackAt?: number;
  unbanAt?: number;
  before: Partial<Record<Client, ConnectResult>>;
  afterBan: Partial<Record<Client, ConnectResult>>;
  afterUnban: Partial<Record<Client, ConnectResult>>;
  error?: string;
}

/** A round's record joined with the logs: every time in ms since the epoch. */
export interface RoundResult extends RoundRecord {
  failures: number[];
  detectedAt?: number;
  bannedAt?: number;
  unbannedAt?: number;
  hub: { receiveBan?: Row; relayBan?: Row; receiveUnban?: Row; relayUnban?: Row };
  block: Partial<Record<Client, Row>>;
  schedule: Partial<Record<Client, Row>>;
  unblock: Partial<Record<Client, Row>>;
  ok: boolean;
}

/** Response times of one round, in ms (undefined where a time is missing). */
export interface Times {
  /** Fail2Ban on client1: first failed login it saw -> its ban. */
  firstFailureToBan?: number;
  /** Fail2Ban on client1: detection (the ban's <time>, the failure that reached maxretry) -> its ban. */
  detectToBan?: number;
  /** client1's actions (local iptables rule, then ban.ts) -> the hub has the ban. */
  banToHub?: number;
  /** The hub: received -> relayed (journal fsync first). */
  hubRelay?: number;
  client2RelayToBlock?: number;
  client3RelayToBlock?: number;
  /** client1's BLOCK (Fail2Ban's ban) -> this client's BLOCK: what the paper's Table 1 shows. */
  client2FromBan?: number;
  client3FromBan?: number;
  /** Detection on client1 -> this client's BLOCK: the paper's RT = T(Block) - T(Detect), the agent's rt_ms. */
  client2Rt?: number;
  client3Rt?: number;
  /** `fail2ban-client set sshd unbanip` on client1 -> this client's UNBLOCK. */
  client2Unban?: number;
  client3Unban?: number;
}

/** The columns of response-times.csv, in order. */
export const TIME_COLUMNS: Array<[keyof Times, string]> = [
  ["firstFailureToBan", "client1_first_failure_to_ban_ms"],
  ["detectToBan", "client1_detect_to_ban_ms"],
  ["banToHub", "client1_ban_to_hub_ms"],
  ["hubRelay", "hub_relay_ms"],
  ["client2RelayToBlock", "client2_relay_to_block_ms"],
  ["client3RelayToBlock", "client3_relay_to_block_ms"],
  ["client2FromBan", "client2_block_after_client1_block_ms"],
  ["client3FromBan", "client3_block_after_client1_block_ms"],
  ["client2Rt", "client2_rt_ms"],
  ["client3Rt", "client3_rt_ms"],
  ["client2Unban", "client2_unban_to_unblock_ms"],
  ["client3Unban", "client3_unban_to_unblock_ms"],
];

/** The lines of the summary: what each measures, and the times it pools over the rounds. */
export const SUMMARY: Array<[string, Array<keyof Times>]> = [
  ["client1    first failed login -> Fail2Ban bans", ["firstFailureToBan"]],
  ["client1    detection -> Fail2Ban bans", ["detectToBan"]],
  ["client1    Fail2Ban ban -> hub has it (iptables, ban.ts)", ["banToHub"]],
  ["hub        received -> relayed (journal fsync)", ["hubRelay"]],
  ["client2/3  hub relayed -> BLOCK (WebSocket, kernel)", ["client2RelayToBlock", "client3RelayToBlock"]],
  ["client2/3  client1's BLOCK -> their BLOCK (Table 1)", ["client2FromBan", "client3FromBan"]],
  ["client2    detection -> BLOCK (RT, eq. 1)", ["client2Rt"]],
  ["client3    detection -> BLOCK (RT, eq. 1)", ["client3Rt"]],
  ["client2/3  unbanip on client1 -> UNBLOCK", ["client2Unban", "client3Unban"]],
];

// ---------------------------------------------------------------------------
// Pure helpers

/** Turns the command line (without `node experiment.ts`) into options. Throws with one sentence on bad usage. */
export function parseArgs(argv: string[]): Options {
  const a = yargs(argv)
    .scriptName("experiment.ts")
    .usage("Usage: npm run experiment -- [--rounds N] [--backend ipset|nftables|iptables] [--keep] [--out DIR]\n\nThe paper's experiment with real sshd, Fail2Ban, hydra and kernels in network namespaces (root).")
    .option("rounds", { type: "number", default: 1, describe: `Attacks, each from a new address (1-${MAX_ROUNDS})` })
    .option("backend", { choices: ["ipset", "nftables", "iptables"] as const, default: "ipset" as Backend, describe: "The agents' firewall backend" })
    .option("keep", { type: "boolean", default: false, describe: "Leave the topology up after the rounds, print how to look around, remove it on Ctrl-C" })
    .option("out", { type: "string", default: "./experiment-out", describe: "Directory for events.csv, response-times.csv, timeline.svg and logs/" })
    .strict()
    .help()
    .version(false)
    .fail((msg, err) => {
      throw err ?? new Error(msg);
    })
    .parseSync();
  if (!Number.isInteger(a.rounds) || a.rounds < 1 || a.rounds > MAX_ROUNDS) throw new Error(`Expected --rounds to be a whole number from 1 to ${MAX_ROUNDS}, got ${a.rounds}`);
  return { rounds: a.rounds, backend: a.backend as Backend, keep: a.keep, out: resolve(a.out) };
}

/** The attacker's address in round `round` (1-based). */
export function attackAddress(round: number): string {
  return `${SUBNET}.${ATTACK_BASE + round}`;
}

/**
 * The Found/Ban/Unban lines of a Fail2Ban log (loglevel INFO or lower), with their times. Fail2Ban
 * writes its own clock in local time with ms: `2026-11-27 02:50:01,234 fail2ban.actions [9]: NOTICE [sshd] Ban 10.77.0.101`.
 */
export function parseFail2banLog(text: string): Fail2banEvent[] {
  const re = /^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d),(\d{3}) \S+\s+\[\d+\]: \w+\s+\[([^\]]+)\] (Found|Ban|Unban) (\S+)/;
  const out: Fail2banEvent[] = [];
  for (const line of text.split("\n")) {
    const m = re.exec(line);
    if (!m) continue;
    const [y, mo, d, h, mi, s, ms] = m.slice(1, 8).map(Number);
    out.push({ time: new Date(y, mo - 1, d, h, mi, s, ms).getTime(), jail: m[8], kind: m[9] as Fail2banEvent["kind"], ip: m[10] });
  }
  return out;
}

/** min, median and max of the numbers given (undefined ones left out), or undefined if there are none. */
export function stats(values: Array<number | undefined>): { n: number; min: number; median: number; max: number } | undefined {
  const v = values.filter((x): x is number => typeof x === "number" && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return undefined;
  const mid = v.length >> 1;
  return { n: v.length, min: v[0], median: v.length % 2 ? v[mid] : Math.round((v[mid - 1] + v[mid]) / 2), max: v[v.length - 1] };
}

const ms = (r: Row | undefined) => (r ? Date.parse(r.time) : undefined);
const num = (s: string | undefined) => (s !== undefined && /^-?\d+$/.test(s) ? Number(s) : undefined);
const diff = (a: number | undefined, b: number | undefined) => (a !== undefined && b !== undefined ? a - b : undefined);

/** Joins a round's record with Fail2Ban's log on client1 and the CSV logs of the hub and the agents. */
export function joinRound(rec: RoundRecord, f2b: Fail2banEvent[], hubRows: Row[], agentRows: Record<Client, Row[]>): RoundResult {
  const mine = f2b.filter((e) => e.ip === rec.ip);
  const hub = hubRows.filter((r) => r.ip === rec.ip);
  const find = (rows: Row[], action: string, detail?: RegExp) => rows.find((r) => r.action === action && (!detail || detail.test(r.detail)));
  const receiveBan = find(hub, "RECEIVE", /^ban/);
  const rt = num(receiveBan?.rt_ms);
  const bannedAt = mine.find((e) => e.kind === "Ban")?.time;
  const res: RoundResult = {
    ...rec,
    // hydra goes on until the ban takes effect; what Fail2Ban found after its ban does not count.
    failures: mine.filter((e) => e.kind === "Found" && (bannedAt === undefined || e.time <= bannedAt)).map((e) => e.time),
    detectedAt: receiveBan && rt !== undefined ? Date.parse(receiveBan.time) - rt : undefined,
    bannedAt,
    unbannedAt: mine.find((e) => e.kind === "Unban")?.time,
    hub: { receiveBan, relayBan: find(hub, "RELAY", /^ban/), receiveUnban: find(hub, "RECEIVE", /^unban/), relayUnban: find(hub, "RELAY", /^unban/) },
    block: {},
    schedule: {},
    unblock: {},
    ok: false,
  };
  for (const c of CLIENTS) {
    const rows = agentRows[c].filter((r) => r.ip === rec.ip);
    res.block[c] = find(rows, "BLOCK");
    res.schedule[c] = find(rows, "SCHEDULE_UNBLOCK");
    res.unblock[c] = find(rows, "UNBLOCK");
  }
  res.ok = roundOk(res);
  return res;
}

/** Every check of a round: reachable before, Fail2Ban banned, blocked on all three clients, unblocked on all three after the unban. */
export function roundOk(r: RoundResult): boolean {
  return (
    !r.error &&
    r.bannedAt !== undefined &&
    r.unbannedAt !== undefined &&
    CLIENTS.every((c) => r.before[c] === "connected" && r.afterBan[c] !== undefined && r.afterBan[c] !== "connected" && r.afterUnban[c] === "connected") &&
    OTHERS.every((c) => r.block[c] && r.unblock[c])
  );
}

/** The response times of one round. */
export function roundTimes(r: RoundResult): Times {
  const relayed = ms(r.hub.relayBan);
  return {
    firstFailureToBan: diff(r.bannedAt, r.failures[0]),
    detectToBan: diff(r.bannedAt, r.detectedAt),
    banToHub: diff(ms(r.hub.receiveBan), r.bannedAt),
    hubRelay: diff(relayed, ms(r.hub.receiveBan)),
    client2RelayToBlock: diff(ms(r.block.client2), relayed),
    client3RelayToBlock: diff(ms(r.block.client3), relayed),
    client2FromBan: diff(ms(r.block.client2), r.bannedAt),
    client3FromBan: diff(ms(r.block.client3), r.bannedAt),
    client2Rt: num(r.block.client2?.rt_ms),
    client3Rt: num(r.block.client3?.rt_ms),
    client2Unban: diff(ms(r.unblock.client2), r.unbanAt),
    client3Unban: diff(ms(r.unblock.client3), r.unbanAt),
  };
}

/** The merged log of all nodes for these rounds, in time order, described like the paper's Table 1. */
export function tableRows(rounds: RoundResult[]): TableRow[] {
  const out: TableRow[] = [];
  const push = (time: number | undefined, node: string, action: string, ip: string, description: string, rtMs = "") => {
    if (time !== undefined) out.push({ time, node, action, ip, rtMs, description });
  };
  for (const r of rounds) {
    const threshold = r.failures[MAXRETRY - 1];
    push(r.attackAt, "attacker", "ATTACK", r.ip, `hydra brute-forces ssh://client1:${SSH_PORT} from ${r.ip}`);
    push(r.failures[0], "client1", "FAILURE", r.ip, "Fail2Ban sees the first failed login");
    push(r.detectedAt ?? threshold, "client1", "DETECT", r.ip, `Fail2Ban: ${MAXRETRY}th failure (maxretry), the ban's <time>`);
    push(r.bannedAt, "client1", "BLOCK", r.ip, "Fail2Ban ban: local iptables rule, sent to hub", r.detectedAt !== undefined && r.bannedAt !== undefined ? String(r.bannedAt - r.detectedAt) : "");
    push(r.unbanAt, "client1", "UNBAN_CMD", r.ip, "fail2ban-client set sshd unbanip (manual)");
    push(r.unbannedAt, "client1", "UNBLOCK", r.ip, "Fail2Ban unban: local rule removed, sent to hub");
    for (const h of [r.hub.receiveBan, r.hub.relayBan, r.hub.receiveUnban, r.hub.relayUnban]) if (h) push(ms(h), "hub", h.action, h.ip, h.detail, h.rt_ms);
    for (const c of OTHERS) {
      const b = r.block[c];
      const s = r.schedule[c];
      const u = r.unblock[c];
      if (b) push(ms(b), c, "BLOCK", b.ip, `Received from hub broadcast (${b.origin})`, b.rt_ms);
      if (s) push(ms(s), c, "SCHEDULE_UNBLOCK", s.ip, `Timed unblock at ${s.until.slice(11, 19)} UTC (${s.detail})`);
      if (u) push(ms(u), c, "UNBLOCK", u.ip, `Unban received from hub (${u.origin})`);
    }
  }
  return out.sort((a, b) => a.time - b.time);
}

/** `HH:MM:SS.mmm` in UTC, like the agents' CSV. */
export function clock(t: number): string {
  return new Date(t).toISOString().slice(11, 23);
}

/** The merged log as a text table, Table 1's columns plus RT. */
export function formatTable(rows: TableRow[]): string {
  const w = { time: 12, node: 8, action: 16, ip: 15 };
  const lines = [`${"Timestamp".padEnd(w.time)}  ${"Node".padEnd(w.node)}  ${"Action".padEnd(w.action)}  ${"IP Address".padEnd(w.ip)}  ${"RT (ms)".padStart(7)}  Description`];
  for (const r of rows) lines.push(`${clock(r.time).padEnd(w.time)}  ${r.node.padEnd(w.node)}  ${r.action.padEnd(w.action)}  ${r.ip.padEnd(w.ip)}  ${r.rtMs.padStart(7)}  ${r.description}`);
  return lines.join("\n");
}

/** The min/median/max table of the response times over the rounds. */
export function formatSummary(times: Times[]): string {
  const lines = [`${"".padEnd(56)}${"n".padStart(3)}${"min".padStart(7)}${"median".padStart(8)}${"max".padStart(7)}`];
  for (const [label, keys] of SUMMARY) {
    const s = stats(times.flatMap((t) => keys.map((k) => t[k])));
    lines.push(`${label.padEnd(56)}${String(s?.n ?? 0).padStart(3)}${(s ? String(s.min) : "-").padStart(7)}${(s ? String(s.median) : "-").padStart(8)}${(s ? String(s.max) : "-").padStart(7)}`);
  }
  return lines.join("\n");
}

function csvCell(v: unknown): string {
  const s = v === undefined ? "" : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** CSV text: a header line, then one line per row. */
export function toCsv(header: string[], rows: unknown[][]): string {
  return [header, ...rows].map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
}

/** `events.csv`: the merged log, time in ISO-8601 UTC. */
export function eventsCsv(rows: TableRow[]): string {
  return toCsv(["time", "node", "action", "ip", "rt_ms", "description"], rows.map((r) => [new Date(r.time).toISOString(), r.node, r.action, r.ip, r.rtMs, r.description]));
}

/** `response-times.csv`: one line per round, the times and what the probes answered. */
export function responseTimesCsv(rounds: RoundResult[]): string {
  const header = ["round", "ip", "failures", ...TIME_COLUMNS.map(([, col]) => col), ...CLIENTS.flatMap((c) => [`${c}_after_ban`, `${c}_after_unban`]), "ok", "error"];
  return toCsv(
    header,
    rounds.map((r) => {
      const t = roundTimes(r);
      return [r.round, r.ip, r.failures.length, ...TIME_COLUMNS.map(([k]) => t[k]), ...CLIENTS.flatMap((c) => [r.afterBan[c], r.afterUnban[c]]), r.ok, r.error];
    }),
  );
}

/** One mark on the timeline. */
export interface Mark {
  lane: Lane;
  t: number;
  kind: "attack" | "failure" | "detect" | "block" | "unblock" | "hub" | "unban";
  label?: string;
}

/** The marks of one round. */
export function roundMarks(r: RoundResult): Mark[] {
  const m: Mark[] = r.attackAt === undefined ? [] : [{ lane: "attacker", t: r.attackAt, kind: "attack", label: "hydra" }];
  for (const t of r.failures) m.push({ lane: "client1", t, kind: "failure" });
  if (r.detectedAt !== undefined) m.push({ lane: "client1", t: r.detectedAt, kind: "detect" });
  if (r.bannedAt !== undefined) m.push({ lane: "client1", t: r.bannedAt, kind: "block", label: r.detectedAt !== undefined ? `+${r.bannedAt - r.detectedAt} ms` : undefined });
  if (r.unbanAt !== undefined) m.push({ lane: "client1", t: r.unbanAt, kind: "unban", label: "unbanip" });
  if (r.unbannedAt !== undefined) m.push({ lane: "client1", t: r.unbannedAt, kind: "unblock" });
  for (const h of [r.hub.receiveBan, r.hub.relayBan, r.hub.receiveUnban, r.hub.relayUnban]) if (h) m.push({ lane: "hub", t: Date.parse(h.time), kind: "hub" });
  for (const c of OTHERS) {
    const b = r.block[c];
    const u = r.unblock[c];
    if (b) m.push({ lane: c, t: Date.parse(b.time), kind: "block", label: `RT ${b.rt_ms} ms` });
    if (u) m.push({ lane: c, t: Date.parse(u.time), kind: "unblock" });
  }
  return m;
}

/** A step for axis ticks: 1, 2 or 5 times a power of ten, giving about `n` ticks over `span`. */
export function niceStep(span: number, n = 8): number {
  const raw = Math.max(span, 1) / n;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((k) => k * p).find((s) => s >= raw)!;
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

/**
 * The events per node over time as an SVG figure: one panel per round, one lane per node, time
 * from the round's attack start on a shared axis. Plain SVG 1.1, no scripts, no dependencies.
 */
export function timelineSvg(rounds: RoundResult[]): string {
  const W = 960;
  const left = 90;
  const right = 30;
  const laneH = 24;
  const head = 58;
  const panelH = LANES.length * laneH + 46;
  // t = 0 at the attack's start (or the round's first mark, if it failed before the attack).
  const origin = (r: RoundResult) => r.attackAt ?? Math.min(...roundMarks(r).map((m) => m.t));
  const spans = rounds.map((r) => Math.max(...roundMarks(r).map((m) => m.t - origin(r)), 1));
  const span = Math.max(...spans, 1000) * 1.04;
  const step = niceStep(span);
  const x = (dt: number) => left + (dt / span) * (W - left - right);
  const H = head + rounds.length * panelH + 10;
  const o: string[] = [];
  o.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="11">`);
  o.push(`<rect width="${W}" height="${H}" fill="#fff"/>`);
  o.push(`<text x="${left}" y="20" font-size="14" font-weight="bold">banshare: the paper's experiment, events per node (t = 0 at the attack's start)</text>`);
  const legend: Array<[Mark["kind"], string]> = [["attack", "attack starts"], ["failure", "failed login (Fail2Ban)"], ["detect", "detection"], ["block", "BLOCK"], ["hub", "hub RECEIVE / RELAY"], ["unban", "unbanip"], ["unblock", "UNBLOCK"]];
  let lx = left;
  for (const [kind, text] of legend) {
    o.push(markSvg(kind, lx + 5, 38));
    o.push(`<text x="${lx + 14}" y="42">${esc(text)}</text>`);
    lx += 24 + text.length * 6;
  }
  rounds.forEach((r, i) => {
    const top = head + i * panelH;
    o.push(`<text x="${left}" y="${top + 12}" font-weight="bold">Round ${r.round}: attacker ${esc(r.ip)}${r.ok ? "" : " (a check failed)"}</text>`);
    LANES.forEach((lane, j) => {
      const y = top + 20 + j * laneH + laneH / 2;
      o.push(`<text x="${left - 8}" y="${y + 4}" text-anchor="end">${lane}</text>`);
      o.push(`<line x1="${left}" y1="${y}" x2="${W - right}" y2="${y}" stroke="#ddd"/>`);
    });
    const axisY = top + 20 + LANES.length * laneH + 4;
    o.push(`<line x1="${left}" y1="${axisY}" x2="${W - right}" y2="${axisY}" stroke="#555"/>`);
    for (let t = 0; t <= span; t += step) {
      const tx = x(t);
      o.push(`<line x1="${tx}" y1="${top + 20}" x2="${tx}" y2="${axisY + 4}" stroke="#eee"/>`);
      o.push(`<line x1="${tx}" y1="${axisY}" x2="${tx}" y2="${axisY + 4}" stroke="#555"/>`);
      o.push(`<text x="${tx}" y="${axisY + 15}" text-anchor="middle">${tickLabel(t, step, span)}</text>`);
    }
    for (const m of roundMarks(r)) {
      const y = top + 20 + LANES.indexOf(m.lane) * laneH + laneH / 2;
      const mx = x(m.t - origin(r));
      o.push(markSvg(m.kind, mx, y));
      if (m.label) o.push(`<text x="${mx + 6}" y="${y - 6}" font-size="10" fill="#333">${esc(m.label)}</text>`);
    }
  });
  o.push("</svg>");
  return o.join("\n") + "\n";
}

/** An axis label: ms for short spans, else seconds with as many decimals as the step needs. */
export function tickLabel(t: number, step: number, span: number): string {
  if (span < 2000) return `${Math.round(t)} ms`;
  return `${(t / 1000).toFixed(step >= 1000 ? 0 : step >= 100 ? 1 : 2)} s`;
}

function markSvg(kind: Mark["kind"], x: number, y: number): string {
  const p = (n: number) => n.toFixed(1);
  switch (kind) {
    case "attack":
      return `<path d="M${p(x - 5)},${p(y - 6)} L${p(x + 5)},${p(y)} L${p(x - 5)},${p(y + 6)} Z" fill="#444"/>`;
    case "failure":
      return `<line x1="${p(x)}" y1="${p(y - 5)}" x2="${p(x)}" y2="${p(y + 5)}" stroke="#999" stroke-width="1.5"/>`;
    case "detect":
      return `<circle cx="${p(x)}" cy="${p(y)}" r="5" fill="none" stroke="#e67e00" stroke-width="2"/>`;
    case "block":
      return `<rect x="${p(x - 4.5)}" y="${p(y - 4.5)}" width="9" height="9" fill="#c0392b"/>`;
    case "unblock":
      return `<rect x="${p(x - 4.5)}" y="${p(y - 4.5)}" width="9" height="9" fill="none" stroke="#27ae60" stroke-width="2"/>`;
    case "hub":
      return `<path d="M${p(x)},${p(y - 5)} L${p(x + 5)},${p(y)} L${p(x)},${p(y + 5)} L${p(x - 5)},${p(y)} Z" fill="#2c6fbb"/>`;
    case "unban":
      return `<path d="M${p(x - 5)},${p(y + 5)} L${p(x + 5)},${p(y + 5)} L${p(x)},${p(y - 5)} Z" fill="#27ae60"/>`;
  }
}

// ---------------------------------------------------------------------------
// I/O

/** Debian packages for the requirements, for the hint in the error line. */
const PACKAGES: Record<string, string> = {
  ip: "iproute2",
  ss: "iproute2",
  sshd: "openssh-server",
  "ssh-keygen": "openssh-client",
  hydra: "hydra",
  "fail2ban-server": "fail2ban",
  "fail2ban-client": "fail2ban",
  iptables: "iptables",
  ipset: "ipset",
  nft: "nftables",
};

/** Why this machine cannot run the experiment, one sentence, or undefined. */
function preflight(backend: Backend): string | undefined {
  if (process.getuid?.() !== 0) return "The experiment needs root (network namespaces, sshd, Fail2Ban, the kernel firewall): run it with sudo";
  const reqs: Requirement[] = ["netns", "ip", "ss", "sshd", "ssh-keygen", "hydra", "fail2ban-server", "fail2ban-client", "iptables", ...(backend === "ipset" ? ["ipset"] : backend === "nftables" ? ["nft"] : [])];
  const lacking = reqs.filter((r) => missing([r]));
  if (lacking.length) {
    const pkgs = [...new Set(lacking.map((r) => PACKAGES[r] ?? r))];
    return `Missing: ${lacking.map((r) => missing([r])).join("; ")}; install with: apt-get install ${pkgs.join(" ")}`;
  }
  return undefined;
}

/** pyinotify lets Fail2Ban see new log lines at once; without it, it polls (~0.5 s slower). */
function fail2banBackend(): "pyinotify" | "polling" {
  const shebang = /^#!\s*(\S+)/.exec(readFileSync(which("fail2ban-server")!, "utf8").split("\n")[0] ?? "")?.[1] ?? "python3";
  return runSync(shebang, ["-c", "import pyinotify"]).status === 0 ? "pyinotify" : "polling";
}

const log = (s: string) => process.stdout.write(s + "\n");
/** While --keep waits for Ctrl-C: the exit code the rounds earned. */
let keeping: number | undefined;

interface Fleet {
  topo: Topology;
  work: string;
  hub: HubProc;
  agents: Record<Client, Proc>;
  sshd: Record<Client, Proc>;
  f2b: Record<Client, Fail2ban>;
  sshLog: Record<Client, string>;
}

/** sshd on port 22 that logs to a file and refuses every login, whatever the password: only failures. */
function sshdConfig(dir: string, listen: string): string {
  return [
    `Port ${SSH_PORT}`,
    `ListenAddress ${listen}`,
    `HostKey ${dir}/ssh_host_ed25519_key`,
    `PidFile ${dir}/sshd.pid`,
    "PasswordAuthentication yes",
    "KbdInteractiveAuthentication no",
    "PubkeyAuthentication no",
    "UsePAM no",
    "PermitRootLogin no",
    // The namespaces share the host's /etc/passwd and /etc/shadow: no account may log in.
    "DenyUsers *",
    "MaxStartups 100:30:200",
    "LogLevel INFO",
    "",
  ].join("\n");
}

async function startClient(topo: Topology, work: string, hubUrl: string, token: string, name: Client, backend: Backend, f2bBackend: "pyinotify" | "polling", stockDir: string) {
  const dir = join(work, name);
  mkdirSync(dir, { recursive: true });
  const netns = topo.ns(name);
  const sshLog = join(dir, "sshd.log");
  runSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(dir, "ssh_host_ed25519_key")]);
  writeFileSync(join(dir, "sshd_config"), sshdConfig(dir, topo.ip(name)));
  writeFileSync(sshLog, "");
  const sshd = spawnProc("/usr/sbin/sshd", ["-D", "-f", join(dir, "sshd_config"), "-E", sshLog], { netns, name: `sshd:${name}` });
  await waitFor(() => /Server listening on/.test(readFileSync(sshLog, "utf8")) || sshd.exitInfo(), `sshd on ${name} to listen`, 10_000);
  if (sshd.exitInfo()) throw new Error(`sshd on ${name} exited: ${readFileSync(sshLog, "utf8").trim()}`);
  const agent = await startAgentProc(name, ["--hub", hubUrl, "--token-file", token, "--node", name, "--backend", backend, "--csv", join(work, `${name}.csv`), "--spool", join(dir, "spool")], { netns });
  // ban.ts's config, as /etc/banshare/ban.json on a real server (where the hub is wss:// and
  // "insecure" stays out: here the plain ws:// hub is on the namespaces' private bridge).
  const banConfig = join(dir, "ban.json");
  writeFileSync(banConfig, JSON.stringify({ hub: hubUrl, "token-file": token, timeout: 5, spool: join(dir, "spool"), insecure: true }));
  const f2b = await startFail2ban({
    dir: join(dir, "f2b"),
    netns,
    logFile: sshLog,
    maxretry: MAXRETRY,
    findtime: FINDTIME_S,
    bantime: BANTIME_S,
    backend: f2bBackend,
    extraActionDirs: [stockDir],
    // Like `action = %(action_)s` + banshare in a jail.local: the local ban first, then the fleet.
    actions: `iptables-multiport[name=sshd, port=ssh, protocol=tcp]\nbanshare[banshare_dir=${REPO_DIR}, node=${process.execPath}, config=${banConfig}]`,
  });
  return { sshd, agent, f2b, sshLog };
}

/** Starts the whole fleet: namespaces, hub, and on each client sshd, an agent and Fail2Ban. */
async function startFleet(opts: Options, work: string): Promise<Fleet> {
  const topo = await createTopology(["hub", ...CLIENTS, "attacker"], { prefix: "bsexp" });
  log(`  namespaces  ${topo.names.map((n) => `${topo.ns(n)} (${topo.ip(n)})`).join(", ")}`);
  const tokens = await enrol(work, CLIENTS.map((c) => [c, "node"] as [string, "node"]));
  const hub = await startHubProc(["--tokens", join(work, "tokens"), "--state", join(work, "journal.jsonl"), "--csv", join(work, "hub.csv"), "--listen", `${topo.ip("hub")}:7700`], { netns: topo.ns("hub") });
  log(`  hub         ${hub.url}`);
  // Fail2Ban's own local ban action, from the system's Fail2Ban.
  const stockDir = join(work, "stock");
  mkdirSync(join(stockDir, "action.d"), { recursive: true });
  for (const f of ["iptables.conf", "iptables-multiport.conf"]) copyFileSync(join("/etc/fail2ban/action.d", f), join(stockDir, "action.d", f));
  const f2bBackend = fail2banBackend();
  const started = await Promise.all(CLIENTS.map((c) => startClient(topo, work, hub.url, tokens[c], c, opts.backend, f2bBackend, stockDir)));
  const pick = <K extends keyof (typeof started)[number]>(k: K) => Object.fromEntries(CLIENTS.map((c, i) => [c, started[i][k]])) as Record<Client, (typeof started)[number][K]>;
  log(`  clients     ${CLIENTS.join(", ")}: sshd on port ${SSH_PORT}, fail2ban-server (sshd-file filter, ${f2bBackend}, maxretry ${MAXRETRY}, iptables-multiport + banshare), agent (${opts.backend})`);
  return { topo, work, hub, agents: pick("agent"), sshd: pick("sshd"), f2b: pick("f2b"), sshLog: pick("sshLog") };
}

const probe = (f: Fleet, to: Client, timeoutMs = 500) => tcpConnect(f.topo, "attacker", to, SSH_PORT, timeoutMs);
const agentRows = (f: Fleet, c: Client) => readCsv(join(f.work, `${c}.csv`));

/** One round: attack client1 from a new address until Fail2Ban bans it, check, unban, check. */
async function runRound(f: Fleet, round: number): Promise<RoundRecord> {
  const ip = attackAddress(round);
  const rec: RoundRecord = { round, ip, before: {}, afterBan: {}, afterUnban: {} };
  // hydra cannot bind a source address, so the round's address becomes the attacker's preferred
  // source for the subnet: hydra, and the probes, connect from it.
  const ns = f.topo.ns("attacker");
  runSync("ip", ["-n", ns, "addr", "add", `${ip}/24`, "dev", "eth0"]);
  const route = runSync("ip", ["-n", ns, "route", "replace", `${SUBNET}.0/24`, "dev", "eth0", "proto", "kernel", "scope", "link", "src", ip]);
  if (route.status !== 0) throw new Error(`ip route replace ... src ${ip} failed: ${route.stderr.trim()}`);
  let hydra: Proc | undefined;
  try {
    for (const c of CLIENTS) rec.before[c] = await probe(f, c, 2000);
    const unreachable = CLIENTS.filter((c) => rec.before[c] !== "connected");
    if (unreachable.length) throw new Error(`the attacker cannot reach port ${SSH_PORT} on ${unreachable.join(", ")} before the attack`);

    rec.attackAt = Date.now();
    hydra = spawnProc("hydra", ["-I", "-t", "4", "-w", "5", "-L", join(f.work, "users.txt"), "-P", join(f.work, "passwords.txt"), `ssh://${f.topo.ip("client1")}:${SSH_PORT}`], { netns: ns, cwd: f.work, name: "hydra" });
    await waitFor(async () => (await f.f2b.client1.banned()).includes(ip), `Fail2Ban on client1 to ban ${ip}`, 30_000);
    await hydra.stop("SIGTERM", 2000);
    // hydra's last attempts, sent after the ban and never acknowledged, stay in the attacker's
    // kernel; retransmitted after the unban they reach sshd as fresh failures and Fail2Ban bans
    // again (rightly). The attack is over: drop those sockets.
    runSync("ip", ["netns", "exec", ns, "ss", "-K", "-t", "src", ip]);
    for (const c of OTHERS) await waitFor(() => agentRows(f, c).some((r) => r.action === "BLOCK" && r.ip === ip), `a BLOCK row for ${ip} on ${c}`, 15_000);
    for (const c of CLIENTS) rec.afterBan[c] = await probe(f, c);

    rec.unbanAt = Date.now();
    await f.f2b.client1.client(["set", "sshd", "unbanip", ip]);
    for (const c of OTHERS) await waitFor(() => agentRows(f, c).some((r) => r.action === "UNBLOCK" && r.ip === ip), `an UNBLOCK row for ${ip} on ${c}`, 15_000);
    for (const c of CLIENTS) {
      // The kernel has it by the time the row is written; a fresh connect can still race ARP.
      await waitFor(async () => (rec.afterUnban[c] = await probe(f, c, 1000)) === "connected", `${c} to let ${ip} in again`, 5_000).catch(() => undefined);
    }
  } catch (e) {
    rec.error = (e as Error).message.split("\n")[0];
    // Leave no ban behind for the next round.
    await f.f2b.client1.client(["set", "sshd", "unbanip", ip]).catch(() => undefined);
  } finally {
    await hydra?.stop("SIGKILL", 1000);
  }
  return rec;
}

/** Reads every log, joins the rounds with them, prints Table 1 and the summary, writes --out. */
function report(f: Fleet, opts: Options, records: RoundRecord[]): RoundResult[] {
  const f2bEvents = parseFail2banLog(readFileSync(f.f2b.client1.logTarget, "utf8"));
  const hubRows = readCsv(join(f.work, "hub.csv"));
  const rowsOf = Object.fromEntries(CLIENTS.map((c) => [c, agentRows(f, c)])) as Record<Client, Row[]>;
  const rounds = records.map((r) => joinRound(r, f2bEvents, hubRows, rowsOf));
  const table = tableRows(rounds);

  const logs = join(opts.out, "logs");
  mkdirSync(logs, { recursive: true });
  copyFileSync(join(f.work, "hub.csv"), join(logs, "hub.csv"));
  for (const c of CLIENTS) {
    if (existsSync(join(f.work, `${c}.csv`))) copyFileSync(join(f.work, `${c}.csv`), join(logs, `${c}.csv`));
    copyFileSync(f.f2b[c].logTarget, join(logs, `${c}-fail2ban.log`));
    copyFileSync(f.sshLog[c], join(logs, `${c}-sshd.log`));
  }
  writeFileSync(join(opts.out, "events.csv"), eventsCsv(table));
  writeFileSync(join(opts.out, "response-times.csv"), responseTimesCsv(rounds));
  writeFileSync(join(opts.out, "timeline.svg"), timelineSvg(rounds));

  log(`\nTable 1. Synchronized IP blocking events (merged logs of all nodes: Fail2Ban's on client1, the hub's and the agents' CSV)\n`);
  log(formatTable(table));
  log(`\nChecks: TCP connects from the round's attacker address to port ${SSH_PORT} (connected = open; refused or timeout = blocked)`);
  for (const r of rounds) {
    const c = (k: "before" | "afterBan" | "afterUnban") => CLIENTS.map((x) => `${x} ${r[k][x] ?? "-"}`).join(", ");
    log(`  round ${r.round} ${r.ip}: ${r.ok ? "ok" : "FAILED"}${r.error ? ` (${r.error})` : ""}`);
    log(`    after the ban:   ${c("afterBan")}`);
    log(`    after the unban: ${c("afterUnban")}`);
  }
  log(`\nResponse times over ${rounds.length} round(s), ms (the paper: the ban appeared on the other nodes "within approximately 1-2 seconds")\n`);
  log(formatSummary(rounds.map(roundTimes)));
  log(`\nWritten: ${join(opts.out, "events.csv")}, ${join(opts.out, "response-times.csv")}, ${join(opts.out, "timeline.svg")}, ${logs}/`);
  return rounds;
}

/** Graceful stop: Fail2Ban (its flush sends no unban), agents and hub (their CSVs flushed), then the namespaces. */
async function stopFleet(f: Fleet): Promise<void> {
  await Promise.all(CLIENTS.map((c) => f.f2b[c].stop()));
  await Promise.all(CLIENTS.map((c) => f.agents[c].stop("SIGTERM", 5000)));
  await f.hub.proc.stop("SIGTERM", 5000);
  await Promise.all(CLIENTS.map((c) => f.sshd[c].stop("SIGTERM", 3000)));
  await f.topo.destroy();
}

function keepHelp(f: Fleet, backend: Backend): string {
  const ns = (n: string) => f.topo.ns(n);
  const set = backend === "ipset" ? "ipset list banshare-v4" : backend === "nftables" ? "nft list table inet banshare" : "iptables -S banshare";
  return [
    "",
    "--keep: everything is still up. Look around (as root, in another shell):",
    `  ip netns exec ${ns("client2")} ${set}    # what the agent put in the kernel`,
    `  ip netns exec ${ns("client1")} iptables -S                        # Fail2Ban's f2b-sshd chain and banshare's chain`,
    `  fail2ban-client -c ${f.f2b.client1.dir} -s ${f.f2b.client1.socket} status sshd`,
    `  fail2ban-client -c ${f.f2b.client1.dir} -s ${f.f2b.client1.socket} set sshd banip 10.77.0.99`,
    `  ip netns exec ${ns("attacker")} hydra -I -t 4 -L ${f.work}/users.txt -P ${f.work}/passwords.txt ssh://${f.topo.ip("client2")}`,
    `  tail -f ${f.work}/hub.csv ${f.work}/client2.csv ${f.f2b.client1.logTarget}`,
    "",
    `Remove it all: press Ctrl-C here (or kill -INT ${process.pid}).`,
    `If this process was killed hard: kill the PIDs of 'ip netns pids NS', then 'ip netns del NS', for NS in ${f.topo.id}-{hub,client1,client2,client3,attacker} and ${f.topo.switchNs}; rm -rf ${f.work}`,
    "(the next run of the experiment also removes leftovers of a dead run).",
  ].join("\n");
}

/** Runs the experiment; resolves with the exit code. */
export async function runExperiment(opts: Options): Promise<number> {
  const why = preflight(opts.backend);
  if (why) {
    process.stderr.write(`experiment: ${why}\n`);
    return 1;
  }
  const work = mkdtempSync("/tmp/bsexp-"); // short: Fail2Ban's socket path must fit in 107 bytes
  onCleanup(() => rmSync(work, { recursive: true, force: true }));
  // sshd's privilege separation directory is compiled in; Debian's ssh.service creates it.
  mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });
  writeFileSync(join(work, "users.txt"), HYDRA_USERS.join("\n") + "\n");
  writeFileSync(join(work, "passwords.txt"), HYDRA_PASSWORDS.join("\n") + "\n");
  mkdirSync(opts.out, { recursive: true });

  const t0 = Date.now();
  log(`banshare experiment: ${opts.rounds} round(s), agents with --backend ${opts.backend}, output in ${opts.out}\n`);
  let fleet: Fleet | undefined;
  try {
    fleet = await startFleet(opts, work);
    log(`  started in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
    const records: RoundRecord[] = [];
    for (let r = 1; r <= opts.rounds; r++) {
      const t = Date.now();
      const rec = await runRound(fleet, r);
      records.push(rec);
      log(`  round ${r}: hydra from ${rec.ip} -> client1${rec.error ? `: FAILED: ${rec.error}` : ": banned, blocked on client1..3, unbanned, open again"} (${((Date.now() - t) / 1000).toFixed(1)} s)`);
    }
    const rounds = report(fleet, opts, records);
    const ok = rounds.every((r) => r.ok);
    log(`\n${ok ? "All checks passed" : "Some checks FAILED"} (${((Date.now() - t0) / 1000).toFixed(1)} s in all).`);
    if (opts.keep) {
      log(keepHelp(fleet, opts.backend));
      keeping = ok ? 0 : 1;
      setInterval(() => undefined, 1 << 30); // wait for the signal; its handler removes everything
      return await new Promise<number>(() => undefined);
    }
    await stopFleet(fleet);
    return ok ? 0 : 1;
  } catch (e) {
    process.stderr.write(`experiment: ${(e as Error).stack}\n`);
    if (fleet) await stopFleet(fleet).catch(() => undefined);
    return 1;
  } finally {
    runCleanupNow();
  }
}

async function main(): Promise<void> {
  let opts: Options;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`experiment: ${(e as Error).message}\n`);
    process.exitCode = 2;
    return;
  }
  // Ctrl-C or kill: remove every namespace and process at once (SIGKILL by PID, then
  // `ip netns del`) and the temporary directory. With --keep this is the normal end.
  const interrupted = (sig: NodeJS.Signals) => {
    process.stderr.write(keeping !== undefined ? "\nexperiment: removing the namespaces and processes\n" : `\nexperiment: ${sig}: stopped; removing the namespaces and processes\n`);
    runCleanupNow();
    process.exit(keeping ?? 130);
  };
  process.on("SIGINT", interrupted).on("SIGTERM", interrupted).on("SIGHUP", interrupted);
  const code = await runExperiment(opts);
  // Everything is stopped and removed: exit with the result, whatever handle may still linger.
  process.exit(code);
}

function isMain(): boolean {
  try {
    return realpathSync(process.argv[1] ?? "") === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isMain()) await main();
