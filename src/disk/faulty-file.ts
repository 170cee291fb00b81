import { DiskError } from '../errors';
import type { ImageFile } from './file';

/**
 * A fault-injecting `ImageFile` for tests: it wraps a real file and can make the Nth write or
 * sync fail with EIO/ENOSPC, or "crash" after the Nth write.
 *
 * Crash model. Up to the crash point, writes reach the wrapped file (immediately, or, with
 * `unsynced: 'lose' | 'random'`, only when a later `sync()` makes them durable). At the crash
 * point the wrapped file keeps what a power cut would leave:
 * - `unsynced: 'keep'` (default, a killed process): every write issued so far;
 * - `unsynced: 'lose'`: only writes that a completed `sync()` covered;
 * - `unsynced: 'random'`: synced writes plus a seeded random subset of the unsynced ones, applied
 *   in issue order (the disk may persist any of them, in any order; overlapping ones are rare in
 *   metadata code, so in-order application of a subset is a fair model).
 * After the crash every write and sync resolves but changes nothing on disk; reads keep seeing
 * what the running code wrote (so it does not trip over its own state), but the wrapped file does
 * not. Reopen the path afterwards to see what survived.
 *
 * Counting: `writes` and `syncs` count calls (1-based numbering for the `*At` options), so a test
 * can first run a workload without faults to learn how many steps it has, then inject at each.
 *
 * @example
 *   const f = new FaultyFile(await NodeImageFile.open(p, { writable: true }), { crashAfterWrite: 17 });
 */
export interface FaultPlan {
  /** The Nth write (1-based) rejects with `errno`. */
  readonly failWriteAt?: number;
  /** The Nth sync (1-based) rejects with `errno`. */
  readonly failSyncAt?: number;
  /** Error to inject (default EIO). */
  readonly errno?: 'EIO' | 'ENOSPC';
  /** After the first injected failure, fail every later write and sync as well (default false: once). */
  readonly sticky?: boolean;
  /** Persist writes 1..N, then drop everything (N = 0 crashes before the first write). */
  readonly crashAfterWrite?: number;
  /** What happens to writes not yet covered by a sync when the crash comes (default 'keep'). */
  readonly unsynced?: 'keep' | 'lose' | 'random';
  /** Seed for `unsynced: 'random'`. */
  readonly seed?: number;
}

interface PendingWrite {
  readonly pos: number;
  readonly data: Uint8Array;
}

