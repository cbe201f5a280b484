/** The scripts stay built from small parts: no function over 150 lines, and the start functions only wire. */

import assert from "node:assert/strict";
import { test } from "node:test";
import { functionSizes } from "./lib/shape.ts";

test("no function or method in hub.ts, agent.ts or ban.ts is longer than 150 lines", () => {
  for (const f of ["hub.ts", "agent.ts", "ban.ts"]) {
    const long = functionSizes(f).filter((s) => s.lines > 150);
    assert.deepEqual(long.map((s) => `${s.file}:${s.line} ${s.name} (${s.lines} lines)`), [], `${f} has functions over 150 lines (npm run shape lists the longest)`);
  }
});

test("startHub and startAgent only wire parts together (at most 60 lines each)", () => {
  for (const [f, name] of [["hub.ts", "startHub"], ["agent.ts", "startAgent"]]) {
    const s = functionSizes(f).find((x) => x.name === name);
    assert.ok(s, `${f} has no function ${name}`);
    assert.ok(s.lines <= 60, `${name} is ${s.lines} lines; it should only wire parts (at most 60)`);
  }
});

test("functionSizes() measures declarations, methods and arrow functions", () => {
  const text = ["function a() {", "  return 1;", "}", "class K {", "  m() {", "    const f = () => {", "      return 2;", "    };", "  }", "}"].join("\n");
  const sizes = functionSizes("x.ts", text);
  assert.deepEqual(sizes.map((s) => [s.name, s.lines]), [["K.m", 5], ["a", 3], ["f", 3]]);
});
