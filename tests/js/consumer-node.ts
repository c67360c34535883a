// A Node program using the packed `jobwire` under Node's own resolution (nodenext) and
// without the DOM's types, with `ws`'s WebSocket: this must compile under `tsc --strict`.
import { JobwireClient, type JobEvent } from "jobwire";
import { WebSocket } from "ws";

const client = new JobwireClient({
  baseUrl: "http://127.0.0.1:8000",
  WebSocket,
  onEvent: (event: JobEvent) => {
    console.log(event.seq, event.state, event.progress?.description);
    if (event.final) client.close();
  },
});
client.subscribe([process.argv[2] ?? "4c7f"]);
