import { JobwireClient } from "jobwire";

const client = new JobwireClient({ baseUrl: "http://127.0.0.1:8000" });
client.subscribe(42); // rejected: job ids are an array of strings
