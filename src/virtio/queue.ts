import { VirtioError, hex } from '../errors';
import { addressFromHalves } from '../memory/guest-memory';
import type { GuestMemory, MemoryRegion } from '../memory/guest-memory';
import { DescriptorChain, VIRTQ_DESC_F } from './chain';

/**
 * A split virtqueue (virtio spec 2.7), device side. It knows nothing about the device using it:
 * it validates the ring geometry, pops descriptor chains (following NEXT and INDIRECT with every
 * rule the spec puts on the driver checked, since the driver is untrusted), writes used entries,
 * and decides when the driver must be notified (EVENT_IDX or NO_INTERRUPT).
 *
 * Layout (all little-endian):
 * - descriptor table, align 16: `{ le64 addr; le32 len; le16 flags; le16 next }[size]`
 * - avail ring, align 2: `le16 flags; le16 idx; le16 ring[size]; le16 used_event`
 * - used ring, align 4: `le16 flags; le16 idx; { le32 id; le32 len }[size]; le16 avail_event`
 *
 * Each ring must lie inside one guest memory region (contiguous host memory); they are accessed
 * through zero-copy views taken once at construction.
 *
 * Errors:
 * - a malformed chain comes back from `pop` with `chain.error` set (E_VIRTIO_CHAIN); the head is
 *   in flight and must be completed (used length 0) like any other;
 * - ring corruption (avail idx more than `size` ahead, a head index >= size, a head popped again
 *   while in flight) throws VirtioError E_VIRTIO_RING from `pop`, after which the queue is
 *   `broken` and pops nothing more: the device must enter DEVICE_NEEDS_RESET.
 */

/** Used ring flag: the device does not need kicks (driver may skip notifying). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;
/** Avail ring flag: the driver does not need interrupts. */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;

/** Largest queue size the split ring allows (spec 2.7). */
export const MAX_QUEUE_SIZE = 32768;

export interface SplitQueueOptions {
  readonly memory: GuestMemory;
  readonly size: number;
  readonly descTable: number;
  readonly availRing: number;
  readonly usedRing: number;
  /** Largest size the device accepts (<= 32768); default 32768. */
  readonly maxSize?: number;
  /** VIRTIO_F_EVENT_IDX negotiated. */
  readonly eventIdx?: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated (an INDIRECT descriptor is a chain error otherwise). */
  readonly indirect?: boolean;
  /** Next avail index to read (vhost-user SET_VRING_BASE). */
  readonly nextAvail?: number;
  /** Next used index to write; defaults to nextAvail. */
  readonly nextUsed?: number;
  /**
   * Most descriptors (direct + indirect) one chain may have; default `size` (the spec's bound).
   * A device advertising seg_max larger than the negotiated size - 2 may raise it.
   */
  readonly maxChainLength?: number;
}

// A full memory barrier. Guest memory is an external Buffer, not a SharedArrayBuffer, so Atomics
// cannot operate on it; but a seq-cst read-modify-write on any shared cell compiles to a locked
// instruction on x86-64 (and a full dmb on arm64), which orders every earlier store before every
// later load, including plain stores to guest memory. The store→load ordering is what the
// notification checks need (virtio spec 2.7.7/2.7.10: write idx / avail_event, then read
// used_event / avail idx); plain store→store and load→load order is already guaranteed by x86-TSO
// and V8 keeps stores to memory in program order (they are effectful nodes on one effect chain).
const fenceCell = new Int32Array(new SharedArrayBuffer(4));
/** Orders all earlier memory accesses before all later ones (see comment above). */
export function fullBarrier(): void {
  Atomics.add(fenceCell, 0, 0);
}

function ringError(message: string, data: Record<string, unknown> = {}): VirtioError {
  return new VirtioError('E_VIRTIO_RING', message, data);
}

