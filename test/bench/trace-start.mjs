// Preload for sender.bench.ts, given first (`node --import ./test/bench/trace-start.mjs --import tsx
// --import ./test/bench/trace-tsx.mjs ban.ts ...`): records, without touching ban.ts, when node
// finished booting, when the first socket connect was started and done, each socket write and
// read, and the exit; prints them as one JSON line on stderr at exit (ms since process start).
import Module from "node:module";
import net from "node:net";

const marks = { boot: performance.now(), timeOrigin: performance.timeOrigin, writes: [], reads: [], wsLoad: 0 };
globalThis.__bsTrace = marks;
// ws is CommonJS (its ESM wrapper requires lib/*.js): time spent in the outermost loads of its files.
const load = Module._load;
let depth = 0;
Module._load = function (request, ...rest) {
  const t = performance.now();
  depth++;
  try {
    return load.call(this, request, ...rest);
  } finally {
    depth--;
    if (depth === 0 && /node_modules[\\/]ws[\\/]/.test(String(request))) marks.wsLoad += performance.now() - t;
  }
};
let traced;
const connect = net.Socket.prototype.connect;
// Every write reaches the kernel through _writeGeneric (after connect, buffered ones too).
const writeGeneric = net.Socket.prototype._writeGeneric;
net.Socket.prototype._writeGeneric = function (...args) {
  if (this === traced) marks.writes.push(performance.now());
  return writeGeneric.apply(this, args);
};
net.Socket.prototype.connect = function (...args) {
  // tsx connects to its own IPC socket while registering: count the first connect after that.
  if (marks.connectCall === undefined && marks.tsx !== undefined) {
    marks.connectCall = performance.now();
    this.once("connect", () => (marks.connected = performance.now()));
    traced = this;
    this.on("data", () => marks.reads.push(performance.now()));
  }
  return connect.apply(this, args);
};
process.on("exit", () => {
  marks.exit = performance.now();
  process.stderr.write(`BSTRACE ${JSON.stringify(marks)}\n`);
});
