import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import type { DiskImage } from '../../src/disk/disk-image';
import { openDiskImage } from '../../src/disk/open';
import { isVblkError } from '../../src/errors';
import { kvmUnavailableReason } from '../../src/kvm/kvm';
import { defaultGuestImage, fnv1a64Words, runGuest, type GuestRunReport } from '../../src/kvm/run-guest';

const SIZE = 1 << 20;

function hasTool(t: string): boolean {
  return spawnSync(t, ['--version'], { stdio: 'ignore' }).status === 0;
}

function qemuIo(fmt: string, file: string, cmds: string[]): string {
  const args = ['-f', fmt];
  for (const c of cmds) args.push('-c', c);
  return execFileSync('qemu-io', [...args, file], { encoding: 'utf8' });
}

/** Asserts every guest and VMM check passed, listing the failures if not. */
function expectAllPassed(r: GuestRunReport): void {
  const failed = r.checks.filter((c) => !c.ok).map((c) => `${c.source}:${c.name} ${c.detail}`);
  expect(failed, r.lines.join('\n')).to.deep.equal([]);
  expect(r.passed).to.equal(true);
}

function guestCheck(r: GuestRunReport, name: string): { ok: boolean; detail: string } | undefined {
  return r.checks.find((c) => c.source === 'guest' && c.name === name);
}

describe('KVM test guest drives virtio-blk over virtio-mmio (real /dev/kvm)', function () {
  this.timeout(120000);
  let dir = '';

  before(function () {
    const why = kvmUnavailableReason();
    if (why !== null) {
      console.log(`    skip: ${why}`);
      this.skip();
    }
    if (!fs.existsSync(defaultGuestImage())) {
      console.log(`    skip: ${defaultGuestImage()} missing (run \`make guest-kvm\`)`);
      this.skip();
    }
    if (!hasTool('qemu-img') || !hasTool('qemu-io')) {
      console.log('    skip: qemu-img / qemu-io not installed (the oracle for these tests)');
      this.skip();
    }
  });

  beforeEach(function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-kvm-'));
  });

  afterEach(function () {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
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
    const file = path.join(dir, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    for (const name of ['probe', 'features', 'queue', 'write', 'flush', 'read-back', 'write-past-end', 'get-id', 'read-past-end', 'unknown-type', 'interrupts', 'reset']) {
      expect(guestCheck(r, name)?.ok, name).to.equal(true);
    }
    const out = qemuIo('raw', file, ['read -P 0xa1 512 512', 'read -P 0xa2 1024 512', `read -P 0x5a ${SIZE - 512} 512`]);
    expect(out).to.not.contain('Pattern verification failed');
  });

  it('raw, read-only: the guest sees RO, its write gets IOERR and the file is unchanged', async function () {
    const file = path.join(dir, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
    qemuIo('raw', file, ['write -P 0x33 0 4096']);
    const before = fs.readFileSync(file);
    const r = await withDisk(file, true, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    expect(guestCheck(r, 'features')?.detail).to.contain('ro=1');
    expect(guestCheck(r, 'write-rejected-readonly')?.detail).to.contain('status=1');
    expect(fs.readFileSync(file).equals(before)).to.equal(true);
  });

  it('raw, read-write disk exposed read-only with --readonly semantics (runGuest readonly option)', async function () {
    const file = path.join(dir, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
    const before = fs.readFileSync(file);
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk, readonly: true }));
    expectAllPassed(r);
    expect(guestCheck(r, 'features')?.detail).to.contain('ro=1');
    expect(fs.readFileSync(file).equals(before)).to.equal(true);
  });

  it('qcow2 (made by qemu-img), read-only: the guest reads the data qemu-io wrote (hash of 0x44 bytes)', async function () {
    const file = path.join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(SIZE)]);
    qemuIo('qcow2', file, ['write -P 0x44 0 1024']);
    const r = await withDisk(file, true, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    const want = fnv1a64Words(Buffer.alloc(1024, 0x44));
    expect(r.lines).to.include(`INFO hash sector=0 count=2 fnv=0x${want.toString(16)}`);
    expect(guestCheck(r, 'write-rejected-readonly')?.ok).to.equal(true);
  });

  it('qcow (version 1, made by qemu-img), read-only: the guest reads the data qemu-io wrote', async function () {
    const file = path.join(dir, 'disk.qcow');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow', file, String(SIZE)]);
    qemuIo('qcow', file, ['write -P 0x45 0 1024']);
    const r = await withDisk(file, true, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expectAllPassed(r);
    const want = fnv1a64Words(Buffer.alloc(1024, 0x45));
    expect(r.lines).to.include(`INFO hash sector=0 count=2 fnv=0x${want.toString(16)}`);
  });

  it('qcow2, read-write: every check passes, qemu-img check is clean and qemu-io reads the patterns', async function () {
    const file = path.join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(SIZE)]);
    let disk: DiskImage;
    try {
      disk = await openDiskImage(file, { readonly: false });
    } catch (e) {
      if (isVblkError(e, 'E_DISK_READONLY') || isVblkError(e, 'E_QCOW_UNSUPPORTED')) {
        console.log(`      skip: qcow2 read-write is not available in this build (${(e as Error).message})`);
        this.skip();
      }
      throw e;
    }
    let r: GuestRunReport;
    try {
      r = await runGuest({ timeoutMs: 30000, disk });
    } finally {
      await disk.close();
    }
    expectAllPassed(r);
    execFileSync('qemu-img', ['check', '-q', file]);
    const out = qemuIo('qcow2', file, ['read -P 0xa1 512 512', 'read -P 0xa2 1024 512', `read -P 0x5a ${SIZE - 512} 512`]);
    expect(out).to.not.contain('Pattern verification failed');
  });

  it('kicks travel through the ioeventfd (no QueueNotify exit) and completions through the irqfd', async function () {
    const file = path.join(dir, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk }));
    expect(r.stats.notifyMmioExits).to.equal(0);
    expect(r.stats.ioeventfdWakeups).to.be.greaterThan(0);
    expect(r.stats.interrupts).to.be.greaterThan(0);
    expect(r.stats.ignoredAccesses).to.equal(0);
  });

  it('without the ioeventfd, QueueNotify falls back to MMIO exits and every check still passes', async function () {
    const file = path.join(dir, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
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
      [0x31, 0xc0, 0xe6, 0xf4, 0xf4], // xor eax,eax; out 0xf4, al; hlt
    ].flat();
    const image = path.join(dir, 'garbage.bin');
    fs.writeFileSync(image, Buffer.from(code));
    const file = path.join(dir, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
    const r = await withDisk(file, false, (disk) => runGuest({ timeoutMs: 30000, disk, guestImage: image }));
    expect(r.exitCode).to.equal(0);
    expect(r.stats.ignoredAccesses).to.be.greaterThanOrEqual(6);
    expect(r.passed).to.equal(false); // it never printed DONE: the VMM says so instead of hanging
  });

  it('a missing guest binary is one clear E_KVM error', async function () {
    const file = path.join(dir, 'disk.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
    let err: unknown;
    await withDisk(file, true, async (disk) => {
      try {
        await runGuest({ timeoutMs: 30000, disk, guestImage: path.join(dir, 'nope.bin') });
      } catch (e) {
        err = e;
      }
    });
    expect(isVblkError(err, 'E_KVM')).to.equal(true);
    expect((err as Error).message).to.match(/^Cannot boot the test guest: .*nope\.bin is missing/);
  });
});
