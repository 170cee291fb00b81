import { expect } from 'chai';
import { setup, pattern, RAM_BASE, turns, rawChain, blkHeader as header } from './helpers';
import type { Setup } from './helpers';
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from '../../src/virtio/blk-config';
import { VIRTQ_DESC_F } from '../../src/virtio/chain';
import { MockBlkDriver, encodeDwzSegment, snapshotMemory, changedOutside } from '../../src/virtio/mock-driver';
import type { MockVirtqueue } from '../../src/virtio/mock-driver';
import { splitRingSizes } from '../../src/virtio/queue';

/**
 * The malformed-input matrix: each case builds one bad chain (or corrupts the ring), kicks, and
 * checks the documented outcome, that no guest byte outside the request's writable buffers and
 * the used ring changed, and that the device still serves a valid request afterwards (except
 * after NEEDS_RESET, where the spec requires a reset first).
 */

const { NEXT, WRITE, INDIRECT } = VIRTQ_DESC_F;

interface Expect {
  /** Used length of the bad request (0 = head returned without status). */
  usedLen?: number;
  /** Status byte expected at `statusAddr`. */
  status?: number;
  needsReset?: boolean;
  /** Extra checks run right after the bad request (before the follow-up valid request). */
  verify?: () => void;
}

/** Puts `bytes` into fresh guest memory and returns its address. */
function put(s: Setup, bytes: Uint8Array | number, fill = 0): number {
  const len = typeof bytes === 'number' ? bytes : bytes.length;
  const a = s.drv.alloc.alloc(Math.max(len, 1));
  if (typeof bytes === 'number') s.mem.slice(a, Math.max(len, 1)).fill(fill);
  else s.mem.writeFrom(a, bytes);
  return a;
}

/** Submits a well-formed chain carrying `req` and returns where the device may write. */
function submitted(s: Setup, req: Parameters<Setup['drv']['submit']>[1]): { writable: { addr: number; len: number }[]; statusAddr: number } {
  const r = s.drv.submit(0, req);
  return { writable: [...r.writableRanges], statusAddr: r.statusAddr };
}

/**
 * Runs one malformed case: `build` publishes the bad chain and returns the writable ranges the
 * device may touch and where the status byte is.
 */
async function check(
  s: Setup,
  build: () => { writable?: { addr: number; len: number }[]; statusAddr?: number; publish?: boolean },
  exp: Expect,
): Promise<void> {
  const q = s.drv.queues[0] as MockVirtqueue;
  const diskBefore = Buffer.from(s.disk.priv.data);
  let configChanges = 0;
  s.dev.onConfigChange(() => configChanges++);
  const b = build();
  const snapAfterBuild = snapshotMemory(s.mem);
  s.drv.kick(0);
  await turns(20);
  const used = q.reap();
  const usedRing = { addr: q.usedRing, len: splitRingSizes(q.size).used };
  const changed = changedOutside(s.mem, snapAfterBuild, [usedRing, ...(b.writable ?? [])]);
  expect(changed.map((a) => '0x' + a.toString(16)), 'bytes changed outside the request').to.deep.equal([]);
  if (exp.needsReset) {
    expect(s.dev.needsReset, 'needsReset').to.equal(true);
    expect(configChanges, 'config change notifications').to.equal(1);
    expect(used, 'used entries').to.deep.equal([]);
    expect(s.disk.priv.data.equals(diskBefore), 'disk unchanged').to.equal(true);
    // A kick now does nothing until reset; after reset the device works again.
    await s.dev.reset();
    expect(s.dev.needsReset).to.equal(false);
    const fresh = new MockBlkDriver(s.dev, s.mem);
    fresh.start();
    const ok = await fresh.run(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
    expect(ok.status, 'serves again after reset').to.equal(VIRTIO_BLK_S.OK);
    return;
  }
  expect(s.dev.needsReset, 'needsReset').to.equal(false);
  expect(used.length, 'one used entry').to.equal(1);
  expect(used[0]?.len, 'used length').to.equal(exp.usedLen ?? 0);
  if (exp.status !== undefined) {
    expect(b.statusAddr, 'test must say where the status is').to.be.a('number');
    expect(s.mem.readU8(b.statusAddr as number), 'status').to.equal(exp.status);
  }
  exp.verify?.();
  // The device keeps serving valid requests.
  s.disk.priv.data.set(pattern(512, 99), 0);
  const ok = await s.drv.run(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 512 });
  expect(ok.status).to.equal(VIRTIO_BLK_S.OK);
  expect(ok.data.equals(pattern(512, 99))).to.equal(true);
}

