/**
 * Requirement checks for tests that need root, network namespaces, firewall
 * tools, fail2ban, sshd ...
 *
 * Design: a skipped test is fine on a developer's laptop, but on CI it would
 * silently hide that nothing was tested. So
 *
 *   - {@link missing} returns why requirements are not met (or undefined);
 *   - {@link needs} is the one-liner for a suite or test:
 *
 *         describe('agent bans via ipset', needs(['root', 'netns', 'ipset', 'iptables']), () => { ... });
 *
 *     Normally it returns `{ skip: reason }` (or `{}` when all is there).
 *     When `process.env.CI === 'true'` and something is missing it ALSO
 *     registers, right where it is called, a test named
 *     `requirements: <label>` that fails with the reason, and still skips the
 *     suite, so the run fails with one clear error instead of a cascade of
 *     confusing ones (node:test does not run the body of a skipped describe).
 *   - {@link requireOrSkip} is the same inside a running test:
 *
 *         test('x', (t) => { if (requireOrSkip(t, ['sshd'])) return; ... });
 *
 *     It calls `t.skip(reason)` and returns true, or throws under CI.
 *
 * `BANSHARE_ALLOW_SKIP=1` turns the CI failure back into a skip (for a CI
 * that knowingly lacks something).
 *
 * Functional checks (netns, ipset, nft, iptables, ip6tables) run inside a
 * scratch network namespace that is deleted at once, so they never touch the
 * host's firewall. Results are cached per process.
 */
import { test, type TestContext } from 'node:test';
import { accessSync, constants, existsSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { runSync } from './proc.ts';

/**
 * Known requirements. Any other string is the name of an executable that must
 * be found in $PATH or an sbin directory (e.g. 'fail2ban-server', 'sshd').
 */
export type Requirement =
  | 'root'
  | 'netns' // root + `ip netns add/exec/del` works
  | 'ipv6'
  | 'ipset' // ipset binary + kernel ip_set (hash:net, inet and inet6, timeout) in a netns
  | 'nft' // nft binary + nf_tables inet table with an interval,timeout set
  | 'iptables' // iptables binary + adding a rule works in a scratch netns
  | 'ip6tables' // same for ip6tables
  | 'chromium' // a Chromium binary (CHROMIUM_PATH, or chromium in PATH) + the playwright-core package
  | (string & {});

export const isCI = process.env.CI === 'true';
const allowSkip = ['1', 'true'].includes(process.env.BANSHARE_ALLOW_SKIP ?? '');

const SBIN = ['/usr/local/sbin', '/usr/sbin', '/sbin', '/usr/local/bin', '/usr/bin', '/bin'];

/** Absolute path of an executable in $PATH or the sbin directories, or undefined. */
export function which(bin: string): string | undefined {
  if (bin.includes('/')) return isExec(bin) ? bin : undefined;
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), ...SBIN];
  for (const d of dirs) {
    const f = path.join(d, bin);
    if (isExec(f)) return f;
  }
  return undefined;
}

