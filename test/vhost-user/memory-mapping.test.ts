/**
 * Guest memory regions are mapped exactly (from the page holding mmap_offset, not from offset 0),
 * in pieces when a region is larger than a Buffer can be, and only from files that cannot
 * shrink under the mapping.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { F_SEAL_GROW, F_SEAL_SHRINK, MFD_ALLOW_SEALING, addSeals, memfdCreate } from '../../src/native/libc';
import { nativeLibraryPath } from '../../src/native/library';
import { MAX_MAPPING_BYTES, MemoryTable } from '../../src/transport/vhost-user/memory-table';
import { mmapRegionMapper } from '../../src/transport/vhost-user/server';
import { isVblkError } from '../../src/errors';
import { skipBecause } from '../helpers/skip';

const MiB = 1 << 20;
const GUEST = 0x1_0000_0000;
const USER = 0x7f00_0000_0000n;

/** Sizes of this process's mappings of `file` (from /proc/self/maps). */
function mappingSizes(file: string): number[] {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l.endsWith(` ${file}`) || l.includes(` ${file} `))
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

describe('vhost-user guest memory mapping', function () {
  this.timeout(30000);
  let dir = '';
  before(function () {
    if (!fs.existsSync(nativeLibraryPath())) skipBecause(this, `${nativeLibraryPath()} is missing; run \`make native\``);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-map-'));
  });
  after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('maps exactly the region at a large, unaligned mmap_offset, not the file from offset 0', () => {
    const file = path.join(dir, 'ram');
    const fd = fs.openSync(file, 'w+');
    try {
      fs.ftruncateSync(fd, 64 * MiB);
      const offset = 48 * MiB + 512;
      fs.writeSync(fd, Buffer.from('region starts here'), 0, 18, offset);
      const t = MemoryTable.map([{ guestAddr: BigInt(GUEST), size: BigInt(MiB), userAddr: USER, mmapOffset: BigInt(offset) }], [fd], mmapRegionMapper);
      try {
        expect(t.memory.read(GUEST, 18).toString()).to.equal('region starts here');
        const resolved = fs.realpathSync(file);
        expect(mappingSizes(resolved)).to.deep.equal([MiB + 4096]); // the page holding the offset, plus the region
      } finally {
        t.unmap();
      }
    } finally {
      fs.closeSync(fd);
    }
  });

  it('refuses a file shorter than the region, naming the sizes', () => {
    const fd = fs.openSync(path.join(dir, 'short'), 'w+');
    try {
      fs.ftruncateSync(fd, MiB);
      const e = thrown(() => MemoryTable.map([{ guestAddr: 0n, size: BigInt(MiB), userAddr: USER, mmapOffset: 4096n }], [fd], mmapRegionMapper));
      expect(isVblkError(e, 'E_VHOST_PROTOCOL'), String(e)).to.equal(true);
      expect(String(e)).to.match(/the file has 1048576 bytes, the region needs 1052672/);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('refuses a memfd that is not sealed against shrinking', () => {
    const fd = memfdCreate('vblk-test-unsealed', MFD_ALLOW_SEALING);
    try {
      fs.ftruncateSync(fd, MiB);
      const e = thrown(() => MemoryTable.map([{ guestAddr: 0n, size: BigInt(MiB), userAddr: USER, mmapOffset: 0n }], [fd], mmapRegionMapper));
      expect(isVblkError(e, 'E_VHOST_PROTOCOL'), String(e)).to.equal(true);
      expect(String(e)).to.match(/memfd without F_SEAL_SHRINK/);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('maps a memfd sealed against shrinking (as QEMU seals memory-backend-memfd)', () => {
    const fd = memfdCreate('vblk-test-sealed', MFD_ALLOW_SEALING);
    try {
      fs.ftruncateSync(fd, MiB);
      addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW);
      const t = MemoryTable.map([{ guestAddr: 0n, size: BigInt(MiB), userAddr: USER, mmapOffset: 0n }], [fd], mmapRegionMapper);
      t.memory.writeU32(100, 0xfeedf00d);
      const b = Buffer.alloc(4);
      fs.readSync(fd, b, 0, 4, 100);
      t.unmap();
      expect(b.readUInt32LE(0)).to.equal(0xfeedf00d);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('maps a region larger than 4 GiB in pieces, and accesses across a seam land at the right file offsets', () => {
    const size = 5 * 1024 * MiB; // sparse: only the pages touched below are ever allocated
    const fd = memfdCreate('vblk-test-big', MFD_ALLOW_SEALING);
    try {
      fs.ftruncateSync(fd, size);
      addSeals(fd, F_SEAL_SHRINK);
      const t = MemoryTable.map([{ guestAddr: BigInt(GUEST), size: BigInt(size), userAddr: USER, mmapOffset: 0n }], [fd], mmapRegionMapper);
      try {
        expect(t.memory.size).to.equal(size);
        expect(t.memory.regions.length).to.equal(Math.ceil(size / MAX_MAPPING_BYTES));
        const seam = GUEST + MAX_MAPPING_BYTES;
        t.memory.writeU64(seam - 4, 0x1122334455667788n); // a field straddling the seam
        t.memory.writeFrom(seam + MAX_MAPPING_BYTES - 2048, Buffer.alloc(4096, 0xab)); // a buffer across the second seam
        t.memory.writeU32(GUEST + size - 4, 0xcafef00d); // the last bytes of the region
        const at = (off: number, n: number): Buffer => {
          const b = Buffer.alloc(n);
          fs.readSync(fd, b, 0, n, off);
          return b;
        };
        expect(at(MAX_MAPPING_BYTES - 4, 8).readBigUInt64LE(0)).to.equal(0x1122334455667788n);
        expect(at(2 * MAX_MAPPING_BYTES - 2048, 4096).equals(Buffer.alloc(4096, 0xab))).to.equal(true);
        expect(at(size - 4, 4).readUInt32LE(0)).to.equal(0xcafef00d);
        expect(t.memory.readU64(seam - 4)).to.equal(0x1122334455667788n);
      } finally {
        t.unmap();
      }
    } finally {
      fs.closeSync(fd);
    }
  });
});
