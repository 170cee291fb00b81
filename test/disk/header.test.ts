import { expect } from 'chai';
import * as fs from 'node:fs';
import {
  Qcow2Header,
  QcowHeader,
  QEMU_FEATURE_TABLE,
  INCOMPAT_DATA_FILE,
  AUTOCLEAR_BITMAPS,
  COMPAT_LAZY_REFCOUNTS,
} from '../../src/disk/qcow/header';
import { isVblkError } from '../../src/errors';
import { requireQemu, useTempDir, createImage, qemuImg, readBytes } from '../helpers/qemu';

function cluster0(file: string): Buffer {
  const first = readBytes(file, 0, 512);
  const cs = Qcow2Header.peekClusterSize(first) ?? 512;
  return readBytes(file, 0, cs);
}

/** parse -> serialize must give back exactly the bytes qemu wrote (rest of cluster 0 is zero). */
function expectRoundTrip(file: string): Qcow2Header {
  const c0 = cluster0(file);
  const h = Qcow2Header.parse(c0);
  const out = h.serialize();
  expect(out.equals(c0.subarray(0, out.length)), 'serialized header differs from the file').to.equal(true);
  expect(c0.subarray(out.length).every((x) => x === 0), 'bytes after the serialized header are not zero').to.equal(true);
  return h;
}

function expectError(fn: () => unknown, code: string, message: RegExp | string): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(isVblkError(caught), `expected a VblkError, got ${String(caught)}`).to.equal(true);
  const err = caught as Error & { code: string };
  expect(err.code).to.equal(code);
  if (typeof message === 'string') expect(err.message).to.equal(message);
  else expect(err.message).to.match(message);
}

