/**
 * The oracle corpus: images made by qemu-img / qemu-io in every shape the read path must handle.
 * For each image:
 *  - `vblk convert -O raw` equals `qemu-img convert -O raw` byte for byte;
 *  - `vblk io -r -c 'read -P ...'` confirms each written pattern;
 *  - `vblk map --output=json` equals `qemu-img map --output=json`.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { requireQemu, useTempDir, createImage, qemuImg, qemuIo, run, writePatterns, type PatternWrite } from '../helpers/qemu';
import { vblk } from '../cli/run-vblk';
import { Qcow2Header } from '../../src/disk/qcow/header';

const MiB = 1 << 20;

/** The corpus pattern P scaled to an 8 MiB disk, cluster-agnostic. */
const P8: PatternWrite[] = [
  { byte: 0x11, offset: 0, length: 65536 },
  { byte: 0x22, offset: 1 * MiB, length: 4096 },
  { byte: 0x33, offset: 0x300200, length: 0x600 },
  { byte: 0x44, offset: 4 * MiB - 4096, length: 8192 },
  { byte: 0x55, offset: 8 * MiB - 65536, length: 65536 },
];

interface Recipe {
  readonly name: string;
  /** Builds the image in `dir`; returns its path. */
  build(file: (n: string) => string): string;
  /** Reads that must match after the build (byte, offset, length). */
  readonly expect: readonly PatternWrite[];
  /**
   * The image has clusters allocated over holes of the host file, which qemu-img map (metadata
   * preallocation detected, SEEK_HOLE) calls `"zero": true, "data": true`; vblk must too.
   */
  readonly hostHoles?: true;
}

function q2(file: (n: string) => string, name: string, size: string, options: Record<string, string>, writes: PatternWrite[]): string {
  const f = createImage(file(name), size, { options });
  writePatterns(f, writes);
  return f;
}

