import { VirtioError, hex } from '../errors';

/**
 * Guest physical memory as seen by a device: a set of non-overlapping regions, each a guest
 * physical address range backed by a host Buffer (typically a zero-copy external Buffer over an
 * mmap'd KVM memory slot or a vhost-user memfd region).
 *
 * Every address handed to this class is untrusted (it comes from a descriptor the guest wrote), so
 * every access is bounds-checked and fails with `VirtioError` code `E_VIRTIO_MEMORY`; nothing is
 * ever read or written outside a region. The Buffers are never copied: `slice` returns a view that
 * aliases guest memory, so writes through it are visible to the guest.
 */

/**
 * One guest memory region: `length` bytes (default: all of `buffer`) from guest physical
 * `guestAddr`.
 *
 * A Buffer longer than `length` looks ahead: its remaining bytes are the same memory as the
 * adjacent regions that follow. That is how one host mapping too large for a single Buffer (a
 * vhost-user region of more than 4 GiB) is represented: as consecutive regions whose Buffers
 * overlap, so that an access starting in one region and ending inside its Buffer is one zero-copy
 * view, exactly as if there were no seam (a ring, a request header or a data buffer across a
 * seam needs no special case anywhere).
 */
export interface MemoryRegion {
  readonly guestAddr: number;
  readonly buffer: Buffer;
  readonly length?: number;
}

/** A region as GuestMemory keeps it: its length resolved. */
export interface ResolvedRegion extends MemoryRegion {
  readonly length: number;
}

const TWO_POW_32 = 0x1_0000_0000;
const U64_LIMIT = 1n << 64n;
const SAFE_LIMIT = BigInt(Number.MAX_SAFE_INTEGER);

function memoryError(action: string, addr: number | bigint, len: number, why: string): VirtioError {
  return new VirtioError('E_VIRTIO_MEMORY', `Cannot ${action} guest memory: range ${hex(addr)}+${hex(len)} ${why}`, {
    addr: typeof addr === 'bigint' ? addr.toString() : addr,
    len,
  });
}

/**
 * Converts a guest-supplied u64 address (as bigint) into a JS number, checking that `addr + len`
 * does not wrap past 2^64 and that the address is a safe integer. Throws E_VIRTIO_MEMORY.
 */
export function guestAddress(addr: bigint, len = 0): number {
  if (addr < 0n || addr >= U64_LIMIT) throw memoryError('address', addr, len, 'is not a u64 address');
  if (addr + BigInt(len) > U64_LIMIT) throw memoryError('address', addr, len, 'wraps past 2^64');
  if (addr > SAFE_LIMIT) throw memoryError('address', addr, len, 'is above 2^53 (outside any region)');
  return Number(addr);
}

/**
 * Combines the two little-endian u32 halves of a guest u64 address into a number.
 * Returns -1 when the address is at or above 2^53 (it cannot lie inside any region, and would
 * lose precision as a number); callers treat -1 as "outside guest memory".
 */
export function addressFromHalves(lo: number, hi: number): number {
  if (hi > 0x1f_ffff) return -1;
  return hi * TWO_POW_32 + lo;
}

/**
 * Bounds-checked, zero-copy access to guest physical memory.
 *
 * @example
 *   const ram = Buffer.alloc(1 << 20);
 *   const mem = new GuestMemory([{ guestAddr: 0x10000, buffer: ram }]);
 *   mem.writeU32(0x10000, 0xdeadbeef);
 *   mem.slice(0x10000, 4); // a view aliasing ram[0..4]
 */
export class GuestMemory {
  readonly #regions: ResolvedRegion[];
  /** Start addresses and ends (exclusive), parallel to #regions, for a fast lookup. */
  readonly #starts: number[];
  readonly #ends: number[];
  /** End (exclusive) of what each region's Buffer reaches: #ends, or further for a look-ahead Buffer. */
  readonly #reach: number[];
  #last = 0;

