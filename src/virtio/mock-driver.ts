import type { GuestMemory } from '../memory/guest-memory';
import type { QueueStart, VirtioDevice } from './device';
import { VIRTIO_F } from './device';
import { VIRTQ_DESC_F } from './chain';
import { needsEvent, splitRingSizes, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY } from './queue';
import { BLK_HEADER_SIZE, VIRTIO_BLK_T } from './blk-config';

/**
 * A simulated virtio driver (the guest side of a split virtqueue), in the spirit of rust-vmm
 * virtio-queue's `MockSplitQueue`: it lays out the rings in a GuestMemory, builds descriptor
 * chains (direct or indirect, with any split of the bytes across descriptors), makes them
 * available, kicks the device, and reaps used entries. It also writes raw descriptors and ring
 * indices so tests can craft malformed chains and corrupt rings.
 *
 * Product code: a VMM author can drive their own `VirtioDevice` with it. All state is per
 * instance.
 */

/** One buffer of a chain: `len` bytes at guest `addr`, device-writable or not. */
export interface MockBuffer {
  readonly addr: number;
  readonly len: number;
  readonly writable: boolean;
}

/** A raw descriptor, as written into a table (for malformed chains). */
export interface RawDescriptor {
  readonly addr: bigint | number;
  readonly len: number;
  readonly flags: number;
  readonly next: number;
}

/** A used ring entry. */
export interface UsedEntry {
  readonly id: number;
  readonly len: number;
}

/** A bump allocator over a guest memory range (reset it between batches). */
export class GuestAllocator {
  readonly start: number;
  readonly end: number;
  #next: number;

  constructor(start: number, size: number) {
    this.start = start;
    this.end = start + size;
    this.#next = start;
  }

  /** Allocates `len` bytes aligned to `align`; throws RangeError when the area is exhausted. */
  alloc(len: number, align = 16): number {
    const a = Math.ceil(this.#next / align) * align;
    if (a + len > this.end) throw new RangeError(`Cannot allocate ${len} bytes of mock guest memory: area exhausted`);
    this.#next = a + Math.max(len, 1);
    return a;
  }

  /** Frees everything. */
  reset(): void {
    this.#next = this.start;
  }

  get used(): number {
    return this.#next - this.start;
  }
}

/** The driver side of one split virtqueue. */
export class MockVirtqueue {
  readonly memory: GuestMemory;
  readonly size: number;
  readonly descTable: number;
  readonly availRing: number;
  readonly usedRing: number;
  /** Interrupts (signalUsed calls) received. */
  interrupts = 0;
  #availIdx = 0;
  /** Avail idx at the last `kickPrepare` (what the device has been told about). */
  #kickedIdx = 0;
  #lastUsed = 0;
  readonly #free: number[] = [];
  /** Descriptors owned by each in-flight head (freed when reaped). */
  readonly #owned = new Map<number, number[]>();
  readonly #waiters: (() => void)[] = [];
  /** Zero-copy views of the avail and used rings (the driver's hot path avoids address lookups). */
  readonly #avail: Buffer;
  readonly #used: Buffer;
  readonly #mask: number;

  /**
   * @param base guest address where the rings are laid out (16-byte aligned); they take
   *   `MockVirtqueue.footprint(size)` bytes.
   */
  constructor(memory: GuestMemory, size: number, base: number) {
    if (size < 1 || (size & (size - 1)) !== 0) throw new RangeError(`Cannot create mock virtqueue: size ${size} is not a power of two`);
    const s = splitRingSizes(size);
    this.memory = memory;
    this.size = size;
    this.descTable = base;
    this.availRing = base + s.desc;
    this.usedRing = Math.ceil((this.availRing + s.avail) / 4096) * 4096;
    memory.slice(this.descTable, s.desc).fill(0);
    this.#avail = memory.slice(this.availRing, s.avail).fill(0);
    this.#used = memory.slice(this.usedRing, s.used).fill(0);
    this.#mask = size - 1;
    for (let i = size - 1; i >= 0; i--) this.#free.push(i);
  }

  /** Bytes of guest memory the rings of a queue of `size` entries occupy from `base`. */
  static footprint(size: number): number {
    const s = splitRingSizes(size);
    return Math.ceil((s.desc + s.avail) / 4096) * 4096 + s.used;
  }

