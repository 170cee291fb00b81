/**
 * A bounded LRU cache of L2 tables (qcow2 and qcow1), keyed by the table's host offset.
 *
 * Tables are decoded once, at load, from big-endian bytes into native 32-bit words (`words[2i]` is
 * the high half of entry i, `words[2i+1]` the low half; extended L2 entries take 4 words), so a
 * lookup on the hot path is two array reads and no BigInt.
 *
 * Concurrency: many requests may ask for the same table at once; only one read is issued (the
 * others await the same promise). A table in use by a request stays valid after eviction (the
 * request keeps its reference; read-only tables never change).
 *
 * Write path: a writer changes entries with `L2Table.set*`, then calls `markDirty(table)` (which
 * bumps the table's `version`). A write-back encodes a snapshot of the table and hands it to the
 * `writeBack(table, bytes)` callback; the table stays dirty and pinned in the cache until that
 * write has completed, and is only marked clean if it did not change meanwhile. Two write-backs of
 * one table are never in flight together (the later one waits, so the newest bytes land last), and
 * a load of an offset whose write-back is in flight waits for it, so the cache never reloads a
 * stale copy from disk. A writer that must keep a table across awaits `pin`s it (never evicted
 * while pinned). Without a `writeBack` callback the cache refuses to mark tables dirty.
 */
import { DiskError, hex } from '../../errors';
import { entryWords, wordsEntry } from './entry';

/** One decoded L2 table. */
export class L2Table {
  /** Host offset of the table in the image file. */
  readonly offset: number;
  /** Decoded entries: 2 words (hi, lo) per standard entry, 4 per extended entry. */
  readonly words: Uint32Array;
  /** Words per entry (2 standard, 4 extended L2). */
  readonly stride: number;
  /** Set by the write path; a dirty table is written back before eviction. */
  dirty = false;
  /** Bumped by every `L2Cache.markDirty`: a write-back only cleans the version it wrote. */
  version = 0;
  /** Pin count: a pinned table is never evicted (`L2Cache.pin` / `unpin`). */
  pins = 0;
  /** LRU clock value of the last use. */
  tick = 0;

  constructor(offset: number, words: Uint32Array, stride: number) {
    this.offset = offset;
    this.words = words;
    this.stride = stride;
  }

  /** Number of entries. */
  get length(): number {
    return this.words.length / this.stride;
  }

  /** Decodes big-endian table bytes (8 or 16 bytes per entry). */
  static decode(offset: number, bytes: Uint8Array, stride: number): L2Table {
    const n = bytes.length >>> 2;
    const words = new Uint32Array(n);
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < n; i++) words[i] = dv.getUint32(i * 4, false);
    return new L2Table(offset, words, stride);
  }

  /** Encodes the table back to big-endian bytes (for the write path). */
  encode(): Buffer {
    const b = Buffer.allocUnsafe(this.words.length * 4);
    for (let i = 0; i < this.words.length; i++) b.writeUInt32BE(this.words[i] ?? 0, i * 4);
    return b;
  }

  /** The 64-bit descriptor word of entry `i` as a bigint (slow path: messages, write path). */
  entry(i: number): bigint {
    const w = this.words;
    return wordsEntry(w[i * this.stride] ?? 0, w[i * this.stride + 1] ?? 0);
  }

  /** Sets the 64-bit descriptor word of entry `i` (does not mark the table dirty). */
  setEntry(i: number, v: bigint): void {
    [this.words[i * this.stride], this.words[i * this.stride + 1]] = entryWords(v);
  }

  /** Extended L2: the 64-bit subcluster bitmap of entry `i`. */
  bitmap(i: number): bigint {
    if (this.stride !== 4) return 0n;
    const w = this.words;
    return wordsEntry(w[i * 4 + 2] ?? 0, w[i * 4 + 3] ?? 0);
  }

  /** Extended L2: sets the subcluster bitmap of entry `i`. */
  setBitmap(i: number, v: bigint): void {
    if (this.stride !== 4) throw new RangeError('setBitmap on a table without extended L2 entries');
    [this.words[i * 4 + 2], this.words[i * 4 + 3]] = entryWords(v);
  }
}

/** Writes one table snapshot (`bytes`, taken when the write-back started) to the file. */
export type L2WriteBack = (table: L2Table, bytes: Buffer) => Promise<void>;

