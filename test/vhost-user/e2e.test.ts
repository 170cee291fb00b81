/**
 * End to end: a real Linux guest (Debian cloud kernel, virtio_blk driver) under QEMU TCG uses
 * `vblk serve` as its disk over vhost-user. Skipped with a printed reason when QEMU is missing
 * or the guest cannot be built. Budget: about 2–4 minutes on this machine.
 */
import { expect } from 'chai';
import * as child from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bootGuest, guestUnavailableReason } from '../../src/transport/vhost-user/qemu-guest';
import type { BootResult } from '../../src/transport/vhost-user/qemu-guest';
import { skipBecause } from '../helpers/skip';

const CLI = path.resolve(__dirname, '..', '..', 'src', 'cli', 'main.js');

function qemuImg(args: string[]): { status: number | null; out: string } {
  const r = child.spawnSync('qemu-img', args, { encoding: 'utf8' });
  return { status: r.status, out: (r.stdout ?? '') + (r.stderr ?? '') };
}

/** A `vblk serve` child process. */
class Served {
  readonly proc: child.ChildProcess;
  output = '';
  constructor(readonly socket: string, image: string, extra: string[] = []) {
    this.proc = child.spawn(process.execPath, [CLI, 'serve', '--socket', socket, ...extra, image], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stdout?.on('data', (d: Buffer) => (this.output += d.toString()));
    this.proc.stderr?.on('data', (d: Buffer) => (this.output += d.toString()));
  }

  async ready(): Promise<void> {
    const deadline = Date.now() + 10_000;
    while (!this.output.includes('vblk serve: serving')) {
      if (this.proc.exitCode !== null) throw new Error(`vblk serve exited: ${this.output}`);
      if (Date.now() > deadline) throw new Error(`vblk serve did not start: ${this.output}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** SIGTERM and wait; resolves to the exit code. */
  stop(): Promise<number | null> {
    if (this.proc.exitCode !== null) return Promise.resolve(this.proc.exitCode);
    return new Promise((resolve) => {
      this.proc.once('exit', (code) => resolve(code));
      this.proc.kill('SIGTERM');
    });
  }
}

function explain(r: BootResult, s: Served): string {
  return `guest lines:\n${r.lines.join('\n')}\n--- qemu tail:\n${r.tail.slice(-1500)}\n--- vblk serve:\n${s.output}`;
}

describe('vhost-user e2e: a Linux guest on vblk serve (QEMU TCG)', function () {
  this.timeout(150_000);
  let dir: string;

  before(function () {
    const why = guestUnavailableReason();
    if (why !== undefined) {
      skipBecause(this, why);
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-e2e-'));
  });

  after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function withServe<T>(image: string, extra: string[], fn: (s: Served) => Promise<T>): Promise<T> {
    const s = new Served(path.join(dir, `vu-${crypto.randomBytes(4).toString('hex')}.sock`), image, extra);
    try {
      await s.ready();
      return await fn(s);
    } finally {
      const code = await s.stop();
      expect(code, `vblk serve exit code; output:\n${s.output}`).to.equal(0);
      expect(s.output).to.not.match(/internal error|TypeError|RangeError|at .*\.js:\d+/);
    }
  }

  function rawImage(name: string, size = 128 << 20): string {
    const p = path.join(dir, name);
    fs.writeFileSync(p, '');
    fs.truncateSync(p, size);
    return p;
  }

  it('the Linux driver negotiates VERSION_1 and EVENT_IDX (kick and interrupt suppression) with vblk serve', async () => {
    const img = rawImage('probe.raw', 16 << 20);
    await withServe(img, [], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'probe', timeoutMs: 60_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
      expect(r.results).to.include('probe size 32768');
      const line = r.lines.find((l) => l.startsWith('VBLK-FEATURES '));
      expect(line, explain(r, s)).to.be.a('string');
      const bits = (line ?? '').slice('VBLK-FEATURES '.length);
      expect(bits[29], 'VIRTIO_RING_F_EVENT_IDX').to.equal('1');
      expect(bits[32], 'VIRTIO_F_VERSION_1').to.equal('1');
    });
  });

  it('raw: mkfs.ext4, mount, write, md5, umount, fsck in the guest; the host e2fsck agrees', async () => {
    const img = rawImage('fs.raw');
    await withServe(img, [], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'fs', timeoutMs: 90_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
      expect(r.results).to.include.members(['mkfs ok', 'md5 ok', 'fsck ok']);
      expect(r.lines.filter((l) => l.startsWith('VBLK-MD5'))).to.have.length(9);
    });
    const fsck = child.spawnSync('e2fsck', ['-fn', img], { encoding: 'utf8' });
    expect(fsck.status, fsck.stdout + fsck.stderr).to.equal(0);
  });

  it('raw: fio --verify=crc32c random writes at block sizes 512 B to 1 MiB and queue depths 1 to 32', async () => {
    const img = rawImage('fio.raw');
    await withServe(img, [], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'fio', params: { fio: '512:1,4k:32,64k:8,1m:4', fiosize: 4 }, timeoutMs: 120_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
      expect(r.results).to.include.members(['fio bs=512 qd=1 ok', 'fio bs=4k qd=32 ok', 'fio bs=64k qd=8 ok', 'fio bs=1m qd=4 ok', 'readback ok']);
    });
  });

  it('--poll-max-us 0 (kicks only): fio --verify=crc32c passes at queue depths 1 and 32', async () => {
    const img = rawImage('nopoll.raw');
    await withServe(img, ['--poll-max-us', '0'], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'fio', params: { fio: '4k:1,4k:32,1m:4', fiosize: 4 }, timeoutMs: 120_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
      expect(r.results).to.include.members(['fio bs=4k qd=1 ok', 'fio bs=4k qd=32 ok', 'fio bs=1m qd=4 ok', 'readback ok']);
    });
  });

  it('adaptive polling: at iodepth 32 the Linux driver kicks far less per request than with polling off', async function () {
    // Under TCG on a shared 2-core machine a 3 s run can leave the policy in its off/backoff state
    // throughout (one run in about five found a handful of requests by polling); one retry, and
    // the figures of each attempt are printed.
    this.retries(1);
    const img = rawImage('kicks.raw', 64 << 20);
    /** Kicks per request over a 3 s fio random-read run at iodepth 32, and serve's log. */
    const kicksPerRequest = async (extra: string[]): Promise<{ ratio: number; log: string }> =>
      withServe(img, extra, async (s) => {
        const secs = 3;
        const r = await bootGuest({ socket: s.socket, workload: 'bench', params: { bench: 'kicks:randread:4k:32', secs, benchsize: 64 }, timeoutMs: 90_000 });
        expect(r.rc, explain(r, s)).to.equal(0);
        const m = /^VBLK-BENCH kicks ([\d.]+)/m.exec(r.lines.join('\n'));
        expect(m, explain(r, s)).to.not.equal(null);
        const deadline = Date.now() + 5000;
        while (!/kicks per queue: \d+/.test(s.output) && Date.now() < deadline) await new Promise((res) => setTimeout(res, 20));
        const k = /kicks per queue: (\d+)/.exec(s.output);
        expect(k, s.output).to.not.equal(null);
        // fio ramps up for 1 s before it counts: about secs + 1 seconds of requests in all.
        return { ratio: Number(k?.[1]) / (Number(m?.[1]) * (secs + 1)), log: s.output };
      });
    const off = await kicksPerRequest(['--poll-max-us', '0']);
    const on = await kicksPerRequest([]);
    expect(off.ratio, 'kicks per request with polling off').to.be.greaterThan(0.5);
    expect(on.ratio, `kicks per request with polling on (off: ${off.ratio.toFixed(2)})`).to.be.lessThan(0.75 * off.ratio);
    // The disconnect line says how many requests polling found, and says nothing of it when off.
    const found = /requests found by polling: (\d+) \(of (\d+) poll windows\)/.exec(on.log);
    expect(found, on.log).to.not.equal(null);
    console.log(`      (kicks per request: off ${off.ratio.toFixed(2)}, on ${on.ratio.toFixed(2)}; ${found?.[0] ?? ""})`);
    // Polling opened windows. How many requests it found varies too widely under TCG on this
    // shared machine to assert (1 to 22k in recent full runs, with kicks coming through the
    // poller thread): printed above, tracked in the README's known limitations.
    expect(Number(found?.[2])).to.be.greaterThan(0);
    expect(off.log).to.not.include('found by polling');
  });

  it('driver reload in the guest (rings stopped with GET_VRING_BASE and restarted) keeps the data and the service', async () => {
    const img = rawImage('reload.raw', 16 << 20);
    await withServe(img, [], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'reload', timeoutMs: 60_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
      expect(r.results).to.include.members(['reload 1 ok', 'reload 2 ok']);
    });
  });

  it('--num-queues 2 with two guest vCPUs: both queues carry verified fio traffic', async () => {
    const img = rawImage('mq.raw', 64 << 20);
    await withServe(img, ['--num-queues', '2'], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'fio', numQueues: 2, cpus: 2, params: { fio: '4k:8,64k:4', fiosize: 4, jobs: 2 }, timeoutMs: 150_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
      expect(r.results).to.include('mq 2');
      expect(r.results).to.include.members(['fio bs=4k qd=8 ok', 'fio bs=64k qd=4 ok']);
      await s.stop();
      const m = /kicks per queue: (\d+), (\d+)/.exec(s.output);
      expect(m, s.output).to.not.equal(null);
      expect(Number(m?.[1])).to.be.greaterThan(0);
      expect(Number(m?.[2])).to.be.greaterThan(0);
    });
  });

  it('--readonly: the guest sees a read-only disk, writes fail, reads return the image', async () => {
    const img = rawImage('ro.raw', 16 << 20);
    const first = crypto.randomBytes(1 << 20);
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, first, 0, first.length, 0);
    fs.closeSync(fd);
    const before = crypto.createHash('md5').update(fs.readFileSync(img)).digest('hex');
    await withServe(img, ['--readonly'], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'ro', timeoutMs: 60_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
      expect(r.results).to.include('ro 1');
      expect(r.results).to.include('write rejected');
      expect(r.results).to.include(`read ${crypto.createHash('md5').update(first).digest('hex')}`);
    });
    expect(crypto.createHash('md5').update(fs.readFileSync(img)).digest('hex')).to.equal(before);
  });

  it('qcow2: the ext4 round trip and fio verify (with discard); qemu-img check is clean', async () => {
    const img = path.join(dir, 'disk.qcow2');
    expect(qemuImg(['create', '-q', '-f', 'qcow2', img, '128M']).status).to.equal(0);
    await withServe(img, [], async (s) => {
      const fsr = await bootGuest({ socket: s.socket, workload: 'fs', timeoutMs: 90_000 });
      expect(fsr.rc, explain(fsr, s)).to.equal(0);
      const fio = await bootGuest({ socket: s.socket, workload: 'fio', params: { fio: '512:1,4k:32,1m:4', fiosize: 4 }, timeoutMs: 120_000 });
      expect(fio.rc, explain(fio, s)).to.equal(0);
      expect(fio.results).to.include('discard ok'); // qcow2 offers VIRTIO_BLK_F_DISCARD
    });
    const check = qemuImg(['check', img]);
    expect(check.status, check.out).to.equal(0);
  });

  it('qcow2 overlay over a qcow2 base: the guest verifies fio data on the overlay; base untouched, both check clean', async () => {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    expect(qemuImg(['create', '-q', '-f', 'qcow2', base, '64M']).status).to.equal(0);
    expect(child.spawnSync('qemu-io', ['-c', 'write -P 0x5c 0 32M', base]).status).to.equal(0);
    expect(qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]).status).to.equal(0);
    const baseSum = crypto.createHash('md5').update(fs.readFileSync(base)).digest('hex');
    await withServe(top, [], async (s) => {
      const r = await bootGuest({ socket: s.socket, workload: 'fio', params: { fio: '4k:16,64k:4', fiosize: 4 }, timeoutMs: 120_000 });
      expect(r.rc, explain(r, s)).to.equal(0);
    });
    expect(crypto.createHash('md5').update(fs.readFileSync(base)).digest('hex')).to.equal(baseSum);
    for (const img of [top, base]) {
      const check = qemuImg(['check', img]);
      expect(check.status, check.out).to.equal(0);
    }
    // Data the guest did not touch still comes from the base.
    const cmp = child.spawnSync('qemu-io', ['-c', 'read -P 0x5c 16M 1M', top], { encoding: 'utf8' });
    expect(cmp.status, cmp.stdout + cmp.stderr).to.equal(0);
    // qemu-io exits 0 even when a command fails: the read must also say it read everything.
    expect(cmp.stdout).to.match(/^read 1048576\/1048576 bytes at offset 16777216$/m);
    expect(cmp.stdout).to.not.match(/Pattern verification failed/);
  });

  it('SIGTERM while the guest is writing: vblk serve drains, flushes, closes the image and exits 0', async () => {
    const img = path.join(dir, 'term.qcow2');
    expect(qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']).status).to.equal(0);
    const s = new Served(path.join(dir, 'term.sock'), img);
    await s.ready();
    let exitCode: number | null | undefined;
    const r = await bootGuest({
      socket: s.socket,
      workload: 'crash-write',
      timeoutMs: 120_000,
      onLine: (line, qemu) => {
        if (!/^VBLK-FLUSHED 2$/.test(line)) return;
        void s.stop().then((code) => {
          exitCode = code;
          qemu.kill('SIGKILL'); // the guest's disk is gone; end the VM
        });
      },
    });
    expect(r.rc, explain(r, s)).to.equal(undefined); // the workload was cut off, not finished
    expect(exitCode, s.output).to.equal(0);
    expect(s.output).to.match(/SIGTERM: draining, flushing and closing the image/);
    expect(s.output).to.match(/vblk serve: stopped/);
    const check = qemuImg(['check', img]);
    expect(check.status, check.out).to.equal(0);
  });

  it('killing QEMU in the middle of a fio write job: the server survives, the image is consistent, a second boot reads back every flushed chunk', async () => {
    const img = path.join(dir, 'crash.qcow2');
    expect(qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']).status).to.equal(0);
    await withServe(img, [], async (s) => {
      let flushed = -1;
      const first = await bootGuest({
        socket: s.socket,
        workload: 'crash-write',
        timeoutMs: 120_000,
        onLine: (line, qemu) => {
          const m = /^VBLK-FLUSHED (\d+)/.exec(line);
          if (m) flushed = Number(m[1]);
          if (flushed >= 4 && !qemu.killed) qemu.kill('SIGKILL');
        },
      });
      expect(first.killed, explain(first, s)).to.equal(true);
      expect(flushed).to.be.at.least(4);
      // The server noticed the disconnect, flushed, and waits for the next front-end.
      const deadline = Date.now() + 10_000;
      while (!s.output.includes('front-end disconnected') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(s.output).to.include('front-end disconnected');
      // While vblk serve still has it open: no corruption (0 = clean, 3 = leaked clusters only).
      const during = qemuImg(['check', '-U', img]);
      expect(during.status, during.out).to.be.oneOf([0, 3]);
      const second = await bootGuest({ socket: s.socket, workload: 'crash-verify', params: { chunks: flushed + 1 }, timeoutMs: 90_000 });
      expect(second.rc, explain(second, s)).to.equal(0);
      expect(second.results).to.include(`verified ${flushed + 1} chunks, 0 bad`);
    });
    const check = qemuImg(['check', img]);
    expect(check.status, check.out).to.equal(0);
  });
});
