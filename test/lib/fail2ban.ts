// Test helper: run a private, self-contained Fail2Ban server (own config dir,
// socket, pidfile, log) with one jail watching a log file, optionally inside a
// network namespace.
//
//   const f2b = await startFail2ban({
//     dir: tmp, netns: 'bs-a', logFile: `${tmp}/sshd.log`,
//     actions: `banshare[banshare_dir=${REPO}, config=${tmp}/ban.json]`,
//   });
//   await appendFile(`${tmp}/sshd.log`, failureLines('10.99.0.7', 3));
//   ... wait for the ban (fail2ban needs ~0.1-0.9 s: its actions thread polls) ...
//   // or, synchronous, bypassing the filter: await f2b.client(['set', f2b.jail, 'banip', ip]);
//   await f2b.client(['set', f2b.jail, 'unbanip', '10.99.0.7']);
//   await f2b.stop();
//
// Needs root (fail2ban-server, ip netns). Does not touch /etc/fail2ban or the
// host's fail2ban: everything lives under opts.dir (socket possibly in a short
// /tmp dir, see socketPath()).

import { spawn, execFile, type ChildProcess } from 'node:child_process';
import {
  closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
/** Repository root (test/lib/../..). */
export const REPO_DIR = resolve(HERE, '..', '..');
/** The project's Fail2Ban files (action.d/banshare.conf, filter.d/sshd-file.conf). */
export const PROJECT_FAIL2BAN_DIR = join(REPO_DIR, 'fail2ban');
/** Test-only Fail2Ban files (action.d/record.conf, filter.d/banshare-test.conf). */
export const FIXTURE_FAIL2BAN_DIR = join(REPO_DIR, 'test', 'fixtures', 'fail2ban');
/** Stock filters the sshd-file filter builds on. */
const STOCK_FILTER_DIR = '/etc/fail2ban/filter.d';

const FAIL2BAN_SERVER = '/usr/bin/fail2ban-server';
const FAIL2BAN_CLIENT = '/usr/bin/fail2ban-client';
const IP = '/usr/sbin/ip';

/** PATH like the one systemd gives fail2ban.service; actions must not need more. */
export const SYSTEMD_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export type Fail2banFilter = 'sshd-file' | 'banshare-test';

export interface StartFail2banOptions {
  /** Directory for the generated config, socket, pidfile, fail2ban log (created if missing). */
  dir: string;
  /** Run fail2ban-server (and so its actions) inside `ip netns exec NS`. */
  netns?: string;
  /** Log file the jail watches (created empty if missing, never truncated). */
  logFile: string;
  /** Jail name (default 'sshd'); becomes <name> in actions. */
  jail?: string;
  /** Failures before a ban (default 3). */
  maxretry?: number;
  /** Seconds (default 600). */
  findtime?: number;
  /** Seconds (default 600); -1 = permanent. */
  bantime?: number;
  /** Raw value of the jail's `action =`, e.g. `banshare[banshare_dir=/work/main, config=/tmp/x.json]`.
   *  Several actions: separate with "\n". Action files available: banshare (project), record (fixture),
   *  plus any .conf in opts.extraActionDirs. */
  actions: string;
  /** Extra environment for fail2ban-server, hence for every action command. */
  env?: Record<string, string>;
  /** Inherit this process's environment (default false: minimal systemd-like env, PATH=SYSTEMD_PATH). */
  inheritEnv?: boolean;
  /** Filter (default 'sshd-file', the project's filter on top of the stock sshd.conf). */
  filter?: Fail2banFilter;
  /** File backend (default 'pyinotify', measured fastest; 'polling' also works). */
  backend?: 'pyinotify' | 'polling';
  /** Ban database: 'none' (default), 'memory', or 'file' (DIR/fail2ban.sqlite3, keeps bans across restarts
   *  of the same dir, so they come back as restored bans). */
  db?: 'none' | 'memory' | 'file';
  /** `logpath = FILE tail` (default true): only lines appended after the start count. With false Fail2Ban
   *  seeks by timestamp, and as sshd -E lines have none, it also ends up skipping what is already there. */
  tail?: boolean;
  /** Fail2Ban loglevel (default 'INFO'; 'DEBUG' logs action results and output, 'TRACEDEBUG' also each command line). */
  loglevel?: string;
  /** Directories whose action.d/*.conf are copied in as well. */
  extraActionDirs?: string[];
  /** How long to wait for the server to answer (default 20000 ms). */
  startTimeoutMs?: number;
}

export interface Fail2ban {
  pid: number;
  jail: string;
  dir: string;
  socket: string;
  /** Fail2Ban's own log file (logtarget). */
  logTarget: string;
  /** stdout/stderr of fail2ban-server. */
  outFile: string;
  /** Run `fail2ban-client -c DIR -s SOCK ...args`, resolve its stdout (rejects on non-zero exit). */
  client(args: string[]): Promise<string>;
  /** IPs currently banned in the jail. */
  banned(): Promise<string[]>;
  /** Stop the server (client stop, then SIGKILL by PID). Safe to call twice. */
  stop(): Promise<void>;
}

/** Servers still running, SIGKILLed if the test process exits without stop(). */
const running = new Map<number, ChildProcess>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const pid of running.keys()) {
      try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
    }
  });
}