const RECIPES: Recipe[] = [
  { name: 'v2-64k', build: (f) => q2(f, 'v2.qcow2', '8M', { compat: '0.10' }, P8), expect: P8 },
  { name: 'v3-64k', build: (f) => q2(f, 'v3.qcow2', '8M', { compat: '1.1' }, P8), expect: P8 },
  { name: 'v3-512', build: (f) => q2(f, 'c512.qcow2', '8M', { cluster_size: '512' }, P8), expect: P8 },
  { name: 'v3-4k', build: (f) => q2(f, 'c4k.qcow2', '8M', { cluster_size: '4k' }, P8), expect: P8 },
  { name: 'v2-4k', build: (f) => q2(f, 'v2c4k.qcow2', '8M', { cluster_size: '4k', compat: '0.10' }, P8), expect: P8 },
  { name: 'v3-2M', build: (f) => q2(f, 'c2m.qcow2', '8M', { cluster_size: '2M' }, P8), expect: P8 },
  {
    name: 'odd virtual size (not a multiple of the cluster size)',
    build: (f) => {
      const w = [...P8.slice(0, 4), { byte: 0x66, offset: 8 * MiB + 3 * 512 - 1536, length: 1536 }];
      return q2(f, 'odd.qcow2', String(8 * MiB + 3 * 512), {}, w);
    },
    expect: [...P8.slice(0, 4), { byte: 0x66, offset: 8 * MiB + 3 * 512 - 1536, length: 1536 }],
  },
  {
    name: 'odd size with 2M clusters',
    build: (f) => q2(f, 'odd2m.qcow2', String(5 * MiB + 512), { cluster_size: '2M' }, [{ byte: 0x77, offset: 5 * MiB - 512, length: 1024 }]),
    expect: [{ byte: 0x77, offset: 5 * MiB - 512, length: 1024 }],
  },
  { name: 'lazy refcounts, refcount_bits=1', build: (f) => q2(f, 'lazy.qcow2', '8M', { lazy_refcounts: 'on', refcount_bits: '1' }, P8), expect: P8 },
  {
    name: 'preallocation=metadata',
    build: (f) => q2(f, 'pm.qcow2', '8M', { preallocation: 'metadata' }, P8),
    expect: P8,
    hostHoles: true,
  },
  {
    name: 'compressed v3 (deflate)',
    build: (f) => {
      const src = q2(f, 'csrc.qcow2', '8M', {}, P8);
      qemuImg('convert', '-c', '-O', 'qcow2', src, f('comp.qcow2'));
      return f('comp.qcow2');
    },
    expect: P8,
  },
  {
    name: 'compressed v2, 4k clusters',
    build: (f) => {
      const src = q2(f, 'csrc2.qcow2', '8M', {}, P8);
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', src, f('comp2.qcow2'));
      return f('comp2.qcow2');
    },
    expect: P8,
  },
  {
    name: 'compressed 2M clusters, then partly rewritten',
    build: (f) => {
      const src = q2(f, 'csrc3.qcow2', '8M', {}, P8);
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=2M', src, f('comp3.qcow2'));
      writePatterns(f('comp3.qcow2'), [{ byte: 0x66, offset: 0x8000, length: 0x1000 }]);
      return f('comp3.qcow2');
    },
    expect: [{ byte: 0x11, offset: 0, length: 0x8000 }, { byte: 0x66, offset: 0x8000, length: 0x1000 }, { byte: 0x11, offset: 0x9000, length: 0x7000 }, ...P8.slice(1)],
  },
  {
    name: 'v3 zero clusters (ZERO_ALLOC, ZERO_PLAIN)',
    build: (f) => {
      const img = q2(f, 'zero.qcow2', '8M', {}, P8);
      qemuIo(img, ['write -z 0 64k', 'write -z -u 0x7f0000 64k', 'write -z 2M 1M']);
      return img;
    },
    expect: [{ byte: 0, offset: 0, length: 65536 }, P8[1] as PatternWrite, P8[2] as PatternWrite, { byte: 0, offset: 8 * MiB - 65536, length: 65536 }],
  },
  {
    name: 'v2 zero writes (deallocated)',
    build: (f) => {
      const img = q2(f, 'zero2.qcow2', '8M', { compat: '0.10' }, P8);
      qemuIo(img, ['write -z 0 64k', 'write -z 2M 1M']);
      return img;
    },
    expect: [{ byte: 0, offset: 0, length: 65536 }, P8[1] as PatternWrite, P8[4] as PatternWrite],
  },
  {
    name: 'internal snapshot then overwrite (clusters without COPIED)',
    build: (f) => {
      const img = q2(f, 'snap.qcow2', '8M', {}, P8);
      qemuImg('snapshot', '-c', 'snap1', img);
      writePatterns(img, [{ byte: 0x66, offset: 0, length: 4096 }, { byte: 0x67, offset: 2 * MiB, length: 65536 }]);
      qemuImg('snapshot', '-c', 'snap2', img);
      writePatterns(img, [{ byte: 0x68, offset: 0x1000, length: 4096 }]);
      return img;
    },
    expect: [{ byte: 0x66, offset: 0, length: 4096 }, { byte: 0x68, offset: 0x1000, length: 4096 }, { byte: 0x11, offset: 0x2000, length: 65536 - 0x2000 }, { byte: 0x67, offset: 2 * MiB, length: 65536 }, ...P8.slice(1)],
  },
  {
    name: 'v2 snapshots (amend to compat=0.10)',
    build: (f) => {
      const img = q2(f, 'snapv2.qcow2', '8M', {}, P8);
      qemuImg('snapshot', '-c', 'snap1', img);
      writePatterns(img, [{ byte: 0x66, offset: 0, length: 4096 }]);
      qemuImg('amend', '-o', 'compat=0.10', img);
      return img;
    },
    expect: [{ byte: 0x66, offset: 0, length: 4096 }, { byte: 0x11, offset: 4096, length: 65536 - 4096 }, ...P8.slice(1)],
  },
  {
    name: '3-level qcow2 chain, top larger than base, zero masking',
    build: (f) => {
      const base = q2(f, 'chain-base.qcow2', '8M', {}, P8);
      const mid = createImage(f('chain-mid.qcow2'), undefined, { backing: 'chain-base.qcow2', backingFormat: 'qcow2' });
      writePatterns(mid, [{ byte: 0x66, offset: 0x8000, length: 0x1000 }, { byte: 0x67, offset: 6 * MiB, length: 65536 }]);
      const top = createImage(f('chain-top.qcow2'), '12M', { backing: 'chain-mid.qcow2', backingFormat: 'qcow2' });
      writePatterns(top, [{ byte: 0x68, offset: 1 * MiB + 512, length: 512 }, { byte: 0x69, offset: 10 * MiB, length: 4096 }]);
      qemuIo(top, ['write -z 4M 64k']);
      void base;
      return top;
    },
    expect: [
      { byte: 0x11, offset: 0, length: 0x8000 },
      { byte: 0x66, offset: 0x8000, length: 0x1000 },
      { byte: 0x22, offset: 1 * MiB, length: 512 },
      { byte: 0x68, offset: 1 * MiB + 512, length: 512 },
      { byte: 0x22, offset: 1 * MiB + 1024, length: 3072 },
      { byte: 0x44, offset: 4 * MiB - 4096, length: 4096 },
      { byte: 0, offset: 4 * MiB, length: 65536 },
      { byte: 0x67, offset: 6 * MiB, length: 65536 },
      { byte: 0x55, offset: 8 * MiB - 65536, length: 65536 },
      { byte: 0, offset: 8 * MiB, length: 2 * MiB },
      { byte: 0x69, offset: 10 * MiB, length: 4096 },
    ],
  },
  {
    name: 'qcow2 overlay on a shorter raw backing file',
    build: (f) => {
      const raw = f('ref.raw');
      const data = Buffer.alloc(3 * MiB, 0x5a);
      data.fill(0x11, 0, 65536);
      fs.writeFileSync(raw, data);
      const top = createImage(f('on-raw.qcow2'), '4M', { backing: 'ref.raw', backingFormat: 'raw' });
      writePatterns(top, [{ byte: 0x22, offset: 1 * MiB, length: 4096 }]);
      return top;
    },
    expect: [{ byte: 0x11, offset: 0, length: 65536 }, { byte: 0x5a, offset: 65536, length: MiB - 65536 }, { byte: 0x22, offset: MiB, length: 4096 }, { byte: 0x5a, offset: MiB + 4096, length: 2 * MiB - 4096 }, { byte: 0, offset: 3 * MiB, length: MiB }],
  },
  {
    name: 'qcow2 overlay with a probed (no format extension) qcow2 backing file',
    build: (f) => {
      q2(f, 'probe-base.qcow2', '8M', {}, P8);
      const top = createImage(f('probe-top.qcow2'), undefined, { backing: 'probe-base.qcow2', backingFormat: 'qcow2' });
      // qemu-img 7.2 insists on -F; drop the backing format extension ourselves so vblk must probe.
      const c0 = fs.readFileSync(top).subarray(0, 65536);
      const h = Qcow2Header.parse(c0);
      h.backingFormat = undefined;
      const fd = fs.openSync(top, 'r+');
      fs.writeSync(fd, Buffer.concat([h.serialize(), Buffer.alloc(65536)]).subarray(0, 65536), 0, 65536, 0);
      fs.closeSync(fd);
      return top;
    },
    expect: P8,
  },
  { name: 'extended L2 (subclusters)', build: (f) => q2(f, 'extl2.qcow2', '8M', { extended_l2: 'on' }, P8), expect: P8 },
  {
    name: 'extended L2 overlay over a backing file, subcluster zero',
    build: (f) => {
      q2(f, 'xbase.qcow2', '8M', {}, P8);
      const top = createImage(f('xtop.qcow2'), undefined, { backing: 'xbase.qcow2', backingFormat: 'qcow2', options: { extended_l2: 'on' } });
      writePatterns(top, [{ byte: 0x66, offset: 0x800, length: 0x800 }]);
      qemuIo(top, ['write -z 0x1800 0x800']);
      return top;
    },
    expect: [{ byte: 0x11, offset: 0, length: 0x800 }, { byte: 0x66, offset: 0x800, length: 0x800 }, { byte: 0x11, offset: 0x1000, length: 0x800 }, { byte: 0, offset: 0x1800, length: 0x800 }, { byte: 0x11, offset: 0x2000, length: 65536 - 0x2000 }, ...P8.slice(1)],
  },
  {
    name: 'sparse 1 TiB image (2048-entry L1)',
    build: (f) => q2(f, 'big.qcow2', '1T', {}, [{ byte: 0x11, offset: 0, length: 65536 }, { byte: 0x22, offset: 2 ** 40 - 65536, length: 65536 }]),
    expect: [{ byte: 0x11, offset: 0, length: 65536 }, { byte: 0, offset: 65536, length: 65536 }, { byte: 0x22, offset: 2 ** 40 - 65536, length: 65536 }],
  },
  {
    name: 'qcow version 1',
    build: (f) => {
      const img = createImage(f('v1.qcow'), '8M', { format: 'qcow' });
      writePatterns(img, P8, 'qcow');
      return img;
    },
    expect: P8,
  },
  {
    name: 'qcow version 1, 17M (L1 size rounds up)',
    build: (f) => {
      const img = createImage(f('v1-17.qcow'), '17M', { format: 'qcow' });
      writePatterns(img, [{ byte: 0x71, offset: 17 * MiB - 4096, length: 4096 }], 'qcow');
      return img;
    },
    expect: [{ byte: 0x71, offset: 17 * MiB - 4096, length: 4096 }, { byte: 0, offset: 16 * MiB, length: MiB - 4096 }],
  },
  {
    name: 'qcow version 1, compressed',
    build: (f) => {
      const src = q2(f, 'v1src.qcow2', '8M', {}, P8);
      // qemu-img 7.2 exits 1 without a message here although the image is complete (qcow2.md 1.7).
      const r = run('qemu-img', ['convert', '-c', '-O', 'qcow', src, f('v1c.qcow')]);
      // Its status says nothing; the output must still be an image qemu-img reads as the source.
      const cmp = run('qemu-img', ['compare', src, f('v1c.qcow')]);
      if (cmp.status !== 0) throw new Error(`qemu-img convert -c -O qcow (exit ${r.status}) made an image that differs: ${cmp.stdout}${cmp.stderr}`);
      return f('v1c.qcow');
    },
    expect: P8,
  },
  {
    name: 'qcow version 1 overlay on raw',
    build: (f) => {
      const raw = f('v1ref.raw');
      fs.writeFileSync(raw, Buffer.alloc(4 * MiB, 0x5a));
      const img = createImage(f('v1ov.qcow'), '6M', { format: 'qcow', backing: 'v1ref.raw', backingFormat: 'raw' });
      writePatterns(img, [{ byte: 0x22, offset: MiB, length: 4096 }], 'qcow');
      return img;
    },
    expect: [{ byte: 0x5a, offset: 0, length: MiB }, { byte: 0x22, offset: MiB, length: 4096 }, { byte: 0x5a, offset: MiB + 4096, length: 3 * MiB - 4096 }, { byte: 0, offset: 4 * MiB, length: 2 * MiB }],
  },
  {
    name: 'qcow2 overlay on a qcow version 1 backing file',
    build: (f) => {
      const b = createImage(f('v1base.qcow'), '8M', { format: 'qcow' });
      writePatterns(b, P8, 'qcow');
      const top = createImage(f('on-v1.qcow2'), undefined, { backing: 'v1base.qcow', backingFormat: 'qcow' });
      writePatterns(top, [{ byte: 0x66, offset: 0, length: 512 }]);
      return top;
    },
    expect: [{ byte: 0x66, offset: 0, length: 512 }, { byte: 0x11, offset: 512, length: 65536 - 512 }, ...P8.slice(1)],
  },
];

