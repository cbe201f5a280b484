/**
 * One raw hub client for the tests: a real WebSocket to a real hub, with the token as a bearer
 * header (as agents and senders send it) or as a subprotocol (as the status page does), the
 * frames the hub sends collected in order, `next()` to wait for one and `acks()` to wait for
 * the hub to ack what was sent.
 */

import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { STATUS_PROTOCOL } from "../../hub.ts";
import { PROTOCOL_VERSION } from "../../messages.ts";
import { waitFor } from "./fleet.ts";

/** A node's connection to the hub. */
export interface HubClient {
  ws: WebSocket;
  /** Every frame the hub sent so far, parsed, oldest first. */
  frames: any[];
  /** Resolves with the close code and reason once the socket is closed, by either side. */
  closed: Promise<{ code: number; reason: string }>;
  /** Every ack so far: the acked frame's id -> the seq the hub gave it. */
  acked: Map<string, string>;
  /** Called with each frame as it arrives, after it is stored (e.g. to act on the n-th ack at once). */
  onFrame?: (frame: any) => void;
  /** Sends a string or bytes as they are, anything else as JSON. */
  send(frame: unknown, opts?: { binary?: boolean }): void;
  /** The first frame so far that `pred` accepts, waiting up to the client's timeout for one. */
  next(pred: (f: any) => boolean, what?: string, timeoutMs?: number): Promise<any>;
  /** Resolves once `n` frames in all have been acked; rejects on the first error frame (30 s by default). */
  acks(n: number, timeoutMs?: number): Promise<void>;
  /** Says hello (with `fields`, e.g. `want`) and waits for the welcome. */
  hello(fields?: Record<string, unknown>): Promise<any>;
  close(): void;
}

/** How `connectNode` connects. */
export interface ConnectOptions {
  /** Offer the token as the status page does: subprotocols STATUS_PROTOCOL and banshare.token.TOKEN. */
  subprotocol?: boolean;
  /** Say hello once open and wait for the welcome; an object adds its fields to the hello. */
  hello?: boolean | Record<string, unknown>;
  /** PEM CA for a wss:// hub. */
  ca?: string;
  /** How long `next()` waits by default (10 s). */
  timeoutMs?: number;
}

/** The token itself, or `{ file }` holding it (as `enrol` writes them). */
export type TokenSource = string | { file: string };

function tokenOf(t: TokenSource): string {
  return typeof t === "string" ? t : readFileSync(t.file, "utf8").trim();
}

/**
 * Opens a socket to the hub as the owner of `token`; resolves once it is open (and welcomed
 * with `hello`). Rejects with `HTTP <status>` when the hub refuses the upgrade.
 */
export async function connectNode(url: string, token: TokenSource, opts: ConnectOptions = {}): Promise<HubClient> {
  const t = tokenOf(token);
  let self: HubClient | undefined; // for the message listener, which is attached before the client exists
  const ws = opts.subprotocol
    ? new WebSocket(url, [STATUS_PROTOCOL, `banshare.token.${t}`], { perMessageDeflate: false, ca: opts.ca })
    : new WebSocket(url, { headers: { authorization: `Bearer ${t}` }, perMessageDeflate: false, ca: opts.ca });
  const frames: any[] = [];
  const acked = new Map<string, string>();
  ws.on("message", (d) => {
    const f = JSON.parse(String(d));
    frames.push(f);
    if (f.type === "ack") acked.set(f.id, f.seq);
    self?.onFrame?.(f);
  });
  const closed = new Promise<{ code: number; reason: string }>((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: String(reason) })));
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("unexpected-response", (_req, res) => {
      reject(new Error(`HTTP ${res.statusCode}`));
      res.resume();
      ws.terminate();
    });
    ws.once("error", reject);
  });
  ws.on("error", () => {});
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const client: HubClient = {
    ws,
    frames,
    closed,
    acked,
    send: (frame, o = {}) => ws.send(typeof frame === "string" || Buffer.isBuffer(frame) ? frame : JSON.stringify(frame), { binary: o.binary ?? false }),
    next: (pred, what = "a frame from the hub", ms = timeoutMs) => waitFor(() => frames.find(pred), what, ms),
    acks: async (n, ms = 30_000) => {
      await waitFor(
        () => {
          const refused = frames.find((f) => f.type === "error");
          if (refused) throw new Error(`the hub refused a frame: ${JSON.stringify(refused)}`);
          return acked.size >= n;
        },
        `${n} acks (got ${acked.size})`,
        ms,
      );
    },
    hello: async (fields = {}) => {
      const from = frames.length;
      client.send({ type: "hello", v: PROTOCOL_VERSION, ...fields });
      const f = await waitFor(() => frames.slice(from).find((x) => x.type === "welcome" || x.type === "error"), "the hub's welcome", timeoutMs);
      if (f.type !== "welcome") throw new Error(`the hub refused the hello: ${f.code}: ${f.message}`);
      return f;
    },
    close: () => ws.close(),
  };
  self = client;
  if (opts.hello) await client.hello(opts.hello === true ? {} : opts.hello);
  return client;
}

/** The HTTP status of an upgrade with `token` (101 when it succeeds; the socket is closed again; -1: no answer). */
export function upgradeStatus(url: string, token: TokenSource | undefined, ca?: string): Promise<number> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers: token === undefined ? {} : { authorization: `Bearer ${tokenOf(token)}` }, ca });
    ws.on("unexpected-response", (_req, res) => {
      resolve(res.statusCode ?? 0);
      res.resume();
      ws.terminate();
    });
    ws.on("open", () => {
      resolve(101);
      ws.close();
    });
    ws.on("error", () => resolve(-1));
  });
}