describe('virtio-blk malformed input matrix', () => {
  let s: Setup;
  let q: MockVirtqueue;
  beforeEach(() => {
    s = setup();
    q = s.drv.queues[0] as MockVirtqueue;
  });

  // --- descriptor-level errors: head returned with used length 0, nothing written ---

  it('descriptor loop: head returned with used length 0', async () => {
    const st = put(s, 1, 0xee);
    await check(s, () => {
      const h = rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.IN, 0)), len: 16, flags: NEXT, next: 1 },
        { addr: st, len: 1, flags: WRITE | NEXT, next: 0 },
      ]);
      q.publish(h);
      return {};
    }, { usedLen: 0 });
    expect(s.mem.readU8(st)).to.equal(0xee);
  });

  it('next >= queue size: head returned with used length 0', async () => {
    await check(s, () => {
      const h = rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.FLUSH, 0)), len: 16, flags: NEXT, rawNext: q.size + 3 },
      ]);
      q.publish(h);
      return {};
    }, { usedLen: 0 });
  });

  it('chain longer than the queue (indirect table of size + 1 entries): used length 0', async () => {
    await check(s, () => {
      const n = q.size + 1;
      const table = s.drv.alloc.alloc(16 * n);
      const st = put(s, 1);
      for (let i = 0; i < n; i++) {
        q.writeDescriptor(i, i === n - 1 ? { addr: st, len: 1, flags: WRITE, next: 0 } : { addr: put(s, header(VIRTIO_BLK_T.IN, 0)), len: 1, flags: NEXT, next: i + 1 }, table);
      }
      q.publish(rawChain(q, [{ addr: table, len: 16 * n, flags: INDIRECT }]));
      return {};
    }, { usedLen: 0 });
  });

  it('indirect table length not a multiple of 16: used length 0', async () => {
    await check(s, () => {
      q.publish(rawChain(q, [{ addr: put(s, 64), len: 24, flags: INDIRECT }]));
      return {};
    }, { usedLen: 0 });
  });

  it('indirect table of length 0: used length 0', async () => {
    await check(s, () => {
      q.publish(rawChain(q, [{ addr: put(s, 64), len: 0, flags: INDIRECT }]));
      return {};
    }, { usedLen: 0 });
  });

  it('nested indirect table: used length 0', async () => {
    await check(s, () => {
      const inner = s.drv.alloc.alloc(32);
      const outer = s.drv.alloc.alloc(32);
      q.writeDescriptor(0, { addr: put(s, header(VIRTIO_BLK_T.FLUSH, 0)), len: 16, flags: NEXT, next: 1 }, outer);
      q.writeDescriptor(1, { addr: inner, len: 32, flags: INDIRECT, next: 0 }, outer);
      q.writeDescriptor(0, { addr: put(s, 1), len: 1, flags: WRITE, next: 0 }, inner);
      q.publish(rawChain(q, [{ addr: outer, len: 32, flags: INDIRECT }]));
      return {};
    }, { usedLen: 0 });
  });

  it('INDIRECT together with NEXT: used length 0', async () => {
    await check(s, () => {
      const t = s.drv.alloc.alloc(16);
      q.writeDescriptor(0, { addr: put(s, header(VIRTIO_BLK_T.FLUSH, 0)), len: 16, flags: 0, next: 0 }, t);
      q.publish(rawChain(q, [
        { addr: t, len: 16, flags: INDIRECT | NEXT, next: 1 },
        { addr: put(s, 1), len: 1, flags: WRITE },
      ]));
      return {};
    }, { usedLen: 0 });
  });

  it('next >= indirect table size inside an indirect table: used length 0', async () => {
    await check(s, () => {
      const t = s.drv.alloc.alloc(32);
      q.writeDescriptor(0, { addr: put(s, header(VIRTIO_BLK_T.FLUSH, 0)), len: 16, flags: NEXT, next: 2 }, t);
      q.writeDescriptor(1, { addr: put(s, 1), len: 1, flags: WRITE, next: 0 }, t);
      q.publish(rawChain(q, [{ addr: t, len: 32, flags: INDIRECT }]));
      return {};
    }, { usedLen: 0, verify: () => expect(s.disk.priv.counts.flush).to.equal(0) });
  });

  it('indirect table outside guest memory: used length 0', async () => {
    await check(s, () => {
      q.publish(rawChain(q, [{ addr: 0x1000, len: 32, flags: INDIRECT }]));
      return {};
    }, { usedLen: 0 });
  });

  // An IN whose data buffer lies (partly) outside guest memory.
  for (const [name, addr] of [
    ['buffer outside guest memory', (_s: Setup): bigint | number => 0x1000], // below RAM_BASE
    ['buffer running past the end of guest memory', (st: Setup): bigint | number => RAM_BASE + st.ram.length - 256],
    ['buffer address wrapping past 2^64', (): bigint | number => 0xffff_ffff_ffff_ff00n],
  ] as const) {
    it(`${name}: used length 0`, async () => {
      await check(s, () => {
        q.publish(rawChain(q, [
          { addr: put(s, header(VIRTIO_BLK_T.IN, 0)), len: 16, flags: NEXT, next: 1 },
          { addr: addr(s), len: 512, flags: WRITE | NEXT, next: 2 },
          { addr: put(s, 1), len: 1, flags: WRITE },
        ]));
        return {};
      }, { usedLen: 0 });
    });
  }

  it('total chain length over 2^32 - 1: used length 0', async () => {
    await check(s, () => {
      q.publish(rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.OUT, 0)), len: 0xffff_fff0, flags: NEXT, next: 1 },
        { addr: put(s, 512), len: 0x20, flags: NEXT, next: 2 },
        { addr: put(s, 1), len: 1, flags: WRITE },
      ]));
      return {};
    }, { usedLen: 0 });
  });

  it('readable descriptor after a writable one (status read-only after IN data): used length 0', async () => {
    await check(s, () => {
      const data = put(s, 512, 0xee);
      q.publish(rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.IN, 0)), len: 16, flags: NEXT, next: 1 },
        { addr: data, len: 512, flags: WRITE | NEXT, next: 2 },
        { addr: put(s, 1), len: 1, flags: 0 },
      ]));
      return { writable: [{ addr: data, len: 512 }] };
    }, { usedLen: 0 });
  });

  // --- request-level errors with a usable status byte ---

  it('header in a writable buffer: IOERR in the last writable byte', async () => {
    await check(s, () => {
      const hdr = put(s, header(VIRTIO_BLK_T.IN, 0));
      const st = put(s, 1, 0xee);
      q.publish(rawChain(q, [
        { addr: hdr, len: 16, flags: WRITE | NEXT, next: 1 },
        { addr: st, len: 1, flags: WRITE },
      ]));
      return { writable: [{ addr: hdr, len: 16 }, { addr: st, len: 1 }], statusAddr: st };
    }, { usedLen: 17, status: VIRTIO_BLK_S.IOERR });
  });

  it('header shorter than 16 bytes: IOERR', async () => {
    await check(s, () => {
      const st = put(s, 1, 0xee);
      q.publish(rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.IN, 0)), len: 12, flags: NEXT, next: 1 },
        { addr: st, len: 1, flags: WRITE },
      ]));
      return { writable: [{ addr: st, len: 1 }], statusAddr: st };
    }, { usedLen: 1, status: VIRTIO_BLK_S.IOERR });
  });

  it('status missing (no writable descriptor): head returned with used length 0, disk untouched', async () => {
    await check(s, () => {
      q.publish(rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.OUT, 0)), len: 16, flags: NEXT, next: 1 },
        { addr: put(s, pattern(512, 1)), len: 512, flags: 0 },
      ]));
      return {};
    }, { usedLen: 0, verify: () => { expect(s.disk.priv.counts.write).to.equal(0); } });
  });

  it('status in a read-only buffer (OUT): used length 0, disk untouched', async () => {
    await check(s, () => {
      q.publish(rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.OUT, 0)), len: 16, flags: NEXT, next: 1 },
        { addr: put(s, pattern(512, 1)), len: 512, flags: NEXT, next: 2 },
        { addr: put(s, 1), len: 1, flags: 0 },
      ]));
      return {};
    }, { usedLen: 0, verify: () => { expect(s.disk.priv.counts.write).to.equal(0); } });
  });

  it('status of length 0: used length 0', async () => {
    await check(s, () => {
      q.publish(rawChain(q, [
        { addr: put(s, header(VIRTIO_BLK_T.FLUSH, 0)), len: 16, flags: NEXT, next: 1 },
        { addr: put(s, 1), len: 0, flags: WRITE },
      ]));
      return {};
    }, { usedLen: 0, verify: () => { expect(s.disk.priv.counts.flush).to.equal(0); } });
  });

  it('data length not a multiple of 512: IOERR, disk untouched', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.OUT, sector: 0, data: pattern(513, 1) }), { usedLen: 1, status: VIRTIO_BLK_S.IOERR, verify: () => { expect(s.disk.priv.counts.write).to.equal(0); } });
  });

  it('IN data length not a multiple of 512: IOERR', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 100 }), { usedLen: 101, status: VIRTIO_BLK_S.IOERR });
  });

  it('sector + length beyond capacity: IOERR', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.IN, sector: s.dev.capacity - 1, readLen: 1024 }), { usedLen: 1025, status: VIRTIO_BLK_S.IOERR, verify: () => { expect(s.disk.priv.counts.read).to.equal(0); } });
  });

  it('sector overflowing u64 arithmetic (2^64 - 1): IOERR', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.OUT, sector: 0xffff_ffff_ffff_ffffn, data: pattern(512, 1) }), { usedLen: 1, status: VIRTIO_BLK_S.IOERR, verify: () => { expect(s.disk.priv.counts.write).to.equal(0); } });
  });

  it('sector just above 2^53 (not representable as a number): IOERR', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.IN, sector: (1n << 53n) + 1n, readLen: 512 }), { usedLen: 513, status: VIRTIO_BLK_S.IOERR });
  });

  it('unknown request type: UNSUPP', async () => {
    await check(s, () => submitted(s, { type: 99, sector: 0 }), { usedLen: 1, status: VIRTIO_BLK_S.UNSUPP });
  });

  it('GET_LIFETIME (not offered): UNSUPP', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.GET_LIFETIME, sector: 0 }), { usedLen: 1, status: VIRTIO_BLK_S.UNSUPP });
  });

  it('legacy SCSI command (type 2): UNSUPP', async () => {
    await check(s, () => submitted(s, { type: 2, sector: 0 }), { usedLen: 1, status: VIRTIO_BLK_S.UNSUPP });
  });

  it('legacy BARRIER flag on an IN request: UNSUPP, disk untouched', async () => {
    await check(s, () => submitted(s, { type: 0x8000_0000 | VIRTIO_BLK_T.IN, sector: 0, readLen: 512 }), {
      usedLen: 1,
      status: VIRTIO_BLK_S.UNSUPP,
      verify: () => expect(s.disk.priv.counts.read).to.equal(0),
    });
  });

  it('write-zeroes with unknown flags: UNSUPP, disk untouched', async () => {
    s.disk.priv.data.fill(0x55);
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.WRITE_ZEROES, sector: 0, data: encodeDwzSegment(4, 2, 0x2) }), { usedLen: 1, status: VIRTIO_BLK_S.UNSUPP, verify: () => { expect(s.disk.priv.counts.writeZeroes).to.equal(0); } });
  });

  it('discard with the unmap flag: UNSUPP (spec 5.2.6.2)', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: encodeDwzSegment(4, 2, 1) }), { usedLen: 1, status: VIRTIO_BLK_S.UNSUPP, verify: () => { expect(s.disk.priv.counts.discard).to.equal(0); } });
  });

  it('discard with more segments than max_discard_seg: UNSUPP', async () => {
    await check(s, () => {
      const segs = Buffer.concat(Array.from({ length: 33 }, (_, i) => encodeDwzSegment(i, 1, 0)));
      const r = s.drv.submit(0, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: segs });
      return { writable: [...r.writableRanges], statusAddr: r.statusAddr };
    }, { usedLen: 1, status: VIRTIO_BLK_S.UNSUPP, verify: () => { expect(s.disk.priv.counts.discard).to.equal(0); } });
  });

  it('discard with an unknown flag: UNSUPP, disk untouched', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: encodeDwzSegment(4, 2, 0x4) }), {
      usedLen: 1,
      status: VIRTIO_BLK_S.UNSUPP,
      verify: () => expect(s.disk.priv.counts.discard).to.equal(0),
    });
  });

  it('write-zeroes with more segments than max_write_zeroes_seg: UNSUPP, disk untouched', async () => {
    const segs = Buffer.concat(Array.from({ length: 33 }, (_, i) => encodeDwzSegment(i, 1, 0)));
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.WRITE_ZEROES, sector: 0, data: segs }), {
      usedLen: 1,
      status: VIRTIO_BLK_S.UNSUPP,
      verify: () => expect(s.disk.priv.counts.writeZeroes).to.equal(0),
    });
  });

  it('discard segment larger than max_discard_sectors: IOERR, disk untouched', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: encodeDwzSegment(0, (1 << 22) + 1, 0) }), {
      usedLen: 1,
      status: VIRTIO_BLK_S.IOERR,
      verify: () => expect(s.disk.priv.counts.discard).to.equal(0),
    });
  });

  it('discard segment whose sector overflows u64 arithmetic: IOERR, disk untouched', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: encodeDwzSegment(0xffff_ffff_ffff_fffen, 4, 0) }), {
      usedLen: 1,
      status: VIRTIO_BLK_S.IOERR,
      verify: () => expect(s.disk.priv.counts.discard).to.equal(0),
    });
  });

  it('discard payload not a whole number of 16-byte segments: IOERR', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: Buffer.alloc(20) }), { usedLen: 1, status: VIRTIO_BLK_S.IOERR });
  });

  it('write-zeroes with no segment: IOERR', async () => {
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.WRITE_ZEROES, sector: 0 }), { usedLen: 1, status: VIRTIO_BLK_S.IOERR });
  });

  it('write-zeroes segment beyond capacity: IOERR, nothing zeroed (all segments checked first)', async () => {
    s.disk.priv.data.fill(0x55);
    await check(s, () => {
      const segs = Buffer.concat([encodeDwzSegment(0, 1, 0), encodeDwzSegment(s.dev.capacity - 1, 2, 0)]);
      const r = s.drv.submit(0, { type: VIRTIO_BLK_T.WRITE_ZEROES, sector: 0, data: segs });
      return { writable: [...r.writableRanges], statusAddr: r.statusAddr };
    }, { usedLen: 1, status: VIRTIO_BLK_S.IOERR, verify: () => { expect(s.disk.priv.data[0]).to.equal(0x55); } });
  });

  it('discard when DISCARD was not negotiated: UNSUPP', async () => {
    s = setup({ drv: { features: setup({ start: false }).dev.deviceFeatures & ~(1n << 13n) } });
    q = s.drv.queues[0] as MockVirtqueue;
    await check(s, () => submitted(s, { type: VIRTIO_BLK_T.DISCARD, sector: 0, data: encodeDwzSegment(0, 1, 0) }), { usedLen: 1, status: VIRTIO_BLK_S.UNSUPP });
  });

  for (const [name, type, data] of [
    ['OUT', VIRTIO_BLK_T.OUT, pattern(512, 3)],
    ['WRITE_ZEROES', VIRTIO_BLK_T.WRITE_ZEROES, encodeDwzSegment(0, 1, 0)],
    ['DISCARD', VIRTIO_BLK_T.DISCARD, encodeDwzSegment(0, 1, 0)],
  ] as const) {
    it(`${name} to a read-only disk: IOERR, nothing written`, async () => {
      s = setup({ dev: { readonly: true } });
      q = s.drv.queues[0] as MockVirtqueue;
      s.disk.priv.data.fill(0x55);
      await check(s, () => submitted(s, { type, sector: 0, data }), {
        usedLen: 1,
        status: VIRTIO_BLK_S.IOERR,
        verify: () => {
          expect(s.disk.priv.counts.write + s.disk.priv.counts.writeZeroes + s.disk.priv.counts.discard).to.equal(0);
          expect(s.disk.priv.data.every((b) => b === 0x55)).to.equal(true);
        },
      });
    });
  }

  // --- ring corruption: DEVICE_NEEDS_RESET ---

  it('avail idx jumping more than the queue size ahead: NEEDS_RESET + config change', async () => {
    await check(s, () => {
      s.drv.submit(0, { type: VIRTIO_BLK_T.FLUSH, sector: 0 });
      q.setAvailIdx(q.size + 5);
      return {};
    }, { needsReset: true });
  });

  it('avail ring entry with a head >= queue size: NEEDS_RESET', async () => {
    await check(s, () => {
      q.pushAvail(q.size + 1);
      q.setAvailIdx(1);
      return {};
    }, { needsReset: true });
  });

  it('a head made available again while in flight: NEEDS_RESET, the first one still completes once', async () => {
    s = setup({ disk: { maxDelayTurns: 50, random: () => 0.99 } });
    q = s.drv.queues[0] as MockVirtqueue;
    let configChanges = 0;
    s.dev.onConfigChange(() => configChanges++);
    const r = s.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 512 });
    s.drv.kick(0);
    expect(s.dev.inFlight(0)).to.equal(1);
    q.publish(r.head); // same head again
    s.drv.kick(0);
    expect(s.dev.needsReset).to.equal(true);
    expect(configChanges).to.equal(1);
    const done = await s.drv.complete([r]);
    expect(done[0]?.status).to.equal(VIRTIO_BLK_S.OK);
    await turns(60);
    expect(q.reap()).to.deep.equal([]); // completed exactly once
    await s.dev.reset();
    expect(s.dev.needsReset).to.equal(false);
  });

  it('a kick for a queue that does not exist or is not started is ignored', () => {
    s.dev.queueNotify(7);
    s.dev.queueNotify(-1);
    expect(s.dev.needsReset).to.equal(false);
  });
});
