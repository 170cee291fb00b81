import { GuestMemory } from '../../src/memory/guest-memory';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import type { MemoryDiskOptions, MemoryDiskState } from '../../src/disk/memory-disk';
import type { DiskImage } from '../../src/disk/disk-image';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import type { VirtioBlkOptions } from '../../src/virtio/blk';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import type { MockBlkDriverOptions, MockVirtqueue } from '../../src/virtio/mock-driver';
import { BLK_HEADER_SIZE } from '../../src/virtio/blk-config';
import { isVblkError } from '../../src/errors';
import type { VblkErrorCode } from '../../src/errors';
import { expect } from 'chai';

/** Guest RAM base used by the tests (not 0, so address 0 is outside guest memory). */
export const RAM_BASE = 0x10_0000;

export interface Setup {
  mem: GuestMemory;
  ram: Buffer;
  disk: DiskImage<MemoryDiskState>;
  dev: VirtioBlkDevice;
  drv: MockBlkDriver;
}

/** A memory disk, a device over it and a started mock driver in 4 MiB of guest RAM. */
export function setup(o: { disk?: Partial<MemoryDiskOptions>; dev?: VirtioBlkOptions; drv?: MockBlkDriverOptions; ramSize?: number; start?: boolean } = {}): Setup {
  const ram = Buffer.alloc(o.ramSize ?? 4 << 20);
  const mem = new GuestMemory([{ guestAddr: RAM_BASE, buffer: ram }]);
  const disk = createMemoryDisk({ size: 1 << 20, path: '/images/test-disk.img', ...o.disk });
  const dev = new VirtioBlkDevice(disk, { queueSize: 16, ...o.dev });
  const drv = new MockBlkDriver(dev, mem, o.drv ?? {});
  if (o.start !== false) drv.start();
  return { mem, ram, disk, dev, drv };
}

/** Deterministic pattern bytes for sector `sector` of a request. */
export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** A small seeded PRNG in [0, 1). */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 0x1_0000_0000;
  };
}

/** Lets `n` event-loop turns pass (setImmediate), so that delayed disk operations can finish. */
export async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
}

/** Runs `fn` and checks that it throws a VblkError with `code`. */
export function expectVblkError(fn: () => unknown, code: VblkErrorCode): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(isVblkError(caught, code), `expected ${code}, got ${String(caught)}`).to.equal(true);
}

/** One raw descriptor of a hand-made chain. */
export interface RawLink {
  readonly addr: bigint | number;
  readonly len: number;
  readonly flags: number;
  /** Index into this list of the next descriptor (translated to a table index). */
  readonly next?: number;
  /** A raw `next` value written as is (overrides `next`). */
  readonly rawNext?: number;
}

/**
 * Writes `links` into free descriptors of `q` and returns the head (owned by it, so `reap` frees
 * them). Flags are written exactly as given: a link without NEXT ends the chain.
 */
export function rawChain(q: MockVirtqueue, links: readonly RawLink[]): number {
  const idx = q.allocDescriptors(links.length);
  const slot = (k: number): number => {
    const v = idx[k];
    if (v === undefined) throw new RangeError(`rawChain: link ${k} is not one of the ${links.length} links`);
    return v;
  };
  links.forEach((d, i) => {
    const next = d.rawNext ?? (d.next !== undefined ? slot(d.next) : 0);
    q.writeDescriptor(slot(i), { addr: d.addr, len: d.len, flags: d.flags, next });
  });
  q.own(slot(0), idx);
  return slot(0);
}

/** A virtio-blk request header `{ le32 type; le32 reserved; le64 sector }`. */
export function blkHeader(type: number, sector: bigint | number): Buffer {
  const h = Buffer.alloc(BLK_HEADER_SIZE);
  h.writeUInt32LE(type >>> 0, 0);
  h.writeBigUInt64LE(BigInt.asUintN(64, BigInt(sector)), 8);
  return h;
}