/** Deterministic 32-bit PRNG (mulberry32) so a failing crash case can be replayed from its seed. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class FaultyFile implements ImageFile {
  readonly path: string;
  readonly writable: boolean;
  readonly #inner: ImageFile;
  readonly #plan: FaultPlan;
  /** Writes issued but not yet durable (lose/random modes, before the crash). */
  #pending: PendingWrite[] = [];
  /** Writes issued after the crash: visible to reads, never persisted. */
  #ghost: PendingWrite[] = [];
  #writes = 0;
  #syncs = 0;
  #crashed = false;
  #failed = false;
  #injected = 0;

  constructor(inner: ImageFile, plan: FaultPlan = {}) {
    for (const k of ['failWriteAt', 'failSyncAt', 'crashAfterWrite'] as const) {
      const v = plan[k];
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) throw new RangeError(`FaultPlan.${k} must be a non-negative integer, got ${v}`);
    }
    this.#inner = inner;
    this.#plan = plan;
    this.path = inner.path;
    this.writable = inner.writable;
    if (plan.crashAfterWrite === 0) this.#crash();
  }

  /** Number of write calls so far. */
  get writes(): number {
    return this.#writes;
  }

  /** Number of sync calls so far. */
  get syncs(): number {
    return this.#syncs;
  }

  /** True once the crash point has passed. */
  get crashed(): boolean {
    return this.#crashed;
  }

  /** Number of failures injected so far. */
  get injected(): number {
    return this.#injected;
  }

  get #buffering(): boolean {
    return (this.#plan.unsynced ?? 'keep') !== 'keep';
  }

  #fault(op: string): DiskError {
    this.#failed = true;
    this.#injected++;
    const errno = this.#plan.errno ?? 'EIO';
    const text = errno === 'EIO' ? 'i/o error' : 'no space left on device';
    return new DiskError('E_DISK_IO', `Cannot ${op} ${this.path}: ${errno} ${text} (injected)`, { errno, injected: true });
  }

  #crash(): void {
    if (this.#crashed) return;
    this.#crashed = true;
    const mode = this.#plan.unsynced ?? 'keep';
    const keep: PendingWrite[] = [];
    if (mode === 'random') {
      const rnd = mulberry32(this.#plan.seed ?? 1);
      for (const w of this.#pending) if (rnd() < 0.5) keep.push(w);
    }
    // The pending writes stay visible to the running code; the survivors reach the inner file at
    // the next call that can await (nothing the running code does afterwards reaches it).
    this.#ghost = this.#pending;
    this.#pending = [];
    this.#persistLater = keep;
  }

  /** Survivors of a random-mode crash, written to the inner file by the next call that awaits. */
  #persistLater: PendingWrite[] = [];

  async #drainSurvivors(): Promise<void> {
    const list = this.#persistLater;
    this.#persistLater = [];
    for (const w of list) await this.#inner.write(w.data, w.pos);
  }

  async read(buf: Uint8Array, position: number): Promise<number> {
    await this.#drainSurvivors();
    let n = await this.#inner.read(buf, position);
    // Overlay writes the inner file has not seen (pending, then ghost), in issue order.
    for (const list of [this.#pending, this.#ghost]) {
      for (const w of list) {
        const start = Math.max(position, w.pos);
        const end = Math.min(position + buf.length, w.pos + w.data.length);
        if (start >= end) continue;
        if (start - position > n) buf.fill(0, n, start - position); // hole between EOF and this write
        buf.set(w.data.subarray(start - w.pos, end - w.pos), start - position);
        n = Math.max(n, end - position);
      }
    }
    return n;
  }

  async write(buf: Uint8Array, position: number): Promise<void> {
    const nth = ++this.#writes;
    if (this.#crashed) {
      this.#ghost.push({ pos: position, data: Uint8Array.from(buf) });
      return;
    }
    if ((this.#failed && this.#plan.sticky) || nth === this.#plan.failWriteAt) throw this.#fault('write');
    if (this.#buffering) this.#pending.push({ pos: position, data: Uint8Array.from(buf) });
    else await this.#inner.write(buf, position);
    if (nth === this.#plan.crashAfterWrite) this.#crash();
  }

  async sync(): Promise<void> {
    const nth = ++this.#syncs;
    if (this.#crashed) {
      await this.#drainSurvivors();
      return;
    }
    if ((this.#failed && this.#plan.sticky) || nth === this.#plan.failSyncAt) throw this.#fault('sync');
    const list = this.#pending;
    this.#pending = [];
    for (const w of list) await this.#inner.write(w.data, w.pos);
    await this.#inner.sync();
  }

  async size(): Promise<number> {
    await this.#drainSurvivors();
    let s = await this.#inner.size();
    for (const list of [this.#pending, this.#ghost]) for (const w of list) s = Math.max(s, w.pos + w.data.length);
    return s;
  }

  async truncate(length: number): Promise<void> {
    if (this.#crashed) {
      // Model the truncate as a zero-length ghost write past the new end: only growth is visible.
      this.#ghost.push({ pos: length, data: new Uint8Array(0) });
      return;
    }
    if (this.#failed && this.#plan.sticky) throw this.#fault('truncate');
    // A truncate is ordered after everything before it: make pending writes land first.
    const list = this.#pending;
    this.#pending = [];
    for (const w of list) await this.#inner.write(w.data, w.pos);
    await this.#inner.truncate(length);
  }

  async close(): Promise<void> {
    await this.#drainSurvivors();
    if (!this.#crashed && this.#pending.length > 0) {
      // A clean close of a file with unsynced writes: the OS keeps them (page cache).
      const list = this.#pending;
      this.#pending = [];
      for (const w of list) await this.#inner.write(w.data, w.pos);
    }
    await this.#inner.close();
  }
}
