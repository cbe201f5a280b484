/**
 * Proving enforcement on the real kernel: a TCP probe that records when an attacker gets in, a
 * Docker-like routed path, and a table of the things that rewrite a firewall behind an agent's
 * back. Everything runs inside network namespaces a test created (test/lib/netns.ts); the root
 * namespace's firewall is never touched: every command here goes through `ip netns exec NS` or
 * `ip -n NS`, and refuses an empty namespace name.
 *
 *     attacker ──(bridge, 10.A.B.0/24)── host eth0 ──FORWARD/DOCKER-USER── docker0 10.213.0.1
 *                                         nat PREROUTING DNAT host:8080                │
 *                                         -> 10.213.0.2:80                      container eth0
 *                                                                               10.213.0.2, listener
 *
 * - {@link startProbe}: one connect every ~100 ms from a node to an address:port, by a real
 *   process in the node's namespace (test/fixtures/tcp-probe.cjs), as a {@link Timeline} of
 *   open/blocked samples. {@link gaps} and {@link timeToState} read a timeline (pure).
 * - {@link dockerPath}: inside a node's namespace, the netfilter layout dockerd builds for one
 *   container publishing a port, and the container as a namespace routed behind the node.
 *   Traffic to host:PORT is DNATed and goes through FORWARD (DOCKER-USER first), not INPUT.
 *   {@link dockerRestart} does what dockerd does when it starts.
 * - {@link TAMPERS}: each tampering the agent must survive, as `(ns) => Promise<void>`.
 *
 * Cleanup: the probe and the listener are proc.ts processes (stopped by PID at process exit at
 * the latest); the container namespace is deleted by `DockerPath.destroy()`, by an exit hook,
 * or, after a SIGKILLed run, by the next createTopology()'s sweep (its name starts with the
 * topology's id). Firewall rules live in the namespaces and go with them.
 *
 * @example
 *   const topo = await createTopology(['attacker', 'a1'], { prefix: 'bsenf' });
 *   const docker = await dockerPath(topo, 'a1');
 *   after(() => docker.destroy().then(() => topo.destroy()));
 *   const probe = await startProbe(topo, 'attacker', 'a1', docker.port);
 *   await probe.waitFor('open');
 *   const t = Date.now();
 *   await TAMPERS['iptables -F'](topo.ns('a1'));
 *   await probe.waitFor('blocked', 2000, { since: t, consecutive: 5 });
 *   assert.deepEqual(gaps(await probe.stop(), t + 2000), []);
 */
import { execa } from 'execa';
import { isIP } from 'node:net';
import path from 'node:path';
import { killAndDeleteSync, listNamespaces, startTcpListenerIn, type Family, type TcpListener, type Topology } from './netns.ts';
import { onCleanup, REPO_ROOT, spawnProc, type Proc } from './proc.ts';

const CMD_TIMEOUT_MS = 10_000;
const PROBE_JS = path.join(REPO_ROOT, 'test', 'fixtures', 'tcp-probe.cjs');

// ---------------------------------------------------------------------------
// Timelines (pure)

export type ProbeState = 'open' | 'blocked';

/** One connect attempt of the probe. */
export interface Sample {
  /** Wall clock (ms, Date.now()) when the attempt started: comparable with the test's Date.now(). */
  at: number;
  state: ProbeState;
  /** connected = open; timeout = no answer (DROP); refused = RST (REJECT, nothing listening); error = other. */
  how: 'connected' | 'timeout' | 'refused' | 'error';
  /** Duration of the attempt in ms. */
  ms: number;
  /** The socket error code, for how = error. */
  code?: string;
}

/** A probe's samples in the order they were taken. */
export type Timeline = readonly Sample[];

/** A run of consecutive `open` samples: the attacker got in from `from` until `to`. */
export interface Gap {
  /** `at` of the first open sample of the run. */
  from: number;
  /** `at` of the blocked sample that ended the run, or of its last open sample if none did (`ongoing`). */
  to: number;
  /** How many open samples the run holds. */
  samples: number;
  /** true when the timeline ends open. */
  ongoing: boolean;
}