/**
 * n lines exactly as `sshd -E FILE` writes them for failed password logins
 * (no timestamp/prefix, "\r\n" line ends), each matched once by both filters:
 *   Failed password for root from 10.0.0.5 port 40001 ssh2
 */
export function failureLines(ip: string, n: number, opts: { user?: string; firstPort?: number } = {}): string {
  const user = opts.user ?? 'root';
  const port0 = opts.firstPort ?? 40000 + Math.floor(Math.random() * 20000);
  let out = '';
  for (let i = 0; i < n; i++) out += `Failed password for ${user} from ${ip} port ${port0 + i} ssh2\r\n`;
  return out;
}

/** Socket path; AF_UNIX paths are limited to 107 bytes, so fall back to a short /tmp dir. */
function socketPath(dir: string): { socket: string; tmpSockDir?: string } {
  const socket = join(dir, 'fail2ban.sock');
  if (Buffer.byteLength(socket) <= 100) return { socket };
  const tmpSockDir = mkdtempSync('/tmp/f2b-'); // not os.tmpdir(): TMPDIR may be long too
  return { socket: join(tmpSockDir, 'f2b.sock'), tmpSockDir };
}

function copyConfs(fromDir: string, toDir: string, names?: string[]): void {
  if (!existsSync(fromDir)) return;
  mkdirSync(toDir, { recursive: true });
  const list = names ?? readdirConfs(fromDir);
  for (const n of list) copyFileSync(join(fromDir, n), join(toDir, n));
}

function readdirConfs(d: string): string[] {
  return readdirSync(d).filter((n) => n.endsWith('.conf'));
}

