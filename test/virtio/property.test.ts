import { expect } from 'chai';
import fc from 'fast-check';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { GuestMemory } from '../../src/memory/guest-memory';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import type { DiskImage } from '../../src/disk/disk-image';
import { openDiskImage, FORMATS } from '../../src/disk/open';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import { MockBlkDriver, encodeDwzSegment } from '../../src/virtio/mock-driver';
import type { SubmittedBlkRequest, BlkCompletion } from '../../src/virtio/mock-driver';
import { VIRTIO_BLK_T, VIRTIO_BLK_S, VIRTIO_BLK_F } from '../../src/virtio/blk-config';
import { VIRTIO_F } from '../../src/virtio/device';
import { pattern, rng, RAM_BASE } from './helpers';
import { skipBecause } from '../helpers/skip';
import { useFuzzSeed } from '../helpers/seed';

/**
 * Property: any stream of valid requests (random descriptor splits, direct or indirect, spread
 * over several queues, completed in random order) gives the same data and statuses as a
 * reference model of the disk (a plain Buffer).
 */

type Op = 'in' | 'out' | 'flush' | 'getid' | 'wz' | 'discard';

interface Req {
  op: Op;
  queue: number;
  sector: number;
  nsec: number;
  seed: number;
  unmap: boolean;
  indirect: boolean;
  rcuts: number[];
  wcuts: number[];
}

const NUM_QUEUES = 2;
const DISK_SECTORS = 2048; // 1 MiB

const reqArb: fc.Arbitrary<Req> = fc.record({
  op: fc.constantFrom<Op>('in', 'in', 'out', 'out', 'flush', 'getid', 'wz', 'discard'),
  queue: fc.integer({ min: 0, max: NUM_QUEUES - 1 }),
  sector: fc.integer({ min: 0, max: DISK_SECTORS - 1 }),
  nsec: fc.integer({ min: 1, max: 16 }),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
  unmap: fc.boolean(),
  indirect: fc.boolean(),
  rcuts: fc.array(fc.integer({ min: 1, max: 16 * 512 }), { maxLength: 3 }),
  wcuts: fc.array(fc.integer({ min: 1, max: 16 * 512 }), { maxLength: 3 }),
});

const streamArb = fc.record({
  batches: fc.array(fc.array(reqArb, { minLength: 1, maxLength: 6 }), { minLength: 1, maxLength: 6 }),
  delaySeed: fc.integer({ min: 1, max: 0x7fffffff }),
  eventIdx: fc.boolean(),
  indirectDesc: fc.boolean(),
  /** Kick only when the device asked for it (avail_event / NO_NOTIFY), like Linux. */
  kickOnlyWhenAsked: fc.boolean(),
});

function isWrite(op: Op): boolean {
  return op === 'out' || op === 'wz' || op === 'discard';
}

/** Drops requests whose range overlaps a write in the same batch (their order is undefined). */
function conflictFree(batch: Req[], cap: number): Req[] {
  const kept: Req[] = [];
  for (const r0 of batch) {
    const r = { ...r0, nsec: Math.min(r0.nsec, cap - r0.sector) };
    if (r.nsec <= 0) continue;
    const ranged = r.op === 'in' || isWrite(r.op);
    const clash = ranged && kept.some((k) => (isWrite(k.op) || isWrite(r.op)) && (k.op === 'in' || isWrite(k.op)) && r.sector < k.sector + k.nsec && k.sector < r.sector + r.nsec);
    if (!clash) kept.push(r);
  }
  return kept;
}

interface Target {
  disk: DiskImage;
  /** Current contents as the model believes them. */
  model: Buffer;
}

/**
 * What a sector may read as. After DISCARD the contents are unspecified by virtio (5.2.6.2: only
 * WRITE_ZEROES promises zeroes), and formats do differ (qcow2 keeps the data of a partial
 * cluster, as QEMU does): a discarded sector may read as zeroes or as what it held before, until
 * it is written again.
 */
class Model {
  readonly data: Buffer;
  readonly #before = new Map<number, Buffer>();

  constructor(data: Buffer) {
    this.data = data;
  }

  write(sector: number, bytes: Buffer): void {
    bytes.copy(this.data, sector * 512);
    for (let s = sector; s < sector + bytes.length / 512; s++) this.#before.delete(s);
  }

  zero(sector: number, n: number): void {
    this.data.fill(0, sector * 512, (sector + n) * 512);
    for (let s = sector; s < sector + n; s++) this.#before.delete(s);
  }