/** A probe output line as a {@link Sample}, or undefined for any other line. */
export function parseSample(line: string): Sample | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    const o = JSON.parse(line) as Partial<Sample>;
    if (typeof o.at !== 'number' || (o.state !== 'open' && o.state !== 'blocked')) return undefined;
    return o as Sample;
  } catch {
    return undefined;
  }
}

/**
 * The intervals in which the target was reachable, among the samples taken at or after `fromMs`
 * (the moment it should have been blocked). `[]` means the attacker never got in.
 *
 * @example
 *   assert.deepEqual(gaps(timeline, bannedAt + 1000), [], describeTimeline(timeline, bannedAt));
 */
export function gaps(timeline: Timeline, fromMs: number): Gap[] {
  const out: Gap[] = [];
  let run: Gap | undefined;
  for (const s of timeline) {
    if (s.at < fromMs) continue;
    if (s.state === 'open') {
      if (run) {
        run.samples++;
        run.to = s.at;
      } else {
        run = { from: s.at, to: s.at, samples: 1, ongoing: true };
        out.push(run);
      }
    } else if (run) {
      run.to = s.at;
      run.ongoing = false;
      run = undefined;
    }
  }
  return out;
}

/**
 * How long after `afterMs` (a tampering) the probe first saw `state` and then only `state` until
 * the end of the timeline: `at` of the first sample at or after `afterMs` that belongs to the
 * final run of `state`, minus `afterMs`. Undefined when the timeline does not end in `state`.
 * The resolution is the probe's interval: a state that never changed reads as the time to the
 * first sample after `afterMs` (under one interval).
 *
 * @example
 *   const t = Date.now(); await TAMPERS['ipset flush'](ns); ...; timeToState(await probe.stop(), t, 'blocked') // 640
 */
export function timeToState(timeline: Timeline, afterMs: number, state: ProbeState): number | undefined {
  let i = timeline.length;
  while (i > 0 && timeline[i - 1].state === state) i--;
  if (i === timeline.length) return undefined;
  for (let j = i; j < timeline.length; j++) if (timeline[j].at >= afterMs) return timeline[j].at - afterMs;
  return undefined; // no sample after afterMs at all
}

/**
 * A timeline as one short line for assertion messages: runs of one state with their start
 * relative to `originMs` (default: the first sample), e.g. `+0 open×5, +500 blocked×12 (timeout)`.
 */
export function describeTimeline(timeline: Timeline, originMs = timeline[0]?.at ?? 0): string {
  if (!timeline.length) return '(no samples)';
  const parts: string[] = [];
  let i = 0;
  while (i < timeline.length) {
    let j = i;
    const hows = new Set<string>();
    while (j < timeline.length && timeline[j].state === timeline[i].state) hows.add(timeline[j++].how);
    const rel = timeline[i].at - originMs;
    const why = timeline[i].state === 'blocked' ? ` (${[...hows].join('/')})` : '';
    parts.push(`${rel >= 0 ? '+' : ''}${rel} ${timeline[i].state}×${j - i}${why}`);
    i = j;
  }
  return parts.join(', ');
}

// ---------------------------------------------------------------------------
// The probe

export interface ProbeOptions {
  /** Start-to-start time between attempts (default 100 ms). */
  intervalMs?: number;
  /** How long an attempt waits for the handshake before it reads as blocked (default 80 ms). */
  timeoutMs?: number;
  /** With a node name as target: which of its addresses (default 4). */
  family?: Family;
}

export interface WaitOptions {
  /** Only samples taken at or after this moment count (default: when waitFor is called). */
  since?: number;
  /** How many consecutive samples in `state` it takes (default 1). */
  consecutive?: number;
}

export interface Probe {
  readonly proc: Proc;
  /** The address and port probed. */
  readonly address: string;
  readonly port: number;
  /** The samples so far. */
  timeline(): Timeline;
  /**
   * Resolves with the first sample of the run of `consecutive` samples in `state` taken at or
   * after `since`; rejects after `timeoutMs` (default 5000) or if the probe died, with the
   * timeline in the message.
   */
  waitFor(state: ProbeState, timeoutMs?: number, opts?: WaitOptions): Promise<Sample>;
  /** The open samples taken at or after `t` (the moments the attacker got in). */
  openSince(t: number): Sample[];
  /** Stop the probe process (SIGTERM, by PID) and return the whole timeline. Idempotent. */
  stop(): Promise<Timeline>;
}

