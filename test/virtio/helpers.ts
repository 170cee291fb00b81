import { GuestMemory } from '../../src/memory/guest-memory';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import type { MemoryDiskOptions, MemoryDiskState } from '../../src/disk/memory-disk';
import type { DiskImage } from '../../src/disk/disk-image';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import type { VirtioBlkOptions } from '../../src/virtio/blk';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import type { MockBlkDriverOptions } from '../../src/virtio/mock-driver';

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