function isExec(f: string): boolean {
  try {
    accessSync(f, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The Chromium to drive with playwright-core: $CHROMIUM_PATH, or chromium / chromium-browser in PATH. */
export function chromiumPath(): string | undefined {
  return process.env.CHROMIUM_PATH ? which(process.env.CHROMIUM_PATH) : (which('chromium') ?? which('chromium-browser'));
}

const cache = new Map<string, string | null>(); // requirement -> reason (null = ok)

const isRoot = () => process.getuid?.() === 0;

function checkRoot(): string | null {
  return isRoot() ? null : `not root (uid ${process.getuid?.()})`;
}

/** Run `fn(ns)` with a scratch netns; returns fn's result, or a reason string if netns itself fails. */
function withScratchNs<T>(fn: (ns: string) => T): T | { nsError: string } {
  // Same naming scheme as netns.ts, so a leftover (if we get SIGKILLed right here) is swept later.
  const ns = `bs-${process.pid}-${randomBytes(2).toString('hex')}-probe`;
  const add = runSync('ip', ['netns', 'add', ns]);
  if (add.status !== 0) return { nsError: `'ip netns add' failed: ${(add.stderr || add.error?.message || '').trim()}` };
  try {
    return fn(ns);
  } finally {
    runSync('ip', ['netns', 'del', ns]);
  }
}

function inNs(ns: string, cmd: string, args: string[], input?: string): string | null {
  const r = runSync('ip', ['netns', 'exec', ns, cmd, ...args], { input });
  if (r.status === 0) return null;
  return `'${[cmd, ...args].join(' ')}' failed in a scratch netns: ${(r.stderr || r.error?.message || `exit ${r.status}`).trim()}`;
}

const FUNCTIONAL: Record<string, { bin: string; check: (ns: string) => string | null }> = {
  ipset: {
    bin: 'ipset',
    check: (ns) =>
      inNs(ns, 'ipset', ['create', 'bsprobe4', 'hash:net', 'family', 'inet', 'timeout', '0']) ??
      inNs(ns, 'ipset', ['add', 'bsprobe4', '10.0.0.0/8', 'timeout', '5']) ??
      inNs(ns, 'ipset', ['create', 'bsprobe6', 'hash:net', 'family', 'inet6', 'timeout', '0']),
  },
  nft: {
    bin: 'nft',
    check: (ns) =>
      inNs(
        ns,
        'nft',
        ['-f', '-'],
        'table inet bsprobe {\n set s { type ipv4_addr; flags interval,timeout; }\n' +
          ' chain input { type filter hook input priority -10; ip saddr @s drop; }\n}\n',
      ),
  },
  iptables: {
    bin: 'iptables',
    check: (ns) => inNs(ns, 'iptables', ['-w', '-A', 'INPUT', '-s', '10.0.0.1', '-j', 'DROP']),
  },
  ip6tables: {
    bin: 'ip6tables',
    check: (ns) => inNs(ns, 'ip6tables', ['-w', '-A', 'INPUT', '-s', 'fd00::1', '-j', 'DROP']),
  },
};

function checkOne(req: string, ns: string | undefined): string | null {
  switch (req) {
    case 'root':
      return checkRoot();
    case 'ipv6':
      return existsSync('/proc/net/if_inet6') ? null : 'kernel has no IPv6';
    case 'chromium': {
      if (!chromiumPath()) return "no Chromium: 'chromium' not found in PATH (apt-get install chromium, or set CHROMIUM_PATH)";
      try {
        import.meta.resolve('playwright-core');
      } catch {
        return "the playwright-core package is not installed (npm ci)";
      }
      return null;
    }
    case 'netns': {
      const r = checkRoot();
      if (r) return `netns: ${r}`;
      if (!which('ip')) return "'ip' (iproute2) not found";
      return null; // the scratch ns below is the real test
    }
  }
  const f = FUNCTIONAL[req];
  if (f) {
    if (!which(f.bin)) return `'${f.bin}' not found`;
    if (ns) return f.check(ns);
    const r = checkRoot();
    return r ? `${req}: ${r}` : null; // no netns to test in; binary presence must do
  }
  return which(req) ? null : `'${req}' not found in PATH or sbin`;
}

/**
 * Why `reqs` are not met (all reasons joined with '; '), or undefined if they are.
 * Cached per requirement; functional checks share one scratch namespace per call.
 */
export function missing(reqs: readonly Requirement[]): string | undefined {
  const todo = [...new Set(reqs)].filter((r) => !cache.has(r));
  if (todo.length) {
    const needNs = todo.some((r) => r === 'netns' || r in FUNCTIONAL);
    const canNs = needNs && isRoot() && which('ip') !== undefined;
    if (canNs) {
      const res = withScratchNs((ns) => {
        for (const r of todo) cache.set(r, checkOne(r, ns));
      });
      if (res && typeof res === 'object' && 'nsError' in res) {
        for (const r of todo) cache.set(r, r === 'netns' ? res.nsError : checkOne(r, undefined));
      }
    } else {
      for (const r of todo) cache.set(r, checkOne(r, undefined));
    }
  }
  const reasons = [...new Set(reqs)].map((r) => cache.get(r)).filter((x): x is string => !!x);
  return reasons.length ? reasons.join('; ') : undefined;
}

/**
 * Options for `describe()`/`test()`: `{}` when `reqs` are met, else
 * `{ skip: reason }`. Under `CI=true` a missing requirement also registers a
 * failing test `requirements: <label>` next to the call (see module doc).
 *
 * @example
 *   describe('nftables backend', needs(['root', 'netns', 'nft']), () => { ... });
 *   test('sshd bans', needs(['root', 'netns', 'sshd', 'fail2ban-server']), async () => { ... });
 */
export function needs(reqs: readonly Requirement[], label: string = reqs.join(', ')): { skip?: string } {
  const reason = missing(reqs);
  if (!reason) return {};
  if (isCI && !allowSkip) {
    test(`requirements: ${label}`, () => {
      throw new Error(`missing requirement on CI (CI=true): ${reason}`);
    });
    return { skip: `${reason} (failing on CI, see "requirements: ${label}")` };
  }
  return { skip: reason };
}

/**
 * Inside a running test: if `reqs` are missing, `t.skip(reason)` and return
 * true (the caller should `return`); under `CI=true` throw instead.
 *
 * @example
 *   test('x', async (t) => {
 *     if (requireOrSkip(t, ['root', 'ipset'])) return;
 *     ...
 *   });
 */
export function requireOrSkip(t: TestContext, reqs: readonly Requirement[]): boolean {
  const reason = missing(reqs);
  if (!reason) return false;
  if (isCI && !allowSkip) throw new Error(`missing requirement on CI (CI=true): ${reason}`);
  t.skip(reason);
  return true;
}
