/**
 * A real Redis for tests: `redis-server` on a free loopback port with a scratch folder, append
 * only file on (fsync on every write, so an acked write survives kill -9), no RDB snapshots. It
 * is ended by its PID (never by name) and its folder removed after the test, also when it fails.
 * It may run inside a test's network namespace (hubs there reach it on that namespace's loopback).
 */

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { enrol, freePort } from "./fleet.ts";
import { spawnProc, stopAll, type Proc } from "./proc.ts";

/** A running test Redis. */
export interface TestRedis {
  url: string;
  port: number;
  dir: string;
  proc: Proc;
  /** kill -9 the server (the append only file stays). */
  kill9(): Promise<void>;
  /** Starts it again on the same port and folder (with `extra` flags after the usual ones); resolves once it accepts connections (AOF or RDB loaded). */
  restart(extra?: string[]): Promise<void>;
  /** Runs one command with redis-cli against it; resolves with its stdout. */
  cli(...args: string[]): Promise<string>;
}

/** Starts a Redis for this test (in `opts.netns` when given); `t.after` stops it and removes its folder. */
export async function startRedis(t: TestContext, extra: string[] = [], opts: { netns?: string } = {}): Promise<TestRedis> {
  const dir = await mkdtemp(join(tmpdir(), "banshare-redis-"));
  const port = await freePort();
  const args = ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no", "--protected-mode", "yes", ...extra];
  const start = async (more: string[] = []) => {
    const proc = spawnProc("redis-server", [...args, ...more], { name: "redis", netns: opts.netns });
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
    async restart(more: string[] = []) {
      r.proc = await start(more);
    },
    async cli(...a: string[]) {
      const p = spawnProc("redis-cli", ["-p", String(port), ...a], { name: "redis-cli", netns: opts.netns });
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

/** A test's scratch folder, a real Redis and enrolled node tokens; all removed after the test, also on failure. */
export interface RedisWorld {
  dir: string;
  redis: TestRedis;
  tokens: Record<string, string>;
}

/** Makes a {@link RedisWorld} for `nodes` (each a node token), its folder named with `prefix`. */
export async function redisWorld(t: TestContext, nodes: string[], prefix: string): Promise<RedisWorld> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  t.after(async () => {
    await stopAll(5000);
    await rm(dir, { recursive: true, force: true });
  });
  const redis = await startRedis(t);
  const tokens = await enrol(dir, nodes.map((n) => [n, "node"] as [string, "node"]));
  return { dir, redis, tokens };
}
