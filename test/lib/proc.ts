/**
 * Real child processes for tests.
 *
 * - {@link spawnProc} starts a command (no shell), optionally inside a network
 *   namespace via `ip netns exec NS cmd ...`. `ip netns exec` *execs* the
 *   command, so the PID we get from spawn() is the PID of the real program
 *   (verified on iproute2 6.1: `echo $$` inside == child.pid outside).
 * - Every child is started in its own process group (`detached: true`) and is
 *   signalled as a group (`kill(-pid)`), so helpers it forks (a shell's
 *   `sleep`, sshd's per-connection children, ...) go with it. Nothing is ever
 *   killed by name.
 * - A process-wide registry stops every child that is still running when the
 *   test process exits, or receives SIGINT/SIGTERM/SIGHUP ({@link onCleanup}
 *   lets other helpers, e.g. netns.ts, hook into the same moment; procs are
 *   always killed before the other hooks run). {@link stopAll} is the polite,
 *   awaitable version for `after(stopAll)`.
 *
 * Set `BANSHARE_TEST_VERBOSE=1` to echo every child's output to stderr,
 * prefixed with `[name]`.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { existsSync } from 'node:fs';

/** Repository root (the directory holding package.json), computed from this file's URL. */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface ProcOptions {
  /** Run inside this network namespace (`ip netns exec NS ...`). */
  netns?: string;
  /** Extra environment; merged over `process.env`. Use `null` as a value to unset a variable. */
  env?: Record<string, string | undefined | null>;
  cwd?: string;
  /** Label used in error messages and verbose output. Defaults to the command's basename. */
  name?: string;
  /** Data written to stdin, after which stdin is closed. Default: stdin is closed immediately. */
  input?: string;
  /**
   * Kill the child (SIGKILL) if this test process dies, even by SIGKILL, via
   * `setpriv --pdeathsig KILL` (util-linux; skipped when not installed).
   * Default true. Not inherited by the child's own children (their process
   * group is still killed by stop()/the exit hooks).
   */
  pdeathsig?: boolean;
  /** tsx(): the node binary to run the script with (default: this process's, process.execPath). */
  node?: string;
}

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Set when spawn() itself failed (e.g. ENOENT without netns). */
  error?: Error;
}

export interface Proc {
  readonly name: string;
  readonly pid: number;
  /** The argv that was actually executed (including `ip netns exec ...`). */
  readonly argv: readonly string[];
  /**
   * Resolve with the first complete output line (stdout or stderr) matching
   * `re`. Lines that arrived before the call count too. Rejects on timeout or
   * when the process exits without such a line; the error carries the output tail.
   */
  waitForLine(re: RegExp, timeoutMs?: number): Promise<string>;
  /** All output so far (stdout and stderr interleaved by line, in arrival order). */
  output(): string;
  /** Output lines so far. */
  lines(): readonly string[];
  /**
   * Resolves when the process has exited (never rejects). Reading this
   * property marks the child as awaited, so it keeps the event loop alive.
   */
  readonly exited: Promise<ExitInfo>;
  /** Like `exited`, but also waits until all output was read (at most 200 ms past exit). */
  readonly closed: Promise<ExitInfo>;
  /** The network namespace it runs in, if any. */
  readonly netns?: string;
  /** Exit info once exited, else undefined. */
  exitInfo(): ExitInfo | undefined;
  /**
   * Send `signal` to the process group, wait up to `timeoutMs` for the
   * process to exit, then SIGKILL the group. Safe to call repeatedly and
   * after the process exited; resolves with the exit info.
   */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<ExitInfo>;
  /** SIGKILL the process group right now; resolves when the process is gone. */
  kill9(): Promise<ExitInfo>;
  /** Send an arbitrary signal to the process (group) without waiting. No-op after exit. */
  signal(sig: NodeJS.Signals): void;
}

const MAX_LINES = 200_000;
const verbose = process.env.BANSHARE_TEST_VERBOSE === '1' || process.env.BANSHARE_TEST_VERBOSE === 'true';

const running = new Set<ProcImpl>();

