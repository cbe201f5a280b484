/**
 * Hammers a hub's HTTP endpoints from its own process: `CONNS` loops, each sending one GET after
 * another (the next as soon as the last answer is read), cycling through the given requests,
 * until killed. Prints `hammering` once started and, on SIGTERM, `requests N` (answers read).
 *
 *   node --import tsx test/bench/hammer-worker.ts CONNS BASE_URL TOKEN FROM PATH[@auth] ...
 *
 * A path ending in `@auth` is sent with `Authorization: Bearer TOKEN`; the others without.
 * FROM is the local address to connect from (another loopback address than the honest
 * client's, as an attacker's is another host), `A.B.C.D+N` for N clients each from its own
 * address counting up from A.B.C.D, or `-` for the system's choice.
 */
import { request, Agent } from "node:http";

const [conns, base, token, from, ...paths] = process.argv.slice(2);
/** Client i's agent: one for all, or one per address. */
const spread = /^(\d+\.\d+\.\d+)\.(\d+)\+\d+$/.exec(from);
const shared = new Agent({ keepAlive: true, maxSockets: Number(conns), ...(from === "-" || spread ? {} : { localAddress: from }) });
const agents = Array.from({ length: Number(conns) }, (_, i) => (spread ? new Agent({ keepAlive: true, maxSockets: 1, localAddress: `${spread[1]}.${Number(spread[2]) + i}` }) : shared));
const targets = paths.map((p) => (p.endsWith("@auth") ? { path: p.slice(0, -5), headers: { authorization: `Bearer ${token}` } } : { path: p, headers: {} as Record<string, string> }));
let answered = 0;

function get(agent: Agent, path: string, headers: Record<string, string>): Promise<void> {
  return new Promise((resolve) => {
    const req = request(`${base}${path}`, { agent, headers }, (res) => {
      res.resume();
      res.on("end", () => {
        answered++;
        resolve();
      });
      res.on("error", () => resolve());
    });
    req.on("error", () => setTimeout(resolve, 10));
    req.end();
  });
}

async function loop(i: number): Promise<void> {
  for (let k = i; ; k++) {
    const t = targets[k % targets.length];
    await get(agents[i], t.path, t.headers);
  }
}

process.on("SIGTERM", () => {
  console.log(`requests ${answered}`);
  process.exit(0);
});
for (let i = 0; i < Number(conns); i++) void loop(i);
console.log("hammering");