/** Options of an `L2Cache`. */
export interface L2CacheOptions {
  /** Maximum number of tables kept (>= 1); exceeded only while every table is pinned. */
  readonly capacity: number;
  /** Bytes per table on disk. */
  readonly tableBytes: number;
  /** Words per entry: 2 (standard) or 4 (extended L2). */
  readonly stride?: number;
  /** Reads `buf.length` bytes of the table at `offset`; resolves to the count read. */
  readonly read: (buf: Uint8Array, offset: number) => Promise<number>;
  /** Writes a dirty table back (write path only; eviction and `flush()` use it). */
  readonly writeBack?: L2WriteBack;
}

/**
 * Bounded LRU cache of decoded L2 tables.
 *
 * @example
 *   const cache = new L2Cache({ capacity: 64, tableBytes: 65536, read: (b, o) => file.read(b, o) });
 *   const t = cache.peek(0x40000) ?? (await cache.get(0x40000));
 */
export class L2Cache {
  readonly capacity: number;
  readonly tableBytes: number;
  readonly stride: number;
  readonly #read: L2CacheOptions['read'];
  #writeBack: L2WriteBack | undefined;
  readonly #tables = new Map<number, L2Table>();
  readonly #loading = new Map<number, Promise<L2Table>>();
  /** Write-backs in flight, by table offset (at most one per offset). */
  readonly #writing = new Map<number, Promise<void>>();
  #clock = 0;
  /** Number of table reads issued (for tests and `bench`: proves there is no re-reading). */
  loads = 0;
  hits = 0;

  constructor(opts: L2CacheOptions) {
    if (!Number.isSafeInteger(opts.capacity) || opts.capacity < 1) throw new RangeError(`L2 cache capacity must be a positive integer, got ${opts.capacity}`);
    if (!Number.isSafeInteger(opts.tableBytes) || opts.tableBytes < 8 || opts.tableBytes % 8 !== 0) throw new RangeError(`L2 table size must be a multiple of 8, got ${opts.tableBytes}`);
    this.capacity = opts.capacity;
    this.tableBytes = opts.tableBytes;
    this.stride = opts.stride ?? 2;
    this.#read = opts.read;
    this.#writeBack = opts.writeBack;
  }

  /** Installs the write-back callback (the read-write table does this when it opens the image). */
  setWriteBack(fn: L2WriteBack): void {
    this.#writeBack = fn;
  }

  /** Every cached table (for the write path's flush ordering and for tests). */
  tables(): IterableIterator<L2Table> {
    return this.#tables.values();
  }

  /** Number of tables currently cached. */
  get size(): number {
    return this.#tables.size;
  }

  /** True while a write-back of the table at `offset` is in flight. */
  writing(offset: number): boolean {
    return this.#writing.has(offset);
  }

  /** The cached table at `offset`, or undefined; counts as a use (synchronous fast path). */
  peek(offset: number): L2Table | undefined {
    const t = this.#tables.get(offset);
    if (t) {
      t.tick = ++this.#clock;
      this.hits++;
    }
    return t;
  }

  /** The table at `offset`, loading it (once, however many callers wait) when not cached. */
  get(offset: number): Promise<L2Table> {
    const t = this.peek(offset);
    if (t) return Promise.resolve(t);
    let p = this.#loading.get(offset);
    if (!p) {
      p = this.#load(offset).finally(() => this.#loading.delete(offset));
      this.#loading.set(offset, p);
    }
    return p;
  }

  /**
   * Inserts a table the caller built (write path: a freshly allocated L2 table), evicting if needed.
   */
  async insert(table: L2Table): Promise<void> {
    table.pins++; // not evictable by the room we make for it
    try {
      await this.#makeRoom();
    } finally {
      table.pins--;
    }
    table.tick = ++this.#clock;
    this.#tables.set(table.offset, table);
  }

  /** Keeps a cached table from being evicted until the matching `unpin` (writers across awaits). */
  pin(table: L2Table): void {
    table.pins++;
  }

  /** Releases one `pin`. */
  unpin(table: L2Table): void {
    if (table.pins <= 0) throw new RangeError(`L2 table ${hex(table.offset)} is not pinned`);
    table.pins--;
  }

