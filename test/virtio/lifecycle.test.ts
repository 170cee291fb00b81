import { expect } from 'chai';
import { setup, pattern } from './helpers';
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from '../../src/virtio/blk-config';
import { VIRTIO_F } from '../../src/virtio/device';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import type { MockVirtqueue } from '../../src/virtio/mock-driver';
import { isVblkError } from '../../src/errors';

async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
}

describe('VirtioBlkDevice lifecycle, batching and notifications', () => {
  it('stopQueue waits for every in-flight request, then resolves to the next avail index', async () => {
    const s = setup({ disk: { maxDelayTurns: 30 } });
    const q = s.drv.queues[0] as MockVirtqueue;
    const subs = Array.from({ length: 5 }, (_, i) => s.drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: i, data: pattern(512, i) }));
    s.drv.kick(0);
    expect(s.dev.inFlight(0)).to.equal(5);
    const next = await s.dev.stopQueue(0);
    expect(next).to.equal(5);
    const used = q.reap();
    expect(used.map((u) => u.id).sort()).to.deep.equal(subs.map((r) => r.head).sort());
    for (const r of subs) expect(s.mem.readU8(r.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
  });

  it('a stopped queue ignores kicks; a restarted one resumes at the given index', async () => {
    const s = setup();
    const q = s.drv.queues[0] as MockVirtqueue;
    await s.drv.run(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    const next = await s.dev.stopQueue(0);
    const r = s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(5);
    expect(q.reap()).to.deep.equal([]);
    s.dev.startQueue(0, { ...q.queueStart(), nextAvail: next });
    s.drv.kick(0);
    const [c] = await s.drv.complete([r]);
    expect(c?.status).to.equal(VIRTIO_BLK_S.OK);
  });

  it('starting a queue twice is refused', () => {
    const s = setup();
    const q = s.drv.queues[0] as MockVirtqueue;
    let caught: unknown;
    try {
      s.dev.startQueue(0, q.queueStart());
    } catch (e) {
      caught = e;
    }
    expect(isVblkError(caught, 'E_VIRTIO_STATE')).to.equal(true);
  });

  it('reset drains in-flight requests, forgets features and allows a fresh start', async () => {
    const s = setup({ disk: { maxDelayTurns: 20 } });
    const q = s.drv.queues[0] as MockVirtqueue;
    const subs = Array.from({ length: 4 }, (_, i) => s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: i, readLen: 512 }));
    s.drv.kick(0);
    await s.dev.reset();
    expect(q.reap().length).to.equal(subs.length);
    expect(s.dev.driverFeatures).to.equal(0n);
    expect(s.dev.inFlight(0)).to.equal(0);
    const d2 = new MockBlkDriver(s.dev, s.mem);
    d2.start();
    expect((await d2.run(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 })).status).to.equal(VIRTIO_BLK_S.OK);
  });

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

  it('without EVENT_IDX, NO_INTERRUPT suppresses interrupts and the used ring still fills', async () => {
    const s = setup({ drv: { features: setup({ start: false }).dev.deviceFeatures & ~(1n << VIRTIO_F.EVENT_IDX) } });
    const q = s.drv.queues[0] as MockVirtqueue;
    q.setNoInterrupt(true);
    s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(3);
    expect(q.usedIdx).to.equal(1);
    expect(q.interrupts).to.equal(0);
    q.setNoInterrupt(false);
    s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    s.drv.kick(0);
    await turns(3);
    expect(q.interrupts).to.equal(1);
    expect(q.usedFlags).to.equal(0); // NO_NOTIFY cleared after draining
  });

  it('a failing flush in writethrough mode turns the write into IOERR', async () => {
    const s = setup({ dev: { writeback: false }, disk: { fail: (op) => op === 'flush' } });
    const r = await s.drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 0, data: pattern(512, 1) });
    expect(r.status).to.equal(VIRTIO_BLK_S.IOERR);
  });

  it('refreshCapacity bumps the config generation and raises a config change', async () => {
    const s = setup();
    let n = 0;
    s.dev.onConfigChange(() => n++);
    const g = s.dev.configGeneration;
    s.dev.refreshCapacity(); // same size: nothing
    expect(n).to.equal(0);
    (s.disk as unknown as { size: number }).size = 2 << 20;
    s.dev.refreshCapacity();
    expect(n).to.equal(1);
    expect(s.dev.configGeneration).to.equal(g + 1);
    expect(s.dev.capacity).to.equal(4096);
  });
});
