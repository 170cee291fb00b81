import { TransportError, hex } from '../../errors';
import { GuestMemory } from '../../memory/guest-memory';
import type { MemoryRegion } from '../../memory/guest-memory';
import type { MemRegionDesc } from './codec';

/**
 * The guest memory a vhost-user front-end shares with SET_MEM_TABLE: each region's fd mapped
 * (MAP_SHARED) into this process, exposed as a `GuestMemory` keyed by guest physical address, plus
 * the translation of the front-end's own virtual ("user") addresses, which is how vring
 * addresses arrive (vhost-user.rst, "vring address description").
 */

/**
 * One region's fd, mapped: `view` gives zero-copy Buffers over parts of it (at most
 * MAX_VIEW_BYTES each), `unmap` releases it (no view may be used afterwards).
 */
export interface RegionMapping {
  /** `length` bytes of the region from byte `offset` of the region (not of the file). */
  view(offset: number, length: number): Buffer;
  unmap(): void;
}

/**
 * Maps exactly `length` bytes of `fd` from file byte `offset`, shared and read-write, as one
 * contiguous mapping (the real one, `mmapRegionMapper`, uses mmap from the page below `offset`
 * and hides the difference). `length` may exceed what one Buffer can hold.
 */
export type RegionMapper = (fd: number, offset: number, length: number) => RegionMapping;

/**
 * Guest memory seams: a region larger than this becomes consecutive GuestMemory regions of
 * PIECE_BYTES each (the last one shorter), because a Buffer holds at most 4 GiB (Node 20's
 * buffer.constants.MAX_LENGTH) and guests have more RAM than that.
 */
export const PIECE_BYTES = 2 ** 31;

/**
 * The longest view a mapper is asked for: each piece's Buffer looks ahead one more PIECE_BYTES
 * into the same contiguous mapping, so any access of up to PIECE_BYTES that starts in a piece
 * (a ring, a request header, a data buffer: all far smaller) is one zero-copy view and seams are
 * invisible; only a longer one is gathered from two views.
 */
export const MAX_VIEW_BYTES = 2 * PIECE_BYTES;

const SAFE = BigInt(Number.MAX_SAFE_INTEGER);

function tableError(message: string, data: Record<string, unknown> = {}): TransportError {
  return new TransportError('E_VHOST_PROTOCOL', message, data);
}

interface Region {
  readonly guestAddr: number;
  readonly size: number;
  readonly userAddr: number;
  readonly mapping: RegionMapping;
}

/**
 * A mapped region as GuestMemory regions of PIECE_BYTES each, every Buffer looking ahead to the
 * region's end or MAX_VIEW_BYTES, whichever comes first.
 */
function pieces(r: Region): MemoryRegion[] {
  const out: MemoryRegion[] = [];
  for (let at = 0; at < r.size; at += PIECE_BYTES) {
    out.push({ guestAddr: r.guestAddr + at, length: Math.min(PIECE_BYTES, r.size - at), buffer: r.mapping.view(at, Math.min(MAX_VIEW_BYTES, r.size - at)) });
  }
  return out;
}

/**
 * @example
 *   const table = MemoryTable.map(regions, fds, mmapMapper);
 *   const gpa = table.userToGuest(vringAddr.desc, 16 * num);
 *   table.memory.readU16(gpa);
 *   table.unmap();
 */
export class MemoryTable {
  readonly memory: GuestMemory;
  readonly #regions: readonly Region[];
  #unmapped = false;

  private constructor(regions: Region[]) {
    this.#regions = regions;
    this.memory = new GuestMemory(regions.flatMap(pieces));
  }