  /**
   * @param regions the regions; each must have a safe-integer start, a non-empty Buffer, a
   *   length from 1 to the Buffer's, end at or below 2^53, and no two may overlap. A look-ahead
   *   Buffer (longer than its region) must be followed by adjacent regions covering all of it.
   *   They are sorted by address; the Buffers are kept as given.
   * @throws RangeError on an invalid region list (a programmer error of the transport).
   */
  constructor(regions: readonly MemoryRegion[]) {
    const sorted = [...regions].sort((a, b) => a.guestAddr - b.guestAddr);
    const resolved: ResolvedRegion[] = sorted.map((r) => {
      if (!Number.isSafeInteger(r.guestAddr) || r.guestAddr < 0) {
        throw new RangeError(`Cannot create guest memory: region address ${r.guestAddr} is not a non-negative safe integer`);
      }
      if (!Buffer.isBuffer(r.buffer) || r.buffer.length === 0) {
        throw new RangeError(`Cannot create guest memory: region at ${hex(r.guestAddr)} has no buffer`);
      }
      const length = r.length ?? r.buffer.length;
      if (!Number.isSafeInteger(length) || length < 1 || length > r.buffer.length) {
        throw new RangeError(`Cannot create guest memory: region at ${hex(r.guestAddr)} has length ${length}, not 1 to its buffer's ${r.buffer.length}`);
      }
      if (!Number.isSafeInteger(r.guestAddr + r.buffer.length)) {
        throw new RangeError(`Cannot create guest memory: region at ${hex(r.guestAddr)} ends above 2^53`);
      }
      return { guestAddr: r.guestAddr, buffer: r.buffer, length };
    });
    for (let i = 1; i < resolved.length; i++) {
      const prev = resolved[i - 1] as ResolvedRegion;
      const cur = resolved[i] as ResolvedRegion;
      if (prev.guestAddr + prev.length > cur.guestAddr) {
        throw new RangeError(`Cannot create guest memory: region ${hex(prev.guestAddr)}+${hex(prev.length)} overlaps region at ${hex(cur.guestAddr)}`);
      }
    }
    for (const [i, r] of resolved.entries()) {
      // A look-ahead Buffer claims to be the memory of the next regions: they must be there,
      // back to back, or an access through it would reach bytes that are not guest memory.
      let covered = r.guestAddr + r.length;
      for (let j = i + 1; covered < r.guestAddr + r.buffer.length; j++) {
        const next = resolved[j];
        if (next === undefined || next.guestAddr !== covered) {
          throw new RangeError(`Cannot create guest memory: the buffer of region ${hex(r.guestAddr)}+${hex(r.length)} reaches ${hex(r.guestAddr + r.buffer.length)}, past the regions adjacent to it`);
        }
        covered += next.length;
      }
    }
    this.#regions = resolved;
    this.#starts = resolved.map((r) => r.guestAddr);
    this.#ends = resolved.map((r) => r.guestAddr + r.length);
    this.#reach = resolved.map((r) => r.guestAddr + r.buffer.length);
  }

  /** The regions, sorted by guest address (a look-ahead region's Buffer is longer than its length). */
  get regions(): readonly ResolvedRegion[] {
    return this.#regions;
  }

