// Watches one job to its end with the packed `jobwire` package, from Node, then closes the
// client and must exit by itself (tests/test_js_package.py): a timer or a socket left behind
// would keep the process running. Prints one JSON line per event, status and error.
//
//   node watch.mjs <baseUrl> <jobId> ws      # `ws`'s WebSocket injected
//   node watch.mjs <baseUrl> <jobId> bare    # no WebSocket, no EventSource: polls with fetch
//
// The last line says how long the process lingered after close(): a timer left armed (the
// heartbeat watchdog, the climb back to WebSocket) would show there.
import { JobwireClient } from "jobwire";

const [baseUrl, jobId, mode] = process.argv.slice(2);
const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
let closedAt = null;

const options = {
  baseUrl,
  onEvent: (event) => {
    print({ event, transport: client.transport });
    if (event.final) {
      client.close();
      closedAt = performance.now();
    }
  },
  onStatus: (change) => print({ status: change }),
  onError: (error) => print({ error }),
};
if (mode === "ws") {
  options.WebSocket = (await import("ws")).WebSocket;
} else {
  // Node 22 and later have a global WebSocket; this run is about a runtime without one.
  delete globalThis.WebSocket;
  delete globalThis.EventSource;
}
const client = new JobwireClient(options);
print({ transports: client.transports });
client.subscribe([jobId]);
process.on("exit", () => print({ lingered: closedAt === null ? null : performance.now() - closedAt }));
