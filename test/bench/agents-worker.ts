/**
 * Benchmark worker: runs several real agents (`startAgent()` from agent.ts) in one process and
 * reports, with a high-resolution wall-clock time, when each applied something.
 *
 *   node --import tsx test/bench/agents-worker.ts HUB_URL TOKEN_DIR BACKEND PREFIX NAME...
 *
 * Agent NAME reads TOKEN_DIR/NAME.token and owns the firewall objects PREFIX<index> (its own
 * ipset sets, chain), so many agents share one network namespace without sharing sets.
 * Output lines (stdout): `START NAME T` as each agent starts; `READY`, once every agent finished its first sync;
 * `APPLIED NAME IP T` (a batch of <= 20 changes: one line per address, after the kernel command
 * returned); `BATCH NAME COUNT T` (a larger batch); `SYNCED NAME COUNT T`; `LOG NAME T TEXT`
 * (every log line, with BANSHARE_BENCH_LOG=1). T is ms since the epoch, sub-ms resolution.
 */

import { join } from "node:path";
import { startAgent, type Agent, type BackendName } from "../../agent.ts";
import { nowMs } from "./lib.ts";

const [hub, tokenDir, backend, prefix, ...names] = process.argv.slice(2);
const verbose = process.env.BANSHARE_BENCH_LOG === "1";
const out: string[] = [];
let flushQueued = false;
// Batch stdout writes: one write per tick, not one per line, so reporting costs little.
function emit(line: string): void {
  out.push(line);
  if (!flushQueued) {
    flushQueued = true;
    setImmediate(() => {
      flushQueued = false;
      process.stdout.write(out.splice(0).join("\n") + "\n");
    });
  }
}

const agents: Agent[] = [];
let synced = 0;
let ready = false;

await Promise.all(
  names.map(async (name, i) => {
    let first = true;
    emit(`START ${name} ${nowMs().toFixed(3)}`);
    const a = await startAgent({
      hubs: [hub],
      tokenFile: join(tokenDir, `${name}.token`),
      node: name,
      backend: backend as BackendName,
      allow: [],
      ports: [],
      heartbeatMs: 60_000,
      prefix: `${prefix}${i}`,
      log: (line) => {
        const t = nowMs();
        if (verbose) emit(`LOG ${name} ${t.toFixed(3)} ${line}`);
        let m = /^blocked (\S+)/.exec(line);
        if (m) return emit(`APPLIED ${name} ${m[1]} ${t.toFixed(3)}`);
        m = /^applied (\d+) change/.exec(line);
        if (m) return emit(`BATCH ${name} ${m[1]} ${t.toFixed(3)}`);
        m = /^synced: (\d+) address/.exec(line);
        if (m) {
          emit(`SYNCED ${name} ${m[1]} ${t.toFixed(3)}`);
          if (first) {
            first = false;
            if (++synced === names.length && !ready) {
              ready = true;
              emit("READY");
            }
          }
          return;
        }
        if (/^(error|warning)/.test(line)) emit(`LOG ${name} ${t.toFixed(3)} ${line}`);
      },
    });
    agents.push(a);
  }),
);

const stop = async () => {
  await Promise.all(agents.map((a) => a.close()));
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