/** Byte sizes of the three ring parts for a queue of `size` entries (including the event fields). */
export function splitRingSizes(size: number): { desc: number; avail: number; used: number } {
  return { desc: 16 * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/** Device side of one split virtqueue. */
export class SplitQueue {
  readonly memory: GuestMemory;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly maxChainLength: number;
  readonly #mask: number;
  readonly #desc: Buffer;
  readonly #avail: Buffer;
  readonly #used: Buffer;
  readonly #usedEventOff: number;
  readonly #availEventOff: number;
  /** One reusable chain object per head index (a head is in flight at most once). */
  readonly #chains: (DescriptorChain | undefined)[];
  readonly #inFlight: Uint8Array;
  #inFlightCount = 0;
  #nextAvail: number;
  #nextUsed: number;
  /** Used idx last published to the driver. */
  #publishedUsed: number;
  #pendingUsed = 0;
  #broken = false;

  /**
   * @throws VirtioError E_VIRTIO_RING when the size or a ring address is invalid.
   */
  constructor(opts: SplitQueueOptions) {
    const maxSize = opts.maxSize ?? MAX_QUEUE_SIZE;
    const { size, memory } = opts;
    if (!Number.isInteger(size) || size < 1 || size > Math.min(maxSize, MAX_QUEUE_SIZE) || (size & (size - 1)) !== 0) {
      throw ringError(`Cannot set up virtqueue: size ${size} is not a power of two between 1 and ${Math.min(maxSize, MAX_QUEUE_SIZE)}`, { size });
    }
    const sizes = splitRingSizes(size);
    this.#desc = SplitQueue.#ring(memory, 'descriptor table', opts.descTable, sizes.desc, 16);
    this.#avail = SplitQueue.#ring(memory, 'avail ring', opts.availRing, sizes.avail, 2);
    this.#used = SplitQueue.#ring(memory, 'used ring', opts.usedRing, sizes.used, 4);
    for (const [name, v] of [['nextAvail', opts.nextAvail], ['nextUsed', opts.nextUsed]] as const) {
      if (v !== undefined && (!Number.isInteger(v) || v < 0 || v > 0xffff)) {
        throw ringError(`Cannot set up virtqueue: ${name} ${v} is not a u16`);
      }
    }
    const maxChain = opts.maxChainLength ?? size;
    if (!Number.isInteger(maxChain) || maxChain < 1 || maxChain > 65536) {
      throw new RangeError(`Cannot set up virtqueue: maxChainLength ${maxChain} is out of range`);
    }
    this.memory = memory;
    this.size = size;
    this.eventIdx = opts.eventIdx ?? false;
    this.indirect = opts.indirect ?? false;
    this.maxChainLength = maxChain;
    this.#mask = size - 1;
    this.#usedEventOff = 4 + 2 * size;
    this.#availEventOff = 4 + 8 * size;
    this.#chains = new Array<DescriptorChain | undefined>(size).fill(undefined);
    this.#inFlight = new Uint8Array(size);
    this.#nextAvail = opts.nextAvail ?? 0;
    this.#nextUsed = opts.nextUsed ?? this.#nextAvail;
    this.#publishedUsed = this.#nextUsed;
  }

  static #ring(memory: GuestMemory, what: string, addr: number, len: number, align: number): Buffer {
    if (!Number.isSafeInteger(addr) || addr < 0) throw ringError(`Cannot set up virtqueue: ${what} address ${addr} is invalid`);
    if (addr % align !== 0) throw ringError(`Cannot set up virtqueue: ${what} at ${hex(addr)} is not ${align}-byte aligned`, { addr });
    const view = memory.view(addr, len);
    if (view === undefined) {
      const why = memory.isValidRange(addr, len) ? 'spans two memory regions' : 'is outside guest memory';
      throw ringError(`Cannot set up virtqueue: ${what} ${hex(addr)}+${hex(len)} ${why}`, { addr, len });
    }
    return view;
  }

  /** Next avail index the device will read (vhost-user GET_VRING_BASE). */
  get nextAvail(): number {
    return this.#nextAvail;
  }

  /** Next used index the device will write. */
  get nextUsed(): number {
    return this.#nextUsed;
  }

  /** Chains popped and not yet completed. */
  get inFlight(): number {
    return this.#inFlightCount;
  }

  /** True after ring corruption was detected; `pop` returns nothing more. */
  get broken(): boolean {
    return this.#broken;
  }

  /** Whether head `head` is currently popped and not completed. */
  isInFlight(head: number): boolean {
    return this.#inFlight[head] === 1;
  }

  /** Number of chains the driver has made available and the device has not popped yet. */
  pending(): number {
    return (this.#avail.readUInt16LE(2) - this.#nextAvail) & 0xffff;
  }

  /**
   * Pops the next available chain, or returns null when the ring is empty (or the queue broken).
   * @throws VirtioError E_VIRTIO_RING on ring corruption (the queue is then broken).
   */
  pop(): DescriptorChain | null {
    if (this.#broken) return null;
    const avail = this.#avail;
    const availIdx = avail.readUInt16LE(2);
    const pending = (availIdx - this.#nextAvail) & 0xffff;
    if (pending === 0) return null;
    if (pending > this.size) {
      this.#broken = true;
      throw ringError(`Cannot pop virtqueue: avail idx ${availIdx} is ${pending} entries ahead of ${this.#nextAvail} (queue size ${this.size})`, {
        availIdx,
        nextAvail: this.#nextAvail,
      });
    }
    // Reading the ring entry after idx needs load→load order, which x86-TSO gives.
    const head = avail.readUInt16LE(4 + 2 * (this.#nextAvail & this.#mask));
    if (head >= this.size) {
      this.#broken = true;
      throw ringError(`Cannot pop virtqueue: avail ring entry ${this.#nextAvail & this.#mask} holds head ${head} >= queue size ${this.size}`, { head });
    }
    if (this.#inFlight[head] === 1) {
      this.#broken = true;
      throw ringError(`Cannot pop virtqueue: head ${head} is made available again while still in flight`, { head });
    }
    this.#nextAvail = (this.#nextAvail + 1) & 0xffff;
    this.#inFlight[head] = 1;
    this.#inFlightCount++;
    let chain = this.#chains[head];
    if (chain === undefined) {
      chain = new DescriptorChain();
      this.#chains[head] = chain;
    }
    chain.reset(head);
    this.#walk(chain);
    return chain;
  }

  #chainError(chain: DescriptorChain, why: string, data: Record<string, unknown> = {}): void {
    chain.error = new VirtioError('E_VIRTIO_CHAIN', `Cannot walk descriptor chain at head ${chain.head}: ${why}`, { head: chain.head, ...data });
    chain.clear(); // nothing of a malformed chain may be used
  }

  /** Follows the chain from `chain.head`, filling in its buffers or its error. */
  #walk(chain: DescriptorChain): void {
    const memory = this.memory;
    const regions = memory.regions;
    let table = this.#desc;
    let tbase = 0; // byte offset of the current table inside `table`
    let tableSize = this.size;
    let idx = chain.head;
    let inIndirect = false;
    let ttl = this.maxChainLength;
    let total = 0;
    let seenWritable = false;
    for (;;) {
      if (ttl === 0) {
        return this.#chainError(chain, `more than ${this.maxChainLength} descriptors (loop?)`);
      }
      ttl--;
      chain.descriptors++;
      const off = tbase + idx * 16;
      const addr = addressFromHalves(table.readUInt32LE(off), table.readUInt32LE(off + 4));
      const len = table.readUInt32LE(off + 8);
      const flags = table.readUInt16LE(off + 12);
      const next = table.readUInt16LE(off + 14);
      if ((flags & VIRTQ_DESC_F.INDIRECT) !== 0) {
        if (!this.indirect) return this.#chainError(chain, `descriptor ${idx} is INDIRECT but INDIRECT_DESC was not negotiated`);
        if (inIndirect) return this.#chainError(chain, `indirect descriptor ${idx} inside an indirect table (nested)`);
        if ((flags & VIRTQ_DESC_F.NEXT) !== 0) return this.#chainError(chain, `descriptor ${idx} has both INDIRECT and NEXT`);
        // The indirect descriptor itself carries no buffer: only the table's entries count.
        ttl++;
        chain.descriptors--;
        if (len === 0 || len % 16 !== 0) return this.#chainError(chain, `indirect table length ${len} is not a non-zero multiple of 16`);
        const entries = len / 16;
        if (entries > ttl) return this.#chainError(chain, `indirect table of ${entries} entries makes the chain longer than ${this.maxChainLength}`);
        if (addr < 0) return this.#chainError(chain, `indirect table address is above 2^53`);
        const ri = memory.regionIndex(addr, len);
        if (ri >= 0) {
          const r = regions[ri] as MemoryRegion;
          table = r.buffer;
          tbase = addr - r.guestAddr;
        } else {
          if (!memory.isValidRange(addr, len)) return this.#chainError(chain, `indirect table ${hex(addr)}+${hex(len)} is outside guest memory`);
          table = memory.read(addr, len); // straddles adjacent regions: a read-only copy is fine
          tbase = 0;
        }
        tableSize = entries;
        idx = 0;
        inIndirect = true;
        continue;
      }
      const writable = (flags & VIRTQ_DESC_F.WRITE) !== 0;
      if (writable) seenWritable = true;
      else if (seenWritable) return this.#chainError(chain, `readable descriptor ${idx} follows a writable one`);
      if (len > 0) {
        if (addr < 0) return this.#chainError(chain, `descriptor ${idx} address is above 2^53`);
        total += len;
        if (total > 0xffffffff) return this.#chainError(chain, `total length exceeds 2^32 - 1`);
        const ri = memory.regionIndex(addr, len);
        if (ri >= 0) {
          const r = regions[ri] as MemoryRegion;
          chain.push(r.buffer, addr - r.guestAddr, len, writable);
        } else {
          if (!memory.isValidRange(addr, len)) return this.#chainError(chain, `descriptor ${idx} buffer ${hex(addr)}+${hex(len)} is outside guest memory`, { addr, len });
          for (const part of memory.gather(addr, len)) chain.push(part, 0, part.length, writable);
        }
      }
      if ((flags & VIRTQ_DESC_F.NEXT) === 0) return;
      if (next >= tableSize) return this.#chainError(chain, `descriptor ${idx} has next ${next} >= ${inIndirect ? 'indirect table size' : 'queue size'} ${tableSize}`);
      idx = next;
    }
  }

  /**
   * Records the completion of chain `head` with `len` bytes written into its writable buffers.
   * The entry is written to the used ring now but only published by `publishUsed`.
   * @throws RangeError when `head` is not in flight (a device bug: completing twice).
   */
  addUsed(head: number, len: number): void {
    if (this.#inFlight[head] !== 1) throw new RangeError(`Cannot complete virtqueue head ${head}: it is not in flight`);
    this.#inFlight[head] = 0;
    this.#inFlightCount--;
    const off = 4 + 8 * (this.#nextUsed & this.#mask);
    this.#used.writeUInt32LE(head, off);
    this.#used.writeUInt32LE(len >>> 0, off + 4);
    this.#nextUsed = (this.#nextUsed + 1) & 0xffff;
    this.#pendingUsed++;
  }

  /** Used entries written and not yet published. */
  get pendingUsed(): number {
    return this.#pendingUsed;
  }

  /**
   * Publishes every used entry added since the last call (one used idx store for the batch) and
   * says whether the driver must be notified (EVENT_IDX `used_event`, else NO_INTERRUPT).
   */
  publishUsed(): boolean {
    if (this.#pendingUsed === 0) return false;
    const old = this.#publishedUsed;
    const now = this.#nextUsed;
    // The id/len stores above precede this idx store in program order; x86 does not reorder
    // stores with stores, so the driver never sees idx before the entries (spec 2.7.8.2).
    this.#used.writeUInt16LE(now, 2);
    this.#publishedUsed = now;
    this.#pendingUsed = 0;
    // Store (idx) → load (used_event / flags): needs a full barrier (spec 2.7.10).
    fullBarrier();
    if (this.eventIdx) {
      const usedEvent = this.#avail.readUInt16LE(this.#usedEventOff);
      return needsEvent(usedEvent, now, old);
    }
    return (this.#avail.readUInt16LE(0) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** Asks the driver not to kick while the device is draining the ring anyway. */
  disableNotification(): void {
    if (!this.eventIdx) this.#used.writeUInt16LE(VIRTQ_USED_F_NO_NOTIFY, 0);
    // With EVENT_IDX, leaving avail_event behind nextAvail already suppresses kicks.
  }

  /**
   * Re-enables kicks (clears NO_NOTIFY, or sets avail_event to the next index) and re-checks the
   * ring: returns true when more chains arrived meanwhile (the caller must keep draining, since
   * the driver may have skipped its kick).
   */
  enableNotification(): boolean {
    if (this.eventIdx) this.#used.writeUInt16LE(this.#nextAvail, this.#availEventOff);
    else this.#used.writeUInt16LE(0, 0);
    fullBarrier();
    return !this.#broken && this.pending() !== 0;
  }

  /** The driver's avail ring flags and used_event (for tests and diagnostics). */
  get usedEvent(): number {
    return this.#avail.readUInt16LE(this.#usedEventOff);
  }
}

/**
 * vring_need_event (spec 2.7.10): notify iff `newIdx` has passed `eventIdx` since `oldIdx`,
 * in wrap-safe u16 arithmetic.
 */
export function needsEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
