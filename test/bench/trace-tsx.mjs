// Preload for sender.bench.ts, given right after `--import tsx`: records when tsx was registered.
globalThis.__bsTrace && (globalThis.__bsTrace.tsx = performance.now());
