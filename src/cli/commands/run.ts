/**
 * `vblk run [--disk IMG] [--readonly] [-f FMT] [--no-ioeventfd] [--timeout SECONDS] [--kvm DEV]`: boots the
 * KVM test guest (guest/blk-guest.c) with a virtio-blk device over IMG on virtio-mmio, prints
 * every line the guest reports and the VMM's own checks, and exits 0 only if all passed.
 *
 * Without --disk it uses a fresh temporary qcow2 image, deleted afterwards. Exit codes: 0 all checks passed, 1 a check failed or the guest crashed,
 * 2 KVM is unusable here (missing /dev/kvm, no permission, old API).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { DiskImage } from '../../disk/disk-image';
import { openDiskImage } from '../../disk/open';
import { createImage } from '../../disk/qcow/create';
import { isVblkError } from '../../errors';
import { Kvm, KVM_DEVICE } from '../../kvm/kvm';
import { runGuest, type GuestRunReport } from '../../kvm/run-guest';
import { parseArgs, parseCount, parseFormat } from '../args';
import { UsageError, type Command } from '../command';

/** Size of the temporary image used when no --disk is given. */
const TEMP_DISK_SIZE = 16 << 20;

async function tempDisk(dir: string, readonly: boolean): Promise<DiskImage> {
  const qcow2 = path.join(dir, 'run.qcow2');
  await createImage(qcow2, { format: 'qcow2', size: TEMP_DISK_SIZE });
  return openDiskImage(qcow2, { readonly });
}

/** Longest --timeout accepted: one day (Node timers cannot wait more than ~24.8 days anyway). */
const MAX_TIMEOUT_SECONDS = 86_400;

/** Parses --timeout: whole seconds, 1 to MAX_TIMEOUT_SECONDS (0 would fail every run at once). */
function parseTimeoutSeconds(s: string): number {
  const v = parseCount(s, 'timeout');
  if (v < 1 || v > MAX_TIMEOUT_SECONDS) throw new UsageError(`invalid timeout "${s}": expected 1 to ${MAX_TIMEOUT_SECONDS} seconds`);
  return v;
}

export const runCommand: Command = {
  name: 'run',
  summary: 'boot a small KVM guest that drives the disk over virtio-mmio and checks the results',
  usage: 'run [--disk IMG] [--readonly] [-f FMT] [--no-ioeventfd] [--timeout SECONDS] [--kvm DEV (default /dev/kvm)]',
  async run(argv, io) {
    const a = parseArgs(argv, { values: 'f', longValues: ['disk', 'timeout', 'kvm'], longFlags: ['readonly', 'no-ioeventfd'] });
    if (a.positional.length > 0) throw new UsageError(`run takes no positional arguments (got "${a.positional[0] ?? ''}"); use --disk IMG`);
    const readonly = a.has('readonly');
    const format = parseFormat(a.get('f'));
    const timeoutArg = a.get('timeout');
    const timeoutMs = timeoutArg === undefined ? 120_000 : parseTimeoutSeconds(timeoutArg) * 1000;
    const kvmDevice = a.get('kvm') ?? KVM_DEVICE;
    // KVM first: a host without it gets one clear line before any image is touched.
    try {
      Kvm.open(kvmDevice).close();
    } catch (e) {
      if (!isVblkError(e, 'E_KVM')) throw e;
      io.stderr.write(`vblk: ${e.message}\n`);
      return 2;
    }
    const diskPath = a.get('disk');
    let tmp: string | undefined;
    let disk: DiskImage;
    if (diskPath !== undefined) {
      disk = await openDiskImage(diskPath, { readonly, ...(format ? { format } : {}) });
    } else {
      tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-run-'));
      try {
        disk = await tempDisk(tmp, readonly);
      } catch (e) {
        fs.rmSync(tmp, { recursive: true, force: true });
        throw e;
      }
    }
    try {
      io.stdout.write(`disk: ${disk.path} (${disk.format}, ${disk.sectors} sectors, ${readonly || disk.readonly ? 'read-only' : 'read-write'})\n`);
      let report: GuestRunReport;
      try {
        report = await runGuest({ disk, readonly, timeoutMs, kvmDevice, ioeventfd: !a.has('no-ioeventfd'), onLine: (l) => io.stdout.write(`guest: ${l}\n`) });
      } catch (e) {
        if (isVblkError(e, 'E_KVM') && /^Cannot (open|use) /.test(e.message)) {
          io.stderr.write(`vblk: ${e.message}\n`);
          return 2;
        }
        throw e;
      }
      for (const c of report.checks.filter((x) => x.source === 'vmm')) {
        io.stdout.write(`vmm: ${c.ok ? 'PASS' : 'FAIL'} ${c.name} ${c.detail}\n`);
      }
      const failed = report.checks.filter((c) => !c.ok).length;
      const s = report.stats;
      io.stdout.write(
        `${report.checks.length - failed} checks passed, ${failed} failed in ${report.durationMs} ms ` +
          `(${s.mmioExits} MMIO exits, ${s.ioExits} port exits, ${s.ioeventfdWakeups} ioeventfd kicks, ${s.interrupts} irqfd interrupts)\n`,
      );
      return report.passed ? 0 : 1;
    } finally {
      await disk.close();
      if (tmp !== undefined) fs.rmSync(tmp, { recursive: true, force: true });
    }
  },
};
