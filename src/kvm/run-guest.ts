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

/** The NUL-terminated string at guest address `addr` (at most 256 bytes, clipped to RAM). */
function guestString(ram: Buffer, addr: number): string {
  if (addr >= ram.length) return '';
  const window = ram.subarray(addr, Math.min(ram.length, addr + MAX_GUEST_STRING));
  const nul = window.indexOf(0);
  return window.subarray(0, nul < 0 ? window.length : nul).toString('latin1');
}

function parseLine(line: string): GuestCheck | undefined {
  const m = /^(PASS|FAIL) (\S+) ?(.*)$/.exec(line);
  if (!m) return undefined;
  return { source: 'guest', ok: m[1] === 'PASS', name: m[2] ?? '', detail: m[3] ?? '' };
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

    const lines: string[] = [];
    let partial = '';
    let exitCode: number | null = null;
    let timedOut = false;
    let ioExits = 0;
    let mmioExits = 0;
    let notifyMmioExits = 0;
    const timer = setTimeout(() => {
      timedOut = true;
      vcpu.kick();
    }, opts.timeoutMs ?? 120_000);
    try {
      while (exitCode === null && !timedOut) {
        const exit = await vcpu.run();
        if (exit.kind === 'io') {
          ioExits++;
          if (exit.direction === 'out' && (exit.port === L.PORT_REPORT || (exit.port === L.PORT_STRING && exit.size === 4))) {
            partial += exit.port === L.PORT_REPORT ? exit.data.toString('latin1') : guestString(ram.buffer, exit.data.readUInt32LE(0));
            let nl: number;
            while ((nl = partial.indexOf('\n')) >= 0) {
              const line = partial.slice(0, nl);
              partial = partial.slice(nl + 1);
              lines.push(line);
              opts.onLine?.(line);
            }
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
    if (partial.length > 0) lines.push(partial);

    for (const r of readers) await r.stop();
    // Complete every in-flight request before RAM is unmapped.
    await device.reset();
    const checks = lines.map(parseLine).filter((c): c is GuestCheck => c !== undefined);
    const vmm = (name: string, ok: boolean, detail: string): void => {
      checks.push({ source: 'vmm', name, ok, detail });
    };

    const done = lines.find((l) => l.startsWith('DONE '));
    vmm('guest-finished', !timedOut && exitCode === 0 && done !== undefined, timedOut ? `timed out after ${opts.timeoutMs ?? 120_000} ms` : `exit code ${String(exitCode)}, ${done ?? 'no DONE line'}`);
    const feat = checks.find((c) => c.source === 'guest' && c.name === 'features');
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
      const after = Buffer.alloc(before.length);
      if (after.length > 0) await opts.disk.readSector(0, after);
      vmm('readonly-disk-unchanged', after.equals(before), after.equals(before) ? 'sectors 0-2 unchanged' : 'sectors 0-2 changed on a read-only disk');
    } else if (opts.disk.sectors >= 8) {
      const s12 = Buffer.alloc(1024);
      const last = Buffer.alloc(512);
      await opts.disk.readSector(1, s12);
      await opts.disk.readSector(opts.disk.sectors - 1, last);
      const ok = s12.subarray(0, 512).every((b) => b === 0xa1) && s12.subarray(512).every((b) => b === 0xa2) && last.every((b) => b === 0x5a);
      vmm('written-data-on-disk', ok, ok ? 'sectors 1, 2 and the last sector hold 0xa1, 0xa2, 0x5a' : 'the disk does not hold the patterns the guest wrote');
    }
    const idCheck = checks.find((c) => c.source === 'guest' && c.name === 'get-id');
    const wantId = device.serial.toString('latin1').replace(/\0.*$/s, '').replace(/[^\x21-\x7e]/g, '?');
    const gotId = idCheck === undefined ? undefined : /^id=(\S*)/.exec(idCheck.detail)?.[1];
    vmm('get-id-serial', gotId === wantId, `guest read "${gotId ?? ''}", device serial "${wantId}"`);
    const wakeups = readers.reduce((n, r) => n + r.wakeups, 0);
    if (useIoeventfd) {
      vmm('kicks-via-ioeventfd', notifyMmioExits === 0, `${notifyMmioExits} QueueNotify MMIO exits`);
    }
    vmm('interrupts-via-irqfd', transport.interruptsRaised > 0, `${transport.interruptsRaised} interrupts raised`);

    return {
      lines,
      checks,
      passed: checks.length > 0 && checks.every((c) => c.ok),
      exitCode,
      durationMs: Date.now() - started,
      stats: {
        ioExits,
        mmioExits,
        notifyMmioExits,
        ioeventfdWakeups: wakeups,
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
