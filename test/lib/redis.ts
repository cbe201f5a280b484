/**
 * A real Redis for tests: `redis-server` on a free loopback port with a scratch folder, append
 * only file on (fsync on every write, so an acked write survives kill -9), no RDB snapshots. It
 * is ended by its PID (never by name) and its folder removed after the test, also when it fails.
 */

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { freePort } from "./fleet.ts";
import { spawnProc, type Proc } from "./proc.ts";

/** A running test Redis. */
export interface TestRedis {
  url: string;
  port: number;
  dir: string;
  proc: Proc;
  /** kill -9 the server (the append only file stays). */
  kill9(): Promise<void>;
  /** Starts it again on the same port and folder; resolves once it accepts connections (AOF loaded). */
  restart(): Promise<void>;
  /** Runs one command with redis-cli against it; resolves with its stdout. */
  cli(...args: string[]): Promise<string>;
}

/** Starts a Redis for this test; `t.after` stops it and removes its folder. */
export async function startRedis(t: TestContext, extra: string[] = []): Promise<TestRedis> {
  const dir = await mkdtemp(join(tmpdir(), "banshare-redis-"));
  const port = await freePort();
  const args = ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no", "--protected-mode", "yes", ...extra];
  const start = async () => {
    const proc = spawnProc("redis-server", args, { name: "redis" });
    await proc.waitForLine(/Ready to accept connections/, 20_000);
    return proc;
  };
  const r: TestRedis = {
    url: `redis://127.0.0.1:${port}/0`,
    port,
    dir,
    proc: await start().catch(async (e) => {
      await rm(dir, { recursive: true, force: true });
      throw e;
    }),
    async kill9() {
      await r.proc.kill9();
    },
    async restart() {
      r.proc = await start();
    },
    async cli(...a: string[]) {
      const p = spawnProc("redis-cli", ["-p", String(port), ...a], { name: "redis-cli" });
      await p.closed;
      return p.output().trim();
    },
  };
  t.after(async () => {
    await r.proc.stop("SIGTERM", 5000);
    await rm(dir, { recursive: true, force: true });
  });
  return r;
}
