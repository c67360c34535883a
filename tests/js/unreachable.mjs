// A client pointed at a port nothing listens on (tests/test_js_package.py): every transport
// fails, so onError must say `unreachable` once while the client keeps trying; after two
// more failed polls, with the next one's backoff timer armed, it is closed, and the process
// must exit by itself at once. Prints one JSON line.
import { JobwireClient } from "jobwire";
import { WebSocket } from "ws";

const [baseUrl] = process.argv.slice(2);
const errors = [];
const statuses = [];
let polls = 0;
let failed = 0;
let toldAt = null;
let closedAt = null;

const client = new JobwireClient({
  baseUrl,
  WebSocket,
  failuresBeforeFallback: 2,
  pollInterval: 50,
  fetch: (url, init) => {
    polls += 1;
    return fetch(url, init).catch((error) => {
      failed += 1;
      if (toldAt !== null && failed === toldAt + 2) {
        setImmediate(() => {
          client.close(); // the client has armed its next try by now
          closedAt = performance.now();
        });
      }
      throw error;
    });
  },
  onError: (error) => {
    errors.push(error);
    if (error.code === "unreachable") toldAt = failed;
  },
  onStatus: ({ status, transport }) => statuses.push([status, transport]),
});
client.subscribe(["never-there"]);
process.on("exit", () => {
  const lingered = closedAt === null ? null : performance.now() - closedAt;
  process.stdout.write(`${JSON.stringify({ errors, polls, failed, toldAt, statuses, lingered })}\n`);
});
