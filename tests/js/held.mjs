// A client whose websocket a server accepts and never answers (tests/test_js_package.py):
// without a connect timeout it would say "connecting" forever. Each handshake counts as a
// failed open after `connectTimeout` ms, so onError says `unreachable` once the transport
// has failed `failuresBeforeFallback` times; then the client is closed and the process must
// exit by itself. Prints one JSON line.
import { JobwireClient } from "jobwire";
import { WebSocket } from "ws";

const [baseUrl] = process.argv.slice(2);
const errors = [];
const statuses = [];
let closedAt = null;
const client = new JobwireClient({
  baseUrl,
  WebSocket,
  transports: ["websocket"],
  connectTimeout: 200,
  failuresBeforeFallback: 2,
  onError: (error) => {
    errors.push(error);
    setImmediate(() => {
      client.close();
      closedAt = performance.now();
    });
  },
  onStatus: ({ status }) => statuses.push(status),
});
client.subscribe(["job-behind-a-silent-proxy"]);
process.on("exit", () => {
  const lingered = closedAt === null ? null : performance.now() - closedAt;
  process.stdout.write(`${JSON.stringify({ errors, statuses, lingered })}\n`);
});
