/**
 * Throwaway network topologies for tests, built from Linux network namespaces.
 *
 * Layout of `createTopology(['hub', 'a1', 'attacker'])`:
 *
 *     ns <id>-hub       ns <id>-a1        ns <id>-attacker
 *       eth0 10.77.0.1    eth0 10.77.0.2    eth0 10.77.0.3      (+ fd00:77::N/64)
 *        |                 |                 |
 *     ---p0-hub-----------p1-a1-------------p2-attacker---  br0, in ns <id>.sw
 *
 * - Every node and the switch live in namespaces of their own; nothing is
 *   created in the root namespace. veth pairs are created directly inside
 *   their target namespaces (`ip link add eth0 netns A type veth peer name pX
 *   netns SW`), so interface names only need to be unique per namespace and
 *   every node's interface is simply `eth0`. Interface names are still kept
 *   <= 15 chars (IFNAMSIZ-1).
 * - `<id>` is `bs-<pid>-<4 random chars>` (or `<prefix>-<pid>-<rand>`), so
 *   parallel runs never collide, and namespaces left behind by a run that was
 *   SIGKILLed (so no hook could run) are recognised by their dead PID and
 *   removed by the next createTopology() with the same prefix
 *   ({@link sweepStaleNamespaces}), processes inside included.
 * - Deleting a namespace removes everything inside it: veths, the bridge,
 *   ipsets, nftables/iptables rules. Processes inside are stopped first
 *   (gracefully for those started with proc.ts, then SIGKILL by PID for
 *   anything left according to `ip netns pids`).
 * - destroy() is idempotent and also runs automatically on process exit and
 *   SIGINT/SIGTERM/SIGHUP (through proc.ts's onCleanup registry).
 */
import { execa, type Options as ExecaOptions } from 'execa';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { onCleanup, runSync, runningProcs, spawnProc, type Proc } from './proc.ts';

export interface TopologyOptions {
  /** Namespace name prefix (default `bs`). PID and random chars are always appended. */
  prefix?: string;
  /**
   * IPv4 /24 for the nodes: a number X (=> 10.X.0.0/24) or a string
   * `10.A.B.0/24` (also accepted: `10.A.B`). Default 10.77.0.0/24.
   * Node i (0-based, in the order given) gets 10.A.B.(i+1) and fd00:A:B::(i+1)/64
   * (i.e. fd00:X::N for B=0). Topologies are isolated L2 segments, so the same
   * subnet in two topologies (or two parallel runs) never conflicts.
   */
  subnet?: number | string;
}

export interface LinkDownOptions {
  /**
   * false (default): set the bridge-side veth down. The node's eth0 loses
   * carrier (NO-CARRIER) and can no longer send or receive, but its sockets
   * stay open and it keeps its addresses.
   * true: keep the link up and only set the bridge port to the `disabled`
   * STP state, so frames are silently dropped at the switch and neither side
   * sees any carrier change (like a failure somewhere in the network).
   */
  silent?: boolean;
}

export interface Topology {
  /** The `<prefix>-<pid>-<rand>` id shared by all namespaces of this topology. */
  readonly id: string;
  /** Node names, in order. */
  readonly names: readonly string[];
  /** The namespace that holds the bridge. */
  readonly switchNs: string;
  /** Network namespace name of a node (for `ip netns exec`, spawnProc({netns}) ...). */
  ns(name: string): string;
  /** IPv4 address of a node (no prefix length). */
  ip(name: string): string;
  /** IPv6 (ULA) address of a node (no prefix length). */
  ip6(name: string): string;
  /** Interface name inside the node namespace (always `eth0`). */
  iface(name: string): string;
  /**
   * Run a command inside a node's namespace with execa (`ip netns exec NS cmd
   * ...args`). Rejects on a non-zero exit unless `{ reject: false }`.
   */
  exec(name: string, cmd: string, args?: readonly string[], opts?: ExecaOptions): ReturnType<typeof execa>;
  /** Cut a node's cable (see {@link LinkDownOptions}). Sockets stay open. */
  linkDown(name: string, opts?: LinkDownOptions): Promise<void>;
  /**
   * Reconnect a node's cable (undoes either kind of linkDown) and flush the
   * ARP/ND entries involving the node, so traffic flows again at once.
   */
  linkUp(name: string): Promise<void>;
  /** Stop processes inside and delete all namespaces. Idempotent. */
  destroy(): Promise<void>;
  /** Synchronous hard destroy (SIGKILL inside processes, delete namespaces). Idempotent. */
  destroySync(): void;
}

const NAME_RE = /^[a-z0-9][a-z0-9_-]{0,31}$/i;
const IFNAMSIZ = 16;

async function ip(args: string[]): Promise<void> {
  await execa('ip', args);
}

