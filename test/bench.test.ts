/** The benchmark runner's command line: only a full run of every benchmark replaces BENCHMARKS.md. */

import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { parseArgs } from "./bench/run.ts";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

test("bench parseArgs() writes BENCHMARKS.md only for a full run of every benchmark", () => {
  assert.equal(parseArgs([]).out, join(ROOT, "BENCHMARKS.md"));
  assert.equal(parseArgs(["--quick"]).out, join(tmpdir(), "bench-quick.md"));
  assert.equal(parseArgs(["--quick", "relay", "burst", "resync"]).out, join(tmpdir(), "bench-quick.md"));
  assert.equal(parseArgs(["relay"]).out, join(tmpdir(), "bench-partial.md"));
  assert.equal(parseArgs(["--quick", "--out", "/tmp/x.md"]).out, "/tmp/x.md");
  assert.deepEqual(parseArgs(["relay.bench.ts"]).names, ["relay"]);
  assert.notEqual(basename(parseArgs(["--quick"]).out), "BENCHMARKS.md");
});

test("bench parseArgs() refuses an unknown flag and a bare --out", () => {
  assert.throws(() => parseArgs(["--fast"]), /Expected --quick, --out FILE or benchmark names, got --fast/);
  assert.throws(() => parseArgs(["--out"]), /Expected a file name after --out/);
});
