/**
 * Bad input: a valid image made by qemu-img with one field poked, and the exact error vblk gives.
 * Nothing may crash and no read may return made-up data.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import * as fc from 'fast-check';
import { openDiskImage } from '../../src/disk/open';
import { isVblkError } from '../../src/errors';
import type { DiskImage } from '../../src/disk/disk-image';
import { requireQemu, useTempDir, createImage, qemuImg, writePatterns, pokeBytes, be64, be32, readBytes } from '../helpers/qemu';

async function expectReject(p: Promise<unknown>, code: string, message: string | RegExp): Promise<void> {
  let caught: unknown;
  try {
    const v = await p;
    if (v && typeof v === 'object' && 'close' in v) await (v as DiskImage).close();
  } catch (e) {
    caught = e;
  }
  expect(isVblkError(caught), `expected a VblkError ${code}, got ${String(caught)}`).to.equal(true);
  const err = caught as Error & { code: string };
  if (typeof message === 'string') expect(err.message).to.equal(message);
  else expect(err.message).to.match(message);
  expect(err.code).to.equal(code);
}

async function readAll(path: string): Promise<void> {
  const d = await openDiskImage(path, { readonly: true });
  try {
    const buf = new Uint8Array(d.sectors * 512);
    await d.readSector(0, buf);
  } finally {
    await d.close();
  }
}

describe('bad input: exact errors', function () {
  const tmp = useTempDir();
  let n = 0;
  /** A fresh copy of a valid 8 MiB v3 image with data in clusters 0 and 16 (L2 at 0x40000, data at 0x50000). */
  let pristine = '';
  before(function () {
    requireQemu(this);
    pristine = createImage(tmp.file('pristine.qcow2'), '8M');
    writePatterns(pristine, [{ byte: 0x11, offset: 0, length: 65536 }, { byte: 0x22, offset: 1 << 20, length: 65536 }]);
  });
  function copy(): string {
    const f = tmp.file(`bad${n++}.qcow2`);
    fs.copyFileSync(pristine, f);
    return f;
  }

  it('truncated header', async () => {
    const f = tmp.file('trunc.qcow2');
    fs.writeFileSync(f, readBytes(pristine, 0, 50));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: invalid qcow2 header: truncated: 50 bytes, the version 3 header needs 104`);
  });

  it('cluster_bits below 9', async () => {
    const f = copy();
    pokeBytes(f, 20, be32(8));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: invalid qcow2 header: cluster_bits 8 is outside 9..21`);
  });

  it('cluster_bits above 21', async () => {
    const f = copy();
    pokeBytes(f, 20, be32(22));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: invalid qcow2 header: cluster_bits 22 is outside 9..21`);
  });

  it('l1_size too small for the virtual size', async () => {
    const f = copy();
    pokeBytes(f, 36, be32(0));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: l1_size 0 is too small for the virtual size 8388608 (needs 1 entries)`);
  });

  it('l1_size huge (capped before allocating)', async () => {
    const f = copy();
    pokeBytes(f, 36, be32(0x10000000));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: l1_size 268435456 is larger than the 4194304 entries QEMU allows`);
  });

  it('l1_table_offset not cluster-aligned', async () => {
    const f = copy();
    pokeBytes(f, 40, be64(0x30200n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: l1_table_offset 0x30200 is not cluster-aligned`);
  });

  it('l1_table_offset past the end of the file', async () => {
    const f = copy();
    pokeBytes(f, 40, be64(0x10000000n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: L1 table at 0x10000000 (1 entries) is past the end of the file (size 0x70000)`);
  });

  it('refcount_table_offset not aligned or past the end of the file', async () => {
    const f = copy();
    pokeBytes(f, 48, be64(0x10008n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: refcount_table_offset 0x10008 is not cluster-aligned`);
    pokeBytes(f, 48, be64(0x100000n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: refcount table at 0x100000 (1 clusters) is past the end of the file (size 0x70000)`);
  });

  it('size that is not a JS safe integer', async () => {
    const f = copy();
    pokeBytes(f, 24, be64(1n << 60n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_UNSUPPORTED', `Cannot open ${f}: invalid qcow2 header: size 0x1000000000000000 is not a safe integer`);
  });

  it('QFI magic with an unknown version is an error, never raw', async () => {
    const f = copy();
    pokeBytes(f, 4, be32(4));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_UNSUPPORTED', `Cannot open ${f}: it has the qcow magic but version 4, which is neither qcow (1) nor qcow2 (2, 3)`);
  });

  it('an unknown incompatible feature bit', async () => {
    const f = copy();
    pokeBytes(f, 72, be64(1n << 63n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_UNSUPPORTED', `Cannot open ${f}: unsupported qcow2 feature: unknown incompatible feature 8000000000000000`);
  });

  it('encryption (crypt_method 1)', async () => {
    const f = copy();
    pokeBytes(f, 32, be32(1));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_UNSUPPORTED', `Cannot open ${f}: unsupported qcow2 feature: encryption (crypt_method 1, AES)`);
  });

  it('zstd compression type', async () => {
    const f = createImage(tmp.file('zstd.qcow2'), '1M', { options: { compression_type: 'zstd' } });
    await expectReject(
      openDiskImage(f, { readonly: true }),
      'E_QCOW_UNSUPPORTED',
      `Cannot open ${f}: unsupported qcow2 feature: zstd compression (compression_type 1); convert it with qemu-img convert -O qcow2 -o compression_type=zlib`,
    );
  });

  it('external data file', async () => {
    // An absolute name: qemu-img resolves a relative data_file against its working directory.
    const data = tmp.file('df.data');
    const f = createImage(tmp.file('df.qcow2'), '1M', { options: { data_file: data } });
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_UNSUPPORTED', `Cannot open ${f}: unsupported qcow2 feature: external data file (${data})`);
  });

  it('an L1 entry with an unaligned L2 offset', async () => {
    const f = copy();
    pokeBytes(f, 0x30000, be64(0x8000000000040200n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', `Cannot read ${f}: L1 entry 0 (0x8000000000040200) has L2 table offset 0x40200, not cluster-aligned`);
  });

  it('an L2 entry pointing past the end of the file (error naming the entry; QEMU would read zeroes)', async () => {
    const f = copy();
    pokeBytes(f, 0x40000, be64(0x8000000000a00000n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', `Cannot read ${f}: L2 entry 0 of table 0x40000 (0x8000000000a00000) points to cluster 0xa00000 past the end of the file (size 0x70000)`);
  });

  it('an unaligned L2 entry', async () => {
    const f = copy();
    pokeBytes(f, 0x40000, be64(0x8000000000050200n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', `Cannot read ${f}: L2 entry 0 of table 0x40000 (0x8000000000050200) has data offset 0x50200, not cluster-aligned`);
  });

  it('a compressed cluster that does not inflate', async () => {
    const src = tmp.file('csrc.raw');
    fs.writeFileSync(src, Buffer.alloc(65536, 0x42));
    const f = tmp.file('comp.qcow2');
    qemuImg('convert', '-c', '-O', 'qcow2', src, f);
    const l2e = readBytes(f, 0x40000, 8).readBigUInt64BE();
    expect(l2e >> 62n).to.equal(1n); // compressed
    const host = Number(l2e & ((1n << 54n) - 1n));
    pokeBytes(f, host, Buffer.alloc(64, 0xff));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', new RegExp(`^Cannot read compressed cluster at 0x${host.toString(16)}: the data does not inflate \\(.+\\)$`));
  });

  it('a backing chain loop', async () => {
    const a = tmp.file('loop-a.qcow2');
    const b = tmp.file('loop-b.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', a, '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', b, '1M');
    await expectReject(openDiskImage(a, { readonly: true }), 'E_BACKING', `Cannot open ${a}: backing chain loop: ${a} -> ${tmp.dir}/loop-b.qcow2 -> ${tmp.dir}/loop-a.qcow2`);
  });

  it('an image that is its own backing file', async () => {
    const a = tmp.file('self.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'self.qcow2', '-F', 'qcow2', a, '1M');
    await expectReject(openDiskImage(a, { readonly: true }), 'E_BACKING', `Cannot open ${a}: backing chain loop: ${a} -> ${tmp.dir}/self.qcow2`);
  });

  it('a loop through a hard link is detected too', async () => {
    const a = tmp.file('hl-a.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'hl-b.qcow2', '-F', 'qcow2', a, '1M');
    fs.linkSync(a, tmp.file('hl-b.qcow2'));
    await expectReject(openDiskImage(a, { readonly: true }), 'E_BACKING', `Cannot open ${a}: backing chain loop: ${a} -> ${tmp.dir}/hl-b.qcow2`);
  });

  it('a backing chain deeper than the cap', async () => {
    let prev = createImage(tmp.file('deep0.qcow2'), '1M');
    for (let i = 1; i <= 4; i++) prev = createImage(tmp.file(`deep${i}.qcow2`), undefined, { backing: `deep${i - 1}.qcow2`, backingFormat: 'qcow2' });
    await expectReject(openDiskImage(prev, { readonly: true, maxBackingDepth: 3 }), 'E_BACKING', `Cannot open ${prev}: the backing chain is deeper than 3 images`);
    const ok = await openDiskImage(prev, { readonly: true, maxBackingDepth: 4 });
    await ok.close();
  });

  it('a missing backing file', async () => {
    const a = tmp.file('orphan.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', a, '1M');
    await expectReject(openDiskImage(a, { readonly: true }), 'E_BACKING', `Cannot open backing file ${tmp.dir}/gone.qcow2 of ${a}: no such file`);
  });

  it('a backing format extension that does not match the backing file', async () => {
    const raw = tmp.file('notq.raw');
    fs.writeFileSync(raw, Buffer.alloc(1 << 20));
    const a = tmp.file('wrongfmt.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'notq.raw', '-F', 'qcow2', a, '1M');
    await expectReject(openDiskImage(a, { readonly: true }), 'E_FORMAT_UNKNOWN', `Cannot open ${tmp.dir}/notq.raw as qcow2: it is not a qcow image (no QFI magic)`);
  });

  it('reads past the end of the disk are rejected', async () => {
    const d = await openDiskImage(pristine, { readonly: true });
    try {
      await expectReject(d.readSector(d.sectors - 1, new Uint8Array(1024)), 'E_DISK_RANGE', 'Cannot read: bytes 0x7ffe00+0x400 are past the end of the disk (size 0x800000)');
    } finally {
      await d.close();
    }
  });

  it('qcow version 1 with encryption', async () => {
    const f = createImage(tmp.file('v1enc.qcow'), '1M', { format: 'qcow' });
    pokeBytes(f, 36, be32(1));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_UNSUPPORTED', `Cannot open ${f}: unsupported qcow feature: encryption (crypt_method 1, AES)`);
  });

  it('qcow version 1 with an L1 table past the end of the file', async () => {
    const f = createImage(tmp.file('v1l1.qcow'), '1M', { format: 'qcow' });
    pokeBytes(f, 40, be64(0x100000n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: L1 table at 0x100000 (1 entries) is past the end of the file (size 0x230)`);
  });

  it('an extended L2 bitmap marking a subcluster both allocated and zero', async () => {
    const f = createImage(tmp.file('xl2.qcow2'), '1M', { options: { extended_l2: 'on' } });
    writePatterns(f, [{ byte: 1, offset: 0, length: 4096 }]);
    expect(readBytes(f, 0x40008, 8).readBigUInt64BE()).to.equal(3n);
    pokeBytes(f, 0x40008, be64(0x0000000100000003n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', `Cannot read ${f}: L2 entry 0 of table 0x40000 marks subcluster 0 both allocated and zero`);
  });

  it('qcow version 1: an L2 entry past the end of the file, and an unaligned one', async () => {
    const f = createImage(tmp.file('v1l2.qcow'), '1M', { format: 'qcow' });
    writePatterns(f, [{ byte: 1, offset: 0, length: 4096 }], 'qcow');
    expect(readBytes(f, 48, 8).readBigUInt64BE()).to.equal(0x1000n);
    expect(readBytes(f, 0x1000, 8).readBigUInt64BE()).to.equal(0x2000n);
    pokeBytes(f, 0x1000, be64(0x100000n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', `Cannot read ${f}: L2 entry 0 of table 0x1000 (0x100000) points to cluster 0x100000 past the end of the file (size 0x3000)`);
    pokeBytes(f, 0x1000, be64(0x2200n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', `Cannot read ${f}: L2 entry 0 of table 0x1000 (0x2200) has data offset 0x2200, not cluster-aligned`);
    // An offset that is not a safe integer is past the end too (and says so, not "unaligned").
    pokeBytes(f, 0x1000, be64(0x7ff0000000000000n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', /^Cannot read .*: L2 entry 0 of table 0x1000 \(0x7ff0000000000000\) points to cluster 0x7ff0000000000000 past the end of the file \(size 0x3000\)$/);
  });

  it('qcow version 1: an L1 entry pointing past the end of the file', async () => {
    const f = createImage(tmp.file('v1l1e.qcow'), '1M', { format: 'qcow' });
    writePatterns(f, [{ byte: 1, offset: 0, length: 4096 }], 'qcow');
    pokeBytes(f, 48, be64(0x100000n));
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', `Cannot read ${f}: L1 entry 0 points to L2 table 0x100000 past the end of the file (size 0x3000)`);
  });

  it('qcow version 1: a backing file name past the end of the file', async () => {
    const f = createImage(tmp.file('v1name.qcow'), '1M', { format: 'qcow' });
    pokeBytes(f, 8, be64(0x100000n));
    pokeBytes(f, 16, be32(10));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: backing file name at 0x100000+10 is past the end of the file (size 0x230)`);
  });

  it('qcow version 1: a backing file name longer than 1023 bytes', async () => {
    const f = createImage(tmp.file('v1long.qcow'), '1M', { format: 'qcow' });
    pokeBytes(f, 8, be64(48n));
    pokeBytes(f, 16, be32(5000));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', `Cannot open ${f}: invalid qcow header: backing_file_size 5000 is larger than 1023`);
  });

  it('qcow version 1: a size that is not a JS safe integer', async () => {
    const f = createImage(tmp.file('v1size.qcow'), '1M', { format: 'qcow' });
    pokeBytes(f, 24, be64(1n << 60n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_UNSUPPORTED', `Cannot open ${f}: invalid qcow header: size 0x1000000000000000 is not a safe integer`);
  });

  it('qcow version 1: a virtual size whose L1 table would be huge is refused before allocating', async () => {
    const f = createImage(tmp.file('v1huge.qcow'), '1M', { format: 'qcow' });
    pokeBytes(f, 24, be64(1n << 52n));
    await expectReject(openDiskImage(f, { readonly: true }), 'E_QCOW_CORRUPT', /^Cannot open .*: the virtual size 4503599627370496 needs an L1 table of \d+ entries, more than \d+$/);
  });

  it('a compressed cluster cut short by the end of the file', async () => {
    const src = tmp.file('csrc2.raw');
    const data = Buffer.alloc(65536);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7919) >>> 3; // compresses, but not to nothing
    fs.writeFileSync(src, data);
    const f = tmp.file('ctrunc.qcow2');
    qemuImg('convert', '-c', '-O', 'qcow2', src, f);
    const l2e = readBytes(f, 0x40000, 8).readBigUInt64BE();
    const host = Number(l2e & ((1n << 54n) - 1n));
    fs.truncateSync(f, host + 100);
    await expectReject(readAll(f), 'E_QCOW_CORRUPT', new RegExp(`^Cannot read compressed cluster at 0x${host.toString(16)}: it inflates to \\d+ bytes, not 65536$`));
  });

  it('random corruption of header, L1 and L2 never crashes: every open/read succeeds or rejects with a VblkError (property)', async function () {
    this.timeout(120000);
    const bytes = fs.readFileSync(pristine);
    const f = tmp.file('fuzz.qcow2');
    // Positions: header fields, the L1 entry, the first L2 entries.
    const pos = fc.oneof(fc.integer({ min: 0, max: 111 }), fc.integer({ min: 0x30000, max: 0x30007 }), fc.integer({ min: 0x40000, max: 0x40000 + 16 * 8 + 7 }));
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(pos, fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }), async (pokes) => {
        const b = Buffer.from(bytes);
        for (const [p, v] of pokes) b[p] = v;
        fs.writeFileSync(f, b);
        let d: DiskImage | undefined;
        try {
          d = await openDiskImage(f, { readonly: true, format: 'qcow2' });
          const n = Math.min(d.size, 2 << 20);
          await d.readSector(0, new Uint8Array(n - (n % 512)));
        } catch (e) {
          if (!isVblkError(e)) throw e;
        } finally {
          await d?.close();
        }
      }),
      { numRuns: 150, seed: 42 },
    );
  });

  it('random corruption of some L2 entries leaves the clusters of the other entries reading their true data (property)', async function () {
    this.timeout(120000);
    const bytes = fs.readFileSync(pristine);
    const expected = Buffer.alloc(2 << 20);
    expected.fill(0x11, 0, 65536);
    expected.fill(0x22, 1 << 20, (1 << 20) + 65536);
    const f = tmp.file('fuzz-l2.qcow2');
    const l2Entries = 32; // the first 2 MiB: clusters 0..31
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(fc.integer({ min: 0, max: l2Entries * 8 - 1 }), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }), async (pokes) => {
        const b = Buffer.from(bytes);
        const poked = new Set<number>();
        for (const [p, v] of pokes) {
          if (b[0x40000 + p] !== v) poked.add(Math.floor(p / 8));
          b[0x40000 + p] = v;
        }
        fs.writeFileSync(f, b);
        const d = await openDiskImage(f, { readonly: true, format: 'qcow2' });
        try {
          for (let c = 0; c < l2Entries; c++) {
            if (poked.has(c)) continue;
            const buf = new Uint8Array(65536);
            await d.readSector(c * 128, buf);
            expect(Buffer.from(buf).equals(expected.subarray(c * 65536, (c + 1) * 65536)), `cluster ${c} after poking entries ${[...poked].join(',')}`).to.equal(true);
          }
          // A poked entry either reads or fails with a typed error; it never throws anything else.
          for (const c of poked) await d.readSector(c * 128, new Uint8Array(65536)).catch((e: unknown) => expect(isVblkError(e), String(e)).to.equal(true));
        } finally {
          await d.close();
        }
      }),
      { numRuns: 60, seed: 7 },
    );
  });
});