function run(file: string, args: string[], timeoutMs = 15000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(file, args, { timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as any).code === 'number' ? (err as any).code : 1) : 0;
      res({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Waits for `p` at most `ms`; the timer is cleared either way, so it never keeps the process alive. */
async function raceTimeout(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([p, new Promise((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

function tailOf(file: string, max = 4000): string {
  try {
    const s = readFileSync(file, 'utf8');
    return s.length > max ? s.slice(-max) : s;
  } catch {
    return '';
  }
}

export async function startFail2ban(opts: StartFail2banOptions): Promise<Fail2ban> {
  const dir = resolve(opts.dir);
  const jail = opts.jail ?? 'sshd';
  const filter = opts.filter ?? 'sshd-file';
  const backend = opts.backend ?? 'pyinotify';
  const db = opts.db ?? 'none';
  const tail = opts.tail ?? true;
  const logFile = resolve(opts.logFile);
  if (!/^[A-Za-z0-9_.-]+$/.test(jail)) throw new Error(`invalid jail name ${jail}`);
  if (/[\s#;]/.test(logFile)) throw new Error(`log file path must not contain spaces/#/; : ${logFile}`);

  mkdirSync(dir, { recursive: true });
  mkdirSync(dirname(logFile), { recursive: true });
  closeSync(openSync(logFile, 'a')); // must exist or the jail refuses to start

  const { socket, tmpSockDir } = socketPath(dir);
  const pidFile = join(dir, 'fail2ban.pid');
  const logTarget = join(dir, 'fail2ban.log.txt');
  const outFile = join(dir, 'fail2ban-server.out');
  const dbfile = db === 'file' ? join(dir, 'fail2ban.sqlite3') : db === 'memory' ? ':memory:' : 'None';

  // --- config dir ---------------------------------------------------------
  const actionD = join(dir, 'action.d');
  const filterD = join(dir, 'filter.d');
  mkdirSync(actionD, { recursive: true });
  mkdirSync(filterD, { recursive: true });
  copyConfs(join(PROJECT_FAIL2BAN_DIR, 'action.d'), actionD);
  copyConfs(join(FIXTURE_FAIL2BAN_DIR, 'action.d'), actionD);
  for (const d of opts.extraActionDirs ?? []) copyConfs(join(d, 'action.d'), actionD);
  if (filter === 'sshd-file') {
    // sshd-file.conf includes sshd.conf (-> common.conf); copy them so the dir is self-contained.
    copyConfs(STOCK_FILTER_DIR, filterD, ['sshd.conf', 'common.conf']);
    copyConfs(join(PROJECT_FAIL2BAN_DIR, 'filter.d'), filterD, ['sshd-file.conf']);
  } else {
    copyConfs(join(FIXTURE_FAIL2BAN_DIR, 'filter.d'), filterD, ['banshare-test.conf']);
  }

  writeFileSync(
    join(dir, 'fail2ban.conf'),
    [
      '[DEFAULT]',
      `loglevel = ${opts.loglevel ?? 'INFO'}`,
      `logtarget = ${logTarget}`,
      'syslogsocket = auto',
      `socket = ${socket}`,
      `pidfile = ${pidFile}`,
      `dbfile = ${dbfile}`,
      'dbpurgeage = 1d',
      'dbmaxmatches = 10',
      '',
      '[Definition]',
      'allowipv6 = auto',
      '',
      '[Thread]',
      '',
    ].join('\n'),
  );

  const actionLines = opts.actions.split('\n').map((l) => l.trim()).filter(Boolean);
  writeFileSync(
    join(dir, 'jail.local'),
    [
      '[DEFAULT]',
      'ignoreself = false',
      'ignoreip =',
      'usedns = no',
      '',
      `[${jail}]`,
      'enabled = true',
      `filter = ${filter}`,
      `backend = ${backend}`,
      `logpath = ${logFile}${tail ? ' tail' : ''}`,
      `maxretry = ${opts.maxretry ?? 3}`,
      `findtime = ${opts.findtime ?? 600}`,
      `bantime = ${opts.bantime ?? 600}`,
      `action = ${actionLines[0] ?? ''}`,
      ...actionLines.slice(1).map((l) => `         ${l}`),
      '',
    ].join('\n'),
  );

  // --- start --------------------------------------------------------------
  for (const f of [pidFile, socket]) rmSync(f, { force: true });
  const env: Record<string, string> = opts.inheritEnv
    ? { ...(process.env as Record<string, string>), ...(opts.env ?? {}) }
    : { PATH: SYSTEMD_PATH, LANG: 'C.UTF-8', ...(opts.env ?? {}) };
  const serverArgs = [FAIL2BAN_SERVER, '-f', '-x', '-c', dir, '-s', socket, '-p', pidFile];
  const [cmd, args] = opts.netns
    ? [IP, ['netns', 'exec', opts.netns, ...serverArgs]]
    : [serverArgs[0], serverArgs.slice(1)];
  const outFd = openSync(outFile, 'a');
  // `ip netns exec` execs the command, so child.pid is fail2ban-server's PID.
  const child = spawn(cmd, args, { cwd: '/', env, stdio: ['ignore', outFd, outFd] });
  closeSync(outFd);
  child.unref();
  const pid = child.pid;
  if (pid === undefined) throw new Error(`could not spawn ${cmd}`);
  installExitHook();
  running.set(pid, child);

  let exited = false;
  let exitInfo = '';
  const exitedP = new Promise<void>((res) => {
    child.once('exit', (code, sig) => {
      exited = true;
      exitInfo = `code=${code} signal=${sig}`;
      running.delete(pid);
      res();
    });
  });

  const client = async (cargs: string[]): Promise<string> => {
    const r = await run(FAIL2BAN_CLIENT, ['-c', dir, '-s', socket, ...cargs]);
    if (r.code !== 0) {
      throw new Error(`fail2ban-client ${cargs.join(' ')} exited ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
    }
    return r.stdout;
  };

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopping ??= (async () => {
      if (!exited) {
        await run(FAIL2BAN_CLIENT, ['-c', dir, '-s', socket, 'stop'], 10000).catch(() => undefined);
        await raceTimeout(exitedP, 10000);
      }
      if (!exited) {
        try { process.kill(pid, 'SIGKILL'); } catch { /* already gone */ }
        await raceTimeout(exitedP, 5000);
      }
      running.delete(pid);
      rmSync(socket, { force: true });
      if (tmpSockDir) rmSync(tmpSockDir, { recursive: true, force: true });
    })());

  // --- wait until it answers and the jail is up --------------------------
  const deadline = Date.now() + (opts.startTimeoutMs ?? 20000);
  let last = '';
  for (;;) {
    if (exited) {
      await stop();
      throw new Error(
        `fail2ban-server exited during start (${exitInfo})\n--- ${outFile}\n${tailOf(outFile)}\n--- ${logTarget}\n${tailOf(logTarget)}`,
      );
    }
    const r = await run(FAIL2BAN_CLIENT, ['-c', dir, '-s', socket, 'status', jail], 5000);
    if (r.code === 0 && r.stdout.includes('Status for the jail')) break;
    last = (r.stderr || r.stdout).trim();
    if (Date.now() > deadline) {
      await stop();
      throw new Error(
        `fail2ban did not come up within ${opts.startTimeoutMs ?? 20000} ms: ${last}\n--- ${outFile}\n${tailOf(outFile)}\n--- ${logTarget}\n${tailOf(logTarget)}`,
      );
    }
    await sleep(100);
  }

  const banned = async (): Promise<string[]> => {
    const out = await client(['get', jail, 'banip']);
    return out.split(/\s+/).filter((s) => s.length > 0);
  };

  return { pid, jail, dir, socket, logTarget, outFile, client, banned, stop };
}

/** `YYYY-MM-DD HH:MM:SS` in local time, as Fail2Ban prints times. */
export function f2bTime(ms: number): string {
  const d = new Date(ms);
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}
