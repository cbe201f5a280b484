// Start-up probe for sender.bench.ts: loads only ws, as ban.ts does.
import WebSocket from "ws";
void WebSocket;
