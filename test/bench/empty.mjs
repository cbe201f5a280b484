// Start-up probe for sender.bench.ts: a plain-JS entry under --import tsx (tsx registered, nothing to transform).
