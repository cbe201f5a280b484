/**
 * The scripts share nothing but messages.ts, so a few small helpers exist in more than one file
 * on purpose (isMain, withOwnEnv, logLine, ownAddresses), ban.ts counts the kernel objects the
 * agent creates by their names, and the status page script carries protocol values of the hub.
 * These tests fail, naming both places, when such copies drift apart.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import ts from "typescript";
import { cleanupCommands, ipsetNames, iptablesReconcileCommands, NFT_SETS, nftSetupScript } from "../agent.ts";
import { kernelAddresses, kernelCountCommands } from "../ban.ts";
import { STATUS_PROTOCOL, requestToken } from "../hub.ts";
import { PROTOCOL_VERSION, parseAddress } from "../messages.ts";
import { startFleet, type Fleet } from "./lib/fleet.ts";
import { REPO_ROOT } from "./lib/proc.ts";

/** The standalone scripts that may hold deliberate copies of each other's helpers. */
const SCRIPTS = ["hub.ts", "agent.ts", "ban.ts", "examples/experiment.ts"];

/** Top-level functions that share a name across scripts but are each script's own by design. */
const OWN_BY_DESIGN = new Set(["main", "parseArgs", "num", "run", "UsageError"]);

/** A copy's text with what is meant to differ taken out: the script's own name in its log lines. */
function normalise(file: string, text: string): string {
  const script = file.replace(/^.*\//, "").replace(/\.ts$/, "");
  return text.replaceAll(` ${script}: `, " SCRIPT: ");
}

function sourceOf(file: string): ts.SourceFile {
  return ts.createSourceFile(file, readFileSync(join(REPO_ROOT, file), "utf8"), ts.ScriptTarget.Latest, true);
}

/** Each top-level function and class declaration of `file`, by name, as text (its JSDoc excluded). */
function topLevelFunctions(file: string): Map<string, string> {
  const src = sourceOf(file);
  const out = new Map<string, string>();
  for (const st of src.statements) if ((ts.isFunctionDeclaration(st) && st.body) || ts.isClassDeclaration(st)) if (st.name) out.set(st.name.text, st.getText(src));
  return out;
}

/** The value of a top-level `const NAME = <numeric expression>` in `file`. */
function numericConst(file: string, name: string): number {
  const src = sourceOf(file);
  for (const st of src.statements) {
    if (!ts.isVariableStatement(st)) continue;
    for (const d of st.declarationList.declarations) {
      if (!ts.isIdentifier(d.name) || d.name.text !== name || !d.initializer) continue;
      const text = d.initializer.getText(src);
      assert.match(text, /^[\d_ *+()-]+$/, `${file}: ${name} is not a plain numeric constant (${text})`);
      return Number(new Function(`return ${text}`)());
    }
  }
  assert.fail(`${file} has no top-level const ${name}; update test/copies.test.ts to the constant the status page uses now`);
}

describe("copies: helpers copied between the scripts on purpose are identical", () => {
  test("every top-level function and class declared in two scripts has the same text in both", () => {
    const seen = new Map<string, { file: string; text: string }>();
    const drift: string[] = [];
    let copies = 0;
    for (const file of SCRIPTS) {
      for (const [name, text] of topLevelFunctions(file)) {
        if (OWN_BY_DESIGN.has(name)) continue;
        const first = seen.get(name);
        if (!first) {
          seen.set(name, { file, text });
          continue;
        }
        copies++;
        if (normalise(first.file, first.text) !== normalise(file, text)) drift.push(`${name}() differs between ${first.file} and ${file}: make the two copies the same text again`);
      }
    }
    assert.deepEqual(drift, []);
    assert.ok(copies >= 4, `expected the copies of isMain, withOwnEnv, logLine and ownAddresses, found ${copies}`);
  });

  test("isMain() is in every script, withOwnEnv(), logLine() and ownAddresses() in hub.ts and agent.ts", () => {
    const names = Object.fromEntries(SCRIPTS.map((f) => [f, topLevelFunctions(f)]));
    for (const f of SCRIPTS) assert.ok(names[f].has("isMain"), `${f} has no isMain()`);
    for (const f of ["hub.ts", "agent.ts"]) for (const fn of ["withOwnEnv", "logLine", "ownAddresses"]) assert.ok(names[f].has(fn), `${f} has no ${fn}(): renamed copies escape the check above (if it moved to messages.ts, drop it from this list)`);
  });
});

describe("copies: ban.ts status counts the very sets, table and chain the agent creates", () => {
  const prefix = "bsx";
  const cfg = { prefix, allow: [parseAddress("198.51.100.0/24")!], ports: [22] };

  test("ipset: ban.ts lists the agent's two sets", () => {
    const names = ipsetNames(prefix);
    assert.deepEqual(kernelCountCommands("ipset", prefix).map((argv) => argv.at(-1)), [names.v4, names.v6], "ban.ts and agent.ts name the ipsets differently");
    for (const set of [names.v4, names.v6]) assert.ok(cleanupCommands("ipset", prefix).some((c) => c.join(" ") === `ipset destroy ${set}`));
  });

  test("nftables: ban.ts lists the sets of the agent's table", () => {
    const script = nftSetupScript(cfg);
    assert.deepEqual(kernelCountCommands("nftables", prefix).map((argv) => argv.at(-1)), [...NFT_SETS], "ban.ts and agent.ts name the nftables sets differently");
    for (const argv of kernelCountCommands("nftables", prefix)) {
      const [family, table, set] = argv.slice(-3);
      assert.ok(script.includes(`add set ${family} ${table} ${set} {`), `ban.ts counts nft set ${family} ${table} ${set}, which agent.ts's nftSetupScript() does not create:\n${script}`);
    }
  });

  test("iptables: ban.ts counts the agent's DROP rules in its chain, and not the allowlist's RETURNs", () => {
    const blocked = ["192.0.2.1", "192.0.2.2", "2001:db8::1"];
    const [v4, v6] = iptablesReconcileCommands(cfg, blocked).map((c) => c.input!);
    const chainLines = (restore: string) => restore.split("\n").filter((l) => l.startsWith(`-A ${prefix} `));
    assert.deepEqual(kernelCountCommands("iptables", prefix).map((argv) => argv.at(-1)), [prefix, prefix]);
    assert.equal(kernelAddresses("iptables", chainLines(v4).join("\n")).length, 2, `ban.ts's rule pattern does not match the agent's rules:\n${v4}`);
    assert.equal(kernelAddresses("iptables", chainLines(v6).join("\n")).length, 1, `ban.ts's rule pattern does not match the agent's rules:\n${v6}`);
  });
});

describe("copies: the status page script carries the hub's protocol constants", () => {
  let fleet: Fleet;
  let script: string;
  let html: string;

  before(async () => {
    fleet = await startFleet({ nodes: [["viewer", "reader"]], csv: false });
    script = await (await fetch(`${fleet.http}/status.js`)).text();
    html = await (await fetch(`${fleet.http}/`)).text();
  });
  after(() => fleet?.stop());

  test("the served script offers STATUS_PROTOCOL and a token subprotocol requestToken() reads", () => {
    const m = /new WebSocket\(url, \[("[^"]*"), ("[^"]*") \+ token\]\)/.exec(script);
    assert.ok(m, "the status script no longer opens its socket as new WebSocket(url, [PROTOCOL, PREFIX + token]): update this test");
    assert.equal(JSON.parse(m[1]), STATUS_PROTOCOL, "the status script's subprotocol is not hub.ts's STATUS_PROTOCOL");
    const token = "AbC-_1234567890abcdefghijklmnopqrstuvwxyzAB";
    const offered = `${JSON.parse(m[1])}, ${JSON.parse(m[2])}${token}`;
    assert.equal(requestToken({ headers: { upgrade: "websocket", "sec-websocket-protocol": offered } }), token, `hub.ts's requestToken() does not read the token the status script offers as ${JSON.parse(m[2])}TOKEN`);
  });

  test("the served script says hello with PROTOCOL_VERSION", () => {
    const m = /type: "hello", v: (\d+), want: "status"/.exec(script);
    assert.ok(m, "the status script's hello frame is not where this test looks: update it");
    assert.equal(Number(m[1]), PROTOCOL_VERSION, "the status script's hello has another protocol version than messages.ts's PROTOCOL_VERSION");
  });

  test("the served script keeps MAX_STATUS_EVENTS events and draws STATUS_RT_WINDOW_MS of response times; the page says so", () => {
    const events = /var MAX_EVENTS = (\d+);/.exec(script);
    const windowMs = /var WINDOW_MS = (\d+);/.exec(script);
    assert.ok(events && windowMs, "the status script has no MAX_EVENTS or WINDOW_MS: update this test");
    assert.equal(Number(events[1]), numericConst("messages.ts", "MAX_STATUS_EVENTS"), "the status script keeps another number of events than messages.ts's MAX_STATUS_EVENTS");
    const rtWindow = numericConst("hub.ts", "STATUS_RT_WINDOW_MS");
    assert.equal(Number(windowMs[1]), rtWindow, "the status script draws another window than hub.ts's STATUS_RT_WINDOW_MS");
    assert.match(html, new RegExp(`up to the last ${rtWindow / 3_600_000} hours`), "the page's text names another window than STATUS_RT_WINDOW_MS");
  });

  test("the login form accepts exactly the tokens the hub reads, and its error message says which", () => {
    const m = /if \(!\/(.*)\/\.test\(token\)\) return showLogin\("([^"]*)"\)/.exec(script);
    assert.ok(m, "the status script's token check is not where this test looks: update it");
    const page = new RegExp(m[1]);
    const candidates = ["", "a".repeat(512), "a".repeat(513), "a b", "web1-token_~.", "x\u00e9"];
    for (let c = 0; c < 128; c++) candidates.push(String.fromCharCode(c), `ab${String.fromCharCode(c)}cd`);
    const disagree = candidates.filter((t) => page.test(t) !== (requestToken({ headers: { authorization: `Bearer ${t}` } }) === t));
    assert.deepEqual(disagree.map((t) => JSON.stringify(t)), [], "the status page and the hub's requestToken() disagree on these tokens");
    const said = /(\d+) to (\d+) printable ASCII characters without spaces/.exec(m[2]);
    assert.ok(said, "the error message does not say what the check accepts");
    const lengths = [Number(said[1]) - 1, Number(said[1]), Number(said[2]), Number(said[2]) + 1].map((n) => page.test("a".repeat(n)));
    assert.deepEqual(lengths, [false, true, true, false], `the error message says ${said[1]} to ${said[2]} characters; the check accepts other lengths`);
  });
});