  /** The QueueStart to hand to `device.startQueue`. */
  queueStart(): QueueStart {
    return {
      memory: this.memory,
      size: this.size,
      descTable: this.descTable,
      availRing: this.availRing,
      usedRing: this.usedRing,
      signalUsed: (): void => {
        this.interrupts++;
        for (const w of this.#waiters.splice(0)) w();
      },
    };
  }

  /** Free descriptors left. */
  get freeDescriptors(): number {
    return this.#free.length;
  }

  /** The driver's avail idx (shadow of what was published). */
  get availIdx(): number {
    return this.#availIdx;
  }

  /** Index of the next used entry the driver will read. */
  get lastUsed(): number {
    return this.#lastUsed;
  }

  /** Writes one raw descriptor (any values, for malformed chains). */
  writeDescriptor(index: number, d: RawDescriptor, table = this.descTable): void {
    const off = table + 16 * index;
    this.memory.writeU64(off, BigInt(d.addr));
    this.memory.writeU32(off + 8, d.len >>> 0);
    this.memory.writeU16(off + 12, d.flags);
    this.memory.writeU16(off + 14, d.next);
  }

  /** Takes `n` descriptors off the free list (for raw chains). */
  allocDescriptors(n: number): number[] {
    if (n > this.#free.length) throw new RangeError(`Cannot allocate ${n} descriptors: ${this.#free.length} free`);
    return this.#free.splice(this.#free.length - n, n).reverse();
  }

  /** Marks raw descriptors as owned by `head` so `reap` frees them. */
  own(head: number, descs: number[]): void {
    this.#owned.set(head, descs);
  }

  /**
   * Builds a chain over `bufs` (readable ones must come first for a valid chain) and returns its
   * head. With `indirect`, the buffers go into an indirect table at guest address `indirect.table`
   * (16-byte aligned, 16 bytes per buffer) and the ring holds a single INDIRECT descriptor.
   * Does not publish: call `publish(head)`.
   */
  buildChain(bufs: readonly MockBuffer[], opts: { indirect?: { table: number } } = {}): number {
    if (bufs.length === 0) throw new RangeError('Cannot build an empty chain');
    if (opts.indirect) {
      const t = opts.indirect.table;
      bufs.forEach((b, i) => {
        const last = i === bufs.length - 1;
        this.writeDescriptor(i, { addr: b.addr, len: b.len, flags: (b.writable ? VIRTQ_DESC_F.WRITE : 0) | (last ? 0 : VIRTQ_DESC_F.NEXT), next: last ? 0 : i + 1 }, t);
      });
      const [head] = this.allocDescriptors(1) as [number];
      this.writeDescriptor(head, { addr: t, len: 16 * bufs.length, flags: VIRTQ_DESC_F.INDIRECT, next: 0 });
      this.#owned.set(head, [head]);
      return head;
    }
    const descs = this.allocDescriptors(bufs.length);
    bufs.forEach((b, i) => {
      const last = i === bufs.length - 1;
      const idx = descs[i] as number;
      this.writeDescriptor(idx, {
        addr: b.addr,
        len: b.len,
        flags: (b.writable ? VIRTQ_DESC_F.WRITE : 0) | (last ? 0 : VIRTQ_DESC_F.NEXT),
        next: last ? 0 : (descs[i + 1] as number),
      });
    });
    const head = descs[0] as number;
    this.#owned.set(head, descs);
    return head;
  }

  /** Puts `head` in the next avail ring slot and bumps avail idx. */
  publish(head: number): void {
    this.pushAvail(head);
    this.setAvailIdx(this.#availIdx + 1);
  }

  /** Writes `head` into the avail ring slot for the current avail idx, without bumping idx. */
  pushAvail(head: number, slotOffset = 0): void {
    this.#avail.writeUInt16LE(head & 0xffff, 4 + 2 * ((this.#availIdx + slotOffset) & this.#mask));
  }

  /** Sets avail idx (any u16: tests use it to corrupt the ring). */
  setAvailIdx(idx: number): void {
    this.#availIdx = idx & 0xffff;
    this.#avail.writeUInt16LE(this.#availIdx, 2);
  }

  /**
   * Whether the device asked to be kicked for the entries published since the last call, as
   * Linux's `virtqueue_kick_prepare` decides it: with EVENT_IDX, iff avail idx passed the
   * device's avail_event; else iff the device did not set VIRTQ_USED_F_NO_NOTIFY. A driver
   * that kicks only then finds out whether the device publishes its kick suppression correctly
   * (a device that forgets to re-enable kicks leaves such a driver waiting forever).
   */
  kickPrepare(eventIdx: boolean): boolean {
    const old = this.#kickedIdx;
    const now = this.#availIdx;
    this.#kickedIdx = now;
    if (old === now) return false;
    return eventIdx ? needsEvent(this.availEvent, now, old) : (this.usedFlags & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** Sets the avail ring flags (VIRTQ_AVAIL_F_NO_INTERRUPT). */
  setNoInterrupt(on: boolean): void {
    this.memory.writeU16(this.availRing, on ? VIRTQ_AVAIL_F_NO_INTERRUPT : 0);
  }

  /** Writes used_event (EVENT_IDX: interrupt me when used idx passes this). */
  setUsedEvent(idx: number): void {
    this.#avail.writeUInt16LE(idx & 0xffff, 4 + 2 * this.size);
  }

  /** The device's avail_event (EVENT_IDX). */
  get availEvent(): number {
    return this.memory.readU16(this.usedRing + 4 + 8 * this.size);
  }

  /** The device's used ring flags (VIRTQ_USED_F_NO_NOTIFY). */
  get usedFlags(): number {
    return this.memory.readU16(this.usedRing);
  }

  /** The device's used idx. */
  get usedIdx(): number {
    return this.#used.readUInt16LE(2);
  }

  /** Reads every used entry published since the last reap and frees their descriptors. */
  reap(): UsedEntry[] {
    const out: UsedEntry[] = [];
    const idx = this.usedIdx;
    while (this.#lastUsed !== idx) {
      const off = 4 + 8 * (this.#lastUsed & this.#mask);
      const id = this.#used.readUInt32LE(off);
      const len = this.#used.readUInt32LE(off + 4);
      out.push({ id, len });
      const owned = this.#owned.get(id);
      if (owned) {
        this.#owned.delete(id);
        for (const d of owned) this.#free.push(d);
      }
      this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /**
   * Waits for the next interrupt (like a guest re-enabling callbacks: with EVENT_IDX it first
   * sets used_event to the next used index it has not seen). Resolves immediately when used
   * entries are already waiting. Rejects after `timeoutMs`.
   */
  waitInterrupt(timeoutMs = 10000): Promise<void> {
    this.setUsedEvent(this.#lastUsed);
    if (this.usedIdx !== this.#lastUsed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        const i = this.#waiters.indexOf(done);
        if (i >= 0) this.#waiters.splice(i, 1);
        reject(new Error(`mock virtqueue: no interrupt within ${timeoutMs} ms (used idx ${this.usedIdx}, last used ${this.#lastUsed})`));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(t);
        resolve();
      };
      this.#waiters.push(done);
    });
  }
}

/** A virtio-blk request to submit through the mock driver. */
export interface BlkRequestSpec {
  readonly type: number;
  readonly sector: bigint | number;
  /** OUT: the data to write. DISCARD / WRITE_ZEROES: the raw segment bytes. */
  readonly data?: Uint8Array;
  /** IN / GET_ID: bytes to read. */
  readonly readLen?: number;
  /** Override the header's reserved field. */
  readonly reserved?: number;
}

/** How a request is laid out in descriptors. */
export interface BlkLayout {
  /**
   * Cut points (byte offsets, strictly inside) splitting the readable bytes (header + OUT data)
   * into descriptors. Default: after the header.
   */
  readonly readableCuts?: readonly number[];
  /** Cut points splitting the writable bytes (IN data + status). Default: before the status byte. */
  readonly writableCuts?: readonly number[];
  /** Put the chain in an indirect table. */
  readonly indirect?: boolean;
}

/** A submitted request: where its buffers are, to check the outcome. */
export interface SubmittedBlkRequest {
  readonly queue: number;
  readonly head: number;
  /** Guest address of the status byte. */
  readonly statusAddr: number;
  /** Guest address of the IN / GET_ID data (contiguous). */
  readonly dataAddr: number;
  readonly readLen: number;
  /** Every guest range the device may write for this request (writable buffers). */
  readonly writableRanges: readonly { addr: number; len: number }[];
}

/** The outcome of a request. */
export interface BlkCompletion {
  readonly head: number;
  readonly usedLen: number;
  readonly status: number;
  /** IN / GET_ID data read back from guest memory. */
  readonly data: Buffer;
}

function cutsToPieces(total: number, cuts: readonly number[]): number[] {
  const pts = [...new Set(cuts.filter((c) => c > 0 && c < total))].sort((a, b) => a - b);
  const out: number[] = [];
  let prev = 0;
  for (const p of pts) {
    out.push(p - prev);
    prev = p;
  }
  out.push(total - prev);
  return out.filter((n) => n > 0);
}

/** Encodes a discard / write-zeroes segment. */
export function encodeDwzSegment(sector: bigint | number, numSectors: number, flags: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(BigInt(sector), 0);
  b.writeUInt32LE(numSectors >>> 0, 8);
  b.writeUInt32LE(flags >>> 0, 12);
  return b;
}

export interface MockBlkDriverOptions {
  readonly numQueues?: number;
  readonly queueSize?: number;
  /** Features to negotiate; default: everything the device offers. */
  readonly features?: bigint;
  /** Guest address where rings start (default: start of the first region). */
  readonly ringBase?: number;
  /** Guest range for request buffers (default: the rest of the first region after the rings). */
  readonly dataBase?: number;
  readonly dataSize?: number;
}

/**
 * A simulated virtio-blk driver over any `VirtioDevice`: negotiates features, starts queues,
 * submits requests with any descriptor layout and collects completions.
 *
 * @example
 *   const drv = new MockBlkDriver(device, memory);
 *   drv.start();
 *   const r = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 4096 });
 *   // r.status === 0, r.data holds the sector contents
 */
export class MockBlkDriver {
  readonly device: VirtioDevice;
  readonly memory: GuestMemory;
  readonly queues: MockVirtqueue[] = [];
  readonly alloc: GuestAllocator;
  readonly features: bigint;

  constructor(device: VirtioDevice, memory: GuestMemory, opts: MockBlkDriverOptions = {}) {
    this.device = device;
    this.memory = memory;
    const region = memory.regions[0];
    if (region === undefined) throw new RangeError('Cannot create mock driver: guest memory has no region');
    const n = opts.numQueues ?? device.numQueues;
    const size = opts.queueSize ?? device.maxQueueSize;
    let at = opts.ringBase ?? region.guestAddr;
    for (let i = 0; i < n; i++) {
      at = Math.ceil(at / 4096) * 4096;
      this.queues.push(new MockVirtqueue(memory, size, at));
      at += MockVirtqueue.footprint(size);
    }
    const dataBase = opts.dataBase ?? Math.ceil(at / 4096) * 4096;
    const dataSize = opts.dataSize ?? region.guestAddr + region.buffer.length - dataBase;
    this.alloc = new GuestAllocator(dataBase, dataSize);
    this.features = opts.features ?? device.deviceFeatures;
  }

  /** Negotiates features and starts every queue. Throws when the device refuses the features. */
  start(): void {
    if (!this.device.setDriverFeatures(this.features)) throw new Error(`mock driver: device refused features 0x${this.features.toString(16)}`);
    this.queues.forEach((q, i) => this.device.startQueue(i, q.queueStart()));
  }

  /** True when the driver negotiated feature bit `b`. */
  has(b: bigint): boolean {
    return (this.features & (1n << b)) !== 0n;
  }

  /** Builds and publishes a request (does not kick). */
  submit(queue: number, req: BlkRequestSpec, layout: BlkLayout = {}): SubmittedBlkRequest {
    const q = this.queues[queue];
    if (q === undefined) throw new RangeError(`mock driver: no queue ${queue}`);
    const mem = this.memory;
    const out = req.data ?? new Uint8Array(0);
    const readLen = req.type === VIRTIO_BLK_T.IN || req.type === VIRTIO_BLK_T.GET_ID ? (req.readLen ?? 0) : 0;
    const rLen = BLK_HEADER_SIZE + (readLen > 0 ? 0 : out.length);
    const wLen = readLen + 1;
    const rAddr = this.alloc.alloc(rLen);
    const wAddr = this.alloc.alloc(wLen);
    const hdr = Buffer.alloc(BLK_HEADER_SIZE);
    hdr.writeUInt32LE(req.type >>> 0, 0);
    hdr.writeUInt32LE((req.reserved ?? 0) >>> 0, 4);
    hdr.writeBigUInt64LE(BigInt.asUintN(64, BigInt(req.sector)), 8);
    mem.writeFrom(rAddr, hdr);
    if (readLen === 0 && out.length > 0) mem.writeFrom(rAddr + BLK_HEADER_SIZE, out);
    mem.slice(wAddr, wLen).fill(0xee); // poison: the device must overwrite what it reports
    const bufs: MockBuffer[] = [];
    let off = 0;
    for (const n of cutsToPieces(rLen, layout.readableCuts ?? [BLK_HEADER_SIZE])) {
      bufs.push({ addr: rAddr + off, len: n, writable: false });
      off += n;
    }
    off = 0;
    for (const n of cutsToPieces(wLen, layout.writableCuts ?? [wLen - 1])) {
      bufs.push({ addr: wAddr + off, len: n, writable: true });
      off += n;
    }
    const head = layout.indirect ? q.buildChain(bufs, { indirect: { table: this.alloc.alloc(16 * bufs.length) } }) : q.buildChain(bufs);
    q.publish(head);
    return { queue, head, statusAddr: wAddr + wLen - 1, dataAddr: wAddr, readLen, writableRanges: [{ addr: wAddr, len: wLen }] };
  }

  /** Kicks queue `queue` (device.queueNotify). */
  kick(queue: number): void {
    this.device.queueNotify(queue);
  }

  /** Kicks queue `queue` only if the device asked for it (see `MockVirtqueue.kickPrepare`); says whether it did. */
  kickIfNeeded(queue: number): boolean {
    const q = this.queues[queue];
    if (q === undefined) throw new RangeError(`mock driver: no queue ${queue}`);
    if (!q.kickPrepare(this.eventIdx)) return false;
    this.device.queueNotify(queue);
    return true;
  }

  /** Reads the outcome of a submitted request. */
  outcome(s: SubmittedBlkRequest, usedLen: number): BlkCompletion {
    return { head: s.head, usedLen, status: this.memory.readU8(s.statusAddr), data: this.memory.read(s.dataAddr, s.readLen) };
  }

  /**
   * Waits until every request in `reqs` (all on one queue) has a used entry; returns their
   * outcomes in the order of `reqs`.
   */
  async complete(reqs: readonly SubmittedBlkRequest[], timeoutMs = 10000): Promise<BlkCompletion[]> {
    const byHead = new Map<number, number>();
    const results = new Map<number, BlkCompletion>();
    const first = reqs[0];
    if (first === undefined) return [];
    const q = this.queues[first.queue] as MockVirtqueue;
    reqs.forEach((r, i) => byHead.set(r.head, i));
    const deadline = Date.now() + timeoutMs;
    while (results.size < reqs.length) {
      for (const u of q.reap()) {
        const i = byHead.get(u.id);
        if (i === undefined) throw new Error(`mock driver: used entry for unknown head ${u.id}`);
        const r = reqs[i] as SubmittedBlkRequest;
        if (results.has(i)) throw new Error(`mock driver: head ${u.id} completed twice`);
        results.set(i, this.outcome(r, u.len));
      }
      if (results.size < reqs.length) await q.waitInterrupt(Math.max(1, deadline - Date.now()));
    }
    return reqs.map((_, i) => results.get(i) as BlkCompletion);
  }

  /** Submits one request, kicks, waits for it. */
  async run(queue: number, req: BlkRequestSpec, layout: BlkLayout = {}): Promise<BlkCompletion> {
    const s = this.submit(queue, req, layout);
    this.kick(queue);
    const [c] = await this.complete([s]);
    return c as BlkCompletion;
  }

  /** True when EVENT_IDX was negotiated. */
  get eventIdx(): boolean {
    return this.has(VIRTIO_F.EVENT_IDX);
  }
}

/** A copy of all guest memory, to check later that nothing outside expected ranges changed. */
export function snapshotMemory(memory: GuestMemory): Buffer[] {
  return memory.regions.map((r) => Buffer.from(r.buffer));
}

/**
 * Guest addresses whose byte differs from the snapshot and is not inside any `allowed` range.
 * Returns at most `limit` addresses.
 */
export function changedOutside(memory: GuestMemory, snap: readonly Buffer[], allowed: readonly { addr: number; len: number }[], limit = 16): number[] {
  const out: number[] = [];
  memory.regions.forEach((r, ri) => {
    const before = snap[ri] as Buffer;
    const now = r.buffer;
    for (let i = 0; i < now.length && out.length < limit; i++) {
      if (now[i] === before[i]) continue;
      const a = r.guestAddr + i;
      if (allowed.some((x) => a >= x.addr && a < x.addr + x.len)) continue;
      out.push(a);
    }
  });
  return out;
}
