import * as fs from 'node:fs';
import * as path from 'node:path';
import type { DiskImage } from '../disk/disk-image';
import { TransportError, hex } from '../errors';
import { GuestMemory } from '../memory/guest-memory';
import { MMIO_REG, MMIO_WINDOW_SIZE, VirtioMmioTransport } from '../transport/mmio';
import { VirtioBlkDevice } from '../virtio/blk';
import { KVM_CAP } from './abi';
import { EventFdReader } from './eventfd-reader';
import { Kvm, KVM_DEVICE } from './kvm';
import { BOOT_LAYOUT, enterLongMode, writeBootTables } from './long-mode';
import type { Vcpu } from './vcpu';
import { signalEventFd, type Vm } from './vm';

/**
 * The VM the test guest runs in (docs/kvm.md):
 *
 *   0x0000_0000  RAM, 2 MiB: boot GDT and page tables at 0x1000-0x4fff, guest image at 0x10000,
 *                stack below 0x80000; the guest keeps its virtqueue and buffers in its own .bss
 *   0x1000_0000  virtio-mmio window (0x200 bytes used of a 4 KiB page); QueueNotify (+0x50) is an
 *                ioeventfd, every other register access is an MMIO exit to the VMM
 *   IRQ 5        the device's interrupt: irqfd on GSI 5 -> in-kernel PIC (vector 0x25 after the
 *                guest remaps it) / IOAPIC pin 5
 *   port 0xE9    guest report bytes; port 0xEA: address of a report string; port 0xF4: guest exit
 *                (the lines: PASS / FAIL / INFO / DONE)
 */
export const GUEST_LAYOUT = {
  RAM_BASE: 0,
  RAM_SIZE: 2 << 20,
  LOAD_ADDR: 0x10000,
  STACK_TOP: 0x80000 - 8,
  MMIO_BASE: 0x1000_0000,
  IRQ: 5,
  PORT_REPORT: 0xe9,
  PORT_EXIT: 0xf4,
  /** A 32-bit write here is the guest address of a NUL-terminated string (one exit per string). */
  PORT_STRING: 0xea,
  TSS_ADDR: 0xfffb_d000,
} as const;

/** The guest binary built by `make guest-kvm`. */
export function defaultGuestImage(): string {
  return path.resolve(__dirname, '..', '..', '..', 'build', 'guest-kvm', 'blk-guest.bin');
}

export interface RunGuestOptions {
  readonly disk: DiskImage;
  /** Expose the disk read-only (the guest must then see RO and get IOERR for a write). */
  readonly readonly?: boolean;
  /** GET_ID serial the device reports (default: the device's default, the image file name). */
  readonly serial?: string;
  /** Flat guest binary; default `defaultGuestImage()`. */
  readonly guestImage?: string;
  /** Wall-clock limit for the guest; default 120 s (nested KVM is slow). */
  readonly timeoutMs?: number;
  /** Route QueueNotify through an ioeventfd (default true); false uses the MMIO-exit fallback. */
  readonly ioeventfd?: boolean;
  /** Called with each line the guest reports, as it arrives. */
  readonly onLine?: (line: string) => void;
  readonly kvmDevice?: string;
}

/** One check: reported by the guest, or made by the VMM about the run. */
export interface GuestCheck {
  readonly source: 'guest' | 'vmm';
  readonly name: string;
  readonly ok: boolean;
  readonly detail: string;
}

export interface GuestRunReport {
  /** Every line the guest printed. */
  readonly lines: readonly string[];
  readonly checks: readonly GuestCheck[];
  /** True when every check passed and the guest ran to DONE. */
  readonly passed: boolean;
  readonly exitCode: number | null;
  readonly durationMs: number;
  readonly stats: {
    readonly ioExits: number;
    readonly mmioExits: number;
    /** QueueNotify writes that reached the VMM as MMIO exits (0 when the ioeventfd carried them). */
    readonly notifyMmioExits: number;
    /** Wake-ups of the QueueNotify ioeventfd reader. */
    readonly ioeventfdWakeups: number;
    /** Interrupts raised through the irqfd. */
    readonly interrupts: number;
    /** Guest register accesses the transport ignored as invalid. */
    readonly ignoredAccesses: number;
  };
}

