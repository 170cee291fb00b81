/**
 * Guest memory regions are mapped exactly (from the page holding mmap_offset, not from offset 0),
 * as one contiguous mapping whatever their size (guests with more than 4 GiB of RAM), with seams
 * between the Buffers that represent it invisible to guest accesses, and only from files that
 * cannot shrink under the mapping.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { F_SEAL_GROW, F_SEAL_SHRINK, MFD_ALLOW_SEALING, addSeals, memfdCreate } from '../../src/native/libc';
import { MAX_VIEW_BYTES, MemoryTable, PIECE_BYTES } from '../../src/transport/vhost-user/memory-table';
import { mmapRegionMapper } from '../../src/transport/vhost-user/server';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../../src/virtio/blk-config';
import { isVblkError } from '../../src/errors';
import { useTempDir } from '../helpers/qemu';
import { requireNativeLibrary } from '../helpers/skip';

const MiB = 1 << 20;
const GiB = 1024 * MiB;
const GUEST = 0x1_0000_0000;
const USER = 0x7f00_0000_0000n;

/** Sizes of this process's mappings of `file` (from /proc/self/maps; a memfd shows as "/memfd:NAME (deleted)"). */
function mappingSizes(file: string): number[] {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l.endsWith(` ${file}`))
    .map((l) => {
      const [range] = l.split(' ');
      const [a, b] = (range ?? '0-0').split('-');
      return parseInt(b ?? '0', 16) - parseInt(a ?? '0', 16);
    });
}

function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  throw new Error('expected it to throw');
}

/** Reads `n` bytes of `fd` at file offset `off` (what the front-end sees). */
function fileBytes(fd: number, off: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  fs.readSync(fd, b, 0, n, off);
  return b;
}

/** A sparse memfd of `size` bytes, sealed against shrinking (pages are only allocated when touched). */
function sealedMemfd(name: string, size: number): number {
  const fd = memfdCreate(name, MFD_ALLOW_SEALING);
  fs.ftruncateSync(fd, size);
  addSeals(fd, F_SEAL_SHRINK);
  return fd;
}

