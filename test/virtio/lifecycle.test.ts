import { expect } from 'chai';
import { setup, pattern, turns, expectVblkError } from './helpers';
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from '../../src/virtio/blk-config';
import { VIRTIO_F } from '../../src/virtio/device';
import { VIRTQ_USED_F_NO_NOTIFY } from '../../src/virtio/queue';
import { VIRTQ_DESC_F } from '../../src/virtio/chain';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import type { MockVirtqueue, SubmittedBlkRequest } from '../../src/virtio/mock-driver';
import { DiskImage } from '../../src/disk/disk-image';
import { createMemoryDisk, memoryDiskOps } from '../../src/disk/memory-disk';
import type { MemoryDiskState } from '../../src/disk/memory-disk';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import { DiskError } from '../../src/errors';
import { GuestMemory } from '../../src/memory/guest-memory';

const NO_EVENT_IDX = ~(1n << VIRTIO_F.EVENT_IDX);

/** Features of a default device without EVENT_IDX. */
function featuresWithoutEventIdx(): bigint {
  return setup({ start: false }).dev.deviceFeatures & NO_EVENT_IDX;
}

/** Submits `n` OUT requests of one sector each (sector i holds pattern i) on queue 0. */
function submitWrites(s: ReturnType<typeof setup>, n: number): SubmittedBlkRequest[] {
  return Array.from({ length: n }, (_, i) => s.drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: i, data: pattern(512, i + 1) }, { indirect: true }));
}

/** A memory disk whose readSector throws synchronously (not a rejected promise) at sector 100. */
class SyncThrowingDisk extends DiskImage<MemoryDiskState> {
  override readSector(sector: number, buf: Uint8Array): Promise<number> {
    if (sector === 100) throw new DiskError('E_DISK_IO', 'Cannot read: synchronous failure at sector 100');
    return super.readSector(sector, buf);
  }
}

describe('VirtioBlkDevice stopQueue and reset', () => {
  it('stopQueue waits for every in-flight request before it resolves', async () => {
    const s = setup({ disk: { maxDelayTurns: 30 } });
    const q = s.drv.queues[0] as MockVirtqueue;
    const subs = submitWrites(s, 5);
    s.drv.kick(0);
    expect(s.dev.inFlight(0)).to.equal(5);
    await s.dev.stopQueue(0);
    expect(q.reap().map((u) => u.id).sort()).to.deep.equal(subs.map((r) => r.head).sort());
    for (const r of subs) expect(s.mem.readU8(r.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
  });

  it('stopQueue resolves to the next avail index the device would read', async () => {
    const s = setup({ disk: { maxDelayTurns: 5 } });
    submitWrites(s, 5);
    s.drv.kick(0);
    expect(await s.dev.stopQueue(0)).to.equal(5);
  });

  it('a stopped queue ignores kicks', async () => {
    const s = setup();
    const q = s.drv.queues[0] as MockVirtqueue;
    await s.dev.stopQueue(0);
    s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(5);
    expect(q.reap()).to.deep.equal([]);
    expect(s.disk.priv.counts.flush).to.equal(0);
  });

  it('a restarted queue resumes at the avail index stopQueue returned', async () => {
    const s = setup();
    const q = s.drv.queues[0] as MockVirtqueue;
    await s.drv.run(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    const next = await s.dev.stopQueue(0);
    const r = s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.dev.startQueue(0, { ...q.queueStart(), nextAvail: next });
    s.drv.kick(0);
    const [c] = await s.drv.complete([r]);
    expect(c?.status).to.equal(VIRTIO_BLK_S.OK);
  });

  it('stopQueue leaves the ring asking for kicks (NO_NOTIFY cleared) even when a drain was cut short', async () => {
    const s = setup({ drv: { features: featuresWithoutEventIdx() }, disk: { maxDelayTurns: 3 } });
    const q = s.drv.queues[0] as MockVirtqueue;
    // A full ring: the drain spends its budget of `size` chains and defers, kicks still suppressed.
    for (let i = 0; i < q.size; i++) s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 }, { indirect: true });
    s.drv.kick(0);
    expect(q.usedFlags & VIRTQ_USED_F_NO_NOTIFY).to.equal(VIRTQ_USED_F_NO_NOTIFY);
    await s.dev.stopQueue(0);
    expect(q.usedFlags & VIRTQ_USED_F_NO_NOTIFY).to.equal(0);
  });

  it('stopQueue with EVENT_IDX leaves avail_event at the next avail index', async () => {
    const s = setup({ disk: { maxDelayTurns: 3 } });
    const q = s.drv.queues[0] as MockVirtqueue;
    for (let i = 0; i < q.size; i++) s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 }, { indirect: true });
    s.drv.kick(0);
    const next = await s.dev.stopQueue(0);
    expect(q.availEvent).to.equal(next);
  });

  it('starting a queue twice is refused', () => {
    const s = setup();
    const q = s.drv.queues[0] as MockVirtqueue;
    expectVblkError(() => s.dev.startQueue(0, q.queueStart()), 'E_VIRTIO_STATE');
  });

  it('reset completes every in-flight request, with its status written, before it resolves', async () => {
    const s = setup({ disk: { maxDelayTurns: 20 } });
    const q = s.drv.queues[0] as MockVirtqueue;
    const subs = Array.from({ length: 4 }, (_, i) => s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: i, readLen: 512 }));
    s.drv.kick(0);
    await s.dev.reset();
    expect(s.dev.inFlight(0)).to.equal(0);
    expect(q.reap().length).to.equal(subs.length);
    for (const r of subs) expect(s.mem.readU8(r.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
  });

  it('writes acknowledged before a reset are on the disk after it', async () => {
    const s = setup({ disk: { maxDelayTurns: 20 } });
    const subs = submitWrites(s, 6);
    s.drv.kick(0);
    await s.dev.reset();
    subs.forEach((r, i) => {
      expect(s.mem.readU8(r.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
      expect(s.disk.priv.data.subarray(i * 512, i * 512 + 512).equals(pattern(512, i + 1)), `sector ${i}`).to.equal(true);
    });
  });

  it('reset forgets the negotiated features', async () => {
    const s = setup();
    await s.dev.reset();
    expect(s.dev.driverFeatures).to.equal(0n);
  });

  it('a reset device serves a freshly started driver', async () => {
    const s = setup();
    await s.dev.reset();
    const d2 = new MockBlkDriver(s.dev, s.mem);
    d2.start();
    expect((await d2.run(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 })).status).to.equal(VIRTIO_BLK_S.OK);
  });
});

