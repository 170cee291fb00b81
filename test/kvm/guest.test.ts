import * as fs from 'node:fs';
import { expect } from 'chai';
import type { DiskImage } from '../../src/disk/disk-image';
import { openDiskImage } from '../../src/disk/open';
import { isVblkError } from '../../src/errors';
import { kvmUnavailableReason } from '../../src/kvm/kvm';
import { MAX_REPORT_LINE, MAX_REPORT_LINES, defaultGuestImage, fnv1a64Words, runGuest, type GuestRunReport } from '../../src/kvm/run-guest';
import { createImage, hasQemu, makeTempDir, qemuImg, qemuIo, type TempDir } from '../helpers/qemu';
import { skipBecause } from '../helpers/skip';

const SIZE = 1 << 20;

/** Asserts every guest and VMM check passed, listing the failures if not. */
function expectAllPassed(r: GuestRunReport): void {
  const failed = r.checks.filter((c) => !c.ok).map((c) => `${c.source}:${c.name} ${c.detail}`);
  expect(failed, r.lines.join('\n')).to.deep.equal([]);
  expect(r.passed).to.equal(true);
}

function vmmCheck(r: GuestRunReport, name: string): { ok: boolean; detail: string } | undefined {
  const c = r.checks.find((x) => x.source === 'vmm' && x.name === name);
  return c === undefined ? undefined : { ok: c.ok, detail: c.detail };
}

/** x86 code that writes `s` to the report port one byte at a time (mov al, c; out 0xe9, al). */
function outChars(s: string): number[] {
  return [...Buffer.from(s, 'latin1')].flatMap((c) => [0xb0, c, 0xe6, 0xe9]);
}

/** xor eax, eax; out 0xf4, al; hlt: the guest exits with code 0. */
const EXIT_0 = [0x31, 0xc0, 0xe6, 0xf4, 0xf4];

function guestCheck(r: GuestRunReport, name: string): { ok: boolean; detail: string } | undefined {
  return r.checks.find((c) => c.source === 'guest' && c.name === name);
}

