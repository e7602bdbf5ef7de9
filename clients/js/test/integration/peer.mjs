// A Node peer for the integration tests (tests/e2e/test_js_client.py): it iterates
// TyrumClient.events() against a real edge and prints one JSON line per item, status change
// and error. The token comes from the environment (TYRUM_TOKEN), never from argv.
// Usage: node --experimental-websocket peer.mjs <ws url>
import { Resync, TyrumClient } from "../../src/index.js";

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const client = new TyrumClient(process.argv[2], {
  token: process.env.TYRUM_TOKEN,
  backoffInitial: 0.2,
  backoffMax: 1,
  onStatus: (status) => out({ status }),
});
process.on("SIGTERM", () => client.close());
try {
  for await (const item of client.events()) {
    if (item instanceof Resync) out({ resync: { stream: item.stream, reason: item.reason } });
    else out({ event: item, state: client.state() });
  }
  out({ end: true, reconnects: client.reconnects, duplicates: client.duplicates });
} catch (error) {
  out({ error: error.name, message: error.message, code: error.code });
  process.exitCode = 3;
}