class ProcImpl implements Proc {
  readonly name: string;
  readonly pid: number;
  readonly argv: readonly string[];
  private readonly exitedP: Promise<ExitInfo>;
  private readonly closedP: Promise<ExitInfo>;
  readonly netns?: string;
  private resolveClosed!: (i: ExitInfo) => void;
  private child: ChildProcess;
  private buf: string[] = [];
  private partial: Record<'stdout' | 'stderr', string> = { stdout: '', stderr: '' };
  private waiters = new Set<() => void>();
  private info: ExitInfo | undefined;
  /** true once the output streams are done (or a grace period after exit passed). */
  private outputDone = false;
  private stopping: Promise<ExitInfo> | undefined;

  constructor(argv: string[], opts: ProcOptions, name: string) {
    this.name = name;
    this.argv = argv;
    this.netns = opts.netns;
    this.closedP = new Promise((r) => (this.resolveClosed = r));
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
    for (const [k, v] of Object.entries(opts.env ?? {})) {
      if (v === undefined || v === null) delete env[k];
      else env[k] = v;
    }
    this.child = spawn(argv[0], argv.slice(1), {
      cwd: opts.cwd,
      env,
      stdio: ['pipe', 'pipe', 'pipe'],
      detached: true, // own process group: we signal -pid, and terminal ^C goes only to us
    });
    let resolveExit!: (i: ExitInfo) => void;
    this.exitedP = new Promise((r) => (resolveExit = r));
    const finish = (i: ExitInfo) => {
      if (this.info) return;
      this.info = i;
      running.delete(this);
      resolveExit(i);
      if (this.outputDone) this.resolveClosed(i);
      // stdio may be held open by grandchildren; don't wait for it forever.
      setTimeout(() => this.markOutputDone(), 200).unref();
      this.notify();
    };
    this.child.on('error', (error) => finish({ code: null, signal: null, error }));
    this.child.on('exit', (code, signal) => finish({ code, signal }));
    this.child.on('close', () => this.markOutputDone());
    for (const s of ['stdout', 'stderr'] as const) {
      const stream = this.child[s]!;
      stream.setEncoding('utf8');
      stream.on('data', (d: string) => this.onData(s, d));
      stream.on('end', () => this.flushPartial(s));
    }
    this.child.stdin!.on('error', () => {}); // EPIPE if the child never reads
    // A running child alone must not keep the test process alive (node --test
    // would hang forever on a forgotten proc): unref it and its pipes. When
    // nothing else is pending the process exits and the exit hook kills the
    // child. Waiting for it (exited/closed/stop/kill9) refs it again.
    this.setRef(false);
    if (opts.input !== undefined) this.child.stdin!.end(opts.input);
    else this.child.stdin!.end();
    // pid is undefined when spawn fails synchronously-ish (ENOENT); use -1 then.
    this.pid = this.child.pid ?? -1;
    if (this.child.pid !== undefined) running.add(this);
  }

  private onData(s: 'stdout' | 'stderr', d: string) {
    const parts = (this.partial[s] + d).split('\n');
    this.partial[s] = parts.pop()!;
    for (const line of parts) this.pushLine(line.endsWith('\r') ? line.slice(0, -1) : line);
    this.notify();
  }

  private flushPartial(s: 'stdout' | 'stderr') {
    if (this.partial[s] !== '') {
      this.pushLine(this.partial[s]);
      this.partial[s] = '';
      this.notify();
    }
  }

  private pushLine(line: string) {
    if (verbose) process.stderr.write(`[${this.name}] ${line}\n`);
    this.buf.push(line);
    if (this.buf.length > MAX_LINES) this.buf.splice(0, this.buf.length - MAX_LINES);
  }

  private markOutputDone() {
    if (this.outputDone) return;
    this.flushPartial('stdout');
    this.flushPartial('stderr');
    this.outputDone = true;
    this.notify();
    if (this.info) this.resolveClosed(this.info);
  }

  private notify() {
    for (const w of [...this.waiters]) w();
  }

  output(): string {
    return this.buf.join('\n') + (this.buf.length ? '\n' : '');
  }

  lines(): readonly string[] {
    return this.buf;
  }

  exitInfo(): ExitInfo | undefined {
    return this.info;
  }

  private describeExit(): string {
    const i = this.info;
    if (!i) return 'still running';
    if (i.error) return `spawn failed: ${i.error.message}`;
    return i.signal ? `killed by ${i.signal}` : `exited with code ${i.code}`;
  }

  private tail(n = 40): string {
    const t = this.buf.slice(-n);
    return t.length ? t.map((l) => `  | ${l}`).join('\n') : '  | (no output)';
  }

