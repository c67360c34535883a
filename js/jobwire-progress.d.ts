// Types for jobwire-progress.js: the <jobwire-progress> element (`import "jobwire/progress"`).

import type { JobEvent, JobwireClient, StoredResult, TokenSource } from "./jobwire.js";

export type { JobEvent, StoredResult, TokenSource };

/** One progress sample: `t` in ms, `percent` from 0 to 100. */
export interface ProgressSample {
  t: number;
  percent: number;
}

/** When an estimate of the time left may be shown. */
export interface EstimateRules {
  minSamples: number;
  minSpanMs: number;
  maxDeviation: number;
  stallFactor: number;
  sampleGapMs: number;
  maxSamples: number;
}

export const ESTIMATE: EstimateRules;

/** Seconds left, or null when the samples show no steady rate at `now` (ms). */
export function estimateRemaining(samples: ProgressSample[], now: number, rules?: EstimateRules): number | null;

/** `samples` with `sample` added (merged into the last when closer than `sampleGapMs`). */
export function addSample(samples: ProgressSample[], sample: ProgressSample, rules?: EstimateRules): ProgressSample[];

/** "about 2 min left (estimate)"; "" for null. */
export function describeRemaining(seconds: number | null): string;

/**
 * `<jobwire-progress job="…" base-url="…" token="…" label="…">`: a live progress bar for
 * one job. Fires `jobwire-progress` for every event and `jobwire-final` for the last.
 */
export class JobwireProgressElement extends HTMLElement {
  static observedAttributes: string[];
  /** The `job` attribute; setting it switches jobs. */
  job: string;
  /** The jobwire server: the `base-url` attribute, else where the module was loaded from. */
  readonly baseUrl: string;
  /** A bearer token or a function that returns one (default: the `token` attribute). */
  token: TokenSource | undefined;
  /** A client of the page's own, shared by the bars it is given (default: one per base URL and token). */
  client: JobwireClient | undefined;
  /** The job's latest state, or null before its first event. */
  readonly state: string | null;
  /** The bar's percent, or null while the progress is indeterminate. */
  readonly percent: number | null;
  /** Seconds left by the estimate, or null while there is no steady rate. */
  readonly remaining: number | null;
}

declare global {
  interface HTMLElementTagNameMap {
    "jobwire-progress": JobwireProgressElement;
  }
  // Events bubble out of the shadow (composed): typed on any element, the document and window.
  interface GlobalEventHandlersEventMap {
    "jobwire-progress": CustomEvent<JobEvent>;
    "jobwire-final": CustomEvent<JobEvent>;
  }
}
