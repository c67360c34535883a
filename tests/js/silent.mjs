// A client closed while its connection hangs on a server that accepts and never answers
// (tests/test_js_package.py): close() must abort the poll in flight, or drop the websocket
// still opening, so that the process exits by itself. Prints one JSON line.
//
//   node silent.mjs <baseUrl> poll    # close() while a fetch waits for its answer
//   node silent.mjs <baseUrl> ws      # close() while a websocket waits for its handshake
import { JobwireClient } from "jobwire";
import { WebSocket } from "ws";

const [baseUrl, mode] = process.argv.slice(2);
let closedAt = null;
const closeSoon = () =>
  setImmediate(() => {
    client.close();
    closedAt = performance.now();
  });

class OpeningWebSocket extends WebSocket {
  constructor(url) {
    super(url);
    closeSoon(); // the handshake is under way, and will never finish
  }
}

const client = new JobwireClient({
  baseUrl,
  transports: mode === "ws" ? ["websocket"] : ["polling"],
  WebSocket: OpeningWebSocket,
  fetch: (url, init) => {
    const answer = fetch(url, init); // sent, never answered
    closeSoon();
    return answer;
  },
});
client.subscribe(["job-on-a-silent-server"]);
process.on("exit", () => {
  const lingered = closedAt === null ? null : performance.now() - closedAt;
  process.stdout.write(`${JSON.stringify({ lingered, status: client.status })}\n`);
});
