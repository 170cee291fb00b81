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
import { pattern, rng, RAM_BASE } from './helpers';

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

async function runStream(t: Target, stream: { batches: Req[][] }, writable: boolean): Promise<void> {
  // Two adjacent regions: buffers may straddle the boundary (gather path).
  const half = 2 << 20;
  const mem = new GuestMemory([
    { guestAddr: RAM_BASE, buffer: Buffer.alloc(half) },
    { guestAddr: RAM_BASE + half, buffer: Buffer.alloc(half) },
  ]);
  const dev = new VirtioBlkDevice(t.disk, { numQueues: NUM_QUEUES, queueSize: 64, serial: 'prop-serial' });
  const ringsEnd = RAM_BASE + 0x20000;
  const drv = new MockBlkDriver(dev, mem, { dataBase: ringsEnd, dataSize: 2 * half - 0x20000 });
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
      subs.push({ r, s: drv.submit(r.queue, spec, { indirect: r.indirect, readableCuts: [16, ...r.rcuts], writableCuts: r.wcuts }) });
    }
    for (let q = 0; q < NUM_QUEUES; q++) drv.kick(q);
    const results = new Map<SubmittedBlkRequest, BlkCompletion>();
    for (let q = 0; q < NUM_QUEUES; q++) {
      const mine = subs.filter((x) => x.r.queue === q).map((x) => x.s);
      const done = await drv.complete(mine);
      mine.forEach((s, i) => results.set(s, done[i] as BlkCompletion));
    }
    const before = Buffer.from(t.model);
    for (const { r, s } of subs) {
      const c = results.get(s) as BlkCompletion;
      const off = r.sector * 512;
      const bytes = r.nsec * 512;
      if (r.op === 'in') {
        expect(c.status, 'IN status').to.equal(VIRTIO_BLK_S.OK);
        expect(c.data.equals(before.subarray(off, off + bytes)), `IN data at sector ${r.sector}`).to.equal(true);
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
        if (r.op === 'out') pattern(bytes, r.seed).copy(t.model, off);
        else t.model.fill(0, off, off + bytes);
      }
    }
  }
  await dev.reset();
  const all = Buffer.alloc(t.model.length);
  await t.disk.readSector(0, all);
  expect(all.equals(t.model), 'final disk contents equal the model').to.equal(true);
}

describe('virtio-blk property: random valid request streams match a reference model', function () {
  this.timeout(120000);

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

    it('raw image, read-write', async () => {
      const file = path.join(dir, 'rw.raw');
      fs.writeFileSync(file, pattern(DISK_SECTORS * 512, 7));
      const disk = await openDiskImage(file, { format: 'raw' });
      const model = Buffer.from(fs.readFileSync(file));
      try {
        await fc.assert(
          fc.asyncProperty(streamArb, async (stream) => {
            await runStream({ disk, model }, stream, true);
          }),
          { numRuns: 60 },
        );
      } finally {
        await disk.close();
      }
      expect(fs.readFileSync(file).equals(model)).to.equal(true);
    });

    it('qcow2 image made by qemu-img (read-only unless qcow2 read-write is available)', async function () {
      if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0 || spawnSync('qemu-io', ['--version'], { stdio: 'ignore' }).status !== 0) {
        console.log('    (skipped: qemu-img/qemu-io not found; install Debian qemu-utils)');
        this.skip();
      }
      const q2 = path.join(dir, 'img.qcow2');
      const raw = path.join(dir, 'img-ref.raw');
      const run = (args: string[], tool = 'qemu-img'): void => {
        const r = spawnSync(tool, args, { encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')}: ${r.stderr}`);
      };
      run(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', q2, String(DISK_SECTORS * 512)]);
      run(['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', '-c', 'write -P 0x33 300k 20k', '-c', 'write -P 0x11 1020k 4k', q2], 'qemu-io');
      run(['convert', '-f', 'qcow2', '-O', 'raw', q2, raw]);
      const model = Buffer.from(fs.readFileSync(raw));
      const writable = FORMATS.qcow2.readWrite !== undefined;
      const disk = await openDiskImage(q2, { format: 'qcow2', readonly: !writable });
      try {
        await fc.assert(
          fc.asyncProperty(streamArb, async (stream) => {
            await runStream({ disk, model }, stream, writable);
          }),
          { numRuns: 40 },
        );
      } finally {
        await disk.close();
      }
      if (writable) {
        const chk = spawnSync('qemu-img', ['check', '-q', q2]);
        expect(chk.status, 'qemu-img check after writes').to.equal(0);
      }
    });
  });
});
