import * as fs from 'node:fs';
import { TransportError, hex } from '../errors';
import { close, eventfd, mmap, munmap, type Mapping } from '../native/libc';
import {
  IOEVENTFD,
  IRQFD,
  IRQ_LEVEL,
  KVM_IOCTL,
  KVM_IOEVENTFD_FLAG_DATAMATCH,
  KVM_IOEVENTFD_FLAG_DEASSIGN,
  KVM_IOEVENTFD_FLAG_PIO,
  KVM_PIT_SPEAKER_DUMMY,
  MEMORY_REGION,
  PIT_CONFIG,
} from './abi';
import { kvmIoctl, kvmIoctlBuffer } from './ioctl';
import { Vcpu } from './vcpu';

/** One KVM memory slot backed by anonymous mmap'd memory, exposed as a zero-copy Buffer. */
export interface RamRegion {
  readonly slot: number;
  readonly guestAddr: number;
  /** The guest's bytes: writes are visible to the guest at once and vice versa. */
  readonly buffer: Buffer;
  readonly mapping: Mapping;
}

/** Where and how an ioeventfd fires. */
export interface IoEventFdOptions {
  /** Guest physical (MMIO) address or I/O port. */
  readonly addr: number;
  /** Access width in bytes: 1, 2, 4 or 8 (0 = any width, no datamatch). */
  readonly len: 0 | 1 | 2 | 4 | 8;
  /** Only writes of this value fire (e.g. the queue index written to QueueNotify). */
  readonly datamatch?: bigint | number;
  /** An I/O port rather than MMIO. */
  readonly pio?: boolean;
}

/** A registered ioeventfd: the eventfd counts guest writes without any exit to user space. */
export interface IoEventFd {
  readonly fd: number;
  readonly options: IoEventFdOptions;
}

/**
 * A KVM virtual machine: memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPIC), PIT,
 * ioeventfds (guest writes to a doorbell signal an eventfd inside the kernel) and irqfds (writing
 * an eventfd raises a guest interrupt line).
 */
export class Vm {
  readonly fd: number;
  /** Size of each vCPU's kvm_run area (KVM_GET_VCPU_MMAP_SIZE, asked once by the Kvm). */
  readonly #vcpuRunSize: number;
  readonly #regions: RamRegion[] = [];
  readonly #ioeventfds: IoEventFd[] = [];
  readonly #irqfds = new Map<number, number>();
  readonly #vcpus: Vcpu[] = [];
  #closed = false;

  /** @internal use Kvm.createVm(). */
  constructor(fd: number, vcpuRunSize: number) {
    this.fd = fd;
    this.#vcpuRunSize = vcpuRunSize;
  }

  get regions(): readonly RamRegion[] {
    return this.#regions;
  }

  /**
   * Maps `size` bytes of zeroed anonymous memory and registers it as guest RAM at `guestAddr`
   * (KVM_SET_USER_MEMORY_REGION). Both must be page-aligned.
   */
  addRam(guestAddr: number, size: number): RamRegion {
    if (!Number.isSafeInteger(guestAddr) || guestAddr % 4096 !== 0 || !Number.isSafeInteger(size) || size <= 0 || size % 4096 !== 0) {
      throw new RangeError(`RAM region ${hex(guestAddr)}+${hex(size)} must be page-aligned`);
    }
    const mapping = mmap({ length: size });
    const slot = this.#regions.length;
    const region = Buffer.alloc(MEMORY_REGION.SIZE);
    region.writeUInt32LE(slot, MEMORY_REGION.SLOT);
    region.writeUInt32LE(0, MEMORY_REGION.FLAGS);
    region.writeBigUInt64LE(BigInt(guestAddr), MEMORY_REGION.GUEST_PHYS_ADDR);
    region.writeBigUInt64LE(BigInt(size), MEMORY_REGION.MEMORY_SIZE);
    region.writeBigUInt64LE(mapping.address, MEMORY_REGION.USERSPACE_ADDR);
    try {
      kvmIoctlBuffer(this.fd, KVM_IOCTL.SET_USER_MEMORY_REGION, region, `KVM_SET_USER_MEMORY_REGION slot ${slot} at ${hex(guestAddr)}`);
    } catch (e) {
      munmap(mapping);
      throw e;
    }
    const r: RamRegion = { slot, guestAddr, buffer: mapping.buffer, mapping };
    this.#regions.push(r);
    return r;
  }

  /** KVM_SET_TSS_ADDR (Intel needs three pages for real-mode emulation; harmless elsewhere). */
  setTssAddr(addr: number): void {
    kvmIoctl(this.fd, KVM_IOCTL.SET_TSS_ADDR, addr, 'KVM_SET_TSS_ADDR');
  }

  /** KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and LAPICs (GSIs 0–15 reach the PIC and IOAPIC). */
  createIrqchip(): void {
    kvmIoctl(this.fd, KVM_IOCTL.CREATE_IRQCHIP, 0, 'KVM_CREATE_IRQCHIP');
  }

