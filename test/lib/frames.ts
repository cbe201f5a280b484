/**
 * Frames for the fault suites, and the raw WebSocket sender that publishes them
 * (test/fixtures/ws-sender.ts): one copy for faults, redis and redis-loss.
 */

import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { BanFrame, UnbanFrame } from "../../messages.ts";
import { tsx, type Proc } from "./proc.ts";

let frameNo = 0;

/**
 * Ban and unban frames with ids unique in the run (`tag`, the pid, a counter): bans detected one
 * ms apart from `at` on, unbans by default after every ban made so far (newest wins per address
 * and origin).
 */
export function frameMaker(tag: string, bantime: number): { bans(ips: string[], at?: number): BanFrame[]; unbans(ips: string[], at?: number): UnbanFrame[] } {
  return {
    bans: (ips, at = Date.now()) => ips.map((ip, i) => ({ type: "ban", id: `${tag}${process.pid}-${++frameNo}`, ip, jail: "sshd", bantime, detectedAt: at + i })),
    unbans: (ips, at = Date.now() + 1000) => ips.map((ip, i) => ({ type: "unban", id: `${tag}${process.pid}-${++frameNo}`, ip, jail: "sshd", detectedAt: at + i })),
  };
}

/**
 * Starts the raw WebSocket sender with `frames` (written to a file in `dir`) and `tokenFile`'s
 * token. It keeps up to `window` frames unacked (default 16); with `hold` it waits for SIGUSR1
 * after the welcome.
 */
export async function startWsSender(dir: string, url: string, tokenFile: string, frames: object[], opts: { window?: number; hold?: boolean; netns?: string; name?: string } = {}): Promise<Proc> {
  const file = join(dir, `frames-${process.pid}-${++frameNo}.json`);
  await writeFile(file, JSON.stringify(frames));
  return tsx("test/fixtures/ws-sender.ts", [url, tokenFile, file, String(opts.window ?? 16), ...(opts.hold ? ["hold"] : [])], { netns: opts.netns, name: opts.name ?? "sender" });
}
