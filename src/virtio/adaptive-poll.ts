/**
 * Whether a queue should poll its avail ring for a while after it went empty, instead of
 * re-enabling the driver's kicks and sleeping; and for how long.
 *
 * Why: under a slow guest (QEMU TCG) a kick is expensive for the guest. The notify write leaves
 * the translated code, takes QEMU's big lock for the memory dispatch and ends in an eventfd
 * write. While the device polls, the kick stays suppressed (EVENT_IDX avail_event left behind,
 * or NO_NOTIFY), so the driver adds requests without kicking. Measured with fio in the Linux test
 * guest, 4 KiB random reads at iodepth 32 (docs/vhost-user.md): 6.5k IOPS without polling,
 * 10.3k with a 64 µs window. With polling, half the requests came 38-50 µs after the ring went
 * empty (the guest's turnaround); without it, almost all came 100-200 µs later.
 *
 * The cost: a window that catches nothing burns the back-end's core, and at queue depth 1 (a
 * request every ~200 µs under TCG) every window misses. With a fixed 100 µs window that guest
 * lost 10-14 % at iodepth 1, the back-end's core being the one that injects interrupts. And the
 * window must fit the guest: 40 µs caught almost nothing in that guest, 64 µs did best, 80 µs
 * and more cost again.
 *
 * The policy:
 * - **On or off by hit rate.** While polling, an exponential average of "the next request came
 *   within the window" is kept. Below `MIN_HIT_RATE`, polling stops.
 * - **Probes.** While off, the policy polls again now and then to see whether the workload
 *   changed (a kick-driven guest looks slower than a polled one, so the gaps seen without
 *   polling cannot tell). Each failed probe doubles the wait before the next one (from
 *   `PROBE_FIRST_NS` up to `PROBE_MAX_NS`); a hit rate above one half resets it.
 * - **Window size.** Twice the moving mean of the gaps the window caught, between `minNs` and
 *   `maxNs`; a probe starts at `maxNs`. Misses do not count, so when the gaps have two modes the
 *   window settles on the shorter one. (At 1.5x the mean the window could shrink below the upper
 *   part of the mode, catch only its shorter gaps, shrink further, and polling died every few
 *   thousand requests until the next probe. Mean plus 4 mean deviations, as TCP sizes its
 *   retransmission timeout, did the same in this guest.) That is what the TCG guest wanted at
 *   iodepth 32: its gaps were ~40 µs (a request it made without kicking) or ~150 µs, and a
 *   64 µs window did better than 200 µs, which caught both (10.3k against 8.6k IOPS; the long
 *   window drew more interrupts per request). At iodepth 1 the only mode is ~170 µs, and a
 *   window that covers it gained 7-17 %.
 */

/** Clock in nanoseconds (a float); injectable for tests. */
export type PollClock = () => number;

export interface AdaptivePollOptions {
  /** Longest window in nanoseconds; 0 turns polling off. */
  readonly maxNs: number;
  /** Shortest window. Default 4 µs (QEMU's first poll step), or `maxNs` if smaller. */
  readonly minNs?: number;
  /** Default: performance.now() in nanoseconds. */
  readonly clock?: PollClock;
}

/** Polling stops when fewer than this share of recent windows caught a request. */
export const MIN_HIT_RATE = 0.1;
/**
 * Wait before the first probe, and the cap of the doubling wait between failed probes, in
 * nanoseconds. The cap bounds how long a workload that would gain from polling goes without it
 * (a second); the doubling bounds what probing costs one that never gains (a probe polls about
 * 35 idle periods).
 */
export const PROBE_FIRST_NS = 10e6;
export const PROBE_MAX_NS = 1e9;
/** Weight of the newest sample in the hit rate and in the short-gap average. */
const HIT_ALPHA = 1 / 32;
const GAP_ALPHA = 1 / 8;
/** The window is this many times the mean caught gap. */
const WINDOW_PER_GAP = 2;
/** A probe starts from this hit rate: 35 straight misses end it. */
const PROBE_START_RATE = 0.3;

