import { expect } from 'chai';
import * as fs from 'node:fs';
import { parseSize, humanSize, parseArgs } from '../../src/cli/args';
import { requireQemu, useTempDir, createImage, writePatterns, qemuImg, qemuIo, run } from '../helpers/qemu';
import { vblk, vblkProcess, vblkWith } from './run-vblk';

describe('vblk CLI', function () {
  const tmp = useTempDir();
  let top = '';
  let base = '';
  before(function () {
    requireQemu(this);
    base = createImage(tmp.file('base.qcow2'), '4M');
    writePatterns(base, [{ byte: 0x11, offset: 0, length: 65536 }, { byte: 0x22, offset: 1 << 20, length: 4096 }]);
    top = createImage(tmp.file('top.qcow2'), '6M', { backing: 'base.qcow2', backingFormat: 'qcow2' });
    writePatterns(top, [{ byte: 0x33, offset: 65536, length: 65536 }, { byte: 0x44, offset: 5 << 20, length: 4096 }]);
  });

  describe('entry point', () => {
    it('runs as the bin.vblk script and prints the command list', () => {
      const r = vblkProcess('--help');
      expect(r.status).to.equal(0);
      for (const c of ['info', 'map', 'compare', 'convert', 'io', 'bench']) expect(r.stdout).to.match(new RegExp(`^  ${c} `, 'm'));
      const pkg = JSON.parse(fs.readFileSync(`${__dirname}/../../../package.json`, 'utf8')) as { bin: { vblk: string } };
      expect(fs.readFileSync(`${__dirname}/../../../${pkg.bin.vblk}`, 'utf8').startsWith('#!/usr/bin/env node\n')).to.equal(true);
    });

    it('an unknown command exits 1 with one line on stderr', () => {
      const r = vblkProcess('frobnicate');
      expect(r.status).to.equal(1);
      expect(r.stderr).to.equal('vblk: unknown command "frobnicate" (run "vblk --help")\n');
    });

    it('an error is one line "vblk: <message>" on stderr, never a stack trace', () => {
      const r = vblkProcess('info', tmp.file('missing.qcow2'));
      expect(r.status).to.equal(1);
      expect(r.stderr).to.equal(`vblk: Cannot open ${tmp.file('missing.qcow2')}: no such file\n`);
      expect(r.stdout).to.equal('');
    });

    it('a bad option is a usage error (exit 1) naming the option', async () => {
      const r = await vblk('info', '--bogus', top);
      expect(r.status).to.equal(1);
      expect(r.stderr.split('\n')[0]).to.equal('vblk: unknown option --bogus (see "vblk info --help")');
    });
  });

  describe('info', () => {
    for (const name of ['top.qcow2', 'base.qcow2', 'v2.qcow2', 'v1.qcow', 'r.raw']) {
      it(`--output=json equals qemu-img info --output=json (${name})`, async () => {
        const f = tmp.file(name);
        if (!fs.existsSync(f)) {
          if (name === 'v2.qcow2') createImage(f, '3M', { options: { compat: '0.10' } });
          if (name === 'v1.qcow') createImage(f, '3M', { format: 'qcow' });
          if (name === 'r.raw') fs.writeFileSync(f, Buffer.alloc(1000000, 1));
        }
        const r = await vblk('info', '--output=json', f);
        expect(r.stderr).to.equal('');
        expect(r.stdout).to.equal(qemuImg('info', '--output=json', f));
      });

      it(`human output equals qemu-img info (${name})`, async () => {
        const f = tmp.file(name);
        const r = await vblk('info', f);
        expect(r.stdout).to.equal(qemuImg('info', f));
      });
    }

    it('reports the dirty and corrupt bits exactly like qemu-img info', async () => {
      const dirty = createImage(tmp.file('dirty.qcow2'), '1M', { options: { lazy_refcounts: 'on' } });
      run('qemu-io', ['-c', 'write -P 0x5a 0 512', '-c', 'sigraise 9', dirty]); // killed mid-way: dirty bit stays set
      const corrupt = tmp.file('corrupt.qcow2');
      fs.copyFileSync(base, corrupt);
      const fd = fs.openSync(corrupt, 'r+');
      fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0, 2]), 0, 8, 72);
      fs.closeSync(fd);
      for (const f of [dirty, corrupt]) {
        expect((await vblk('info', f)).stdout).to.equal(qemuImg('info', f));
        expect((await vblk('info', '--output=json', f)).stdout).to.equal(qemuImg('info', '--output=json', f));
      }
      expect((JSON.parse((await vblk('info', '--output=json', dirty)).stdout) as Record<string, unknown>)['dirty-flag']).to.equal(true);
    });

    it('info does not need the backing file (like qemu-img info)', async () => {
      const f = tmp.file('orphan.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', f, '1M');
      const r = await vblk('info', '--output=json', f);
      expect(r.status).to.equal(0);
      expect((JSON.parse(r.stdout) as Record<string, unknown>)['backing-filename']).to.equal('gone.qcow2');
    });

    it('--backing-chain lists every layer', async () => {
      const r = await vblk('info', '--backing-chain', '--output=json', top);
      const layers = JSON.parse(r.stdout) as Record<string, unknown>[];
      expect(layers.map((l) => l['filename'])).to.deep.equal([top, tmp.file('base.qcow2')]);
    });
  });

  describe('map', () => {
    it('human output equals qemu-img map', async () => {
      const r = await vblk('map', top);
      expect(r.stdout).to.equal(qemuImg('map', top));
    });

    it('relative paths print like qemu-img (run from the image folder)', () => {
      const ours = run(process.execPath, [`${__dirname}/../../src/cli/main.js`, 'map', 'top.qcow2'], { cwd: tmp.dir });
      const theirs = run('qemu-img', ['map', 'top.qcow2'], { cwd: tmp.dir });
      expect(ours.stdout).to.equal(theirs.stdout);
      expect(ours.stdout).to.match(/\nbase\.qcow2|base\.qcow2\n/);
    });

    /** A 4 MiB raw file: data at 0-1 MiB and 3-3.25 MiB, holes elsewhere (SEEK_DATA / SEEK_HOLE). */
    function sparseRaw(): string {
      const f = tmp.file('sparse.raw');
      fs.writeFileSync(f, '');
      fs.truncateSync(f, 4 << 20);
      const fd = fs.openSync(f, 'r+');
      fs.writeSync(fd, Buffer.alloc(1 << 20, 0x5a), 0, 1 << 20, 0);
      fs.writeSync(fd, Buffer.alloc(256 << 10, 0xa5), 0, 256 << 10, 3 << 20);
      fs.closeSync(fd);
      return f;
    }

    it('a sparse raw image: holes are "zero", not "data", exactly as in qemu-img map --output=json', async () => {
      const f = sparseRaw();
      const r = await vblk('map', '--output=json', '-f', 'raw', f);
      expect(r.stdout).to.equal(qemuImg('map', '--output=json', '-f', 'raw', f));
      expect(r.stdout).to.include('"zero": true, "data": false');
    });

    it('a sparse raw image: human output lists only the data, as qemu-img map does', async () => {
      const f = sparseRaw();
      const r = await vblk('map', '-f', 'raw', f);
      expect(r.stdout).to.equal(qemuImg('map', '-f', 'raw', f));
    });

    it('qcow2 with preallocation=metadata: clusters over host holes are "zero", as qemu-img map says', async () => {
      const f = tmp.file('prealloc-meta.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', f, '4M');
      qemuIo(f, ['write -P 7 1M 64k']);
      const json = await vblk('map', '--output=json', f);
      expect(json.stdout).to.equal(qemuImg('map', '--output=json', f));
      expect(json.stdout).to.include('"zero": true, "data": true');
      expect((await vblk('map', f)).stdout).to.equal(qemuImg('map', f));
    });

    it('a refcount table entry pointing past any file does not fail the map (the preallocation guess just says no)', async () => {
      const f = tmp.file('bad-reftable.qcow2');
      fs.copyFileSync(base, f);
      const fd = fs.openSync(f, 'r+');
      const header = Buffer.alloc(56);
      fs.readSync(fd, header, 0, 56, 0);
      const reftable = Number(header.readBigUInt64BE(48)); // refcount_table_offset
      const entry = Buffer.alloc(8);
      entry.writeBigUInt64BE(0x7fff_ffff_fffe_0000n);
      fs.writeSync(fd, entry, 0, 8, reftable);
      fs.closeSync(fd);
      const r = await vblk('map', '--output=json', f);
      expect(r.status, r.stderr).to.equal(0);
      expect(r.stdout).to.equal((await vblk('map', '--output=json', base)).stdout.split(base).join(f));
    });

    it('exits 1 on a corrupt image', async () => {
      const f = tmp.file('bad-map.qcow2');
      fs.copyFileSync(base, f);
      const fd = fs.openSync(f, 'r+');
      fs.writeSync(fd, Buffer.from([0x80, 0, 0, 0, 0, 0, 0x02, 0x00]), 0, 8, 0x40000);
      fs.closeSync(fd);
      const r = await vblk('map', '--output=json', f);
      expect(r.status).to.equal(1);
      expect(r.stderr).to.match(/^vblk: Cannot read .*: L2 entry 0 of table 0x40000 \(0x8000000000000200\) has data offset 0x200, not cluster-aligned\n$/);
    });
  });

  describe('compare', () => {
    it('exits 0 and says identical for the same contents in different formats', async () => {
      const raw = tmp.file('top.raw');
      qemuImg('convert', '-O', 'raw', top, raw);
      const r = await vblk('compare', top, raw);
      expect(r.stdout).to.equal('Images are identical.\n');
      expect(r.status).to.equal(0);
    });

    it('exits 1 with the first differing offset, like qemu-img', async () => {
      const a = tmp.file('ca.raw');
      const b = tmp.file('cb.raw');
      fs.writeFileSync(a, Buffer.alloc(65536));
      const buf = Buffer.alloc(65536);
      buf[33000] = 1;
      fs.writeFileSync(b, buf);
      const r = await vblk('compare', a, b);
      expect(r.status).to.equal(1);
      expect(r.stdout).to.equal('Content mismatch at offset 32768!\n');
      expect(run('qemu-img', ['compare', a, b]).stdout).to.equal(r.stdout);
    });

    it('a size mismatch warns and compares the tail against zeroes; -s fails it', async () => {
      const a = tmp.file('sa.raw');
      const b = tmp.file('sb.raw');
      fs.writeFileSync(a, Buffer.alloc(4096));
      fs.writeFileSync(b, Buffer.alloc(8192));
      const r = await vblk('compare', a, b);
      expect(r.stdout).to.equal('Warning: Image size mismatch!\nImages are identical.\n');
      expect(r.status).to.equal(0);
      const s = await vblk('compare', '-s', a, b);
      expect(s.stdout).to.equal('Strict mode: Image size mismatch!\n');
      expect(s.status).to.equal(1);
      const buf = Buffer.alloc(8192);
      buf[5000] = 9;
      fs.writeFileSync(b, buf);
      const t = await vblk('compare', a, b);
      expect(t.stdout).to.equal('Warning: Image size mismatch!\nContent mismatch at offset 4608!\n');
      expect(t.status).to.equal(1);
    });

    it('-p prints only the final progress line when stdout is not a TTY', async () => {
      const r = await vblk('compare', '-p', top, top);
      expect(r.status, r.stderr).to.equal(0);
      expect(r.stdout).to.equal('    (100.00/100%)\nImages are identical.\n');
    });

    it('-p updates the progress in place on a TTY', async () => {
      const r = await vblkWith({ tty: true }, 'compare', '-p', top, top);
      expect(r.status, r.stderr).to.equal(0);
      const updates = r.stdout.split('\r').slice(0, -1);
      expect(updates.length, r.stdout).to.be.greaterThan(1);
      for (const u of updates) expect(u).to.match(/^ {4}\(\d+\.\d\d\/100%\)$/);
      expect(r.stdout.endsWith('    (100.00/100%)\nImages are identical.\n')).to.equal(true);
    });

    it('exits 2 when an image cannot be opened', async () => {
      const r = await vblk('compare', top, tmp.file('nothing.raw'));
      expect(r.status).to.equal(2);
      expect(r.stderr).to.equal(`vblk: Cannot open ${tmp.file('nothing.raw')}: no such file\n`);
    });
  });

  describe('convert', () => {
    it('-O raw output equals qemu-img convert output', async () => {
      const ours = tmp.file('conv.vblk.raw');
      const r = await vblk('convert', '-O', 'raw', top, ours);
      expect(r.status).to.equal(0);
      qemuImg('convert', '-O', 'raw', top, tmp.file('conv.qemu.raw'));
      expect(fs.readFileSync(ours).equals(fs.readFileSync(tmp.file('conv.qemu.raw')))).to.equal(true);
    });

    it('keeps the output sparse (zero ranges are not written)', async () => {
      const big = createImage(tmp.file('sparse.qcow2'), '64M');
      writePatterns(big, [{ byte: 1, offset: 0, length: 4096 }]);
      const out = tmp.file('sparse.raw');
      const r = await vblk('convert', '-O', 'raw', big, out);
      expect(r.status, r.stderr).to.equal(0);
      const data = fs.readFileSync(out);
      expect(data.subarray(0, 4096).every((b) => b === 1) && data.subarray(4096).every((b) => b === 0), 'contents').to.equal(true);
      const st = fs.statSync(out);
      expect(st.size).to.equal(64 << 20);
      expect(st.blocks * 512).to.be.below(1 << 20);
    });

    it('-p prints progress (the final line when stdout is not a TTY)', async () => {
      const r = await vblk('convert', '-p', '-O', 'raw', top, tmp.file('p.raw'));
      expect(r.status, r.stderr).to.equal(0);
      expect(r.stdout).to.equal('    (100.00/100%)\n');
    });

    it('-O qcow2 writes an image that qemu-img check finds clean and qemu-img compare finds equal to the source', async () => {
      const out = tmp.file('x.qcow2');
      const r = await vblk('convert', '-O', 'qcow2', top, out);
      expect(r.status, r.stderr).to.equal(0);
      expect(run('qemu-img', ['check', out]).status, 'qemu-img check').to.equal(0);
      const cmp = run('qemu-img', ['compare', top, out]);
      expect(cmp.stdout).to.equal('Images are identical.\n');
      expect(cmp.status).to.equal(0);
    });
  });

  describe('io', () => {
    it('read -v prints the same hex dump as qemu-io', async () => {
      const r = await vblk('io', '-r', '-c', 'read -v 65520 48', top);
      const q = run('qemu-io', ['-r', '-c', 'read -v 65520 48', top]);
      const dump = (s: string): string[] => s.split('\n').filter((l) => /^[0-9a-f]{8}:/.test(l));
      expect(dump(r.stdout)).to.deep.equal(dump(q.stdout));
      expect(dump(r.stdout)).to.have.length(3);
    });

    it('read reports "read N/N bytes at offset O" and unaligned reads work', async () => {
      const r = await vblk('io', '-r', '-c', 'read -P 0x33 65537 100', top);
      expect(r.status).to.equal(0);
      expect(r.stdout.split('\n')[0]).to.equal('read 100/100 bytes at offset 65537');
    });

    it('a read past the end fails with exit 1', async () => {
      const r = await vblk('io', '-r', '-c', 'read 6M 512', top);
      expect(r.status).to.equal(1);
      expect(r.stderr).to.equal('vblk: read failed: Cannot read: 6291456+512 is past the end of the disk (size 6291456)\n');
    });

    it('an unknown io command is a usage error', async () => {
      const r = await vblk('io', '-r', '-c', 'frob 0 1', top);
      expect(r.status).to.equal(1);
      // The list of known commands grows with the read-write work; it must name read at least.
      expect(r.stderr.split('\n')[0]).to.match(/^vblk: unknown io command "frob" \(known: read(, [a-z-]+)*\) \(see "vblk io --help"\)$/);
    });
  });

  describe('bench', () => {
    it('prints the qemu-img bench lines', async () => {
      const r = await vblk('bench', '-c', '1000', '-d', '8', '-s', '4k', '-S', '8k', top);
      expect(r.status).to.equal(0);
      const lines = r.stdout.split('\n');
      expect(lines[0]).to.equal('Sending 1000 read requests, 4096 bytes each, 8 in parallel (starting at offset 0, step size 8192)');
      expect(lines[1]).to.match(/^Run completed in \d+\.\d{3} seconds\.$/);
    });

    it('-w writes the pattern (raw image)', async () => {
      const f = tmp.file('bw.raw');
      fs.writeFileSync(f, Buffer.alloc(1 << 20));
      const r = await vblk('bench', '-w', '--pattern=0xa5', '-c', '256', '-d', '4', '-f', 'raw', f);
      expect(r.status).to.equal(0);
      expect(fs.readFileSync(f).every((b) => b === 0xa5)).to.equal(true);
    });
  });
});

