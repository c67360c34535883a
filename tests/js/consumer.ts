// A browser app using the packed `jobwire` through its `exports` and `types`: this must
// compile under `tsc --strict` (tests/test_js_package.py).
import {
  Close,
  JobwireClient,
  Msg,
  Op,
  RETRYABLE_STATUS,
  TERMINAL_CLOSE_CODES,
  backoff,
  notBefore,
  type JobEvent,
  type JobwireErrorInfo,
  type JobwireOptions,
  type StatusChange,
  type StoredResult,
  type Transport,
} from "jobwire";
import type { JobwireProgressElement } from "jobwire/progress";

const shown = new Map<string, JobEvent>();

function render(event: JobEvent): void {
  shown.set(event.job_id, event);
  const percent: number | undefined = event.progress?.percent;
  const line = `${event.job_id} #${event.seq} ${event.state} ${percent ?? "?"}% (epoch ${event.epoch})`;
  if (event.coalesced) console.log(`${line}, ${event.coalesced} progress events skipped`);
  if (event.final && event.state === "FAILURE") console.error(event.error?.type, event.error?.message);
  if (event.retry) console.log(`retry ${event.retry.attempt} in ${event.retry.countdown ?? "?"} s`);
  const result = event.result as StoredResult | undefined;
  if (result?.type === "stored_result") console.log(`download ${result.filename ?? result.key}`);
  if (event.parent) console.log(`child of ${event.parent}`);
  console.log(line, event.ts, event.task);
}

const options: JobwireOptions = {
  baseUrl: "https://jobs.example.com/jobwire",
  token: async () => "a-token",
  transports: ["websocket", "sse"],
  WebSocket,
  EventSource,
  fetch,
  onEvent: render,
  onStatus: ({ status, transport }: StatusChange) => console.log(status, transport),
  onNewJob: (id, info) => {
    if (!info.parent) client.subscribe([id]);
  },
  onAllSync: () => console.log("list the jobs now"),
  onError: (error: JobwireErrorInfo) => {
    if (error.code === "unreachable") console.warn("is the server up?", error.message);
    else console.warn(error.code, error.message, error.job_id);
  },
  onReset: (id) => shown.delete(id),
  pollInterval: 500,
  failuresBeforeFallback: 2,
  upgradeInterval: 0,
};
const client = new JobwireClient(options);
client.subscribe(["4c7f"]);
client.subscribe(["9a1b"], { "9a1b": 3 });
client.subscribeAll();
const seq: number = client.lastSeq("4c7f");
const transport: Transport = client.transport;
if (client.status !== "closed") client.unsubscribe(["9a1b"]);
client.unsubscribeAll();
client.close();
console.log(seq, transport, client.transports.length);

// A page's own client, shared with <jobwire-progress> bars.
const bar: JobwireProgressElement | null = document.querySelector("jobwire-progress");
if (bar) bar.client = client;

// The contract and the helpers.
const op: Op = Op.SUBSCRIBE;
const msg: Msg = Msg.EVENT;
const code: Close = Close.TRY_AGAIN_LATER;
const terminal: boolean = TERMINAL_CLOSE_CODES.has(1006);
const wait: number = notBefore("2", backoff(3, 250, 10000));
console.log(op, msg, code, terminal, wait, RETRYABLE_STATUS.has(429));