/** A started mock driver over a device over a SyncThrowingDisk. */
function syncThrowingSetup(): { dev: VirtioBlkDevice; drv: MockBlkDriver } {
  const base = createMemoryDisk({ size: 1 << 20 });
  const disk = new SyncThrowingDisk({ path: 'sync-throw', format: 'raw', size: base.size, readonly: false, ops: memoryDiskOps, priv: base.priv });
  const mem = new GuestMemory([{ guestAddr: 0x10_0000, buffer: Buffer.alloc(1 << 20) }]);
  const dev = new VirtioBlkDevice(disk, { queueSize: 16 });
  const drv = new MockBlkDriver(dev, mem);
  drv.start();
  return { dev, drv };
}

describe('VirtioBlkDevice disk failures', () => {
  it('a failing flush in writethrough mode turns the write into IOERR', async () => {
    const s = setup({ dev: { writeback: false }, disk: { fail: (op) => op === 'flush' } });
    const r = await s.drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data: pattern(512, 1) });
    expect(r.status).to.equal(VIRTIO_BLK_S.IOERR);
  });

  it('a disk method that throws synchronously gives IOERR, completed once', async () => {
    const { drv } = syncThrowingSetup();
    const bad = drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 100, readLen: 512 });
    drv.kick(0);
    const [c] = await drv.complete([bad]);
    expect(c?.status).to.equal(VIRTIO_BLK_S.IOERR);
    await turns(5);
    expect((drv.queues[0] as MockVirtqueue).reap()).to.deep.equal([]);
  });

  it('the queue keeps serving after a disk method threw synchronously', async () => {
    const { dev, drv } = syncThrowingSetup();
    await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 100, readLen: 512 });
    const ok = await drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 101, readLen: 512 });
    expect(ok.status).to.equal(VIRTIO_BLK_S.OK);
    expect(dev.needsReset).to.equal(false);
  });
});

