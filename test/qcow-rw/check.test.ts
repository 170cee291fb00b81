/**
 * `vblk check` against `qemu-img check` on images damaged by hand: the same exit-code class and
 * the same corruption and leak counts; and repairs that leave `qemu-img check` clean.
 */
import { expect } from 'chai';
import * as fs from 'node:fs';
import { main } from '../../src/cli/main';
import { requireQemu, useTempDir, createImage as qemuCreate, qemuIo, pokeBytes, be64, run } from '../helpers/qemu';

interface Verdict {
  status: number;
  corruptions: number;
  leaks: number;
}

function qemuVerdict(img: string, extra: string[] = []): Verdict {
  const r = run('qemu-img', ['check', ...extra, '--output=json', img]);
  const j = r.stdout.trim() ? (JSON.parse(r.stdout) as { corruptions?: number; leaks?: number }) : {};
  return { status: r.status, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0 };
}

async function vblk(args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const status = await main(args, { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) } });
  return { status, stdout, stderr };
}

async function vblkVerdict(img: string, extra: string[] = []): Promise<Verdict> {
  const r = await vblk(['check', ...extra, '--output=json', img]);
  const j = r.stdout.trim() ? (JSON.parse(r.stdout) as { corruptions?: number; leaks?: number }) : {};
  return { status: r.status, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0 };
}

const u16 = (v: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
};

// Default 64 KiB layout: header, refcount table 0x10000, refcount block 0x20000, L1 0x30000,
// L2 0x40000, data from 0x50000 (reference/qcow2.md 1.8).
const RB = 0x20000;
const L1 = 0x30000;
const L2 = 0x40000;

const damages: { name: string; poke: (img: string) => void }[] = [
  { name: 'leak (refcount 1, no reference)', poke: (img) => pokeBytes(img, RB + 2 * 9, u16(1)) },
  { name: 'refcount 0 on a used data cluster', poke: (img) => pokeBytes(img, RB + 2 * 5, u16(0)) },
  { name: 'refcount 2 on a data cluster with one reference', poke: (img) => pokeBytes(img, RB + 2 * 5, u16(2)) },
  { name: 'unaligned L2 entry', poke: (img) => pokeBytes(img, L2, be64(0x8000000000050200n)) },
  { name: 'L2 entry past the end of the file', poke: (img) => pokeBytes(img, L2 + 8 * 2, be64(0x8000000001000000n)) },
  { name: 'reserved bits in an L1 entry', poke: (img) => pokeBytes(img, L1, be64(0x8100000000040000n)) },
  { name: 'reserved bits in an L2 entry', poke: (img) => pokeBytes(img, L2, be64(0x8000000000050002n)) },
  { name: 'two L2 entries sharing one cluster', poke: (img) => pokeBytes(img, L2 + 8 * 3, be64(0x8000000000050000n)) },
  { name: 'COPIED flag missing on a data cluster', poke: (img) => pokeBytes(img, L2, be64(0x0000000000050000n)) },
];

describe('vblk check agrees with qemu-img check', function () {
  this.timeout(60000);
  const tmp = useTempDir('vblk-check-');
  let base = '';
  before(function () {
    requireQemu(this);
    base = tmp.file('base.qcow2');
    qemuCreate(base, '64M');
    // Clusters 5 (0), 6 (1M), 7 (2M), 8, 9; then free cluster 9 again so a hole exists in the file.
    qemuIo(base, ['write -P 0x11 0 64k', 'write -P 0x22 1M 4k', 'write -P 0x33 2M 64k', 'write -P 0x44 3M 64k', 'write -P 0x55 4M 64k', 'discard 4M 64k']);
    expect(qemuVerdict(base).status).to.equal(0);
  });

  it('reports a clean image as clean', async () => {
    expect(await vblkVerdict(base)).to.deep.equal(qemuVerdict(base));
    expect((await vblk(['check', base])).stdout).to.match(/No errors were found on the image/);
  });

  damages.forEach((d, i) => {
    it(`matches exit code and counts: ${d.name}`, async () => {
      const img = tmp.file(`bad${i}.qcow2`);
      fs.copyFileSync(base, img);
      d.poke(img);
      const q = qemuVerdict(img);
      expect(q.status, 'the damage is detected').to.not.equal(0);
      expect(await vblkVerdict(img)).to.deep.equal(q);
    });
  });

  damages.forEach((d, i) => {
    it(`repairs like qemu-img (-r leaks, then -r all): ${d.name}`, async () => {
      for (const mode of ['leaks', 'all']) {
        const a = tmp.file(`rep${i}-${mode}-q.qcow2`);
        const b = tmp.file(`rep${i}-${mode}-v.qcow2`);
        fs.copyFileSync(base, a);
        d.poke(a);
        fs.copyFileSync(a, b);
        const qr = run('qemu-img', ['check', '-r', mode, a]);
        const vr = await vblk(['check', '-r', mode, b]);
        expect(vr.status, `vblk check -r ${mode}: ${vr.stdout}${vr.stderr}\nqemu: ${qr.stdout}${qr.stderr}`).to.equal(qr.status);
        // After our repair, qemu-img sees what it sees after its own.
        expect(qemuVerdict(b), `after vblk check -r ${mode}`).to.deep.equal(qemuVerdict(a));
      }
    });
  });

  it('prints the same JSON as qemu-img check on clean images of many shapes (snapshots, compressed, v2, refcount widths)', async () => {
    const shapes: { name: string; make: (f: string) => void }[] = [
      { name: 'v2', make: (f) => qemuCreate(f, '8M', { options: { compat: '0.10', cluster_size: '4k' } }) },
      { name: 'refbits1', make: (f) => qemuCreate(f, '8M', { options: { refcount_bits: '1', cluster_size: '512' } }) },
      { name: 'refbits64', make: (f) => qemuCreate(f, '8M', { options: { refcount_bits: '64' } }) },
      {
        name: 'snapshots',
        make: (f) => {
          qemuCreate(f, '8M', { options: { cluster_size: '4k' } });
          qemuIo(f, ['write -P 1 0 1M']);
          run('qemu-img', ['snapshot', '-c', 's1', f]);
          qemuIo(f, ['write -P 2 512k 1M']);
          run('qemu-img', ['snapshot', '-c', 's2', f]);
        },
      },
      {
        name: 'compressed',
        make: (f) => {
          const raw = f + '.raw';
          qemuCreate(raw, '8M', { format: 'raw' });
          qemuIo(raw, ['write -P 7 0 3M'], { format: 'raw' });
          run('qemu-img', ['convert', '-c', '-O', 'qcow2', raw, f]);
        },
      },
    ];
    for (const sh of shapes) {
      const f = tmp.file(`shape-${sh.name}.qcow2`);
      sh.make(f);
      if (sh.name !== 'snapshots' && sh.name !== 'compressed') qemuIo(f, ['write -P 3 0 100k', 'write -P 4 2M 64k', 'discard 2M 64k', 'write -P 5 5M 8k']);
      const q = JSON.parse(run('qemu-img', ['check', '--output=json', f]).stdout) as Record<string, unknown>;
      const v = JSON.parse((await vblk(['check', '--output=json', f])).stdout) as Record<string, unknown>;
      expect(v, sh.name).to.deep.equal(q);
    }
  });

  it('exits 63 for a qcow (version 1) image, as qemu-img does', async () => {
    const img = tmp.file('v1.qcow');
    qemuCreate(img, '1M', { format: 'qcow' });
    expect((await vblk(['check', img])).status).to.equal(63);
  });
});