  waitForLine(re: RegExp, timeoutMs = 10_000): Promise<string> {
    return new Promise((resolve, reject) => {
      let idx = 0;
      const check = () => {
        for (; idx < this.buf.length; idx++) {
          re.lastIndex = 0;
          if (re.test(this.buf[idx])) return done(undefined, this.buf[idx]);
        }
        if (this.info && this.outputDone) {
          done(new Error(`[${this.name}] ${this.describeExit()} before printing a line matching ${re}\n${this.tail()}`));
        }
      };
      const timer = setTimeout(() => {
        done(new Error(`[${this.name}] no line matching ${re} within ${timeoutMs} ms (${this.describeExit()})\n${this.tail()}`));
      }, timeoutMs);
      const done = (err?: Error, line?: string) => {
        clearTimeout(timer);
        this.waiters.delete(check);
        if (err) reject(err);
        else resolve(line!);
      };
      this.waiters.add(check);
      check();
    });
  }

  signal(sig: NodeJS.Signals): void {
    if (this.info || this.pid <= 0) return;
    signalGroup(this.pid, sig);
  }

  stop(signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 5_000): Promise<ExitInfo> {
    if (this.info) return this.exitedP;
    if (this.stopping) return this.stopping;
    this.setRef(true);
    this.stopping = (async () => {
      this.signal(signal);
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        this.exitedP.then(() => false),
        new Promise<boolean>((r) => (timer = setTimeout(() => r(true), timeoutMs))),
      ]);
      clearTimeout(timer);
      if (timedOut) this.signal('SIGKILL');
      const info = await this.exitedP;
      // Leftover members of the group (forked helpers that ignored the signal).
      // The group id cannot be reused while any member is alive, so this is safe.
      try {
        process.kill(-this.pid, 'SIGKILL');
      } catch {
        /* ESRCH: group is empty */
      }
      return info;
    })();
    return this.stopping;
  }

  kill9(): Promise<ExitInfo> {
    this.signal('SIGKILL');
    return this.exited;
  }

  get exited(): Promise<ExitInfo> {
    this.setRef(true);
    return this.exitedP;
  }

  get closed(): Promise<ExitInfo> {
    this.setRef(true);
    return this.closedP;
  }

  private setRef(on: boolean) {
    const targets = [this.child, this.child.stdout, this.child.stderr] as Array<{ ref?(): void; unref?(): void } | null>;
    for (const t of targets) {
      if (on) t?.ref?.();
      else t?.unref?.();
    }
  }

  /** Synchronous last-resort kill used by exit/signal hooks. */
  killSync() {
    if (this.info || this.pid <= 0) return;
    signalGroup(this.pid, 'SIGKILL');
  }
}

function signalGroup(pid: number, sig: NodeJS.Signals) {
  try {
    process.kill(-pid, sig);
  } catch {
    try {
      process.kill(pid, sig);
    } catch {
      /* already gone */
    }
  }
}

/**
 * Start `cmd args...` (no shell). With `opts.netns`, runs
 * `ip netns exec NS cmd args...` (same PID as the real program).
 *
 * @example
 *   const p = spawnProc('sleep', ['30'], { name: 'sleeper' });
 *   await p.stop();
 *
 *   const srv = spawnProc(process.execPath, ['-e', 'console.log("ready"); setInterval(()=>{},1e9)'], { netns: topo.ns('hub') });
 *   await srv.waitForLine(/ready/, 5000);
 */
export function spawnProc(cmd: string, args: string[] = [], opts: ProcOptions = {}): Proc {
  installHooks();
  let argv = opts.netns ? ['ip', 'netns', 'exec', opts.netns, cmd, ...args] : [cmd, ...args];
  // setpriv and `ip netns exec` both exec(), so the PID stays the real program's.
  if (opts.pdeathsig !== false && setprivPath()) argv = [setprivPath()!, '--pdeathsig', 'KILL', ...argv];
  const name = opts.name ?? path.basename(cmd);
  return new ProcImpl(argv, opts, name);
}

let setpriv: string | null | undefined;
function setprivPath(): string | null {
  if (setpriv === undefined) {
    setpriv = null;
    for (const d of ['/usr/bin', '/bin', '/usr/sbin', '/sbin']) {
      const f = path.join(d, 'setpriv');
      if (existsSync(f) && runSync(f, ['--help']).stdout.includes('--pdeathsig')) {
        setpriv = f;
        break;
      }
    }
  }
  return setpriv;
}

