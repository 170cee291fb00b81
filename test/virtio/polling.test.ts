import { expect } from 'chai';
import { setup, turns } from './helpers';
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from '../../src/virtio/blk-config';
import type { MockVirtqueue } from '../../src/virtio/mock-driver';
import { PROBE_FIRST_NS } from '../../src/virtio/adaptive-poll';

const US = 1000;

/** Devices of the current test: reset afterwards, since a window on a frozen clock never closes. */
const running: ReturnType<typeof setup>[] = [];
afterEach(async () => {
  for (const s of running.splice(0)) await s.dev.reset();
});

/** A device polling up to 100 µs on a hand-driven clock, past its first probe point. */
function pollingSetup(disk: { maxDelayTurns?: number; random?: () => number } = {}): { s: ReturnType<typeof setup>; q: MockVirtqueue; advance: (ns: number) => void } {
  let t = 0;
  const s = setup({ dev: { pollMaxUs: 100, pollClock: () => t }, disk });
  running.push(s);
  t += PROBE_FIRST_NS;
  return {
    s,
    q: s.drv.queues[0] as MockVirtqueue,
    advance: (ns) => {
      t += ns;
    },
  };
}

/** Serves a first read, kicked as Linux kicks (only when the device asks), so a window opens. */
async function serveFirst(s: ReturnType<typeof setup>): Promise<void> {
  const sub = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 512 });
  expect(s.drv.kickIfNeeded(0)).to.equal(true);
  await s.drv.complete([sub]);
}

describe('VirtioBlkDevice adaptive polling', () => {
  it('is off by default: after a drain the ring asks for the next kick', async () => {
    const s = setup();
    await serveFirst(s);
    expect(s.dev.pollPolicy(0)?.polling).to.equal(false);
    s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    expect(s.drv.kickIfNeeded(0)).to.equal(true);
  });

  it('while a window is open the ring asks for no kick, and a request is served without one', async () => {
    const { s, q } = pollingSetup();
    await serveFirst(s);
    expect(s.dev.pollPolicy(0)?.polling).to.equal(true);
    const sub = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    expect(s.drv.kickIfNeeded(0)).to.equal(false); // the driver skips the kick, as Linux would
    const [done] = await s.drv.complete([sub]);
    expect(done?.status).to.equal(VIRTIO_BLK_S.OK);
    expect(q.usedIdx).to.equal(2);
  });

  it('a request found by the poll counts as a hit', async () => {
    const { s } = pollingSetup();
    await serveFirst(s);
    const sub = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    await s.drv.complete([sub]);
    expect(s.dev.pollPolicy(0)?.hits).to.equal(1);
  });

  it('when the window closes with nothing found, the ring asks for kicks again', async () => {
    const { s, advance } = pollingSetup();
    await serveFirst(s);
    advance(101 * US);
    await turns(3);
    s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    expect(s.drv.kickIfNeeded(0)).to.equal(true);
  });

  it('a request added just as the window closes is still served (no kick needed)', async () => {
    const { s, advance } = pollingSetup();
    await serveFirst(s);
    advance(101 * US); // the window is over, but the device has not looked yet
    const sub = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    expect(s.drv.kickIfNeeded(0)).to.equal(false);
    const [done] = await s.drv.complete([sub]);
    expect(done?.status).to.equal(VIRTIO_BLK_S.OK);
  });

  it('stopQueue during a window stops polling and leaves the ring asking for kicks', async () => {
    const { s, q } = pollingSetup();
    await serveFirst(s);
    const next = await s.dev.stopQueue(0);
    expect(next).to.equal(1);
    expect(q.availEvent).to.equal(1);
    s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    await turns(5);
    expect(q.usedIdx).to.equal(1); // the stopped queue did not pick it up by polling
  });

  it('does not poll while requests are still in the disk; kicks stay on meanwhile', async () => {
    const { s } = pollingSetup({ maxDelayTurns: 20, random: () => 0.99 }); // every operation takes 20 turns
    const sub = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 512 });
    s.drv.kick(0);
    await turns(2);
    expect(s.dev.inFlight(0)).to.be.greaterThan(0);
    const second = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    expect(s.drv.kickIfNeeded(0)).to.equal(true);
    await s.drv.complete([sub, second]);
  });

  it('opens a window once the last in-flight request completes', async () => {
    const { s } = pollingSetup({ maxDelayTurns: 5, random: () => 0.99 });
    await serveFirst(s);
    await turns(2);
    const before = s.dev.pollPolicy(0)?.hits ?? 0;
    const sub = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    s.drv.kickIfNeeded(0); // kicks were on; the poll may find it first either way
    await s.drv.complete([sub]);
    expect(s.dev.pollPolicy(0)?.hits).to.equal(before + 1);
  });

  it('refuses a poll window that is negative, not a number, or over a second', () => {
    for (const bad of [-1, Number.NaN, 1_000_001]) {
      expect(() => setup({ dev: { pollMaxUs: bad }, start: false }), String(bad)).to.throw(RangeError, /pollMaxUs .* is not 0\.\.1000000/);
    }
  });

  it('pollCounts keeps the windows of a stopped queue', async () => {
    const { s } = pollingSetup();
    await serveFirst(s);
    const sub = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 1, readLen: 512 });
    await s.drv.complete([sub]);
    await s.dev.stopQueue(0);
    expect(s.dev.pollCounts.hits).to.equal(1);
  });

  it('the poll finds ring corruption without a kick and the device asks for a reset', async () => {
    const { s, q } = pollingSetup();
    await serveFirst(s);
    q.setAvailIdx(q.availIdx + 1000); // further ahead than the queue size: ring corruption
    await turns(5);
    expect(s.dev.needsReset).to.equal(true);
  });
});