const defaultClock: PollClock = () => performance.now() * 1e6;

export class AdaptivePoll {
  readonly maxNs: number;
  readonly minNs: number;
  readonly #clock: PollClock;
  /** Polling is on (the policy polls at the next idle period). */
  #on = false;
  /** Current window while on, in nanoseconds. */
  #windowNs: number;
  #hitRate = PROBE_START_RATE;
  /** Mean of the caught gaps (NaN: none since the probe began). */
  #hitGapNs = Number.NaN;
  /** When the next probe may start, and the wait that follows a failed one. */
  #probeAt: number;
  #probeWaitNs = PROBE_FIRST_NS;
  /** When the ring last went empty (NaN while requests are arriving), and the window then. */
  #idleSince = Number.NaN;
  #idleWindowNs = 0;
  /** Counters for logs and tests. */
  hits = 0;
  misses = 0;
  probes = 0;

  constructor(opts: AdaptivePollOptions) {
    if (!Number.isFinite(opts.maxNs) || opts.maxNs < 0) throw new RangeError(`Cannot poll: window ${opts.maxNs} ns is not a non-negative number`);
    this.maxNs = opts.maxNs;
    this.minNs = Math.min(opts.minNs ?? 4000, opts.maxNs);
    this.#clock = opts.clock ?? defaultClock;
    this.#windowNs = this.maxNs;
    this.#probeAt = this.#clock() + PROBE_FIRST_NS;
  }

  /** Polling is currently on. */
  get polling(): boolean {
    return this.#on;
  }

  /** The window the next idle period would poll for (0 when off). */
  get windowNs(): number {
    return this.#on ? this.#windowNs : 0;
  }

  /** The ring went empty. Returns true when the caller should poll (then `open()` says until when). */
  idle(): boolean {
    if (this.maxNs === 0) return false;
    const now = this.#clock();
    if (!this.#on && now >= this.#probeAt) {
      this.#on = true;
      this.#hitRate = PROBE_START_RATE;
      this.#windowNs = this.maxNs;
      this.#hitGapNs = Number.NaN; // the workload may have changed: learn its gaps afresh
      this.probes++;
    }
    this.#idleSince = now;
    this.#idleWindowNs = this.#on ? this.#windowNs : 0;
    return this.#on;
  }

  /** Is the window that `idle` opened still open? */
  open(): boolean {
    return !Number.isNaN(this.#idleSince) && this.#clock() - this.#idleSince < this.#idleWindowNs;
  }

  /** Forgets the idle period `idle` opened, learning nothing from it (the device was not idle). */
  cancel(): void {
    this.#idleSince = Number.NaN;
  }

  /** Requests arrived (found by polling or by a kick): learns from the gap since `idle`. */
  arrived(): void {
    if (Number.isNaN(this.#idleSince)) return;
    const gap = this.#clock() - this.#idleSince;
    const polled = this.#idleWindowNs > 0;
    const hit = polled && gap <= this.#idleWindowNs;
    this.#idleSince = Number.NaN;
    if (!polled || !this.#on) return;
    if (hit) {
      this.hits++;
      // Only caught gaps move the window: it settles on the shortest mode of the gaps (see above).
      this.#hitGapNs = Number.isNaN(this.#hitGapNs) ? gap : this.#hitGapNs + (gap - this.#hitGapNs) * GAP_ALPHA;
      this.#windowNs = Math.min(this.maxNs, Math.max(this.minNs, WINDOW_PER_GAP * this.#hitGapNs));
    } else {
      this.misses++;
    }
    this.#hitRate += ((hit ? 1 : 0) - this.#hitRate) * HIT_ALPHA;
    if (this.#hitRate < MIN_HIT_RATE) {
      this.#on = false;
      this.#probeAt = this.#clock() + this.#probeWaitNs;
      this.#probeWaitNs = Math.min(this.#probeWaitNs * 2, PROBE_MAX_NS);
    } else if (this.#hitRate > 0.5) {
      this.#probeWaitNs = PROBE_FIRST_NS; // polling pays: a later failure starts the backoff afresh
    }
  }
}
