/** The bench framework's pure parts (src/bench/suite.ts): parsing peer output and the table. */
import { expect } from 'chai';
import * as child from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fmtValue, formatTable, runSeconds } from '../../src/bench/suite';
import { runDeviceBench } from '../../src/bench/device';
import { openDiskImage } from '../../src/disk/open';
import { pinGuestLayout, pinUnavailableReason } from '../../src/bench/pin';
import { skipBecause } from '../helpers/skip';

describe('bench suite helpers', function () {
  it('runSeconds reads "Run completed in X seconds." from qemu-img bench and vblk bench output', function () {
    expect(runSeconds('Sending 100 read requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)\nRun completed in 0.125 seconds.\n')).to.equal(0.125);
  });

  it('runSeconds refuses output without that line instead of inventing a time', function () {
    expect(() => runSeconds('qemu-img: Could not open x')).to.throw('no "Run completed" line in: qemu-img: Could not open x');
  });

  it('fmtValue: thousands as "k" from 10000, whole numbers from 100, one decimal below', function () {
    expect([fmtValue(164400), fmtValue(9999), fmtValue(912.4), fmtValue(42.25)]).to.deep.equal(['164.4k', '9999', '912', '42.3']);
  });

  it('formatTable: one aligned row per result with the vblk/peer ratio and the note', function () {
    const t = formatTable([
      { name: 'raw 4k rand read QD1', unit: 'IOPS', peerName: 'qemu-img bench', peer: 200000, vblk: 100000 },
      { name: 'x', unit: 'MiB/s', peerName: 'qsd', peer: 100, vblk: 150, note: 'warm' },
    ]);
    const [head, rule, row1, row2] = t.trimEnd().split('\n');
    expect(rule).to.match(/^[- ]+$/);
    // Columns line up: each value starts where its header does.
    for (const [col, v1, v2] of [['unit', 'IOPS', 'MiB/s'], ['peer value', '200.0k', '100'], ['vblk/peer', '0.50x', '1.50x']] as const) {
      expect([row1?.indexOf(v1), row2?.indexOf(v2)], col).to.deep.equal([head?.indexOf(col), head?.indexOf(col)]);
    }
    expect(row1?.startsWith('raw 4k rand read QD1')).to.equal(true);
    expect(row2?.endsWith('1.50x  (warm)')).to.equal(true);
  });
});

describe('device bench (src/bench/device.ts)', function () {
  this.timeout(30_000);
  let dir: string;
  let image: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-devbench-'));
    image = path.join(dir, 'd.raw');
    fs.writeFileSync(image, Buffer.alloc(1 << 20, 0x5a));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('measures both sides of a row in child processes and reports their ratio', async () => {
    const rows = await runDeviceBench({ image, filter: 'randread qd32', rounds: 1, seconds: 0.1, warmup: 0.05 });
    expect(rows.map((r) => r.name)).to.deep.equal(['4k randread qd32']);
    const [r] = rows;
    expect(r?.device.requests, 'device requests').to.be.greaterThan(0);
    expect(r?.disk.requests, 'disk requests').to.be.greaterThan(0);
    expect(r?.ratio).to.be.closeTo((r?.disk.iops ?? 0) / (r?.device.iops ?? 1), 1e-9);
  });

  it('measures in-process when given an open disk', async () => {
    const disk = await openDiskImage(image, { readonly: true });
    try {
      const rows = await runDeviceBench({ disk, filter: '64k seqread', rounds: 1, seconds: 0.05 });
      expect(rows.map((r) => [r.name, r.device.requests > 0, r.disk.requests > 0])).to.deep.equal([['64k seqread qd32', true, true]]);
    } finally {
      await disk.close();
    }
  });

  it('a child that cannot open the image fails the row with its error, not a made-up figure', async () => {
    const disk = await openDiskImage(image, { readonly: true });
    try {
      // The parent has the disk open; the children get a path that does not exist.
      const missing = path.join(dir, 'missing.raw');
      const err = await runDeviceBench({ disk, image: missing, isolate: true, filter: '4k randread qd1', rounds: 1, seconds: 0.05 }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(String(err)).to.match(/the disk measurement of '4k randread qd1' failed: .*missing\.raw/);
    } finally {
      await disk.close();
    }
  });
});

describe('guest bench CPU layout (src/bench/pin.ts)', function () {
  this.timeout(20_000);
  const children: child.ChildProcess[] = [];
  afterEach(() => {
    for (const c of children.splice(0)) c.kill('SIGKILL');
  });

  /** A Node child whose main thread is named `name` (libuv sets the thread name from the title). */
  async function namedProcess(name: string): Promise<number> {
    const c = child.spawn(process.execPath, ['-e', `process.title = ${JSON.stringify(name)}; setInterval(() => {}, 1000)`], { stdio: 'ignore' });
    children.push(c);
    const pid = c.pid ?? -1;
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline) {
      try {
        if (fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === name) return pid;
      } catch {
        // not started yet
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    throw new Error(`child ${pid} did not take the name ${name}`);
  }

  function cpusOf(pid: number): Map<string, string> {
    const out = new Map<string, string>();
    for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
      const status = fs.readFileSync(`/proc/${pid}/task/${t}/status`, 'utf8');
      const comm = fs.readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim();
      out.set(`${t} ${comm}`, /^Cpus_allowed_list:\s*(\S+)/m.exec(status)?.[1] ?? '?');
    }
    return out;
  }

  it('puts the vCPU thread alone on CPU 0 and every other thread of QEMU and the back-end on CPU 1', async function () {
    const why = pinUnavailableReason();
    if (why !== undefined) {
      skipBecause(this, why);
    }
    const fakeQemu = await namedProcess('CPU 0/TCG');
    const backend = await namedProcess('backend');
    await pinGuestLayout(fakeQemu, backend);
    const q = cpusOf(fakeQemu);
    const vcpu = [...q.entries()].filter(([k]) => k.endsWith(' CPU 0/TCG'));
    expect(vcpu.map(([, v]) => v)).to.deep.equal(['0']);
    for (const [k, v] of q) if (!k.endsWith(' CPU 0/TCG')) expect(v, k).to.equal('1');
    for (const [k, v] of cpusOf(backend)) expect(v, k).to.equal('1');
  });

  it('fails naming the process when it has no vCPU thread', async function () {
    const why = pinUnavailableReason();
    if (why !== undefined) skipBecause(this, why);
    const plain = await namedProcess('not-a-vcpu');
    let err: unknown;
    try {
      await pinGuestLayout(plain, plain, 200);
    } catch (e) {
      err = e;
    }
    expect(String(err)).to.include(`no vCPU thread ("CPU n/...") in process ${plain} after 200 ms`);
  });
});
