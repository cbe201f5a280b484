/**
 * A raw WebSocket client over a plain TCP socket, for the attacks a well-behaved library will
 * not make: it upgrades with a token, then sends what it is told and reads only when asked
 * (never answering a close frame or a ping, or pausing the socket so that it reads nothing).
 */

import { randomBytes } from "node:crypto";
import { connect, type Socket } from "node:net";

/** One frame from the hub: opcode (1 text, 8 close, 9 ping) and payload. */
export interface RawFrame {
  op: number;
  data: Buffer;
}

/** A raw client: the socket, the frames parsed so far, and whether the hub has closed the TCP connection. */
export interface RawWs {
  socket: Socket;
  frames: RawFrame[];
  /** Resolves when the TCP connection ends (the hub terminated or closed it). */
  ended: Promise<void>;
  /** Sends one masked text frame. */
  sendText(text: string): void;
}

/** One masked client frame (clients must mask, RFC 6455 5.3). */
export function clientFrame(text: string, opcode = 1): Buffer {
  const payload = Buffer.from(text);
  const mask = randomBytes(4);
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x80 | opcode, 0x80 | n]) : n < 65536 ? Buffer.from([0x80 | opcode, 0x80 | 126, n >> 8, n & 255]) : Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | 127]), Buffer.from([0, 0, 0, 0, (n >>> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255])]);
  const body = Buffer.alloc(n);
  for (let i = 0; i < n; i++) body[i] = payload[i] ^ mask[i & 3];
  return Buffer.concat([head, mask, body]);
}

/** Splits unmasked server frames off the front of `buf`; returns them and the rest. */
function parseFrames(buf: Buffer): { frames: RawFrame[]; rest: Buffer } {
  const frames: RawFrame[] = [];
  let at = 0;
  for (;;) {
    if (buf.length - at < 2) break;
    const op = buf[at] & 0x0f;
    let n = buf[at + 1] & 0x7f;
    let off = at + 2;
    if (n === 126) {
      if (buf.length - at < 4) break;
      n = buf.readUInt16BE(at + 2);
      off = at + 4;
    } else if (n === 127) {
      if (buf.length - at < 10) break;
      n = Number(buf.readBigUInt64BE(at + 2));
      off = at + 10;
    }
    if (buf.length < off + n) break;
    frames.push({ op, data: buf.subarray(off, off + n) });
    at = off + n;
  }
  return { frames, rest: buf.subarray(at) };
}

/**
 * Upgrades a raw socket to the hub at `port` with `token` (from `localAddress`, another loopback
 * address than the honest clients' if given). With `read: false` it pauses the socket once
 * upgraded and never reads again. Rejects with the status line when the hub does not upgrade.
 */
export function rawWs(port: number, token: string, opts: { localAddress?: string; read?: boolean } = {}): Promise<RawWs> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: "127.0.0.1", port, localAddress: opts.localAddress });
    socket.on("error", () => {});
    const ended = new Promise<void>((r) => socket.once("close", () => r()));
    let buf: Buffer = Buffer.alloc(0);
    let upgraded = false;
    const frames: RawFrame[] = [];
    const client: RawWs = { socket, frames, ended, sendText: (t) => void socket.write(clientFrame(t)) };
    socket.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (!upgraded) {
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) return;
        const status = buf.subarray(0, buf.indexOf("\r\n")).toString();
        if (!/^HTTP\/1\.1 101 /.test(status)) return reject(new Error(status));
        upgraded = true;
        buf = buf.subarray(end + 4);
        resolve(client);
        if (opts.read === false) return void socket.pause();
      }
      const { frames: got, rest } = parseFrames(buf);
      frames.push(...got);
      buf = rest;
    });
    socket.once("close", () => reject(new Error("closed before the upgrade")));
    socket.write(`GET / HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${randomBytes(16).toString("base64")}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer ${token}\r\n\r\n`);
  });
}