/**
 * Run a TypeScript entry point with the current node and tsx:
 * `process.execPath --import <tsx> SCRIPT ARGS...`, cwd = repo root unless
 * `opts.cwd` is given, `script` relative to the repo root unless absolute.
 * `--import tsx` resolves from the cwd, so it is passed as the absolute URL of
 * the repo's tsx loader (resolved from this file); any cwd works.
 *
 * @example
 *   const hub = tsx('hub.ts', ['--port', '0'], { netns: topo.ns('hub'), name: 'hub' });
 *   await hub.waitForLine(/listening/i, 10_000);
 */
export function tsx(script: string, args: string[] = [], opts: ProcOptions = {}): Proc {
  const cwd = opts.cwd ?? REPO_ROOT;
  const abs = path.isAbsolute(script) ? script : path.join(REPO_ROOT, script);
  // Inside a namespace the test created, a plain ws:// hub is on the test's own private bridge:
  // agent.ts and ban.ts may send it their token (BANSHARE_INSECURE, as --insecure), unless the
  // test says otherwise (`env: { BANSHARE_INSECURE: null }` to see the refusal).
  const insecure = opts.netns && !(opts.env && 'BANSHARE_INSECURE' in opts.env) ? { BANSHARE_INSECURE: 'true' } : {};
  return spawnProc(opts.node ?? process.execPath, ['--import', tsxLoader(), abs, ...args], {
    ...opts,
    env: { ...insecure, ...opts.env },
    cwd,
    name: opts.name ?? path.basename(script),
  });
}

function tsxLoader(): string {
  try {
    return import.meta.resolve('tsx'); // file:///…/node_modules/tsx/dist/loader.mjs
  } catch {
    return 'tsx';
  }
}

/** Stop (SIGTERM, then SIGKILL after `timeoutMs`) every child that is still running. For `after(stopAll)`. */
export async function stopAll(timeoutMs = 5_000): Promise<void> {
  await Promise.all([...running].map((p) => p.stop('SIGTERM', timeoutMs)));
}

/** Children started by this module that have not exited yet. */
export function runningProcs(): Proc[] {
  return [...running];
}

// ---------------------------------------------------------------------------
// Process-exit / signal cleanup registry (shared with netns.ts).

type Hook = () => void;
const hooks: Hook[] = [];
let hooksInstalled = false;

/**
 * Register a *synchronous* function to run once when the process exits or
 * gets SIGINT/SIGTERM/SIGHUP. Running children are SIGKILLed first, then hooks
 * run in registration order. Returns an unregister function.
 */
export function onCleanup(fn: Hook): () => void {
  installHooks();
  hooks.push(fn);
  return () => {
    const i = hooks.indexOf(fn);
    if (i >= 0) hooks.splice(i, 1);
  };
}

/**
 * Run the exit-time cleanup now (synchronously): SIGKILL all running children,
 * then run (and unregister) every hook. Safe to call repeatedly.
 */
export function runCleanupNow(): void {
  for (const p of [...running]) {
    p.killSync();
    running.delete(p);
  }
  for (const h of hooks.splice(0)) {
    try {
      h();
    } catch (e) {
      process.stderr.write(`banshare test cleanup hook failed: ${(e as Error).message}\n`);
    }
  }
}

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function installHooks() {
  if (hooksInstalled) return;
  hooksInstalled = true;
  process.on('exit', runCleanupNow);
  for (const sig of SIGNALS) {
    const handler = () => {
      runCleanupNow();
      process.removeListener(sig, handler);
      // If someone else (e.g. node:test's harness) also listens, it decides
      // what happens next; otherwise die of the same signal, as if we hadn't
      // been here.
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.on(sig, handler);
  }
}

/** Synchronously run a command, returning status/output; never throws. Used by cleanup paths. */
export function runSync(cmd: string, args: string[], opts: { input?: string; timeoutMs?: number } = {}) {
  const r = spawnSync(cmd, args, {
    encoding: 'utf8',
    timeout: opts.timeoutMs ?? 10_000,
    killSignal: 'SIGKILL',
    input: opts.input,
    stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
  });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '', error: r.error };
}
