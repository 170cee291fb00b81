/**
 * When a NodeImageFile may do a read or write synchronously on the event loop instead of
 * through libuv's thread pool ("sync-first", like io_uring's inline attempt before punting to a
 * worker).
 *
 * Why: at queue depth 1 the pool round trip (a pool thread woken, the event loop woken again) is
 * most of the request's cost. Measured under the QEMU TCG guest at fio iodepth 1 (4 KiB, page
 * cache): vblk reached 0.75-0.88x qemu-storage-daemon through the pool and 0.90-0.99x with the
 * idle file's request done synchronously, at about 30 % less CPU per request.
 *
 * The risk is blocking the event loop when the kernel blocks (a page-cache miss, dirty-page
 * throttling). So a synchronous attempt is made only when it is cheap to be wrong:
 * - the file has nothing in the pool (an idle file: the latency-bound case);
 * - at most once per event-loop turn (a batch of requests still goes to the pool's threads in
 *   parallel; without this cap a caller keeping many requests in flight would run them one by
 *   one on the loop, since each completes before the next is issued);
 * - only for transfers up to `maxBytes` (copying more would hold the loop up);
 * - and after a slow call (over `slowNs`, taken as "the kernel blocked") the next 2^k chances
 *   are skipped, k growing with each slow call (up to 2^12) and shrinking with each fast one,
 *   so on a cold cache at most one request in thousands blocks the loop.
 */

/** Clock in nanoseconds; injectable for tests. */
export type NsClock = () => bigint;

export interface SyncFirstOptions {
  /** A synchronous call slower than this counts as blocking. Default 200 µs. */
  readonly slowNs?: number;
  /** Larger transfers always use the pool. Default 64 KiB. */
  readonly maxBytes?: number;
  /** Schedules the end-of-turn reset; default setImmediate. */
  readonly nextTurn?: (fn: () => void) => void;
}

const MAX_BACKOFF_SHIFT = 12;

export class SyncFirstPolicy {
  readonly slowNs: number;
  readonly maxBytes: number;
  readonly #nextTurn: (fn: () => void) => void;
  #usedThisTurn = false;
  #slowShift = 0;
  #skip = 0;
  /** Synchronous calls made, and how many of them were slow (for tests and diagnostics). */
  syncCalls = 0;
  slowCalls = 0;
  readonly #newTurn = (): void => {
    this.#usedThisTurn = false;
  };

  constructor(opts: SyncFirstOptions = {}) {
    this.slowNs = opts.slowNs ?? 200_000;
    this.maxBytes = opts.maxBytes ?? 64 * 1024;
    this.#nextTurn = opts.nextTurn ?? setImmediate;
  }

  /** May a transfer of `bytes` go synchronously, given `inPool` requests in the pool? */
  shouldTry(bytes: number, inPool: number): boolean {
    if (inPool !== 0 || bytes > this.maxBytes || this.#usedThisTurn) return false;
    if (this.#skip > 0) {
      this.#skip--;
      return false;
    }
    this.#usedThisTurn = true;
    this.#nextTurn(this.#newTurn);
    return true;
  }

  /** Records how long a synchronous call took. */
  record(elapsedNs: number): void {
    this.syncCalls++;
    if (elapsedNs > this.slowNs) {
      this.slowCalls++;
      this.#slowShift = Math.min(this.#slowShift + 1, MAX_BACKOFF_SHIFT);
      this.#skip = (1 << this.#slowShift) - 1;
    } else if (this.#slowShift > 0) {
      this.#slowShift--;
    }
  }
}