describe('KVM test guest drives virtio-blk over virtio-mmio (real /dev/kvm)', function () {
  this.timeout(120000);
  let tmp: TempDir | undefined;
  const tmpFile = (name: string): string => {
    if (!tmp) throw new Error('temp dir used outside a test');
    return tmp.file(name);
  };
  /** A fresh zero-filled image made by qemu-img. */
  const freshImage = (name: string, format: 'raw' | 'qcow2' | 'qcow'): string => createImage(tmpFile(name), SIZE, { format });

  before(function () {
    const why = kvmUnavailableReason();
    if (why !== null) {
      skipBecause(this, why);
    }
    if (!fs.existsSync(defaultGuestImage())) {
      skipBecause(this, `${defaultGuestImage()} missing (run \`make guest-kvm\`)`);
    }
    if (!hasQemu()) {
      skipBecause(this, 'qemu-img / qemu-io not installed (the oracle for these tests)');
    }
  });

  beforeEach(function () {
    tmp = makeTempDir('vblk-kvm-');
  });

  afterEach(function () {
    tmp?.cleanup();
    tmp = undefined;
  });

  async function withDisk<T>(file: string, readonly: boolean, fn: (d: DiskImage) => Promise<T>): Promise<T> {
    const disk = await openDiskImage(file, { readonly });
    try {
      return await fn(disk);
    } finally {
      await disk.close();
    }
  }

  it('raw, read-write: every guest check passes and qemu-io finds the written patterns in the file', async function () {
    const file = freshImage('disk.raw', 'raw');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    for (const name of ['probe', 'features', 'queue', 'write', 'flush', 'read-back', 'write-past-end', 'get-id', 'read-past-end', 'unknown-type', 'interrupts', 'reset']) {
      expect(guestCheck(r, name)?.ok, name).to.equal(true);
    }
    qemuIo(file, ['read -P 0xa1 512 512', 'read -P 0xa2 1024 512', `read -P 0x5a ${SIZE - 512} 512`], { format: 'raw' });
    // qemuIo throws on "Pattern verification failed", so reaching here means every pattern matched.
  });

  it('raw, read-only: the guest sees RO, its write gets IOERR and the file is unchanged', async function () {
    const file = freshImage('disk.raw', 'raw');
    qemuIo(file, ['write -P 0x33 0 4096'], { format: 'raw' });
    const before = fs.readFileSync(file);
    const r = await withDisk(file, true, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    expect(guestCheck(r, 'features')?.detail).to.contain('ro=1');
    expect(guestCheck(r, 'write-rejected-readonly')?.detail).to.contain('status=1');
    expect(fs.readFileSync(file).equals(before)).to.equal(true);
  });

  it('raw, read-write disk exposed read-only with --readonly semantics (runGuest readonly option)', async function () {
    const file = freshImage('disk.raw', 'raw');
    const before = fs.readFileSync(file);
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk, readonly: true }));
    expectAllPassed(r);
    expect(guestCheck(r, 'features')?.detail).to.contain('ro=1');
    expect(fs.readFileSync(file).equals(before)).to.equal(true);
  });

  it('qcow2 (made by qemu-img), read-only: the guest reads the data qemu-io wrote (hash of 0x44 bytes)', async function () {
    const file = freshImage('disk.qcow2', 'qcow2');
    qemuIo(file, ['write -P 0x44 0 1024'], { format: 'qcow2' });
    const r = await withDisk(file, true, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    const want = fnv1a64Words(Buffer.alloc(1024, 0x44));
    expect(r.lines).to.include(`INFO hash sector=0 count=2 fnv=0x${want.toString(16)}`);
    expect(guestCheck(r, 'write-rejected-readonly')?.ok).to.equal(true);
  });

  it('qcow (version 1, made by qemu-img), read-only: the guest reads the data qemu-io wrote', async function () {
    const file = freshImage('disk.qcow', 'qcow');
    qemuIo(file, ['write -P 0x45 0 1024'], { format: 'qcow' });
    const r = await withDisk(file, true, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    const want = fnv1a64Words(Buffer.alloc(1024, 0x45));
    expect(r.lines).to.include(`INFO hash sector=0 count=2 fnv=0x${want.toString(16)}`);
  });

  it('qcow2, read-write: every check passes, qemu-img check is clean and qemu-io reads the patterns', async function () {
    const file = freshImage('disk.qcow2', 'qcow2');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    qemuImg('check', '-q', file);
    qemuIo(file, ['read -P 0xa1 512 512', 'read -P 0xa2 1024 512', `read -P 0x5a ${SIZE - 512} 512`], { format: 'qcow2' });
    // qemuIo throws on "Pattern verification failed", so reaching here means every pattern matched.
  });

  it('qcow (version 1), read-write: every check passes and qemu-io reads the patterns', async function () {
    const file = freshImage('disk.qcow', 'qcow');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    qemuIo(file, ['read -P 0xa1 512 512', 'read -P 0xa2 1024 512', `read -P 0x5a ${SIZE - 512} 512`], { format: 'qcow' });
  });

  it('kicks travel through the ioeventfd (no QueueNotify exit) and completions through the irqfd', async function () {
    const file = freshImage('disk.raw', 'raw');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expect(r.stats.notifyMmioExits).to.equal(0);
    expect(r.stats.ioeventfdWakeups).to.be.greaterThan(0);
    expect(r.stats.interrupts).to.be.greaterThan(0);
    expect(r.stats.ignoredAccesses).to.equal(0);
  });

  it('without the ioeventfd, QueueNotify falls back to MMIO exits and every check still passes', async function () {
    const file = freshImage('disk.raw', 'raw');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk, ioeventfd: false }));
    expectAllPassed(r);
    expect(r.stats.notifyMmioExits).to.be.greaterThan(0);
  });

  it('a guest writing garbage to the virtio-mmio registers is ignored access by access, never crashing the VMM', async function () {
    // rdi = window base. Each line is one bad access; then out 0xf4 (exit) and hlt.
    const code = [
      [0xc6, 0x47, 0x70, 0x0f], // mov byte [rdi+0x70], 0x0f     1-byte Status write
      [0x66, 0xc7, 0x47, 0x30, 0x34, 0x12], // mov word [rdi+0x30], 0x1234  2-byte QueueSel write
      [0x48, 0x89, 0xbf, 0x80, 0, 0, 0], // mov [rdi+0x80], rdi    8-byte QueueDescLow write
      [0xc7, 0x47, 0x44, 1, 0, 0, 0], // mov dword [rdi+0x44], 1  QueueReady before FEATURES_OK
      [0xc7, 0x87, 0xf0, 0x01, 0, 0, 0xff, 0xff, 0xff, 0xff], // config write past the config space
      [0x8b, 0x87, 0xf8, 0, 0, 0], // mov eax, [rdi+0xf8]       unknown register read
      [0xc7, 0x47, 0x70, 0xff, 0, 0, 0], // Status = 0xff (DRIVER_OK without the steps before it)
      [0xc7, 0x47, 0x50, 7, 0, 0, 0], // QueueNotify 7: no such queue (MMIO exit)
      EXIT_0,
    ].flat();
    const image = tmpFile('garbage.bin');
    fs.writeFileSync(image, Buffer.from(code));
    const file = freshImage('disk.raw', 'raw');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk, guestImage: image }));
    expect(r.exitCode).to.equal(0);
    expect(r.stats.ignoredAccesses).to.be.greaterThanOrEqual(6);
    // It never printed DONE: the VMM says so instead of hanging.
    expect(vmmCheck(r, 'guest-finished')).to.deep.equal({ ok: false, detail: 'exit code 0, no DONE line' });
    expect(r.passed).to.equal(false);
  });

  it('a guest that claims DONE without running the checks fails: the VMM lists the checks it never reported', async function () {
    const image = tmpFile('liar.bin');
    fs.writeFileSync(image, Buffer.from([...outChars('DONE pass=0 fail=0\n'), ...EXIT_0]));
    const file = freshImage('disk.raw', 'raw');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk, guestImage: image }));
    expect(vmmCheck(r, 'guest-finished')?.ok).to.equal(true);
    expect(vmmCheck(r, 'guest-checks-complete')).to.deep.equal({
      ok: false,
      detail: 'the guest did not report: probe, features, queue, read, get-id, read-past-end, unknown-type, interrupts, reset, write, flush, read-back, write-past-end',
    });
    expect(r.passed).to.equal(false);
  });

  it('a guest flooding the report port without a newline is cut at the line cap and stopped by the timeout', async function () {
    const image = tmpFile('flood.bin');
    fs.writeFileSync(image, Buffer.from([0xb0, 0x78, 0xe6, 0xe9, 0xeb, 0xfc])); // mov al,'x'; l: out 0xe9,al; jmp l
    const file = freshImage('disk.raw', 'raw');
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 1500, disk, guestImage: image }));
    expect(r.stats.ioExits, 'the guest got far enough to overflow a line').to.be.greaterThan(MAX_REPORT_LINE);
    expect(r.lines.length).to.be.within(1, MAX_REPORT_LINES);
    expect(r.lines.every((l) => l.length <= MAX_REPORT_LINE)).to.equal(true);
    expect(vmmCheck(r, 'report-within-limits')?.ok).to.equal(false);
    expect(vmmCheck(r, 'guest-finished')).to.deep.equal({ ok: false, detail: 'timed out after 1500 ms' });
  });

  it('a missing guest binary is one clear E_KVM error', async function () {
    const file = freshImage('disk.raw', 'raw');
    let err: unknown;
    await withDisk(file, true, async (disk) => {
      try {
        await runGuest({ timeoutMs: 30000, disk, guestImage: tmpFile('nope.bin') });
      } catch (e) {
        err = e;
      }
    });
    expect(isVblkError(err, 'E_KVM')).to.equal(true);
    expect((err as Error).message).to.match(/^Cannot boot the test guest: .*nope\.bin is missing/);
  });
});