describe('qcow/qcow2 read path against qemu-img (corpus)', function () {
  const tmp = useTempDir();
  before(function () {
    requireQemu(this);
  });

  for (const r of RECIPES) {
    describe(r.name, () => {
      let img = '';
      before(function () {
        requireQemu(this);
        img = r.build((n) => tmp.file(n));
      });

      it('vblk convert -O raw equals qemu-img convert -O raw byte for byte', async function () {
        const size = (JSON.parse(qemuImg('info', '--output=json', img)) as { 'virtual-size': number })['virtual-size'];
        const ours = tmp.file(`${r.name.replace(/\W+/g, '_')}.vblk.raw`);
        const theirs = tmp.file(`${r.name.replace(/\W+/g, '_')}.qemu.raw`);
        const res = await vblk('convert', '-t', 'unsafe', '-O', 'raw', img, ours);
        expect(res.stderr).to.equal('');
        expect(res.status).to.equal(0);
        qemuImg('convert', '-O', 'raw', img, theirs);
        try {
          expect(fs.statSync(ours).size).to.equal(fs.statSync(theirs).size);
          if (size > 256 * MiB) {
            // Too big to read into memory (the 1 TiB image): both outputs are sparse, so let
            // qemu-img compare them, skipping the holes of both files (it exits 1 on a difference).
            const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ours, theirs]);
            expect(cmp.status, cmp.stdout + cmp.stderr).to.equal(0);
            expect(cmp.stdout).to.equal('Images are identical.\n');
          } else {
            expect(fs.readFileSync(ours).equals(fs.readFileSync(theirs)), 'contents differ').to.equal(true);
          }
        } finally {
          fs.rmSync(ours);
          fs.rmSync(theirs);
        }
      });

      it('vblk io -r read -P confirms every written pattern', async () => {
        const cmds = r.expect.flatMap((w) => ['-c', `read -P 0x${w.byte.toString(16)} ${w.offset} ${w.length}`]);
        const res = await vblk('io', '-r', ...cmds, img);
        expect(res.stdout).to.not.match(/Pattern verification failed/);
        expect(res.stderr).to.equal('');
        expect(res.status).to.equal(0);
      });

      it('vblk io -r read -P detects a wrong pattern', async () => {
        const w = r.expect[0] as PatternWrite;
        const res = await vblk('io', '-r', '-c', `read -P 0x${((w.byte + 1) & 0xff).toString(16)} ${w.offset} ${w.length}`, img);
        expect(res.stdout).to.match(/Pattern verification failed at offset/);
        expect(res.status).to.equal(1);
      });

      it(r.hostHoles ? 'vblk map --output=json equals qemu-img map --output=json, clusters over host holes included' : 'vblk map --output=json equals qemu-img map --output=json', async function () {
        const res = await vblk('map', '--output=json', img);
        expect(res.stderr).to.equal('');
        const theirs = qemuImg('map', '--output=json', img);
        if (r.hostHoles) expect(theirs, 'the image has no cluster over a host hole: drop hostHoles').to.include('"zero": true, "data": true');
        expect(res.stdout).to.equal(theirs);
      });
    });
  }
});