  /**
   * Checks the table, then maps every region. Nothing stays mapped when it fails. The fds are not
   * closed here (the caller closes them either way: a mapping keeps the memory alive).
   * @throws TransportError E_VHOST_PROTOCOL when the fd count does not match, a region is empty,
   *   too large, overlaps another (in guest or user address space) or cannot be mapped.
   */
  static map(descs: readonly MemRegionDesc[], fds: readonly number[], mapper: RegionMapper): MemoryTable {
    if (fds.length !== descs.length) {
      throw tableError(`Cannot set memory table: ${descs.length} regions but ${fds.length} file descriptors`, {
        regions: descs.length,
        fds: fds.length,
      });
    }
    const checked = descs.map((d, i) => {
      const where = `region ${i} (guest ${hex(d.guestAddr)}+${hex(d.size)})`;
      if (d.size === 0n) throw tableError(`Cannot set memory table: ${where} is empty`);
      if (d.guestAddr + d.size > SAFE) throw tableError(`Cannot set memory table: ${where} ends above 2^53`);
      if (d.userAddr + d.size > SAFE) throw tableError(`Cannot set memory table: ${where} user address ${hex(d.userAddr)} ends above 2^53`);
      if (d.mmapOffset + d.size > SAFE) throw tableError(`Cannot set memory table: ${where} mmap offset ${hex(d.mmapOffset)} ends above 2^53`);
      return { index: i, guestAddr: Number(d.guestAddr), size: Number(d.size), userAddr: Number(d.userAddr), mmapOffset: Number(d.mmapOffset) };
    });
    for (const key of ['guestAddr', 'userAddr'] as const) {
      const sorted = [...checked].sort((a, b) => a[key] - b[key]);
      for (let i = 1; i < sorted.length; i++) {
        const a = sorted[i - 1];
        const b = sorted[i];
        if (a !== undefined && b !== undefined && a[key] + a.size > b[key]) {
          const space = key === 'guestAddr' ? 'guest' : 'user';
          throw tableError(`Cannot set memory table: region ${a.index} (${space} ${hex(a[key])}+${hex(a.size)}) overlaps region ${b.index} at ${hex(b[key])}`);
        }
      }
    }
    const regions: Region[] = [];
    try {
      for (const c of checked) {
        const fd = fds[c.index] as number;
        let mapping: RegionMapping;
        try {
          mapping = mapper(fd, c.mmapOffset, c.size);
        } catch (e) {
          throw tableError(`Cannot set memory table: region ${c.index} (guest ${hex(c.guestAddr)}+${hex(c.size)}) cannot be mapped from fd ${fd}: ${e instanceof Error ? e.message : String(e)}`);
        }
        regions.push({ guestAddr: c.guestAddr, size: c.size, userAddr: c.userAddr, mapping });
      }
      return new MemoryTable(regions);
    } catch (e) {
      for (const r of regions) r.mapping.unmap();
      throw e;
    }
  }

  /** The regions (guest address, size, user address), for logs and tests. */
  get regions(): readonly { guestAddr: number; size: number; userAddr: number }[] {
    return this.#regions.map((r) => ({ guestAddr: r.guestAddr, size: r.size, userAddr: r.userAddr }));
  }

  /**
   * Translates a front-end user address to a guest physical address; the `len` bytes from it must
   * lie in the same region.
   * @throws TransportError E_VHOST_PROTOCOL when the range is not inside one region.
   */
  userToGuest(userAddr: bigint, len: number, what = 'address'): number {
    for (const r of this.#regions) {
      const start = BigInt(r.userAddr);
      if (userAddr >= start && userAddr + BigInt(len) <= start + BigInt(r.size)) {
        return r.guestAddr + Number(userAddr - start);
      }
    }
    throw tableError(`Cannot translate ${what}: user address ${hex(userAddr)}+${hex(len)} is outside the memory table`, {
      userAddr: userAddr.toString(),
      len,
    });
  }

  /** Unmaps every region; the `memory` views must not be used afterwards. Idempotent. */
  unmap(): void {
    if (this.#unmapped) return;
    this.#unmapped = true;
    for (const r of this.#regions) {
      try {
        r.mapping.unmap();
      } catch {
        // munmap of a range we mapped cannot fail in practice; nothing else to do.
      }
    }
  }
}
