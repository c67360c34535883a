import type { JobEvent } from "jobwire";

export function show(event: JobEvent): string {
  return event.stat; // rejected: there is no `stat` (it is `state`)
}