describe('vhost-user guest memory mapping', function () {
  this.timeout(30000);
  const tmp = useTempDir('vblk-map-');
  before(function () {
    requireNativeLibrary(this);
  });

  it('maps exactly the region at a large, unaligned mmap_offset, not the file from offset 0', () => {
    const file = tmp.file('ram');
    const fd = fs.openSync(file, 'w+');
    try {
      fs.ftruncateSync(fd, 64 * MiB);
      const offset = 48 * MiB + 512;
      fs.writeSync(fd, Buffer.from('region starts here'), 0, 18, offset);
      const t = MemoryTable.map([{ guestAddr: BigInt(GUEST), size: BigInt(MiB), userAddr: USER, mmapOffset: BigInt(offset) }], [fd], mmapRegionMapper);
      try {
        expect(t.memory.read(GUEST, 18).toString()).to.equal('region starts here');
        expect(mappingSizes(fs.realpathSync(file))).to.deep.equal([MiB + 4096]); // the page holding the offset, plus the region
      } finally {
        t.unmap();
      }
      expect(mappingSizes(fs.realpathSync(file)), 'unmapped').to.deep.equal([]);
    } finally {
      fs.closeSync(fd);
    }
  });

  /** The error mapping a 1 MiB region of `fd` (a 1 MiB file) at `mmapOffset` fails with; closes `fd`. */
  function refusal(fd: number, mmapOffset: bigint): unknown {
    try {
      fs.ftruncateSync(fd, MiB);
      return thrown(() => MemoryTable.map([{ guestAddr: 0n, size: BigInt(MiB), userAddr: USER, mmapOffset }], [fd], mmapRegionMapper));
    } finally {
      fs.closeSync(fd);
    }
  }

  it('refuses a file shorter than the region, naming the sizes', () => {
    const e = refusal(fs.openSync(tmp.file('short'), 'w+'), 4096n);
    expect(isVblkError(e, 'E_VHOST_PROTOCOL'), String(e)).to.equal(true);
    expect(String(e)).to.match(/the file has 1048576 bytes, the region needs 1052672/);
  });

  it('refuses a memfd that could be sealed but is not sealed against shrinking', () => {
    const e = refusal(memfdCreate('vblk-test-unsealed', MFD_ALLOW_SEALING), 0n);
    expect(isVblkError(e, 'E_VHOST_PROTOCOL'), String(e)).to.equal(true);
    expect(String(e)).to.match(/memfd without F_SEAL_SHRINK/);
  });

  it('refuses a memfd created without MFD_ALLOW_SEALING (it can never be sealed)', () => {
    expect(String(refusal(memfdCreate('vblk-test-unsealable'), 0n))).to.match(/memfd without F_SEAL_SHRINK/);
  });

  it('maps a memfd sealed against shrinking (as QEMU seals memory-backend-memfd)', () => {
    const fd = memfdCreate('vblk-test-sealed', MFD_ALLOW_SEALING);
    try {
      fs.ftruncateSync(fd, MiB);
      addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW);
      const t = MemoryTable.map([{ guestAddr: 0n, size: BigInt(MiB), userAddr: USER, mmapOffset: 0n }], [fd], mmapRegionMapper);
      t.memory.writeU32(100, 0xfeedf00d);
      t.unmap();
      expect(fileBytes(fd, 100, 4).readUInt32LE(0)).to.equal(0xfeedf00d);
    } finally {
      fs.closeSync(fd);
    }
  });

  describe('a region larger than a Buffer can be (5 GiB, sparse)', () => {
    const size = 5 * GiB;
    let fd = -1;
    let t: MemoryTable | undefined;
    const seam = GUEST + PIECE_BYTES;

    before(() => {
      fd = sealedMemfd('vblk-test-big', size);
      t = MemoryTable.map([{ guestAddr: BigInt(GUEST), size: BigInt(size), userAddr: USER, mmapOffset: 0n }], [fd], mmapRegionMapper);
    });
    after(() => {
      t?.unmap();
      if (fd >= 0) fs.closeSync(fd);
    });

    function table(): MemoryTable {
      if (t === undefined) throw new Error('not mapped');
      return t;
    }

    it('is accepted as one mapping of exactly the region', () => {
      expect(table().memory.size).to.equal(size);
      expect(mappingSizes('/memfd:vblk-test-big (deleted)')).to.deep.equal([size]);
    });

    it('is represented as PIECE_BYTES pieces whose Buffers look ahead at most MAX_VIEW_BYTES', () => {
      const regions = table().memory.regions;
      expect(regions.map((r) => r.guestAddr - GUEST)).to.deep.equal([0, PIECE_BYTES, 2 * PIECE_BYTES]);
      expect(regions.map((r) => r.length)).to.deep.equal([PIECE_BYTES, PIECE_BYTES, size - 2 * PIECE_BYTES]);
      expect(regions.map((r) => r.buffer.length)).to.deep.equal([MAX_VIEW_BYTES, size - PIECE_BYTES, size - 2 * PIECE_BYTES]);
    });

    it('serves a range across a seam as one zero-copy view that lands at the right file offsets', () => {
      const v = table().memory.view(seam - 2048, 4096);
      expect(v, 'one view across the seam').to.not.equal(undefined);
      v?.fill(0xab);
      expect(fileBytes(fd, PIECE_BYTES - 2048, 4096).equals(Buffer.alloc(4096, 0xab))).to.equal(true);
      expect(table().memory.gather(seam - 2048, 4096)).to.have.length(1);
    });

    it('reads and writes a field straddling a seam', () => {
      table().memory.writeU64(seam - 4, 0x1122334455667788n);
      expect(fileBytes(fd, PIECE_BYTES - 4, 8).readBigUInt64LE(0)).to.equal(0x1122334455667788n);
      expect(table().memory.readU64(seam - 4)).to.equal(0x1122334455667788n);
    });

    it('reaches the last bytes of the region and nothing past it', () => {
      table().memory.writeU32(GUEST + size - 4, 0xcafef00d);
      expect(fileBytes(fd, size - 4, 4).readUInt32LE(0)).to.equal(0xcafef00d);
      expect(table().memory.isValidRange(GUEST + size - 4, 5)).to.equal(false);
    });

    it('serves a request whose rings and data buffer straddle a seam', async () => {
      const disk = createMemoryDisk({ size: MiB, path: '/images/seam.img' });
      const dev = new VirtioBlkDevice(disk, { queueSize: 1024 });
      // A 16 KiB descriptor table from 4 KiB below the seam; the request's header just below it,
      // its data from 16 bytes below it.
      const drv = new MockBlkDriver(dev, table().memory, { ringBase: seam - 4096, dataBase: seam - 32, dataSize: 64 * 1024 });
      const q = drv.queues[0];
      expect(q !== undefined && q.descTable < seam && q.descTable + 16 * q.size > seam, 'the descriptor table straddles the seam').to.equal(true);
      drv.start();
      const payload = Buffer.alloc(8192, 0x5c);
      const w = await drv.run(0, { type: VIRTIO_BLK_T.OUT, sector: 8, data: payload });
      expect(w.status).to.equal(VIRTIO_BLK_S.OK);
      expect(disk.priv.data.subarray(8 * 512, 8 * 512 + 8192).equals(payload)).to.equal(true);
    });
  });
});