/** FNV-1a over 64-bit little-endian words (the guest's `hash`). */
export function fnv1a64Words(b: Uint8Array): bigint {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  let h = 0xcbf29ce484222325n;
  for (let i = 0; i + 8 <= buf.length; i += 8) {
    h ^= buf.readBigUInt64LE(i);
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return h;
}

/** Longest string the guest may pass by address (port 0xEA). */
const MAX_GUEST_STRING = 256;
/** Longest report line kept (the guest controls it: a line without '\n' must not grow forever). */
export const MAX_REPORT_LINE = 1024;
/** Most report lines kept; the guest prints about 20. */
export const MAX_REPORT_LINES = 1000;

/**
 * The NUL-terminated string at guest address `addr` (at most 256 bytes, clipped to RAM): what
 * the guest passes by address on port 0xEA.
 */
export function guestString(ram: Buffer, addr: number): string {
  if (addr >= ram.length) return '';
  const window = ram.subarray(addr, Math.min(ram.length, addr + MAX_GUEST_STRING));
  const nul = window.indexOf(0);
  return window.subarray(0, nul < 0 ? window.length : nul).toString('latin1');
}

/**
 * Splits the guest's report output into lines, with both caps applied (the output is
 * guest-controlled). `overflowed` says whether anything was cut.
 */
export class ReportLines {
  readonly lines: string[] = [];
  overflowed = false;
  #partial = '';
  readonly #onLine: ((line: string) => void) | undefined;

  constructor(onLine?: (line: string) => void) {
    this.#onLine = onLine;
  }

  /** Adds report text; complete lines are kept and passed to `onLine`. */
  push(text: string): void {
    this.#partial += text;
    let nl: number;
    while ((nl = this.#partial.indexOf('\n')) >= 0) {
      this.#add(this.#partial.slice(0, nl));
      this.#partial = this.#partial.slice(nl + 1);
    }
    if (this.#partial.length > MAX_REPORT_LINE) {
      this.#add(this.#partial);
      this.#partial = '';
    }
  }

  /** Keeps the last unterminated line, if any. */
  end(): void {
    if (this.#partial.length > 0) this.#add(this.#partial);
    this.#partial = '';
  }

  #add(line: string): void {
    if (this.lines.length >= MAX_REPORT_LINES) {
      this.overflowed = true;
      return;
    }
    if (line.length > MAX_REPORT_LINE) this.overflowed = true;
    const kept = line.slice(0, MAX_REPORT_LINE);
    this.lines.push(kept);
    this.#onLine?.(kept);
  }
}

function parseLine(line: string): GuestCheck | undefined {
  const m = /^(PASS|FAIL) (\S+) ?(.*)$/.exec(line);
  if (!m) return undefined;
  return { source: 'guest', ok: m[1] === 'PASS', name: m[2] ?? '', detail: m[3] ?? '' };
}

/**
 * Checks the guest must report in every complete run (guest/blk-guest.c). A guest that skips one
 * (a bug, or a device that made it bail out early) fails the run instead of passing with less.
 */
export const REQUIRED_GUEST_CHECKS = {
  always: ['probe', 'features', 'queue', 'read', 'get-id', 'read-past-end', 'unknown-type', 'interrupts', 'reset'],
  readWrite: ['write', 'flush', 'read-back', 'write-past-end'],
  readOnly: ['write-rejected-readonly'],
} as const;

/** The names in REQUIRED_GUEST_CHECKS that `checks` lacks. */
export function missingGuestChecks(checks: readonly GuestCheck[], readonly: boolean): string[] {
  const seen = new Set(checks.filter((c) => c.source === 'guest').map((c) => c.name));
  const want = [...REQUIRED_GUEST_CHECKS.always, ...(readonly ? REQUIRED_GUEST_CHECKS.readOnly : REQUIRED_GUEST_CHECKS.readWrite)];
  return want.filter((n) => !seen.has(n));
}

/** What the run loop saw, for the VMM's checks and the report. */
interface LoopResult {
  readonly exitCode: number | null;
  readonly timedOut: boolean;
  readonly ioExits: number;
  readonly mmioExits: number;
  readonly notifyMmioExits: number;
}

/**
 * Runs the vCPU until the guest writes its exit port or the timeout fires, serving port I/O
 * (reports) and MMIO exits (the virtio-mmio window; anything else reads as all-ones).
 */
async function runLoop(vcpu: Vcpu, ram: Buffer, transport: VirtioMmioTransport, report: ReportLines, timeoutMs: number): Promise<LoopResult> {
  const L = GUEST_LAYOUT;
  let exitCode: number | null = null;
  let timedOut = false;
  let ioExits = 0;
  let mmioExits = 0;
  let notifyMmioExits = 0;
  const timer = setTimeout(() => {
    timedOut = true;
    vcpu.kick();
  }, timeoutMs);
  try {
    while (exitCode === null && !timedOut) {
      const exit = await vcpu.run();
      if (exit.kind === 'io') {
        ioExits++;
        if (exit.direction === 'out' && (exit.port === L.PORT_REPORT || (exit.port === L.PORT_STRING && exit.size === 4))) {
          report.push(exit.port === L.PORT_REPORT ? exit.data.toString('latin1') : guestString(ram, exit.data.readUInt32LE(0)));
        } else if (exit.direction === 'out' && exit.port === L.PORT_EXIT) {
          exitCode = exit.data[0] ?? 0;
        } else if (exit.direction === 'in') {
          exit.data.fill(0xff); // no device on this port
        }
      } else if (exit.kind === 'mmio') {
        mmioExits++;
        const off = exit.address - L.MMIO_BASE;
        if (off >= 0 && off < MMIO_WINDOW_SIZE) {
          if (exit.isWrite) {
            if (off === MMIO_REG.QUEUE_NOTIFY) notifyMmioExits++;
            transport.writeBytes(off, exit.data);
          } else {
            transport.readBytes(off, exit.data);
          }
          await transport.settled();
        } else if (!exit.isWrite) {
          exit.data.fill(0xff); // unmapped guest physical address
        }
      } else if (exit.kind === 'hlt') {
        throw new TransportError('E_KVM', 'Cannot run the test guest: it halted with no interrupt controller to wake it');
      }
      // 'interrupted': the timer kicked us (loop condition ends the run) or a stray signal
    }
  } finally {
    clearTimeout(timer);
  }
  return { exitCode, timedOut, ioExits, mmioExits, notifyMmioExits };
}

/** Everything the VMM-side checks look at once the guest has stopped. */
interface VmmCheckInput {
  readonly opts: RunGuestOptions;
  readonly readonly: boolean;
  readonly timeoutMs: number;
  readonly loop: LoopResult;
  readonly report: ReportLines;
  readonly guestChecks: readonly GuestCheck[];
  /** Sectors 0-2 before the run. */
  readonly before: Buffer;
  readonly device: VirtioBlkDevice;
  readonly transport: VirtioMmioTransport;
  readonly useIoeventfd: boolean;
  readonly ioeventfdWakeups: number;
}

/** The VMM's own checks of a finished run: what the guest said must match the disk and the counters. */
async function vmmChecks(x: VmmCheckInput): Promise<GuestCheck[]> {
  const out: GuestCheck[] = [];
  const vmm = (name: string, ok: boolean, detail: string): void => {
    out.push({ source: 'vmm', name, ok, detail });
  };
  const { loop, report, guestChecks, opts, readonly } = x;
  const lines = report.lines;
  const done = lines.find((l) => l.startsWith('DONE '));
  vmm('guest-finished', !loop.timedOut && loop.exitCode === 0 && done !== undefined, loop.timedOut ? `timed out after ${x.timeoutMs} ms` : `exit code ${String(loop.exitCode)}, ${done ?? 'no DONE line'}`);
  const missing = missingGuestChecks(guestChecks, readonly);
  vmm('guest-checks-complete', missing.length === 0, missing.length === 0 ? 'the guest reported every required check' : `the guest did not report: ${missing.join(', ')}`);
  const counts = done === undefined ? undefined : /^DONE pass=(\d+) fail=(\d+)$/.exec(done);
  const passes = guestChecks.filter((c) => c.ok).length;
  const fails = guestChecks.length - passes;
  vmm('guest-counts-match', counts !== undefined && counts !== null && Number(counts[1]) === passes && Number(counts[2]) === fails, `guest counted ${done ?? 'nothing'}, the VMM received pass=${passes} fail=${fails}`);
  vmm('report-within-limits', !report.overflowed, report.overflowed ? `the guest printed more than ${MAX_REPORT_LINES} lines or a line longer than ${MAX_REPORT_LINE} bytes (cut)` : `${lines.length} lines`);
  const feat = guestChecks.find((c) => c.name === 'features');
  const sawRo = feat !== undefined && /\bro=1\b/.test(feat.detail);
  vmm('readonly-seen', feat !== undefined && sawRo === readonly, `guest saw ro=${sawRo ? 1 : 0}, disk is ${readonly ? 'read-only' : 'read-write'}`);
  const hashLine = lines.find((l) => l.startsWith('INFO hash '));
  const hashMatch = hashLine === undefined ? undefined : /fnv=0x([0-9a-f]+)/.exec(hashLine);
  if (hashMatch?.[1] !== undefined) {
    const buf = Buffer.alloc(1024);
    await opts.disk.readSector(0, buf);
    const want = fnv1a64Words(buf);
    const got = BigInt('0x' + hashMatch[1]);
    vmm('data-matches-disk', got === want, `guest read sectors 0-1 with hash ${hex(got)}, the disk holds ${hex(want)}`);
  } else {
    vmm('data-matches-disk', false, 'the guest reported no hash');
  }
  if (readonly) {
    const after = Buffer.alloc(x.before.length);
    if (after.length > 0) await opts.disk.readSector(0, after);
    vmm('readonly-disk-unchanged', after.equals(x.before), after.equals(x.before) ? 'sectors 0-2 unchanged' : 'sectors 0-2 changed on a read-only disk');
  } else if (opts.disk.sectors >= 8) {
    const s12 = Buffer.alloc(1024);
    const last = Buffer.alloc(512);
    await opts.disk.readSector(1, s12);
    await opts.disk.readSector(opts.disk.sectors - 1, last);
    const ok = s12.subarray(0, 512).every((b) => b === 0xa1) && s12.subarray(512).every((b) => b === 0xa2) && last.every((b) => b === 0x5a);
    vmm('written-data-on-disk', ok, ok ? 'sectors 1, 2 and the last sector hold 0xa1, 0xa2, 0x5a' : 'the disk does not hold the patterns the guest wrote');
  }
  const idCheck = guestChecks.find((c) => c.name === 'get-id');
  const wantId = x.device.serial.toString('latin1').replace(/\0.*$/s, '').replace(/[^\x21-\x7e]/g, '?');
  const gotId = idCheck === undefined ? undefined : /^id=(\S*)/.exec(idCheck.detail)?.[1];
  vmm('get-id-serial', gotId === wantId, `guest read "${gotId ?? ''}", device serial "${wantId}"`);
  if (x.useIoeventfd) {
    // Both halves: no kick took the MMIO-exit path, and kicks did arrive through the eventfd.
    vmm('kicks-via-ioeventfd', loop.notifyMmioExits === 0 && x.ioeventfdWakeups > 0, `${loop.notifyMmioExits} QueueNotify MMIO exits, ${x.ioeventfdWakeups} ioeventfd wake-ups`);
  }
  vmm('interrupts-via-irqfd', x.transport.interruptsRaised > 0, `${x.transport.interruptsRaised} interrupts raised`);
  return out;
}

/**
 * Boots the test guest (guest/blk-guest.c) in a fresh KVM VM whose only device is a virtio-blk
 * over `disk` on virtio-mmio, runs it to completion and returns what it reported plus the VMM's
 * own checks of the run (read-only seen, data hash matches the disk, GET_ID serial, kicks through
 * the ioeventfd, interrupts through the irqfd).
 *
 * @throws TransportError E_KVM when KVM is unusable (one clear line), or the guest crashed the
 *   vCPU (triple fault, entry failure, internal error).
 */
export async function runGuest(opts: RunGuestOptions): Promise<GuestRunReport> {
  const L = GUEST_LAYOUT;
  const imagePath = opts.guestImage ?? defaultGuestImage();
  if (!fs.existsSync(imagePath)) {
    throw new TransportError('E_KVM', `Cannot boot the test guest: ${imagePath} is missing (run \`make guest-kvm\`)`, { path: imagePath });
  }
  const image = fs.readFileSync(imagePath);
  if (L.LOAD_ADDR + image.length > L.STACK_TOP - 0x8000) {
    throw new TransportError('E_KVM', `Cannot boot the test guest: ${imagePath} is ${image.length} bytes, more than the ${hex(L.STACK_TOP - 0x8000 - L.LOAD_ADDR)} reserved`);
  }
  const readonly = opts.readonly === true || opts.disk.readonly;
  const started = Date.now();
  // What sectors 0-2 hold before the run: a read-only run must leave them as they are.
  const before = Buffer.alloc(Math.min(3, opts.disk.sectors) * 512);
  if (before.length > 0) await opts.disk.readSector(0, before);
  const kvm = Kvm.open(opts.kvmDevice ?? KVM_DEVICE);
  let vm: Vm | undefined;
  const readers: EventFdReader[] = [];
  let device: VirtioBlkDevice | undefined;
  try {
    kvm.requireExtension(KVM_CAP.IRQCHIP, 'KVM_CAP_IRQCHIP');
    kvm.requireExtension(KVM_CAP.IRQFD, 'KVM_CAP_IRQFD');
    kvm.requireExtension(KVM_CAP.IMMEDIATE_EXIT, 'KVM_CAP_IMMEDIATE_EXIT');
    const useIoeventfd = opts.ioeventfd !== false && kvm.checkExtension(KVM_CAP.IOEVENTFD) > 0;
    vm = kvm.createVm();
    vm.setTssAddr(L.TSS_ADDR);
    vm.createIrqchip();
    const ram = vm.addRam(L.RAM_BASE, L.RAM_SIZE);
    writeBootTables(ram.buffer);
    if (L.LOAD_ADDR < BOOT_LAYOUT.END) throw new RangeError('guest load address overlaps the boot tables');
    image.copy(ram.buffer, L.LOAD_ADDR);
    const memory = new GuestMemory([{ guestAddr: L.RAM_BASE, buffer: ram.buffer }]);

    device = new VirtioBlkDevice(opts.disk, { readonly, ...(opts.serial !== undefined ? { serial: opts.serial } : {}) });
    const irqfd = vm.irqfd(L.IRQ);
    const transport = new VirtioMmioTransport({ device, memory, raiseInterrupt: () => signalEventFd(irqfd) });
    const notifyAddr = L.MMIO_BASE + MMIO_REG.QUEUE_NOTIFY;
    if (useIoeventfd) {
      for (let q = 0; q < device.numQueues; q++) {
        const ev = vm.addIoEventFd({ addr: notifyAddr, len: 4, datamatch: q });
        readers.push(new EventFdReader(ev.fd, () => transport.notify(q)));
      }
    }

    const vcpu = vm.createVcpu(0);
    enterLongMode(vcpu, L.LOAD_ADDR, L.STACK_TOP);
    const regs = vcpu.getRegs();
    regs.rdi = BigInt(L.MMIO_BASE);
    regs.rsi = BigInt(L.IRQ);
    vcpu.setRegs(regs);

    const report = new ReportLines(opts.onLine);
    const timeoutMs = opts.timeoutMs ?? 120_000;
    const loop = await runLoop(vcpu, ram.buffer, transport, report, timeoutMs);
    report.end();

    for (const r of readers) await r.stop();
    // Complete every in-flight request before RAM is unmapped.
    await device.reset();
    const guestChecks = report.lines.map(parseLine).filter((c): c is GuestCheck => c !== undefined);
    const ioeventfdWakeups = readers.reduce((n, r) => n + r.wakeups, 0);
    const checks = [...guestChecks, ...(await vmmChecks({ opts, readonly, timeoutMs, loop, report, guestChecks, before, device, transport, useIoeventfd, ioeventfdWakeups }))];
    return {
      lines: report.lines,
      checks,
      passed: checks.length > 0 && checks.every((c) => c.ok),
      exitCode: loop.exitCode,
      durationMs: Date.now() - started,
      stats: {
        ioExits: loop.ioExits,
        mmioExits: loop.mmioExits,
        notifyMmioExits: loop.notifyMmioExits,
        ioeventfdWakeups,
        interrupts: transport.interruptsRaised,
        ignoredAccesses: transport.ignoredAccesses,
      },
    };
  } finally {
    for (const r of readers) await r.stop();
    if (device !== undefined) await device.reset().catch(() => undefined);
    vm?.close();
    kvm.close();
  }
}
