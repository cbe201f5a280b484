/**
 * Hammers a hub's HTTP endpoints from its own process: `CONNS` loops, each sending one GET after
 * another (the next as soon as the last answer is read), cycling through the given requests,
 * until killed. Prints `hammering` once started and, on SIGTERM, `requests N` (answers read).
 *
 *   node --import tsx test/bench/hammer-worker.ts CONNS BASE_URL TOKEN FROM PATH[@auth] ...
 *
 * A path ending in `@auth` is sent with `Authorization: Bearer TOKEN`; the others without.
 * FROM is the local address to connect from (another loopback address than the honest
 * client's, as an attacker's is another host), or `-` for the system's choice.
 */
import { request, Agent } from "node:http";

const [conns, base, token, from, ...paths] = process.argv.slice(2);
const agent = new Agent({ keepAlive: true, maxSockets: Number(conns), ...(from === "-" ? {} : { localAddress: from }) });
const targets = paths.map((p) => (p.endsWith("@auth") ? { path: p.slice(0, -5), headers: { authorization: `Bearer ${token}` } } : { path: p, headers: {} as Record<string, string> }));
let answered = 0;

function get(path: string, headers: Record<string, string>): Promise<void> {
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
    await get(t.path, t.headers);
  }
}

process.on("SIGTERM", () => {
  console.log(`requests ${answered}`);
  process.exit(0);
});
for (let i = 0; i < Number(conns); i++) void loop(i);
console.log("hammering");