  /** KVM_CREATE_PIT2 with a dummy speaker port (only for guests that program the PIT). */
  createPit2(): void {
    const cfg = Buffer.alloc(PIT_CONFIG.SIZE);
    cfg.writeUInt32LE(KVM_PIT_SPEAKER_DUMMY, PIT_CONFIG.FLAGS);
    kvmIoctlBuffer(this.fd, KVM_IOCTL.CREATE_PIT2, cfg, 'KVM_CREATE_PIT2');
  }

  /** KVM_IRQ_LINE: sets interrupt line `irq` to `level` (needs the in-kernel irqchip). */
  irqLine(irq: number, level: 0 | 1): void {
    const b = Buffer.alloc(IRQ_LEVEL.SIZE);
    b.writeUInt32LE(irq, IRQ_LEVEL.IRQ);
    b.writeUInt32LE(level, IRQ_LEVEL.LEVEL);
    kvmIoctlBuffer(this.fd, KVM_IOCTL.IRQ_LINE, b, `KVM_IRQ_LINE ${irq}`);
  }

  #ioeventfdStruct(o: IoEventFdOptions, fd: number, deassign: boolean): Buffer {
    const b = Buffer.alloc(IOEVENTFD.SIZE);
    let flags = 0;
    if (o.datamatch !== undefined) {
      flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
      b.writeBigUInt64LE(BigInt(o.datamatch), IOEVENTFD.DATAMATCH);
    }
    if (o.pio === true) flags |= KVM_IOEVENTFD_FLAG_PIO;
    if (deassign) flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
    b.writeBigUInt64LE(BigInt(o.addr), IOEVENTFD.ADDR);
    b.writeUInt32LE(o.len, IOEVENTFD.LEN);
    b.writeInt32LE(fd, IOEVENTFD.FD);
    b.writeUInt32LE(flags, IOEVENTFD.FLAGS);
    return b;
  }

  /**
   * KVM_IOEVENTFD: a guest write matching `options` increments a new eventfd inside the kernel
   * (the vCPU does not exit). Read the fd with `EventFdReader`.
   */
  addIoEventFd(options: IoEventFdOptions): IoEventFd {
    const fd = eventfd(0);
    try {
      kvmIoctlBuffer(this.fd, KVM_IOCTL.IOEVENTFD, this.#ioeventfdStruct(options, fd, false), `KVM_IOEVENTFD at ${hex(options.addr)}`);
    } catch (e) {
      close(fd);
      throw e;
    }
    const ev = { fd, options };
    this.#ioeventfds.push(ev);
    return ev;
  }

  /** Unregisters and closes an ioeventfd. */
  removeIoEventFd(ev: IoEventFd): void {
    const i = this.#ioeventfds.indexOf(ev);
    if (i < 0) return;
    this.#ioeventfds.splice(i, 1);
    try {
      kvmIoctlBuffer(this.fd, KVM_IOCTL.IOEVENTFD, this.#ioeventfdStruct(ev.options, ev.fd, true), 'KVM_IOEVENTFD deassign');
    } finally {
      close(ev.fd);
    }
  }

  /**
   * KVM_IRQFD: returns an eventfd; writing 1 to it (8 bytes LE) pulses interrupt line `gsi`
   * (an edge) without any ioctl. One per GSI.
   */
  irqfd(gsi: number): number {
    const existing = this.#irqfds.get(gsi);
    if (existing !== undefined) return existing;
    const fd = eventfd(0);
    const b = Buffer.alloc(IRQFD.SIZE);
    b.writeUInt32LE(fd, IRQFD.FD);
    b.writeUInt32LE(gsi, IRQFD.GSI);
    try {
      kvmIoctlBuffer(this.fd, KVM_IOCTL.IRQFD, b, `KVM_IRQFD gsi ${gsi}`);
    } catch (e) {
      close(fd);
      throw e;
    }
    this.#irqfds.set(gsi, fd);
    return fd;
  }

  /** KVM_CREATE_VCPU with its kvm_run area mapped. */
  createVcpu(id: number): Vcpu {
    if (this.#closed) throw new TransportError('E_KVM', 'Cannot create a vCPU: the VM is closed');
    const fd = kvmIoctl(this.fd, KVM_IOCTL.CREATE_VCPU, id, `KVM_CREATE_VCPU ${id}`);
    const vcpu = new Vcpu(id, fd, this.#vcpuRunSize);
    this.#vcpus.push(vcpu);
    return vcpu;
  }

  /** Closes vCPUs, eventfds and the VM fd, then unmaps RAM (the RAM Buffers become invalid). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const v of this.#vcpus) v.close();
    for (const ev of [...this.#ioeventfds]) {
      try {
        this.removeIoEventFd(ev);
      } catch {
        // the VM is going away; the fd was closed by removeIoEventFd's finally
      }
    }
    for (const fd of this.#irqfds.values()) close(fd);
    this.#irqfds.clear();
    close(this.fd);
    // Unmap only after the VM fd is closed: KVM holds no reference to the pages after that.
    for (const r of this.#regions) munmap(r.mapping);
    this.#regions.length = 0;
  }
}

/** Writes 1 to an eventfd (irqfd: raise the interrupt; ioeventfd: wake a reader). */
export function signalEventFd(fd: number): void {
  fs.writeSync(fd, ONE);
}
const ONE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);
