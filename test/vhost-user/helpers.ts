import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { GuestMemory } from '../../src/memory/guest-memory';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import type { MemoryDiskOptions, MemoryDiskState } from '../../src/disk/memory-disk';
import type { DiskImage } from '../../src/disk/disk-image';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import type { VirtioBlkOptions } from '../../src/virtio/blk';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import type { MockVirtqueue } from '../../src/virtio/mock-driver';
import { VhostUserBackend } from '../../src/transport/vhost-user/backend';
import type { HandleResult } from '../../src/transport/vhost-user/backend';
import { encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from '../../src/transport/vhost-user/codec';
import type { MemRegionDesc } from '../../src/transport/vhost-user/codec';
import type { RegionMapper } from '../../src/transport/vhost-user/memory-table';
import { FLAGS, PROTOCOL_F, VHOST_USER, VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/transport/vhost-user/protocol';

/** Guest physical base of the test RAM and the front-end's (pretend) virtual address of it. */
export const GUEST_BASE = 0x10_0000;
export const USER_BASE = 0x7f00_0000_0000;

/** A descriptor the back-end may keep or close (a fresh /dev/null fd each time). */
export function dummyFd(): number {
  return fs.openSync('/dev/null', 'r');
}

/** True when `fd` is open in this process. */
export function isOpen(fd: number): boolean {
  try {
    fs.fstatSync(fd);
    return true;
  } catch {
    return false;
  }
}

/**
 * Plays the front-end against a `VhostUserBackend` without a socket: RAM is a plain Buffer that
 * the injected mapper hands out as the "mapped file", kicks are delivered by calling the watcher,
 * and call fds are temporary files (each signal appends 8 bytes, so the size counts signals).
 */
export class FakeFrontEnd {
  readonly ram: Buffer;
  readonly mem: GuestMemory;
  readonly disk: DiskImage<MemoryDiskState>;
  readonly dev: VirtioBlkDevice;
  readonly backend: VhostUserBackend;
  readonly drv: MockBlkDriver;
  readonly logs: string[] = [];
  readonly kicks = new Map<number, () => void>();
  /** Makes the next watchKick calls fail (a kick fd the event loop cannot watch). */
  failWatch = false;
  readonly tmp: string;
  readonly callFds: number[] = [];
  mapped = 0;
  unmapped = 0;

  constructor(o: { disk?: Partial<MemoryDiskOptions>; dev?: VirtioBlkOptions; ramSize?: number } = {}) {
    this.ram = Buffer.alloc(o.ramSize ?? 2 << 20);
    this.mem = new GuestMemory([{ guestAddr: GUEST_BASE, buffer: this.ram }]);
    this.disk = createMemoryDisk({ size: 1 << 20, path: '/images/vu-test.img', ...o.disk });
    this.dev = new VirtioBlkDevice(this.disk, { queueSize: 16, ...o.dev });
    this.drv = new MockBlkDriver(this.dev, this.mem);
    this.tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-vu-'));
    const mapper: RegionMapper = (_fd, offset, length) => {
      if (offset + length > this.ram.length) throw new RangeError(`mapping of ${length} bytes at ${offset} exceeds the ${this.ram.length}-byte file`);
      this.mapped++;
      return { view: (at, n) => this.ram.subarray(offset + at, offset + at + n), unmap: () => void this.unmapped++ };
    };
    this.backend = new VhostUserBackend(this.dev, {
      mapper,
      log: (line) => this.logs.push(line),
      watchKick: (fd, onKick) => {
        if (this.failWatch) throw new Error('EMFILE: too many watches');
        this.kicks.set(fd, onKick);
        return () => void this.kicks.delete(fd);
      },
    });
  }

  /** Sends one message; `needReply` sets NEED_REPLY. */
  send(request: number, payload: Buffer = Buffer.alloc(0), o: { fds?: number[]; needReply?: boolean } = {}): Promise<HandleResult> {
    const flags = FLAGS.VERSION | (o.needReply ? FLAGS.NEED_REPLY : 0);
    return this.backend.handle({ request, flags, payload, fds: o.fds ?? [] });
  }

  /** The whole RAM as one region (guest GUEST_BASE, user USER_BASE). */
  oneRegion(): MemRegionDesc[] {
    return [{ guestAddr: BigInt(GUEST_BASE), size: BigInt(this.ram.length), userAddr: BigInt(USER_BASE), mmapOffset: 0n }];
  }

  /** A guest address of the test RAM as the front-end's user address. */
  user(gpa: number): bigint {
    return BigInt(gpa - GUEST_BASE + USER_BASE);
  }

  queue(i: number): MockVirtqueue {
    const q = this.drv.queues[i];
    if (q === undefined) throw new RangeError(`no queue ${i}`);
    return q;
  }

  /** A call fd: a temporary file whose size / 8 is the number of signals. */
  callFd(): number {
    const fd = fs.openSync(path.join(this.tmp, `call${this.callFds.length}`), 'w');
    this.callFds.push(fd);
    return fd;
  }

  /** Signals written to call fd `fd` so far. */
  static signals(fd: number): number {
    return fs.fstatSync(fd).size / 8;
  }

  /** The message sequence QEMU sends to start the device (vhost_dev_start), with REPLY_ACK. */
  async start(o: { queues?: number; base?: number; features?: bigint } = {}): Promise<{ kick: number[]; call: number[] }> {
    const must = async (request: number, payload?: Buffer, fds?: number[]): Promise<void> => {
      const r = await this.send(request, payload, { needReply: true, ...(fds ? { fds } : {}) });
      if (r.reply === undefined || r.reply.readBigUInt64LE(12) !== 0n) {
        throw new Error(`front-end: request ${request} failed: ${this.logs.join(' | ')}`);
      }
    };
    await this.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64((1n << PROTOCOL_F.REPLY_ACK) | (1n << PROTOCOL_F.CONFIG) | (1n << PROTOCOL_F.MQ)));
    await this.send(VHOST_USER.SET_OWNER);
    await must(VHOST_USER.SET_FEATURES, encodeU64((o.features ?? this.dev.deviceFeatures) | (1n << VHOST_USER_F_PROTOCOL_FEATURES)));
    await must(VHOST_USER.SET_MEM_TABLE, encodeMemTable(this.oneRegion()), [dummyFd()]);
    const kick: number[] = [];
    const call: number[] = [];
    const n = o.queues ?? this.dev.numQueues;
    for (let i = 0; i < n; i++) {
      const q = this.queue(i);
      await must(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: i, num: q.size }));
      await must(VHOST_USER.SET_VRING_BASE, encodeVringState({ index: i, num: o.base ?? 0 }));
      await must(
        VHOST_USER.SET_VRING_ADDR,
        encodeVringAddr({ index: i, flags: 0, desc: this.user(q.descTable), used: this.user(q.usedRing), avail: this.user(q.availRing), log: 0n }),
      );
      const k = dummyFd();
      const c = this.callFd();
      await must(VHOST_USER.SET_VRING_KICK, encodeU64(BigInt(i)), [k]);
      await must(VHOST_USER.SET_VRING_CALL, encodeU64(BigInt(i)), [c]);
      await must(VHOST_USER.SET_VRING_ENABLE, encodeVringState({ index: i, num: 1 }));
      kick.push(k);
      call.push(c);
    }
    return { kick, call };
  }

  /** Delivers a kick for the queue whose kick fd is `fd`. */
  kick(fd: number): void {
    const k = this.kicks.get(fd);
    if (k === undefined) throw new Error(`no kick watcher for fd ${fd}`);
    k();
  }

  /** Waits until queue `i`'s used idx reaches `idx` (polling: completions are asynchronous). */
  async waitUsed(i: number, idx: number, timeoutMs = 5000): Promise<void> {
    const q = this.queue(i);
    const deadline = Date.now() + timeoutMs;
    while (q.usedIdx !== idx) {
      if (Date.now() > deadline) throw new Error(`queue ${i}: used idx ${q.usedIdx}, expected ${idx}`);
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  async dispose(): Promise<void> {
    await this.backend.shutdown();
    fs.rmSync(this.tmp, { recursive: true, force: true });
  }
}

/** Reply payload as a u64 (GET_* replies and REPLY_ACK). */
export function replyU64(r: HandleResult): bigint {
  if (r.reply === undefined) throw new Error('no reply');
  return r.reply.readBigUInt64LE(12);
}