  /** Total bytes of guest memory. */
  get size(): number {
    let n = 0;
    for (const r of this.#regions) n += r.length;
    return n;
  }

  /** Index of the region containing `addr`, or -1. */
  #find(addr: number): number {
    const last = this.#last;
    if (addr >= (this.#starts[last] as number) && addr < (this.#ends[last] as number)) return last;
    let lo = 0;
    let hi = this.#starts.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (addr < (this.#starts[mid] as number)) hi = mid - 1;
      else if (addr >= (this.#ends[mid] as number)) lo = mid + 1;
      else {
        this.#last = mid;
        return mid;
      }
    }
    return -1;
  }

  #checkArgs(action: string, addr: number, len: number): void {
    if (!Number.isSafeInteger(addr) || addr < 0) throw memoryError(action, addr, len, 'has an invalid address');
    if (!Number.isSafeInteger(len) || len < 0) throw new RangeError(`Cannot ${action} guest memory: length ${len} is invalid`);
  }

  /** True when every byte of [addr, addr+len) is guest memory (possibly across adjacent regions). */
  isValidRange(addr: number, len: number): boolean {
    if (!Number.isSafeInteger(addr) || addr < 0 || !Number.isSafeInteger(len) || len < 0) return false;
    if (len === 0) return true;
    let i = this.#find(addr);
    if (i < 0) return false;
    const end = addr + len;
    for (;;) {
      const e = this.#ends[i] as number;
      if (end <= e) return true;
      i++;
      if (i >= this.#starts.length || this.#starts[i] !== e) return false;
    }
  }

  /**
   * A zero-copy view of [addr, addr+len), which must lie inside one region's Buffer (its look-ahead
   * included). A zero-length range is valid anywhere (nothing is accessed) and yields an empty Buffer.
   * @throws VirtioError E_VIRTIO_MEMORY when the range is outside guest memory or spans regions.
   */
  slice(addr: number, len: number): Buffer {
    this.#checkArgs('access', addr, len);
    if (len === 0) return Buffer.alloc(0);
    const i = this.#find(addr);
    if (i >= 0 && addr + len <= (this.#reach[i] as number)) {
      const off = addr - (this.#starts[i] as number);
      return (this.#regions[i] as ResolvedRegion).buffer.subarray(off, off + len);
    }
    if (i >= 0 && this.isValidRange(addr, len)) throw memoryError('access', addr, len, 'spans two memory regions (use gather)');
    throw memoryError('access', addr, len, 'is outside guest memory');
  }

  /**
   * Like `slice`, but returns undefined instead of throwing when [addr, addr+len) is not inside
   * one region (hot path of the virtqueue: no exception for the common case, no allocation).
   * `addr` and `len` must be non-negative safe integers and `len` > 0 (the caller's invariant).
   */
  view(addr: number, len: number): Buffer | undefined {
    const i = this.#find(addr);
    if (i < 0 || addr + len > (this.#reach[i] as number)) return undefined;
    const off = addr - (this.#starts[i] as number);
    return (this.#regions[i] as ResolvedRegion).buffer.subarray(off, off + len);
  }

  /**
   * Index (into `regions`) of the region whose Buffer holds all of [addr, addr+len), or -1. Lets
   * hot paths address `regions[i].buffer` at `addr - regions[i].guestAddr` without creating a view.
   * `addr` and `len` must be non-negative safe integers (the caller's invariant).
   */
  regionIndex(addr: number, len: number): number {
    const i = this.#find(addr);
    if (i < 0 || addr + len > (this.#reach[i] as number)) return -1;
    return i;
  }

  /**
   * Zero-copy views covering [addr, addr+len), as few as the regions' Buffers allow (adjacent
   * regions only; a look-ahead Buffer serves the regions it covers in one piece).
   * @throws VirtioError E_VIRTIO_MEMORY when any byte is outside guest memory.
   */
  gather(addr: number, len: number): Buffer[] {
    this.#checkArgs('access', addr, len);
    if (len === 0) return [];
    const out: Buffer[] = [];
    let cur = addr;
    let left = len;
    while (left > 0) {
      // Every byte before `cur` was guest memory, so the region holding `cur` continues the range.
      const i = this.#find(cur);
      if (i < 0) throw memoryError('access', addr, len, 'is outside guest memory');
      const r = this.#regions[i] as ResolvedRegion;
      const n = Math.min(left, (this.#reach[i] as number) - cur);
      const off = cur - r.guestAddr;
      out.push(r.buffer.subarray(off, off + n));
      left -= n;
      cur += n;
    }
    return out;
  }

  /** Copies guest memory at `addr` into `dst` (may span adjacent regions). */
  readInto(addr: number, dst: Uint8Array): void {
    let off = 0;
    for (const b of this.gather(addr, dst.length)) {
      dst.set(b, off);
      off += b.length;
    }
  }

  /** Copies `src` into guest memory at `addr` (may span adjacent regions). Checks the whole range first. */
  writeFrom(addr: number, src: Uint8Array): void {
    let off = 0;
    for (const b of this.gather(addr, src.length)) {
      b.set(src.subarray(off, off + b.length));
      off += b.length;
    }
  }

  /** A fresh copy of [addr, addr+len). */
  read(addr: number, len: number): Buffer {
    const out = Buffer.allocUnsafe(len);
    this.readInto(addr, out);
    return out;
  }

  readU8(addr: number): number {
    return this.#field(addr, 1).readUInt8(0);
  }

  readU16(addr: number): number {
    return this.#field(addr, 2).readUInt16LE(0);
  }

  readU32(addr: number): number {
    return this.#field(addr, 4).readUInt32LE(0);
  }

  /** Reads a little-endian u64 as bigint (u64 guest values are range-checked by the caller). */
  readU64(addr: number): bigint {
    return this.#field(addr, 8).readBigUInt64LE(0);
  }

  writeU8(addr: number, v: number): void {
    const b = this.#field(addr, 1);
    b.writeUInt8(v, 0);
    this.#commit(addr, b);
  }

  writeU16(addr: number, v: number): void {
    const b = this.#field(addr, 2);
    b.writeUInt16LE(v, 0);
    this.#commit(addr, b);
  }

  writeU32(addr: number, v: number): void {
    const b = this.#field(addr, 4);
    b.writeUInt32LE(v, 0);
    this.#commit(addr, b);
  }

  writeU64(addr: number, v: bigint): void {
    const b = this.#field(addr, 8);
    b.writeBigUInt64LE(v, 0);
    this.#commit(addr, b);
  }

  /**
   * A view of a small fixed-size field. A field straddling two adjacent regions comes back as a
   * copy (not aliasing guest memory); `#commit` writes such a copy back.
   */
  #field(addr: number, len: number): Buffer {
    if (!Number.isSafeInteger(addr) || addr < 0) throw memoryError('access', addr, len, 'has an invalid address');
    const i = this.#find(addr);
    if (i >= 0 && addr + len <= (this.#reach[i] as number)) {
      const off = addr - (this.#starts[i] as number);
      return (this.#regions[i] as ResolvedRegion).buffer.subarray(off, off + len);
    }
    return Buffer.concat(this.gather(addr, len));
  }

  #commit(addr: number, b: Buffer): void {
    const i = this.#find(addr);
    if (i >= 0 && addr + b.length <= (this.#reach[i] as number)) return; // wrote through the view
    this.writeFrom(addr, b);
  }
}
