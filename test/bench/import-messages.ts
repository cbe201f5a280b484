// Start-up probe for sender.bench.ts: loads only messages.ts, as ban.ts does.
import { PROTOCOL_VERSION } from "../../messages.ts";
void PROTOCOL_VERSION;