function parseSubnet(s: TopologyOptions['subnet']): [number, number] {
  if (s === undefined) return [77, 0];
  if (typeof s === 'number') {
    if (!Number.isInteger(s) || s < 0 || s > 255) throw new Error(`subnet ${s}: want 0..255`);
    return [s, 0];
  }
  const m = /^10\.(\d{1,3})\.(\d{1,3})(?:\.0(?:\/24)?)?$/.exec(s);
  if (!m || +m[1] > 255 || +m[2] > 255) throw new Error(`subnet ${s}: want "10.A.B.0/24"`);
  return [+m[1], +m[2]];
}

function randId(n: number): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  return [...randomBytes(n)].map((b) => alphabet[b % alphabet.length]).join('');
}

/** Names from `ip netns list` (its lines look like `name (id: 3)` or `name`). */
export function listNamespaces(): string[] {
  const r = runSync('ip', ['netns', 'list']);
  return r.stdout
    .split('\n')
    .map((l) => l.trim().split(/\s+/)[0])
    .filter(Boolean);
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
  try {
    // a zombie (dead, not yet reaped: this sandbox's PID 1 reaps lazily) is not alive
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * SIGKILL every process in `ns` (by PID, from `ip netns pids`) and delete it. Sync, never throws.
 * Exported for helpers that add namespaces of their own next to a topology's (test/lib/enforce.ts).
 */
export function killAndDeleteSync(ns: string) {
  const pids = runSync('ip', ['netns', 'pids', ns]).stdout.split(/\s+/).filter(Boolean).map(Number);
  for (const pid of pids) {
    if (pid > 1 && pid !== process.pid) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }
  runSync('ip', ['netns', 'del', ns]);
}

/**
 * Delete namespaces named `<prefix>-<pid>-<rand4>...` whose <pid> is no longer
 * alive (left behind by a test run that was SIGKILLed, so no hook could run),
 * killing any process still inside them. createTopology() calls it for its
 * prefix; returns the names removed.
 */
export function sweepStaleNamespaces(prefix = 'bs'): string[] {
  const staleRe = new RegExp(`^${prefix}-(\\d+)-[0-9a-z]{4}[-.]`);
  const removed: string[] = [];
  for (const ns of listNamespaces()) {
    const m = staleRe.exec(ns);
    if (!m) continue;
    const pid = Number(m[1]);
    if (pid === process.pid || pidAlive(pid)) continue;
    killAndDeleteSync(ns);
    removed.push(ns);
  }
  return removed;
}

/**
 * Create one namespace per node, a bridge in a namespace of its own, a veth
 * per node (node side `eth0`, up, with 10.A.B.N/24 and fd00:A:B::N/64
 * `nodad`), and `lo` up everywhere.
 *
 * @example
 *   const topo = await createTopology(['hub', 'a1', 'attacker']);
 *   after(() => topo.destroy());
 *   await topo.exec('a1', 'ipset', ['create', 'S', 'hash:net', 'timeout', '0']);
 *   const hub = tsx('hub.ts', ['--listen', `${topo.ip('hub')}:7000`], { netns: topo.ns('hub') });
 */
export async function createTopology(names: string[], opts: TopologyOptions = {}): Promise<Topology> {
  if (names.length === 0) throw new Error('createTopology: need at least one node');
  if (names.length > 253) throw new Error('createTopology: at most 253 nodes per /24');
  for (const n of names) if (!NAME_RE.test(n)) throw new Error(`createTopology: bad node name ${JSON.stringify(n)} (want ${NAME_RE})`);
  if (new Set(names).size !== names.length) throw new Error('createTopology: duplicate node names');
  const prefix = opts.prefix ?? 'bs';
  if (!/^[a-z][a-z0-9]{0,7}$/i.test(prefix)) throw new Error(`createTopology: bad prefix ${JSON.stringify(prefix)}`);
  const [a, b] = parseSubnet(opts.subnet);

  sweepStaleNamespaces(prefix);

  const id = `${prefix}-${process.pid}-${randId(4)}`;
  const switchNs = `${id}.sw`;
  const index = new Map(names.map((n, i) => [n, i]));
  const nsOf = (n: string) => `${id}-${n}`;
  const portOf = (n: string) => `p${index.get(n)}-${n}`.slice(0, IFNAMSIZ - 1);
  const created: string[] = []; // namespaces, for cleanup

  let destroyed = false;
  let destroying: Promise<void> | undefined;
  const destroySync = () => {
    if (destroyed) return;
    destroyed = true;
    unregister();
    for (const ns of created) killAndDeleteSync(ns);
  };
  const unregister = onCleanup(destroySync);

  const get = (n: string) => {
    const i = index.get(n);
    if (i === undefined) throw new Error(`topology ${id}: no node ${JSON.stringify(n)} (have ${names.join(', ')})`);
    return i;
  };

  const destroy = (): Promise<void> => {
    if (destroying) return destroying;
    destroying = (async () => {
      if (destroyed) return;
      // 1. polite stop for our own procs running in these namespaces
      const mine = new Set(created);
      await Promise.all(runningProcs().filter((p) => p.netns && mine.has(p.netns)).map((p) => p.stop('SIGTERM', 3000)));
      // 2. hard kill of anything else inside, then delete
      destroySync();
    })();
    return destroying;
  };

  try {
    // Namespaces. `ip -batch` saves a fork+exec per command.
    const all = [switchNs, ...names.map(nsOf)];
    await execa('ip', ['-batch', '-'], { input: all.map((n) => `netns add ${n}`).join('\n') + '\n' }).catch(async (e) => {
      // record whatever did get created so it is cleaned up
      for (const n of all) if (listNamespaces().includes(n)) created.push(n);
      throw e;
    });
    created.push(...all);

    // Switch: bridge without multicast snooping (so IPv6 neighbour discovery
    // never depends on MLD state) and without STP (ports forward at once).
    await execa('ip', ['-n', switchNs, '-batch', '-'], {
      input: [
        'link set lo up',
        'link add br0 type bridge stp_state 0 mcast_snooping 0 forward_delay 0',
        'link set br0 up',
      ].join('\n') + '\n',
    });

    // veth pairs, created straight inside their namespaces (never in the root ns).
    await execa('ip', ['-batch', '-'], {
      input:
        names.map((n) => `link add eth0 netns ${nsOf(n)} type veth peer name ${portOf(n)} netns ${switchNs}`).join('\n') +
        '\n',
    });
    await execa('ip', ['-n', switchNs, '-batch', '-'], {
      input: names.flatMap((n) => [`link set ${portOf(n)} master br0`, `link set ${portOf(n)} up`]).join('\n') + '\n',
    });

    // Node side: addresses (nodad: usable at once, no ~1-2 s of DAD) and links up.
    await Promise.all(
      names.map((n, i) =>
        execa('ip', ['-n', nsOf(n), '-batch', '-'], {
          input: [
            'link set lo up',
            `addr add 10.${a}.${b}.${i + 1}/24 dev eth0`,
            `addr add fd00:${a}:${b}::${i + 1}/64 dev eth0 nodad`,
            'link set eth0 up',
          ].join('\n') + '\n',
        }),
      ),
    );
  } catch (e) {
    destroySync();
    throw e;
  }

  return {
    id,
    names: [...names],
    switchNs,
    ns: (n) => (get(n), nsOf(n)),
    ip: (n) => `10.${a}.${b}.${get(n) + 1}`,
    ip6: (n) => `fd00:${a}:${b}::${get(n) + 1}`,
    iface: (n) => (get(n), 'eth0'),
    exec: (n, cmd, args = [], o) => (get(n), execa('ip', ['netns', 'exec', nsOf(n), cmd, ...args], o)),
    async linkDown(n, o = {}) {
      get(n);
      // NB: `ip link set PORT type bridge_slave state 0` exits 0 but changes nothing (iproute2 6.1); `bridge link set` works.
      if (o.silent) await execa('bridge', ['-n', switchNs, 'link', 'set', 'dev', portOf(n), 'state', '0']);
      else await ip(['-n', switchNs, 'link', 'set', 'dev', portOf(n), 'down']);
    },
    async linkUp(n) {
      const i = get(n);
      await ip(['-n', switchNs, 'link', 'set', 'dev', portOf(n), 'up']);
      await execa('bridge', ['-n', switchNs, 'link', 'set', 'dev', portOf(n), 'state', '3']); // forwarding
      // Neighbour entries that went INCOMPLETE/FAILED while the cable was cut
      // would otherwise delay the first packets by up to ~1 s (ARP/ND retry
      // timer), making "right after linkUp" flaky. Flush them on both sides.
      const v4 = `10.${a}.${b}.${i + 1}`;
      const v6 = `fd00:${a}:${b}::${i + 1}`;
      await Promise.all(
        names.map((m) =>
          execa('ip', ['-n', nsOf(m), '-batch', '-'], {
            input: m === n ? 'neigh flush dev eth0\n' : `neigh flush to ${v4}\nneigh flush to ${v6}\n`,
          }),
        ),
      );
    },
    destroy,
    destroySync,
  };
}

// ---------------------------------------------------------------------------
// TCP reachability

export type Family = 4 | 6;

export interface TcpListener {
  readonly proc: Proc;
  readonly port: number;
  /** Remote addresses of accepted connections so far, in order (IPv4 ones unmapped from ::ffff:). */
  accepts(): string[];
  stop(): Promise<void>;
}

const LISTENER_JS = `
const net = require('node:net');
const port = Number(process.argv[1]);
const srv = net.createServer((s) => {
  let a = s.remoteAddress || '?';
  if (a.startsWith('::ffff:')) a = a.slice(7);
  console.log('accept ' + a);
  s.on('error', () => {});
  s.end();
});
srv.on('error', (e) => { console.error('listen error ' + e.message); process.exit(1); });
srv.listen({ port, host: '::', ipv6Only: false }, () => console.log('listening ' + port));
process.on('SIGTERM', () => process.exit(0));
`;

/**
 * Start a TCP listener on `[::]:port` (IPv4 and IPv6) inside node `name`. It
 * accepts and immediately closes every connection, printing `accept <addr>`.
 * Resolves once it listens. Stopped by `stop()`, stopAll() or topo.destroy().
 *
 * @example
 *   const l = await startTcpListener(topo, 'a1', 2222);
 *   assert.equal(await tcpProbe(topo, 'attacker', 'a1', 2222), true);
 *   assert.deepEqual(l.accepts(), [topo.ip('attacker')]);
 */
export async function startTcpListener(topo: Topology, name: string, port: number): Promise<TcpListener> {
  return startTcpListenerIn(topo.ns(name), port, `listen:${name}:${port}`);
}

/**
 * {@link startTcpListener} in any namespace given by name (one that is not a topology node, such
 * as the routed "container" of test/lib/enforce.ts's dockerPath). `label` names the process.
 */
export async function startTcpListenerIn(netns: string, port: number, label = `listen:${netns}:${port}`): Promise<TcpListener> {
  const proc = spawnProc(process.execPath, ['-e', LISTENER_JS, String(port)], { netns, name: label });
  try {
    await proc.waitForLine(/^listening \d+$/, 10_000);
  } catch (e) {
    await proc.stop('SIGKILL');
    throw e;
  }
  return {
    proc,
    port,
    accepts: () => proc.lines().filter((l) => l.startsWith('accept ')).map((l) => l.slice(7)),
    stop: async () => {
      await proc.stop('SIGTERM', 2000);
    },
  };
}

export type ConnectResult = 'connected' | 'refused' | 'timeout' | 'error';

export interface ProbeOptions {
  /** 4 (default) or 6: which of the target's addresses to connect to. */
  family?: Family;
}

/**
 * Try one TCP connect from node `from` to node `to`:port (bash's /dev/tcp
 * run in `from`'s namespace; ~10 ms when it gets through). A connect that
 * hangs (DROP) is SIGKILLed `timeoutMs` after bash started => 'timeout' (so a
 * blocked probe costs timeoutMs + ~10 ms); RST (REJECT, no listener) =>
 * 'refused'. The timeout only costs time when the result is 'timeout': when
 * asserting "open", a generous timeout is free.
 */
export async function tcpConnect(
  topo: Topology,
  from: string,
  to: string,
  port: number,
  timeoutMs = 500,
  opts: ProbeOptions = {},
): Promise<ConnectResult> {
  const addr = opts.family === 6 ? topo.ip6(to) : topo.ip(to);
  // `echo go` first, so the timeout measures the connect() alone and not the
  // (load-dependent) start-up of ip/bash.
  const p = spawnProc('bash', ['-c', 'echo go; exec 3<>"/dev/tcp/$1/$2"', 'probe', addr, String(port)], {
    netns: topo.ns(from),
    name: `probe:${from}->${to}:${port}`,
    pdeathsig: false, // saves an exec; destroy()/exit hooks still kill it
  });
  try {
    await p.waitForLine(/^go$/, 10_000);
  } catch {
    await p.kill9();
    return 'error';
  }
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([
    p.exited,
    new Promise<'timeout'>((res) => (timer = setTimeout(() => res('timeout'), timeoutMs))),
  ]);
  clearTimeout(timer);
  if (r === 'timeout') {
    await p.kill9();
    return 'timeout';
  }
  if (r.code === 0) return 'connected';
  await p.closed; // all of stderr
  return /refused/i.test(p.output()) ? 'refused' : 'error';
}

/**
 * true if a TCP connection from `from` to `to`:port is established within
 * `timeoutMs` (default 500 ms, plenty inside a namespace where RTT is µs).
 *
 * @example
 *   await topo.exec('a1', 'iptables', ['-I', 'INPUT', '-s', topo.ip('attacker'), '-j', 'DROP']);
 *   assert.equal(await tcpProbe(topo, 'attacker', 'a1', 2222), false); // returns after ~500 ms
 *   assert.equal(await tcpProbe(topo, 'attacker', 'a1', 2222, 500, { family: 6 }), true);
 */
export async function tcpProbe(
  topo: Topology,
  from: string,
  to: string,
  port: number,
  timeoutMs = 500,
  opts: ProbeOptions = {},
): Promise<boolean> {
  return (await tcpConnect(topo, from, to, port, timeoutMs, opts)) === 'connected';
}