  discard(sector: number, n: number): void {
    for (let s = sector; s < sector + n; s++) {
      if (!this.#before.has(s)) this.#before.set(s, Buffer.from(this.data.subarray(s * 512, s * 512 + 512)));
    }
    this.data.fill(0, sector * 512, (sector + n) * 512);
  }

  /** The first sector of `buf` (read at `sector`) that matches no allowed content, or -1. */
  mismatch(sector: number, buf: Buffer): number {
    for (let i = 0; i < buf.length / 512; i++) {
      const s = sector + i;
      const got = buf.subarray(i * 512, i * 512 + 512);
      if (got.equals(this.data.subarray(s * 512, s * 512 + 512))) continue;
      const before = this.#before.get(s);
      if (before !== undefined && got.equals(before)) continue;
      return s;
    }
    return -1;
  }

  clone(): Model {
    const m = new Model(Buffer.from(this.data));
    for (const [k, v] of this.#before) m.#before.set(k, v);
    return m;
  }
}

async function runStream(t: Target, stream: { batches: Req[][]; eventIdx?: boolean; indirectDesc?: boolean; kickOnlyWhenAsked?: boolean }, writable: boolean): Promise<void> {
  const model = new Model(t.model);
  // Two adjacent regions: buffers may straddle the boundary (gather path).
  const half = 2 << 20;
  const mem = new GuestMemory([
    { guestAddr: RAM_BASE, buffer: Buffer.alloc(half) },
    { guestAddr: RAM_BASE + half, buffer: Buffer.alloc(half) },
  ]);
  const dev = new VirtioBlkDevice(t.disk, { numQueues: NUM_QUEUES, queueSize: 64, serial: 'prop-serial' });
  const ringsEnd = RAM_BASE + 0x20000;
  let features = dev.deviceFeatures;
  if (stream.eventIdx === false) features &= ~(1n << VIRTIO_F.EVENT_IDX);
  if (stream.indirectDesc === false) features &= ~(1n << VIRTIO_F.INDIRECT_DESC);
  const drv = new MockBlkDriver(dev, mem, { dataBase: ringsEnd, dataSize: 2 * half - 0x20000, features });
  drv.start();
  const hasDiscard = drv.has(VIRTIO_BLK_F.DISCARD);
  const capacity = dev.capacity;
  for (const raw of stream.batches) {
    const batch = conflictFree(raw, capacity).filter((r) => r.op !== 'discard' || hasDiscard);
    drv.alloc.reset();
    const subs: { r: Req; s: SubmittedBlkRequest }[] = [];
    for (const r of batch) {
      const bytes = r.nsec * 512;
      let spec;
      if (r.op === 'in') spec = { type: VIRTIO_BLK_T.IN, sector: r.sector, readLen: bytes };
      else if (r.op === 'out') spec = { type: VIRTIO_BLK_T.OUT, sector: r.sector, data: pattern(bytes, r.seed) };
      else if (r.op === 'flush') spec = { type: VIRTIO_BLK_T.FLUSH, sector: 0 };
      else if (r.op === 'getid') spec = { type: VIRTIO_BLK_T.GET_ID, sector: 0, readLen: 20 };
      else spec = { type: r.op === 'wz' ? VIRTIO_BLK_T.WRITE_ZEROES : VIRTIO_BLK_T.DISCARD, sector: 0, data: encodeDwzSegment(r.sector, r.nsec, r.op === 'wz' && r.unmap ? 1 : 0) };
      subs.push({ r, s: drv.submit(r.queue, spec, { indirect: r.indirect && drv.has(VIRTIO_F.INDIRECT_DESC), readableCuts: [16, ...r.rcuts], writableCuts: r.wcuts }) });
    }
    for (let q = 0; q < NUM_QUEUES; q++) {
      if (stream.kickOnlyWhenAsked === true) drv.kickIfNeeded(q);
      else drv.kick(q);
    }
    const results = new Map<SubmittedBlkRequest, BlkCompletion>();
    for (let q = 0; q < NUM_QUEUES; q++) {
      const mine = subs.filter((x) => x.r.queue === q).map((x) => x.s);
      const done = await drv.complete(mine);
      mine.forEach((s, i) => results.set(s, done[i] as BlkCompletion));
    }
    const before = model.clone();
    for (const { r, s } of subs) {
      const c = results.get(s) as BlkCompletion;
      const bytes = r.nsec * 512;
      if (r.op === 'in') {
        expect(c.status, 'IN status').to.equal(VIRTIO_BLK_S.OK);
        expect(before.mismatch(r.sector, c.data), `IN data at sector ${r.sector}: first wrong sector`).to.equal(-1);
        expect(c.usedLen).to.equal(bytes + 1);
      } else if (r.op === 'getid') {
        expect(c.status).to.equal(VIRTIO_BLK_S.OK);
        expect(c.data.toString('latin1')).to.equal('prop-serial\0\0\0\0\0\0\0\0\0');
      } else if (r.op === 'flush') {
        expect(c.status).to.equal(VIRTIO_BLK_S.OK);
      } else if (!writable) {
        expect(c.status, `${r.op} on a read-only disk`).to.equal(VIRTIO_BLK_S.IOERR);
      } else {
        expect(c.status, `${r.op} status`).to.equal(VIRTIO_BLK_S.OK);
        if (r.op === 'out') model.write(r.sector, pattern(bytes, r.seed));
        else if (r.op === 'wz') model.zero(r.sector, r.nsec);
        else model.discard(r.sector, r.nsec);
      }
    }
  }
  await dev.reset();
  const all = Buffer.alloc(t.model.length);
  await t.disk.readSector(0, all);
  expect(model.mismatch(0, all), 'final disk contents: first sector differing from the model').to.equal(-1);
}

describe('virtio-blk property: random valid request streams match a reference model', function () {
  this.timeout(120000);
  before(() => {
    useFuzzSeed();
  });

  it('on a memory disk with random completion order', async () => {
    await fc.assert(
      fc.asyncProperty(streamArb, async (stream) => {
        const disk = createMemoryDisk({ size: DISK_SECTORS * 512, maxDelayTurns: 4, random: rng(stream.delaySeed) });
        await runStream({ disk, model: Buffer.alloc(DISK_SECTORS * 512) }, stream, true);
      }),
      { numRuns: 150 },
    );
  });

  it('on a read-only memory disk (writes get IOERR, nothing changes)', async () => {
    await fc.assert(
      fc.asyncProperty(streamArb, async (stream) => {
        const contents = pattern(DISK_SECTORS * 512, stream.delaySeed);
        const disk = createMemoryDisk({ size: DISK_SECTORS * 512, readonly: true, contents, maxDelayTurns: 3, random: rng(stream.delaySeed) });
        await runStream({ disk, model: Buffer.from(contents) }, stream, false);
      }),
      { numRuns: 40 },
    );
  });

  describe('on image files', () => {
    let dir = '';
    before(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-virtio-prop-'));
    });
    after(() => {
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** Runs the property on a fresh copy of `base` per run (so a failing run shrinks on a clean image). */
    async function onCopies(base: string, format: 'raw' | 'qcow2', writable: boolean, numRuns: number, afterRun?: (file: string) => void): Promise<void> {
      const model0 = await (async () => {
        const d = await openDiskImage(base, { format, readonly: true });
        try {
          const b = Buffer.alloc(d.size);
          await d.readSector(0, b);
          return b;
        } finally {
          await d.close();
        }
      })();
      let n = 0;
      await fc.assert(
        fc.asyncProperty(streamArb, async (stream) => {
          const file = path.join(dir, `run-${n++}.${format}`);
          fs.copyFileSync(base, file);
          const disk = await openDiskImage(file, { format, readonly: !writable });
          try {
            await runStream({ disk, model: Buffer.from(model0) }, stream, writable);
          } finally {
            await disk.close();
          }
          afterRun?.(file);
          fs.rmSync(file);
        }),
        { numRuns },
      );
    }

    it('raw image, read-write', async () => {
      const file = path.join(dir, 'base.raw');
      fs.writeFileSync(file, pattern(DISK_SECTORS * 512, 7));
      await onCopies(file, 'raw', true, 40);
    });

    it('qcow2 image made by qemu-img (read-write when qcow2 read-write is available, then also qemu-img check)', async function () {
      if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0 || spawnSync('qemu-io', ['--version'], { stdio: 'ignore' }).status !== 0) {
        skipBecause(this, 'qemu-img/qemu-io not found; install Debian qemu-utils');
      }
      const q2 = path.join(dir, 'base.qcow2');
      const run = (args: string[], tool = 'qemu-img'): void => {
        const r = spawnSync(tool, args, { encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')}: ${r.stderr}`);
      };
      run(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', q2, String(DISK_SECTORS * 512)]);
      run(['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', '-c', 'write -P 0x33 300k 20k', '-c', 'write -P 0x11 1020k 4k', q2], 'qemu-io');
      const writable = FORMATS.qcow2.readWrite !== undefined;
      await onCopies(q2, 'qcow2', writable, 30, (file) => {
        if (!writable) return;
        const chk = spawnSync('qemu-img', ['check', '-q', file], { encoding: 'utf8' });
        expect(chk.status, `qemu-img check after the run: ${chk.stdout}${chk.stderr}`).to.equal(0);
      });
    });
  });
});