describe('cli args', () => {
  it('parses sizes with k/M/G/T suffixes', () => {
    expect(parseSize('512')).to.equal(512);
    expect(parseSize('4k')).to.equal(4096);
    expect(parseSize('64K')).to.equal(65536);
    expect(parseSize('1M')).to.equal(1 << 20);
    expect(parseSize('1.5G')).to.equal(1.5 * 2 ** 30);
    expect(parseSize('2T')).to.equal(2 * 2 ** 40);
    expect(parseSize('0x300200')).to.equal(0x300200);
    expect(() => parseSize('12Q')).to.throw(/invalid size "12Q"/);
    expect(() => parseSize('99999999P')).to.throw(/too large/);
  });

  it('formats sizes like qemu (size_to_str)', () => {
    expect(humanSize(0)).to.equal('0 B');
    expect(humanSize(6291456)).to.equal('6 MiB');
    expect(humanSize(1000448)).to.equal('977 KiB');
    expect(humanSize(1023 * 1024)).to.equal('0.999 MiB');
    expect(humanSize(2 ** 40)).to.equal('1 TiB');
  });

  it('parses bundled short options, values and long options', () => {
    const a = parseArgs(['-rq', '-fqcow2', '-c', 'read 0 1', '--output=json', '-c', 'read 1 1', 'img'], { flags: 'rq', values: 'fc', longValues: ['output'] });
    expect(a.has('r') && a.has('q')).to.equal(true);
    expect(a.get('f')).to.equal('qcow2');
    expect(a.all('c')).to.deep.equal(['read 0 1', 'read 1 1']);
    expect(a.get('output')).to.equal('json');
    expect(a.positional).to.deep.equal(['img']);
  });
});
