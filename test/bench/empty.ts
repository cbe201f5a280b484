// Empty script: the start-up floor for `node --import tsx SCRIPT`, compared with ban.ts in sender.bench.ts.
export {};
