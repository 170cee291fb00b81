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
 * Write path (H3): a writer changes entries with `L2Table.set*`, then calls `markDirty(table)`.
 * Before a dirty table is evicted, the cache calls `writeBack(table)` and keeps the table until it
 * has been written; `flush()` writes back every dirty table. Without a `writeBack` callback the
 * cache refuses to mark tables dirty.
 */
import { DiskError, hex } from '../../errors';

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
    return (BigInt(w[i * this.stride] ?? 0) << 32n) | BigInt(w[i * this.stride + 1] ?? 0);
  }

  /** Sets the 64-bit descriptor word of entry `i` (does not mark the table dirty). */
  setEntry(i: number, v: bigint): void {
    this.words[i * this.stride] = Number((v >> 32n) & 0xffffffffn);
    this.words[i * this.stride + 1] = Number(v & 0xffffffffn);
  }

  /** Extended L2: the 64-bit subcluster bitmap of entry `i`. */
  bitmap(i: number): bigint {
    if (this.stride !== 4) return 0n;
    const w = this.words;
    return (BigInt(w[i * 4 + 2] ?? 0) << 32n) | BigInt(w[i * 4 + 3] ?? 0);
  }

  /** Extended L2: sets the subcluster bitmap of entry `i`. */
  setBitmap(i: number, v: bigint): void {
    if (this.stride !== 4) throw new RangeError('setBitmap on a table without extended L2 entries');
    this.words[i * 4 + 2] = Number((v >> 32n) & 0xffffffffn);
    this.words[i * 4 + 3] = Number(v & 0xffffffffn);
  }
}

/** Options of an `L2Cache`. */
export interface L2CacheOptions {
  /** Maximum number of tables kept (>= 1). */
  readonly capacity: number;
  /** Bytes per table on disk. */
  readonly tableBytes: number;
  /** Words per entry: 2 (standard) or 4 (extended L2). */
  readonly stride?: number;
  /** Reads `buf.length` bytes of the table at `offset`; resolves to the count read. */
  readonly read: (buf: Uint8Array, offset: number) => Promise<number>;
  /** Writes a dirty table back (write path only). */
  readonly writeBack?: (table: L2Table) => Promise<void>;
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
  #writeBack: L2CacheOptions['writeBack'];
  readonly #tables = new Map<number, L2Table>();
  readonly #loading = new Map<number, Promise<L2Table>>();
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
  setWriteBack(fn: (table: L2Table) => Promise<void>): void {
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
    await this.#makeRoom();
    table.tick = ++this.#clock;
    this.#tables.set(table.offset, table);
  }

  /** Marks a cached table dirty (write path). */
  markDirty(table: L2Table): void {
    if (!this.#writeBack) throw new RangeError('L2Cache.markDirty needs a writeBack callback');
    if (this.#tables.get(table.offset) !== table) throw new RangeError(`L2 table ${hex(table.offset)} is not in the cache`);
    table.dirty = true;
  }

  /** Writes back every dirty table (in offset order). */
  async flush(): Promise<void> {
    const dirty = [...this.#tables.values()].filter((t) => t.dirty).sort((a, b) => a.offset - b.offset);
    for (const t of dirty) await this.#write(t);
  }

  /** Drops a table from the cache without writing it (e.g. after the cluster was freed). */
  forget(offset: number): void {
    this.#tables.delete(offset);
  }

  /** Drops every clean table (dirty ones must be flushed first). */
  clear(): void {
    for (const [off, t] of this.#tables) if (!t.dirty) this.#tables.delete(off);
  }

  async #write(t: L2Table): Promise<void> {
    if (!this.#writeBack) return;
    t.dirty = false;
    try {
      await this.#writeBack(t);
    } catch (e) {
      t.dirty = true;
      throw e;
    }
  }

  async #load(offset: number): Promise<L2Table> {
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
    await this.#makeRoom();
    t.tick = ++this.#clock;
    this.#tables.set(offset, t);
    return t;
  }

  async #makeRoom(): Promise<void> {
    while (this.#tables.size >= this.capacity) {
      let victim: L2Table | undefined;
      for (const t of this.#tables.values()) if (!victim || t.tick < victim.tick) victim = t;
      if (!victim) return;
      if (victim.dirty) await this.#write(victim);
      // It may have been used or re-dirtied while being written; only drop it if still clean.
      if (!victim.dirty && this.#tables.get(victim.offset) === victim) this.#tables.delete(victim.offset);
    }
  }
}