class TcpProbe implements Probe {
  private readonly samples: Sample[] = [];
  private read = 0;
  private stopped: Promise<Timeline> | undefined;

  constructor(readonly proc: Proc, readonly address: string, readonly port: number) {}

  /** Parse the lines the process wrote since the last call. */
  private pull(): Sample[] {
    const lines = this.proc.lines();
    for (; this.read < lines.length; this.read++) {
      const s = parseSample(lines[this.read]);
      if (s) this.samples.push(s);
    }
    return this.samples;
  }

  timeline(): Timeline {
    return [...this.pull()];
  }

  openSince(t: number): Sample[] {
    return this.pull().filter((s) => s.state === 'open' && s.at >= t);
  }

  async waitFor(state: ProbeState, timeoutMs = 5000, opts: WaitOptions = {}): Promise<Sample> {
    const since = opts.since ?? Date.now();
    const need = opts.consecutive ?? 1;
    const end = Date.now() + timeoutMs;
    let from = 0; // first index not yet known to be before `since`
    for (;;) {
      const all = this.pull();
      while (from < all.length && all[from].at < since) from++;
      let run = 0;
      for (let i = from; i < all.length; i++) {
        run = all[i].state === state ? run + 1 : 0;
        if (run >= need) return all[i - need + 1];
      }
      const why = this.proc.exitInfo() ? `the probe exited (${JSON.stringify(this.proc.exitInfo())}): ${this.proc.output().slice(-500)}` : Date.now() > end ? `timed out after ${timeoutMs} ms` : undefined;
      if (why) {
        throw new Error(`probe ${this.address}:${this.port}: waiting for ${need} × ${state} since +${since - (all[0]?.at ?? since)} ms, ${why}; timeline: ${describeTimeline(all)}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  stop(): Promise<Timeline> {
    this.stopped ??= this.proc.stop('SIGTERM', 2000).then(() => this.proc.closed).then(() => this.timeline());
    return this.stopped;
  }
}

/**
 * Start probing `to`:`port` from node `from`: a real process in `from`'s namespace
 * (test/fixtures/tcp-probe.cjs) that tries one connect every `intervalMs`. `to` is a node name
 * (its IPv4 address, or IPv6 with `family: 6`) or an IP address. Resolves once the first sample
 * is in. Stopped by `stop()`, proc.ts's stopAll() or topo.destroy().
 *
 * @example
 *   const probe = await startProbe(topo, 'attacker', 'a1', 2222);
 *   await probe.waitFor('blocked', 2000, { consecutive: 3 });
 */
export async function startProbe(topo: Topology, from: string, to: string, port: number, opts: ProbeOptions = {}): Promise<Probe> {
  const address = topo.names.includes(to) ? (opts.family === 6 ? topo.ip6(to) : topo.ip(to)) : to;
  if (!isIP(address)) throw new Error(`startProbe: expected a node name (${topo.names.join(', ')}) or an IP address as target, got ${JSON.stringify(to)}`);
  const intervalMs = opts.intervalMs ?? 100;
  const timeoutMs = opts.timeoutMs ?? 80;
  const proc = spawnProc(process.execPath, [PROBE_JS, address, String(port), String(intervalMs), String(timeoutMs)], {
    netns: topo.ns(from),
    name: `tcp-probe:${from}->${address}:${port}`,
  });
  const probe = new TcpProbe(proc, address, port);
  // The first sample, whatever its state, says the probe runs.
  const end = Date.now() + 10_000;
  while (!probe.timeline().length) {
    if (proc.exitInfo() || Date.now() > end) {
      await proc.stop('SIGKILL');
      throw new Error(`probe ${address}:${port} from ${from} did not start: ${proc.output().slice(-500) || 'no output in 10 s'}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return probe;
}

// ---------------------------------------------------------------------------
// Commands inside a namespace

interface RunOptions {
  input?: string;
  /** Treat a failure whose stderr matches as success (the object was already gone/there). */
  okIf?: RegExp;
}

/** Run `cmd args` in namespace `ns` (never the root namespace); rejects with its stderr. */
async function nsRun(ns: string, cmd: string, args: string[], opts: RunOptions = {}): Promise<{ ok: boolean; stdout: string }> {
  if (!ns) throw new Error(`Expected a network namespace name for ${cmd}, got ${JSON.stringify(ns)}`);
  const r = await execa('ip', ['netns', 'exec', ns, cmd, ...args], { input: opts.input, reject: false, timeout: CMD_TIMEOUT_MS });
  if (r.exitCode === 0) return { ok: true, stdout: r.stdout };
  if (opts.okIf?.test(r.stderr)) return { ok: false, stdout: r.stdout };
  throw new Error(`in ${ns}: '${[cmd, ...args].join(' ')}' failed (exit ${r.exitCode}): ${r.stderr.trim() || r.message}`);
}

/** `iptables-save` + `ip6tables-save` of a namespace, to put back later with {@link restoreRuleset}. */
export interface SavedRuleset {
  v4: string;
  v6: string;
}

const EMPTY_FILTER = '*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n';
const snapshots = new Map<string, SavedRuleset>();

/**
 * Save the iptables and ip6tables rules of `ns` now (call it before the agent starts): the
 * "rules file" that the `iptables-restore` tampering loads, as ufw, netfilter-persistent and
 * firewalld reloads do. A missing filter table is saved as an empty one (a fresh namespace has
 * none, and a restore of nothing would change nothing).
 */
export async function snapshotRuleset(ns: string): Promise<SavedRuleset> {
  const save = async (bin: string) => {
    const text = (await nsRun(ns, bin, [])).stdout;
    return /^\*filter$/m.test(text) ? text + '\n' : text + '\n' + EMPTY_FILTER;
  };
  const saved = { v4: await save('iptables-save'), v6: await save('ip6tables-save') };
  snapshots.set(ns, saved);
  return saved;
}

/**
 * `iptables-restore` and `ip6tables-restore` (without --noflush) of `saved`, default the last
 * {@link snapshotRuleset} of `ns`: every table in the file is replaced as a whole, chains not in
 * it (banshare's) are deleted. ipsets and nftables tables of their own are not touched.
 */
export async function restoreRuleset(ns: string, saved = snapshots.get(ns)): Promise<void> {
  if (!saved) throw new Error(`restoreRuleset: no saved ruleset for ${ns}; call snapshotRuleset(ns) before the agent starts`);
  await nsRun(ns, 'iptables-restore', [], { input: saved.v4 });
  await nsRun(ns, 'ip6tables-restore', [], { input: saved.v6 });
}

// ---------------------------------------------------------------------------
// Docker's netfilter layout and a container routed behind a node

/** One container publishing a port, on Docker's default bridge. */
export interface DockerLayout {
  /** The bridge in the host namespace (default `docker0`). */
  bridge: string;
  /** The network, as `10.X.Y` (a /24): bridge .1, container .2. Default `10.213.0`. */
  net: string;
  /** The published port on the host (`-p port:containerPort`), default 8080. */
  port: number;
  /** The port the container listens on, default 80. */
  containerPort: number;
}

/** One iptables call of dockerd's start, in a table. */
export interface DockerStep {
  table: 'filter' | 'nat';
  args: string[];
  /** Skip the step when `iptables -C` of these args succeeds (the rule is there). */
  unless?: string[];
  /** Failure is fine (deleting a rule that is not there, creating a chain that is). */
  mayFail?: boolean;
}

/** The default layout with `over` applied. */
export function dockerLayout(over: Partial<DockerLayout> = {}): DockerLayout {
  const l = { bridge: 'docker0', net: '10.213.0', port: 8080, containerPort: 80, ...over };
  if (!/^10\.\d{1,3}\.\d{1,3}$/.test(l.net)) throw new Error(`dockerLayout: expected net as "10.X.Y", got ${JSON.stringify(l.net)}`);
  return l;
}

/** The container's address in `layout`. */
export function containerIp(layout: DockerLayout): string {
  return `${layout.net}.2`;
}

/** Docker's FORWARD rules for a bridge network, in the order dockerd leaves them (top first). */
function dockerForwardRules(b: string): string[][] {
  return [
    ['-j', 'DOCKER-USER'],
    ['-j', 'DOCKER-ISOLATION-STAGE-1'],
    ['-o', b, '-m', 'conntrack', '--ctstate', 'RELATED,ESTABLISHED', '-j', 'ACCEPT'],
    ['-o', b, '-j', 'DOCKER'],
    ['-i', b, '!', '-o', b, '-j', 'ACCEPT'],
    ['-i', b, '-o', b, '-j', 'ACCEPT'],
  ];
}

/**
 * What dockerd (20.x-27.x, iptables backend, IPv4) does to the firewall when it starts with one
 * running container publishing `layout.port` -> `containerPort`, as argv steps (pure):
 *
 * - its chains are created if missing; DOCKER (filter and nat) and the isolation chains are
 *   flushed and refilled; DOCKER-USER is created if missing but never flushed (Docker's promise:
 *   user rules there survive), and gets `-j RETURN` appended if it has none;
 * - FORWARD policy DROP (dockerd turned ip_forward on);
 * - `fresh` (default true): its FORWARD rules are deleted and inserted again at the top, so
 *   anything another program put at the top of FORWARD (a ban jump) is now below Docker's ACCEPT
 *   for the published port: the start that finds none of its rules (the boot on which banshare
 *   came first, or after an `iptables -F`). `fresh: false`: rules already there stay where they
 *   are, missing ones are inserted at the top (dockerd's check-then-insert).
 * - either way `-j DOCKER-USER` is deleted and inserted at the top last (dockerd's
 *   EnsureJumpRule), so DOCKER-USER comes first; between the two calls it is not traversed.
 * - nat: PREROUTING/OUTPUT jumps to DOCKER for local addresses, MASQUERADE for the bridge's
 *   outgoing traffic, and the DNAT of host:port to the container.
 */
export function dockerStartSteps(layout: DockerLayout, { fresh = true }: { fresh?: boolean } = {}): DockerStep[] {
  const b = layout.bridge;
  const ctr = containerIp(layout);
  const steps: DockerStep[] = [];
  const f = (args: string[], more: Partial<DockerStep> = {}) => steps.push({ table: 'filter', args, ...more });
  const n = (args: string[], more: Partial<DockerStep> = {}) => steps.push({ table: 'nat', args, ...more });
  const ensure = (table: 'filter' | 'nat', chain: string, rule: string[]) => steps.push({ table, args: ['-A', chain, ...rule], unless: ['-C', chain, ...rule] });

  for (const c of ['DOCKER', 'DOCKER-ISOLATION-STAGE-1', 'DOCKER-ISOLATION-STAGE-2', 'DOCKER-USER']) f(['-N', c], { mayFail: true });
  for (const c of ['DOCKER', 'DOCKER-ISOLATION-STAGE-1', 'DOCKER-ISOLATION-STAGE-2']) f(['-F', c]);
  n(['-N', 'DOCKER'], { mayFail: true });
  n(['-F', 'DOCKER']);
  f(['-P', 'FORWARD', 'DROP']);

  f(['-A', 'DOCKER-ISOLATION-STAGE-1', '-i', b, '!', '-o', b, '-j', 'DOCKER-ISOLATION-STAGE-2']);
  f(['-A', 'DOCKER-ISOLATION-STAGE-1', '-j', 'RETURN']);
  f(['-A', 'DOCKER-ISOLATION-STAGE-2', '-o', b, '-j', 'DROP']);
  f(['-A', 'DOCKER-ISOLATION-STAGE-2', '-j', 'RETURN']);
  // Each -I goes to the top: insert bottom-up so the final order is dockerForwardRules's.
  for (const rule of [...dockerForwardRules(b)].reverse()) {
    if (fresh || rule[1] === 'DOCKER-USER') {
      f(['-D', 'FORWARD', ...rule], { mayFail: true });
      f(['-I', 'FORWARD', ...rule]);
    } else {
      f(['-I', 'FORWARD', ...rule], { unless: ['-C', 'FORWARD', ...rule] });
    }
  }
  ensure('filter', 'DOCKER-USER', ['-j', 'RETURN']);

  ensure('nat', 'PREROUTING', ['-m', 'addrtype', '--dst-type', 'LOCAL', '-j', 'DOCKER']);
  ensure('nat', 'OUTPUT', ['!', '-d', '127.0.0.0/8', '-m', 'addrtype', '--dst-type', 'LOCAL', '-j', 'DOCKER']);
  ensure('nat', 'POSTROUTING', ['-s', `${layout.net}.0/24`, '!', '-o', b, '-j', 'MASQUERADE']);
  n(['-A', 'DOCKER', '-i', b, '-j', 'RETURN']);

  // The container's published port.
  const dport = ['-p', 'tcp', '-m', 'tcp', '--dport'];
  f(['-A', 'DOCKER', '-d', `${ctr}/32`, '!', '-i', b, '-o', b, ...dport, String(layout.containerPort), '-j', 'ACCEPT']);
  ensure('nat', 'POSTROUTING', ['-s', `${ctr}/32`, '-d', `${ctr}/32`, ...dport, String(layout.containerPort), '-j', 'MASQUERADE']);
  n(['-A', 'DOCKER', '!', '-i', b, ...dport, String(layout.port), '-j', 'DNAT', '--to-destination', `${ctr}:${layout.containerPort}`]);
  return steps;
}

const layouts = new Map<string, DockerLayout>(); // host namespace -> its container's layout

/**
 * Run dockerd's start ({@link dockerStartSteps}) in namespace `ns`, one iptables call at a time
 * as dockerd does (not atomic: other rules may interleave). Uses the layout {@link dockerPath}
 * built in `ns`, else the default one.
 */
export async function dockerRestart(ns: string, layout = layouts.get(ns) ?? dockerLayout(), opts: { fresh?: boolean } = {}): Promise<void> {
  for (const s of dockerStartSteps(layout, opts)) {
    if (s.unless && (await execa('ip', ['netns', 'exec', ns, 'iptables', '-w', '-t', s.table, ...s.unless], { reject: false, timeout: CMD_TIMEOUT_MS })).exitCode === 0) continue;
    await nsRun(ns, 'iptables', ['-w', '-t', s.table, ...s.args], { okIf: s.mayFail ? /[^]*/ : undefined });
  }
}

export interface DockerPath {
  readonly layout: DockerLayout;
  /** The host's namespace (the topology node's) and the container's. */
  readonly hostNs: string;
  readonly ns: string;
  /** The container's address (behind the host, not reachable from the bridge). */
  readonly containerIp: string;
  /** The published port: probe `host`:port. */
  readonly port: number;
  /** The listener in the container, on `layout.containerPort`; `accepts()` shows the original source address. */
  readonly listener: TcpListener;
  /** {@link dockerRestart} in the host's namespace (`fresh` default true). */
  restart(opts?: { fresh?: boolean }): Promise<void>;
  /** Stop the listener and delete the container namespace. Idempotent; also runs at process exit. */
  destroy(): Promise<void>;
}

/**
 * In node `host`'s namespace: a bridge `docker0` (`net`.1/24), a container namespace behind it
 * (veth, `net`.2, default route via the host), ip_forward=1, dockerd's rules for the container
 * publishing `port` -> `containerPort` ({@link dockerStartSteps}), and a listener in the container
 * that accepts and closes. An attacker's connect to host:port is DNATed in nat PREROUTING and
 * filtered in FORWARD (DOCKER-USER, then Docker's ACCEPT), never in INPUT.
 *
 * @example
 *   const docker = await dockerPath(topo, 'a1');
 *   after(() => docker.destroy());
 *   const probe = await startProbe(topo, 'attacker', 'a1', docker.port);
 */
export async function dockerPath(topo: Topology, host: string, over: Partial<DockerLayout> = {}): Promise<DockerPath> {
  const layout = dockerLayout(over);
  const hostNs = topo.ns(host);
  // `.` cannot occur in a node name, so this never collides with a node's namespace; it starts
  // with the topology's id, so a SIGKILLed run's leftover is swept by the next createTopology().
  const ns = `${topo.id}.ctr-${host}`;
  if (listNamespaces().includes(ns)) throw new Error(`dockerPath: ${host} already has a container (${ns})`);
  await execa('ip', ['netns', 'add', ns], { timeout: CMD_TIMEOUT_MS });
  let listener: TcpListener | undefined;
  let destroying: Promise<void> | undefined;
  const unregister = onCleanup(() => killAndDeleteSync(ns));
  const destroy = () =>
    (destroying ??= (async () => {
      await listener?.stop();
      unregister();
      killAndDeleteSync(ns);
      layouts.delete(hostNs);
    })());
  try {
    const b = layout.bridge;
    await execa('ip', ['-n', hostNs, 'link', 'add', b, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0'], { timeout: CMD_TIMEOUT_MS });
    await execa('ip', ['link', 'add', 'vethctr', 'netns', hostNs, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns], { timeout: CMD_TIMEOUT_MS });
    await execa('ip', ['-n', hostNs, '-batch', '-'], {
      input: [`link set vethctr master ${b}`, 'link set vethctr up', `addr add ${layout.net}.1/24 dev ${b}`, `link set ${b} up`].join('\n') + '\n',
      timeout: CMD_TIMEOUT_MS,
    });
    await execa('ip', ['-n', ns, '-batch', '-'], {
      input: ['link set lo up', `addr add ${layout.net}.2/24 dev eth0`, 'link set eth0 up', `route add default via ${layout.net}.1`].join('\n') + '\n',
      timeout: CMD_TIMEOUT_MS,
    });
    await nsRun(hostNs, 'sysctl', ['-qw', 'net.ipv4.ip_forward=1']);
    layouts.set(hostNs, layout);
    await dockerRestart(hostNs, layout);
    listener = await startTcpListenerIn(ns, layout.containerPort, `container:${host}:${layout.containerPort}`);
  } catch (e) {
    await destroy();
    throw e;
  }
  return {
    layout,
    hostNs,
    ns,
    containerIp: containerIp(layout),
    port: layout.port,
    listener,
    restart: (opts) => dockerRestart(hostNs, layout, opts),
    destroy,
  };
}

// ---------------------------------------------------------------------------
// Tampering

/** The firewall objects banshare's agent makes with `--prefix prefix` (agent.ts on main). */
export interface BanshareObjects {
  /** iptables and ip6tables chain (ipset and iptables backends), jumped to from INPUT. */
  chain: string;
  /** The jump's rule spec: `-I INPUT 1 -j <chain>` inserts it, `-C`/`-D INPUT` + this check/delete it. */
  inputJump: string[];
  /** ipset backend: hash:net sets, one DROP rule each in `chain` (`-m set --match-set <set> src -j DROP`). */
  sets: { v4: string; v6: string };
  /** nftables backend: `table inet <prefix>`, with sets v4/v6 and chain input (hook input, priority filter - 10). */
  nftTable: string;
}

/** {@link BanshareObjects} for a prefix (default `banshare`). */
export function banshareObjects(prefix = 'banshare'): BanshareObjects {
  return { chain: prefix, inputJump: ['-j', prefix], sets: { v4: `${prefix}-v4`, v6: `${prefix}-v6` }, nftTable: prefix };
}

/**
 * Delete every rule of `chain` (filter table) that jumps to `target`, whatever its matches:
 * `iptables -S chain` lists them, `-D` removes each. Both families. Missing chains are fine.
 */
export async function deleteJumps(ns: string, chain: string, target: string): Promise<number> {
  let n = 0;
  for (const bin of ['iptables', 'ip6tables']) {
    // iptables-nft says "incompatible" for a chain of a table that does not exist.
    const r = await nsRun(ns, bin, ['-w', '-S', chain], { okIf: /No chain|does not exist|incompatible/i });
    for (const line of r.stdout.split('\n')) {
      const spec = line.trim().split(/\s+/);
      if (spec[0] !== '-A' || spec[1] !== chain) continue;
      const j = spec.indexOf('-j');
      if (j < 0 || spec[j + 1] !== target) continue;
      await nsRun(ns, bin, ['-w', '-D', ...spec.slice(1)]);
      n++;
    }
  }
  return n;
}

export type Tamper = (ns: string) => Promise<void>;

export type TamperName =
  | 'iptables -F'
  | 'iptables -D INPUT'
  | 'iptables -D DOCKER-USER'
  | 'ipset flush'
  | 'ipset destroy'
  | 'iptables-restore'
  | 'nft flush ruleset'
  | 'nft delete table'
  | 'docker restart';

/** Which backends' objects a tampering removes (with iptables-nft, as on Debian 12). */
export const TAMPER_HITS: Readonly<Record<TamperName, readonly ('ipset' | 'nftables' | 'iptables')[]>> = {
  'iptables -F': ['ipset', 'iptables'],
  'iptables -D INPUT': ['ipset', 'iptables'],
  'iptables -D DOCKER-USER': ['ipset', 'iptables'],
  'ipset flush': ['ipset'],
  'ipset destroy': ['ipset', 'iptables'],
  'iptables-restore': ['ipset', 'iptables'],
  // iptables-nft keeps iptables' rules in nftables tables (ip filter, ip6 filter): gone too.
  'nft flush ruleset': ['ipset', 'nftables', 'iptables'],
  'nft delete table': ['nftables'],
  'docker restart': ['ipset', 'iptables'],
};

/**
 * The tamperings of issue 13 for an agent with `--prefix prefix`, each run inside namespace `ns`:
 *
 * - `iptables -F`: `iptables -F` and `ip6tables -F` (every chain of the filter table emptied,
 *   chains and policies kept; nat untouched).
 * - `iptables -D INPUT`: every INPUT rule jumping to the agent's chain deleted (the agent inserts
 *   `-I INPUT 1 -j banshare`), both families.
 * - `iptables -D DOCKER-USER`: the same for DOCKER-USER and FORWARD (where a Docker-aware agent
 *   hooks in).
 * - `ipset flush`: `ipset flush banshare-v4` and `banshare-v6` (sets and rules stay, empty).
 * - `ipset destroy`: what it takes to destroy a referenced set: `iptables -F`, `ip6tables -F`,
 *   then `ipset destroy banshare-v4` and `banshare-v6`.
 * - `iptables-restore`: the ruleset saved by {@link snapshotRuleset} before the agent started
 *   loaded again (ufw, netfilter-persistent, firewalld reloads); throws if none was saved.
 * - `nft flush ruleset`: every nftables table gone (with iptables-nft, iptables' rules too).
 * - `nft delete table`: `nft delete table inet banshare`.
 * - `docker restart`: {@link dockerRestart}.
 *
 * An object that is already gone is not an error (the tampering's effect is there); any other
 * failure (a set still in use) rejects.
 */
export function tampersFor(prefix = 'banshare'): Readonly<Record<TamperName, Tamper>> {
  const o = banshareObjects(prefix);
  const gone = /does not exist|No chain|No such file|not found|Bad rule/i;
  const both = async (ns: string, args: string[]) => {
    await nsRun(ns, 'iptables', ['-w', ...args], { okIf: gone });
    await nsRun(ns, 'ip6tables', ['-w', ...args], { okIf: gone });
  };
  const sets = async (ns: string, op: 'flush' | 'destroy') => {
    for (const s of [o.sets.v4, o.sets.v6]) await nsRun(ns, 'ipset', [op, s], { okIf: gone });
  };
  return {
    'iptables -F': (ns) => both(ns, ['-F']),
    'iptables -D INPUT': async (ns) => void (await deleteJumps(ns, 'INPUT', o.chain)),
    'iptables -D DOCKER-USER': async (ns) => {
      await deleteJumps(ns, 'DOCKER-USER', o.chain);
      await deleteJumps(ns, 'FORWARD', o.chain);
    },
    'ipset flush': (ns) => sets(ns, 'flush'),
    'ipset destroy': async (ns) => {
      await both(ns, ['-F']);
      await sets(ns, 'destroy');
    },
    'iptables-restore': (ns) => restoreRuleset(ns),
    'nft flush ruleset': async (ns) => void (await nsRun(ns, 'nft', ['flush', 'ruleset'])),
    'nft delete table': async (ns) => void (await nsRun(ns, 'nft', ['delete', 'table', 'inet', o.nftTable], { okIf: gone })),
    'docker restart': (ns) => dockerRestart(ns),
  };
}

/** {@link tampersFor} the default prefix `banshare`. */
export const TAMPERS = tampersFor('banshare');