  /** Marks a cached table dirty (write path). */
  markDirty(table: L2Table): void {
    if (!this.#writeBack) throw new RangeError('L2Cache.markDirty needs a writeBack callback');
    if (this.#tables.get(table.offset) !== table) throw new RangeError(`L2 table ${hex(table.offset)} is not in the cache`);
    table.dirty = true;
    table.version++;
  }

  /**
   * Writes back every dirty table (in offset order) through `write`, or through the `writeBack`
   * callback when omitted (a writer passes a plain table write when it has already ordered the
   * refcounts and data before the whole batch).
   */
  async flush(write?: L2WriteBack): Promise<void> {
    const fn = write ?? this.#writeBack;
    if (!fn) return;
    const dirty = [...this.#tables.values()].filter((t) => t.dirty).sort((a, b) => a.offset - b.offset);
    for (const t of dirty) await this.#write(t, fn);
  }

  /** Drops a table from the cache without writing it (e.g. after the cluster was freed). */
  forget(offset: number): void {
    this.#tables.delete(offset);
  }

  /** Drops every clean, unpinned table that is not being written (dirty ones must be flushed first). */
  clear(): void {
    for (const [off, t] of this.#tables) if (!t.dirty && t.pins === 0 && !this.#writing.has(off)) this.#tables.delete(off);
  }

  /**
   * Writes `t` back if dirty. Waits for an in-flight write-back of the same offset first (so the
   * newest snapshot lands last); the table is marked clean only when the version written is still
   * current, and it stays in the cache (dirty) for the whole write.
   */
  async #write(t: L2Table, fn: L2WriteBack): Promise<void> {
    for (;;) {
      const prev = this.#writing.get(t.offset);
      if (!prev) break;
      await prev.catch(() => undefined);
    }
    if (!t.dirty) return;
    const v = t.version;
    const p = fn(t, t.encode());
    this.#writing.set(t.offset, p);
    try {
      await p;
      if (t.version === v) t.dirty = false;
    } finally {
      this.#writing.delete(t.offset);
    }
  }

  async #load(offset: number): Promise<L2Table> {
    // A write-back of this offset may still be in flight (the table was forgotten or replaced):
    // reading now could return the bytes from before it.
    for (;;) {
      const w = this.#writing.get(offset);
      if (!w) break;
      await w.catch(() => undefined);
    }
    const buf = Buffer.allocUnsafe(this.tableBytes);
    this.loads++;
    const n = await this.#read(buf, offset);
    if (n !== this.tableBytes) {
      throw new DiskError('E_QCOW_CORRUPT', `Cannot read L2 table at ${hex(offset)}: short read (${n} of ${this.tableBytes} bytes, past the end of the file)`, { offset });
    }
    const t = L2Table.decode(offset, buf, this.stride);
    // Another caller may have inserted it meanwhile (write path); keep the cached one.
    const existing = this.#tables.get(offset);
    if (existing) return existing;
    t.pins++;
    try {
      await this.#makeRoom();
    } finally {
      t.pins--;
    }
    const again = this.#tables.get(offset);
    if (again) return again;
    t.tick = ++this.#clock;
    this.#tables.set(offset, t);
    return t;
  }

  /**
   * Evicts least-recently-used tables until one more fits. A dirty victim is written back first
   * and dropped only if it is still clean, unpinned and cached afterwards. Pinned tables and tables
   * being written are skipped; when nothing else is left, waits for a write-back in flight, or
   * (everything pinned) lets the cache exceed its capacity until the pins are released.
   */
  async #makeRoom(): Promise<void> {
    while (this.#tables.size >= this.capacity) {
      let victim: L2Table | undefined;
      for (const t of this.#tables.values()) {
        if (t.pins > 0 || this.#writing.has(t.offset)) continue;
        if (!victim || t.tick < victim.tick) victim = t;
      }
      if (!victim) {
        const inflight = [...this.#writing.values()];
        if (inflight.length === 0) return;
        await Promise.race(inflight.map((p) => p.catch(() => undefined)));
        continue;
      }
      if (victim.dirty) {
        if (!this.#writeBack) throw new RangeError('L2Cache: a dirty table without a writeBack callback');
        await this.#write(victim, this.#writeBack);
      }
      // It may have been used, pinned or re-dirtied while being written; only drop it if not.
      if (!victim.dirty && victim.pins === 0 && !this.#writing.has(victim.offset) && this.#tables.get(victim.offset) === victim) this.#tables.delete(victim.offset);
    }
  }
}