describe('Qcow2Header codec', function () {
  const tmp = useTempDir();
  before(function () {
    requireQemu(this);
  });

  it('parses a v3 header from qemu-img and serializes it back byte for byte', () => {
    const f = createImage(tmp.file('v3.qcow2'), '64M');
    const h = expectRoundTrip(f);
    expect(h.version).to.equal(3);
    expect(h.clusterBits).to.equal(16);
    expect(h.size).to.equal(64 << 20);
    expect(h.headerLength).to.equal(112);
    expect(h.refcountOrder).to.equal(4);
    expect(h.l1TableOffset).to.equal(0x30000);
    expect(h.refcountTableOffset).to.equal(0x10000);
    expect(h.featureTable).to.deep.equal(QEMU_FEATURE_TABLE);
    expect(h.compressionType).to.equal(0);
  });

  it('parses a v2 (compat=0.10) header: 72 bytes, implicit 16-bit refcounts', () => {
    const f = createImage(tmp.file('v2.qcow2'), '64M', { options: { compat: '0.10' } });
    const h = expectRoundTrip(f);
    expect(h.version).to.equal(2);
    expect(h.headerLength).to.equal(72);
    expect(h.refcountBits).to.equal(16);
    expect(h.incompatibleFeatures).to.equal(0n);
  });

  it('round-trips 512-byte clusters (no feature table) and 2 MiB clusters', () => {
    const a = expectRoundTrip(createImage(tmp.file('c512.qcow2'), '8M', { options: { cluster_size: '512' } }));
    expect(a.clusterBits).to.equal(9);
    expect(a.featureTable).to.equal(undefined);
    const b = expectRoundTrip(createImage(tmp.file('c2m.qcow2'), '8M', { options: { cluster_size: '2M' } }));
    expect(b.clusterBits).to.equal(21);
  });

  it('round-trips a backing file name and the backing format extension', () => {
    const base = createImage(tmp.file('base.qcow2'), '8M');
    const f = createImage(tmp.file('top.qcow2'), undefined, { backing: base, backingFormat: 'qcow2' });
    const h = expectRoundTrip(f);
    expect(h.backingFile).to.equal(base);
    expect(h.backingFormat).to.equal('qcow2');
    expect(h.backingFileOffset).to.be.greaterThan(h.headerLength);
  });

  it('round-trips lazy refcounts, refcount_bits=64 and a bitmaps extension', () => {
    const f = createImage(tmp.file('bm.qcow2'), '8M', { options: { lazy_refcounts: 'on', refcount_bits: '64' } });
    qemuImg('bitmap', '--add', f, 'bm0');
    const h = expectRoundTrip(f);
    expect(h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS).to.equal(COMPAT_LAZY_REFCOUNTS);
    expect(h.autoclearFeatures & AUTOCLEAR_BITMAPS).to.equal(AUTOCLEAR_BITMAPS);
    expect(h.refcountOrder).to.equal(6);
    expect(h.bitmaps?.nbBitmaps).to.equal(1);
  });

  it('round-trips an external data file extension', () => {
    const f = createImage(tmp.file('df.qcow2'), '8M', { options: { data_file: tmp.file('df.data'), data_file_raw: 'on' } });
    const h = expectRoundTrip(f);
    expect(h.dataFile).to.equal(tmp.file('df.data'));
    expect(h.incompatibleFeatures & INCOMPAT_DATA_FILE).to.equal(INCOMPAT_DATA_FILE);
  });

  it('round-trips an encryption (LUKS) header pointer extension', () => {
    // qemu-img cannot make LUKS images in this sandbox (PBKDF timing needs getrusage), so build it.
    const h = new Qcow2Header({ size: 1 << 20, cryptMethod: 2, l1Size: 1, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1 });
    h.crypto = { offset: 0x50000, length: 0x201000 };
    const back = Qcow2Header.parse(h.serialize());
    expect(back.cryptMethod).to.equal(2);
    expect(back.crypto).to.deep.equal({ offset: 0x50000, length: 0x201000 });
    expect(back.serialize().equals(h.serialize())).to.equal(true);
  });

  it('keeps unknown extensions and header bytes past 112 through a round trip', () => {
    const h = new Qcow2Header({ size: 1 << 20, l1Size: 1, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1 });
    h.headerLength = 120;
    h.extraHeader = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
    h.unknownExtensions = [{ type: 0x12345678, data: Uint8Array.from([9, 9, 9]) }];
    h.backingFile = 'base.raw';
    h.backingFormat = 'raw';
    const bytes = h.serialize();
    const back = Qcow2Header.parse(bytes);
    expect(back.headerLength).to.equal(120);
    expect(Array.from(back.extraHeader)).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(back.unknownExtensions).to.have.length(1);
    expect(back.unknownExtensions[0]?.type).to.equal(0x12345678);
    expect(Array.from(back.unknownExtensions[0]?.data ?? [])).to.deep.equal([9, 9, 9]);
    expect(back.backingFile).to.equal('base.raw');
    expect(back.backingFormat).to.equal('raw');
    expect(back.serialize().equals(bytes)).to.equal(true);
  });

  it('a header serialized from scratch is accepted by qemu-img info', () => {
    const h = new Qcow2Header({ size: 1 << 20, l1Size: 1, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1 });
    h.featureTable = [...QEMU_FEATURE_TABLE];
    const f = tmp.file('scratch.qcow2');
    const img = Buffer.alloc(0x40000);
    h.serialize().copy(img, 0);
    // refcount table -> refblock at 0x20000; refcounts of clusters 0..3 = 1 (16-bit).
    img.writeBigUInt64BE(0x20000n, 0x10000);
    for (let i = 0; i < 4; i++) img.writeUInt16BE(1, 0x20000 + 2 * i);
    fs.writeFileSync(f, img);
    const info = JSON.parse(qemuImg('info', '--output=json', f)) as Record<string, unknown>;
    expect(info['virtual-size']).to.equal(1 << 20);
    expect(qemuImg('check', f)).to.match(/No errors were found/);
  });

  describe('rejects bad headers with a clear error', () => {
    function good(): Buffer {
      const h = new Qcow2Header({ size: 1 << 20, l1Size: 1, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1 });
      const b = Buffer.alloc(65536);
      h.serialize().copy(b);
      return b;
    }

    it('truncated header', () => {
      expectError(() => Qcow2Header.parse(good().subarray(0, 50)), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: truncated: 50 bytes, the version 3 header needs 104');
      expectError(() => Qcow2Header.parse(good().subarray(0, 80)), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: truncated: 80 bytes, the version 3 header needs 104');
      expectError(() => Qcow2Header.parse(good().subarray(0, 4)), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: file is 4 bytes, too short for the magic and version');
    });

    it('cluster_bits below 9 or above 21', () => {
      const b = good();
      b.writeUInt32BE(8, 20);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: cluster_bits 8 is outside 9..21');
      b.writeUInt32BE(22, 20);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: cluster_bits 22 is outside 9..21');
    });

    it('unknown version is an error, not raw', () => {
      const b = good();
      b.writeUInt32BE(4, 4);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_UNSUPPORTED', 'Cannot parse qcow2 header: unsupported qcow version 4');
    });

    it('bad magic', () => {
      const b = good();
      b[3] = 0;
      expectError(() => Qcow2Header.parse(b), 'E_FORMAT_UNKNOWN', 'Cannot parse qcow2 header: bad magic 0x51464900');
    });

    it('size that is not a safe integer', () => {
      const b = good();
      b.writeBigUInt64BE(1n << 60n, 24);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_UNSUPPORTED', 'Cannot parse qcow2 header: size 0x1000000000000000 is not a safe integer');
    });

    it('header_length not a multiple of 8 or too small', () => {
      const b = good();
      b.writeUInt32BE(105, 100);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: header_length 105 must be at least 104 and a multiple of 8');
      b.writeUInt32BE(96, 100);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: header_length 96 must be at least 104 and a multiple of 8');
    });

    it('refcount_order above 6', () => {
      const b = good();
      b.writeUInt32BE(7, 96);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: refcount_order 7 is greater than 6');
    });

    it('a header extension longer than cluster 0', () => {
      const b = good();
      b.writeUInt32BE(0x12345678, 112);
      b.writeUInt32BE(70000, 116);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: header extension 0x12345678 at 0x70 has length 70000, past 0x10000');
    });

    it('a backing file name outside cluster 0', () => {
      const b = good();
      b.writeBigUInt64BE(0xfff0n, 8);
      b.writeUInt32BE(100, 16);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: backing file name at 0xfff0+100 is not inside cluster 0');
    });

    it('an empty backing file name (offset set, length 0) means no backing file, as in QEMU', () => {
      const b = good();
      b.writeBigUInt64BE(0x200n, 8); // backing_file_offset set, backing_file_size stays 0
      expect(Qcow2Header.parse(b).backingFile).to.equal(undefined);
    });

    it('an offset field that is not a safe integer', () => {
      const b = good();
      b.writeBigUInt64BE(0xffffffffffff0000n, 40);
      expectError(() => Qcow2Header.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow2 header: l1_table_offset 0xffffffffffff0000 is not a safe integer');
    });
  });
});

describe('QcowHeader (version 1) codec', function () {
  const tmp = useTempDir();
  before(function () {
    requireQemu(this);
  });

  it('parses a qemu-img qcow1 header and serializes it back byte for byte', () => {
    const f = createImage(tmp.file('v1.qcow'), '17M', { format: 'qcow' });
    const first = readBytes(f, 0, 512);
    const h = QcowHeader.parse(first);
    expect(h.size).to.equal(17 << 20);
    expect(h.clusterBits).to.equal(12);
    expect(h.l2Bits).to.equal(9);
    expect(h.l1TableOffset).to.equal(48);
    expect(h.l1Size).to.equal(9); // ceil(17 MiB / 2 MiB): rounds up
    const out = h.serialize();
    expect(out.equals(first.subarray(0, out.length))).to.equal(true);
  });

  it('round-trips a backing file name', () => {
    const base = tmp.file('ref.raw');
    fs.writeFileSync(base, Buffer.alloc(1 << 20));
    const f = createImage(tmp.file('ov.qcow'), undefined, { format: 'qcow', backing: base, backingFormat: 'raw' });
    const first = readBytes(f, 0, 4096);
    const h = QcowHeader.parse(first);
    expect(h.backingFile).to.equal(base);
    expect(h.clusterBits).to.equal(9);
    expect(h.l2Bits).to.equal(12);
    const out = h.serialize();
    expect(out.equals(first.subarray(0, out.length))).to.equal(true);
    expect(h.l1TableOffset).to.equal((out.length + 7) & ~7);
  });

  it('an empty backing file name (offset set, length 0) means no backing file, as in QEMU', () => {
    const b = new QcowHeader({ size: 1 << 20, l1TableOffset: 48 }).serialize();
    b.writeBigUInt64BE(48n, 8); // backing_file_offset points at the L1 table, backing_file_size stays 0
    expect(QcowHeader.parse(b).backingFile).to.equal(undefined);
  });

  it('takes the backing name from a separate read when given, and checks its length against backing_file_size', () => {
    const b = new QcowHeader({ size: 1 << 20, l1TableOffset: 48 }).serialize();
    b.writeBigUInt64BE(0x10000n, 8); // far past these 48 bytes
    b.writeUInt32BE(4, 16);
    expect(QcowHeader.parse(b, Buffer.from('base')).backingFile).to.equal('base');
    expectError(() => QcowHeader.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow header: backing file name at 0x10000+4 is past the end of the header buffer');
    expectError(() => QcowHeader.parse(b, Buffer.from('ba')), 'E_QCOW_CORRUPT', 'Cannot parse qcow header: backing file name at 0x10000 is 2 bytes, backing_file_size says 4');
  });

  it('rejects cluster_bits outside 9..16 and a truncated header', () => {
    const h = new QcowHeader({ size: 1 << 20, l1TableOffset: 48 });
    const b = h.serialize();
    expectError(() => QcowHeader.parse(b.subarray(0, 40)), 'E_QCOW_CORRUPT', 'Cannot parse qcow header: truncated: 40 bytes, the header needs 48');
    b[32] = 17;
    expectError(() => QcowHeader.parse(b), 'E_QCOW_CORRUPT', 'Cannot parse qcow header: cluster_bits 17 is outside 9..16');
  });
});

describe('header codecs: round-trip property', () => {
  it('Qcow2Header: parse(serialize(h)) gives back every field', async () => {
    const fcm = await import('fast-check');
    const fc = fcm.default ?? fcm;
    const u32 = fc.integer({ min: 0, max: 0xffffffff });
    const off = fc.integer({ min: 0, max: 2 ** 43 }).map((n) => n * 512);
    const name = fc.string({ minLength: 1, maxLength: 40 }).filter((s) => !s.includes('\0'));
    fc.assert(
      fc.property(
        fc.record({
          version: fc.constantFrom(2 as const, 3 as const),
          clusterBits: fc.integer({ min: 9, max: 21 }),
          size: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
          l1Size: u32,
          l1TableOffset: off,
          refcountTableOffset: off,
          refcountTableClusters: u32,
          nbSnapshots: u32,
          snapshotsOffset: off,
          features: fc.tuple(fc.bigUintN(64), fc.bigUintN(64), fc.bigUintN(64)),
          refcountOrder: fc.integer({ min: 0, max: 6 }),
          backingFile: fc.option(name, { nil: undefined }),
          backingFormat: fc.option(fc.constantFrom('raw', 'qcow2', 'qcow'), { nil: undefined }),
          unknown: fc.array(fc.record({ type: fc.integer({ min: 1, max: 0x7fffffff }), data: fc.uint8Array({ maxLength: 20 }) }), { maxLength: 2 }),
        }),
        (r) => {
          const h = new Qcow2Header({
            version: r.version,
            clusterBits: r.clusterBits,
            size: r.size,
            l1Size: r.l1Size,
            l1TableOffset: r.l1TableOffset,
            refcountTableOffset: r.refcountTableOffset,
            refcountTableClusters: r.refcountTableClusters,
            nbSnapshots: r.nbSnapshots,
            snapshotsOffset: r.snapshotsOffset,
            backingFile: r.backingFile,
            backingFormat: r.backingFormat,
            unknownExtensions: r.unknown.filter((u) => ![0xe2792aca, 0x6803f857, 0x23852875, 0x0537be77, 0x44415441].includes(u.type)),
          });
          if (r.version === 3) {
            [h.incompatibleFeatures, h.compatibleFeatures, h.autoclearFeatures] = r.features;
            h.refcountOrder = r.refcountOrder;
          }
          let bytes: Buffer;
          try {
            bytes = h.serialize();
          } catch (e) {
            // Only allowed failure: the header does not fit in one (small) cluster.
            expect(String(e)).to.match(/more than one cluster/);
            return;
          }
          const back = Qcow2Header.parse(bytes);
          for (const k of ['version', 'clusterBits', 'size', 'l1Size', 'l1TableOffset', 'refcountTableOffset', 'refcountTableClusters', 'nbSnapshots', 'snapshotsOffset', 'incompatibleFeatures', 'compatibleFeatures', 'autoclearFeatures', 'refcountOrder', 'backingFile', 'backingFormat'] as const) {
            expect(back[k], k).to.deep.equal(h[k]);
          }
          expect(back.unknownExtensions.map((u) => [u.type, Array.from(u.data)])).to.deep.equal(h.unknownExtensions.map((u) => [u.type, Array.from(u.data)]));
          expect(back.serialize().equals(bytes)).to.equal(true);
        },
      ),
      { numRuns: 300, seed: 7 },
    );
  });

  it('QcowHeader: parse(serialize(h)) gives back every field', async () => {
    const fcm = await import('fast-check');
    const fc = fcm.default ?? fcm;
    fc.assert(
      fc.property(
        fc.record({
          size: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
          clusterBits: fc.integer({ min: 9, max: 16 }),
          l2Bits: fc.integer({ min: 6, max: 13 }),
          mtime: fc.integer({ min: 0, max: 0xffffffff }),
          l1TableOffset: fc.integer({ min: 0, max: 2 ** 40 }),
          backingFile: fc.option(fc.string({ minLength: 1, maxLength: 60 }), { nil: undefined }),
        }),
        (r) => {
          const h = new QcowHeader(r);
          const back = QcowHeader.parse(h.serialize());
          expect({ ...back }).to.deep.equal({ ...h });
        },
      ),
      { numRuns: 200, seed: 7 },
    );
  });
});