describe('VirtioBlkDevice batching and notifications', () => {
  it('a batch of completions in one turn is published with one used idx update and one interrupt', async () => {
    const s = setup();
    const q = s.drv.queues[0] as MockVirtqueue;
    const subs = Array.from({ length: 5 }, (_, i) => s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: i, readLen: 512 }));
    s.drv.kick(0);
    await s.drv.complete(subs);
    expect(q.interrupts).to.equal(1);
  });

  it('EVENT_IDX: no interrupt until used idx passes used_event', async () => {
    const s = setup();
    expect(s.drv.eventIdx).to.equal(true);
    const q = s.drv.queues[0] as MockVirtqueue;
    q.setUsedEvent(3); // interrupt only once entry 3 is used
    for (let i = 0; i < 3; i++) {
      s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
      s.drv.kick(0);
      await turns(3);
    }
    expect(q.usedIdx).to.equal(3);
    expect(q.interrupts).to.equal(0);
    s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(3);
    expect(q.interrupts).to.equal(1);
  });

  it('EVENT_IDX: the device publishes avail_event after draining (kick suppression)', async () => {
    const s = setup();
    const q = s.drv.queues[0] as MockVirtqueue;
    const subs = [0, 1, 2].map(() => s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 }));
    s.drv.kick(0);
    expect(q.availEvent).to.equal(3);
    await s.drv.complete(subs);
  });

  it('without EVENT_IDX, NO_INTERRUPT suppresses the interrupt while the used ring still fills', async () => {
    const s = setup({ drv: { features: featuresWithoutEventIdx() } });
    const q = s.drv.queues[0] as MockVirtqueue;
    q.setNoInterrupt(true);
    s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(3);
    expect(q.usedIdx).to.equal(1);
    expect(q.interrupts).to.equal(0);
  });

  it('without EVENT_IDX, clearing NO_INTERRUPT brings the interrupts back', async () => {
    const s = setup({ drv: { features: featuresWithoutEventIdx() } });
    const q = s.drv.queues[0] as MockVirtqueue;
    q.setNoInterrupt(true);
    s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(3);
    q.setNoInterrupt(false);
    s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(3);
    expect(q.interrupts).to.equal(1);
  });

  it('without EVENT_IDX, NO_NOTIFY is cleared once the drain ends', async () => {
    const s = setup({ drv: { features: featuresWithoutEventIdx() } });
    const q = s.drv.queues[0] as MockVirtqueue;
    await s.drv.run(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    expect(q.usedFlags).to.equal(0);
  });

  for (const eventIdx of [true, false]) {
    it(`a driver that kicks only when the device asks is never left waiting (EVENT_IDX ${eventIdx ? 'on' : 'off'})`, async () => {
      const s = setup({ disk: { maxDelayTurns: 4 }, ...(eventIdx ? {} : { drv: { features: featuresWithoutEventIdx() } }) });
      const q = s.drv.queues[0] as MockVirtqueue;
      // 5 rounds of a full ring (the drain runs out of budget and defers) refilled as completions
      // arrive: every kick the driver skips must be covered by the device's own re-check.
      let kicks = 0;
      let done = 0;
      for (let round = 0; round < 5; round++) {
        s.drv.alloc.reset();
        const subs = Array.from({ length: q.size }, (_, i) => {
          const r = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: i, readLen: 512 }, { indirect: true });
          if (i % 3 === 2 && s.drv.kickIfNeeded(0)) kicks++;
          return r;
        });
        if (s.drv.kickIfNeeded(0)) kicks++;
        const results = await s.drv.complete(subs, 5000);
        done += results.filter((r) => r.status === VIRTIO_BLK_S.OK).length;
      }
      expect(done).to.equal(5 * q.size);
      expect(kicks).to.be.greaterThan(0);
    });
  }

  it('a drain yields after walking 65536 descriptors, however few chains that is', async () => {
    // 512 heads, each a 512-descriptor loop (cut at the chain cap): 2^18 descriptor reads in all.
    const s = setup({ dev: { queueSize: 512 }, ramSize: 1 << 20 });
    const q = s.drv.queues[0] as MockVirtqueue;
    const buf = s.drv.alloc.alloc(16);
    for (let i = 0; i < q.size; i++) q.writeDescriptor(i, { addr: buf, len: 0, flags: VIRTQ_DESC_F.NEXT, next: (i + 1) % q.size });
    for (let i = 0; i < q.size; i++) q.pushAvail(i, i);
    q.setAvailIdx(q.size);
    s.drv.kick(0);
    expect(q.usedIdx, 'chains completed by the first drain').to.equal(65536 / 512);
    await turns(10);
    expect(q.usedIdx, 'chains completed once the deferred drains ran').to.equal(q.size);
  });

  it('refreshCapacity with an unchanged size raises no config change', () => {
    const s = setup();
    let n = 0;
    s.dev.onConfigChange(() => n++);
    s.dev.refreshCapacity();
    expect(n).to.equal(0);
  });

  it('refreshCapacity after a resize updates capacity, bumps the config generation and raises a config change', () => {
    const s = setup();
    let n = 0;
    s.dev.onConfigChange(() => n++);
    const g = s.dev.configGeneration;
    (s.disk as unknown as { size: number }).size = 2 << 20;
    s.dev.refreshCapacity();
    expect([n, s.dev.configGeneration, s.dev.capacity]).to.deep.equal([1, g + 1, 4096]);
  });
});
