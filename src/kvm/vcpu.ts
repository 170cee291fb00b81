import { TransportError, hex } from '../errors';
import { close, mmap, munmap, MAP_SHARED, PROT_READ, PROT_WRITE, type Mapping } from '../native/libc';
import { arg, callI64, callI64Blocking, errnoName } from '../native/library';
import {
  KVM_EXIT,
  KVM_EXIT_IO_OUT,
  KVM_IOCTL,
  REGS_SIZE,
  RUN,
  SREGS,
  decodeRegs,
  decodeSregs,
  encodeRegs,
  encodeSregs,
  exitReasonName,
  type Regs,
  type Sregs,
} from './abi';
import { kvmIoctlBuffer } from './ioctl';

/** A decoded vCPU exit that the VMM is expected to handle. */
export type VcpuExit =
  | {
      readonly kind: 'io';
      readonly direction: 'in' | 'out';
      readonly port: number;
      /** Bytes per access (1, 2, 4). */
      readonly size: number;
      /** Number of accesses (> 1 for `rep outs`/`rep ins`). */
      readonly count: number;
      /** size × count bytes inside the kvm_run area: read them (out) or fill them (in). */
      readonly data: Buffer;
    }
  | {
      readonly kind: 'mmio';
      readonly address: number;
      readonly isWrite: boolean;
      /** Access width in bytes (1, 2, 4, 8). */
      readonly len: number;
      /** The `len` data bytes inside kvm_run: the value written, or where to put the value read. */
      readonly data: Buffer;
    }
  /** HLT with no in-kernel irqchip (with it, HLT waits in the kernel). */
  | { readonly kind: 'hlt' }
  /** KVM_RUN returned EINTR: `kick()` was called (or another signal arrived). */
  | { readonly kind: 'interrupted' };

let nextKickSlot = 0;
let kickInitialised = false;

/**
 * One virtual CPU: registers, the mmap'd kvm_run area, and a run loop step that executes KVM_RUN
 * on a worker thread (ffi-rs runInNewThread) so the event loop keeps serving the device while the
 * guest runs.
 */
export class Vcpu {
  readonly id: number;
  readonly fd: number;
  readonly #run: Mapping;
  readonly #kickSlot: number;
  #running = false;
  #closed = false;

  /** @internal use Vm.createVcpu(). */
  constructor(id: number, fd: number, runSize: number) {
    this.id = id;
    this.fd = fd;
    try {
      this.#run = mmap({ length: runSize, fd, prot: PROT_READ | PROT_WRITE, flags: MAP_SHARED });
    } catch (e) {
      close(fd);
      throw e;
    }
    if (!kickInitialised) {
      const r = callI64('vblk', 'vblk_kick_init', []);
      if (r < 0n) throw new TransportError('E_NATIVE', `Cannot install the vCPU kick signal: ${errnoName(Number(-r))}`);
      kickInitialised = true;
    }
    this.#kickSlot = nextKickSlot++ % 64;
  }

  /** The raw kvm_run area (shared with the kernel). */
  get runArea(): Buffer {
    return this.#run.buffer;
  }

  getRegs(): Regs {
    const b = Buffer.alloc(REGS_SIZE);
    kvmIoctlBuffer(this.fd, KVM_IOCTL.GET_REGS, b, 'KVM_GET_REGS');
    return decodeRegs(b);
  }

  setRegs(regs: Regs): void {
    kvmIoctlBuffer(this.fd, KVM_IOCTL.SET_REGS, encodeRegs(regs), 'KVM_SET_REGS');
  }

  getSregs(): Sregs {
    const b = Buffer.alloc(SREGS.SIZE);
    kvmIoctlBuffer(this.fd, KVM_IOCTL.GET_SREGS, b, 'KVM_GET_SREGS');
    return decodeSregs(b);
  }

  setSregs(sregs: Sregs): void {
    kvmIoctlBuffer(this.fd, KVM_IOCTL.SET_SREGS, encodeSregs(sregs), 'KVM_SET_SREGS');
  }

  /**
   * Runs the guest until the next exit that needs user space, and decodes it. An MMIO read or
   * an I/O `in` must be answered by filling `exit.data` before the next `run()`.
   *
   * @throws TransportError E_KVM on exits that mean the guest or KVM failed: SHUTDOWN (triple
   *   fault), FAIL_ENTRY, INTERNAL_ERROR, and any exit reason vblk does not handle; the message
   *   names the exit and the guest rip.
   */
  async run(): Promise<VcpuExit> {
    if (this.#closed) throw new TransportError('E_KVM', `Cannot run vCPU ${this.id}: it is closed`);
    if (this.#running) throw new TransportError('E_KVM', `Cannot run vCPU ${this.id}: it is already running`);
    this.#running = true;
    let r: bigint;
    try {
      r = await callI64Blocking('vblk', 'vblk_kvm_run', [arg.i32(this.fd), arg.i32(this.#kickSlot)]);
    } finally {
      this.#running = false;
    }
    const run = this.#run.buffer;
    if (r < 0n) {
      const name = errnoName(Number(-r));
      if (name === 'EINTR' || name === 'EAGAIN') {
        run.writeUInt8(0, RUN.IMMEDIATE_EXIT);
        return { kind: 'interrupted' };
      }
      throw new TransportError('E_KVM', `Cannot run vCPU ${this.id}: KVM_RUN failed with ${name}`, { errno: Number(-r) });
    }
    return this.#decodeExit(run);
  }

  #decodeExit(run: Buffer): VcpuExit {
    const reason = run.readUInt32LE(RUN.EXIT_REASON);
    switch (reason) {
      case KVM_EXIT.IO: {
        const size = run.readUInt8(RUN.IO_SIZE);
        const count = run.readUInt32LE(RUN.IO_COUNT);
        const off = Number(run.readBigUInt64LE(RUN.IO_DATA_OFFSET));
        const len = size * count;
        if (off + len > run.length || len === 0) throw this.#fail(reason, `I/O data at ${hex(off)}+${len} is outside kvm_run`);
        return {
          kind: 'io',
          direction: run.readUInt8(RUN.IO_DIRECTION) === KVM_EXIT_IO_OUT ? 'out' : 'in',
          port: run.readUInt16LE(RUN.IO_PORT),
          size,
          count,
          data: run.subarray(off, off + len),
        };
      }
      case KVM_EXIT.MMIO: {
        const len = Math.min(run.readUInt32LE(RUN.MMIO_LEN), 8);
        const addr = run.readBigUInt64LE(RUN.MMIO_PHYS_ADDR);
        return {
          kind: 'mmio',
          address: Number(addr), // guest physical addresses are < 2^52
          isWrite: run.readUInt8(RUN.MMIO_IS_WRITE) !== 0,
          len,
          data: run.subarray(RUN.MMIO_DATA, RUN.MMIO_DATA + len),
        };
      }
      case KVM_EXIT.HLT:
        return { kind: 'hlt' };
      case KVM_EXIT.INTR:
        return { kind: 'interrupted' };
      case KVM_EXIT.SHUTDOWN:
        throw this.#fail(reason, 'the guest triple-faulted or requested shutdown');
      case KVM_EXIT.FAIL_ENTRY:
        throw this.#fail(
          reason,
          `VM entry failed (hardware_entry_failure_reason ${hex(run.readBigUInt64LE(RUN.FAIL_ENTRY_REASON))}); the initial register state is invalid`,
        );
      case KVM_EXIT.INTERNAL_ERROR: {
        const sub = run.readUInt32LE(RUN.INTERNAL_SUBERROR);
        const n = Math.min(run.readUInt32LE(RUN.INTERNAL_NDATA), 16);
        const data: string[] = [];
        for (let i = 0; i < n; i++) data.push(hex(run.readBigUInt64LE(RUN.INTERNAL_DATA + i * 8)));
        const what = sub === 1 ? 'emulation failure' : sub === 2 ? 'simultaneous exceptions' : sub === 3 ? 'delivery event' : `suberror ${sub}`;
        throw this.#fail(reason, `KVM internal error: ${what} [${data.join(' ')}]`);
      }
      case KVM_EXIT.EXCEPTION:
        throw this.#fail(reason, 'unhandled guest exception');
      case KVM_EXIT.SYSTEM_EVENT:
        throw this.#fail(reason, `system event type ${run.readUInt32LE(RUN.SYSTEM_EVENT_TYPE)}`);
      default:
        throw this.#fail(reason, 'vblk does not handle this exit');
    }
  }

  #fail(reason: number, why: string): TransportError {
    let rip = 'unknown';
    try {
      rip = hex(this.getRegs().rip);
    } catch {
      // keep "unknown": the registers are not readable in this state
    }
    return new TransportError('E_KVM', `Cannot run vCPU ${this.id}: ${exitReasonName(reason)} at rip ${rip}: ${why}`, {
      exitReason: reason,
      rip,
    });
  }

  /**
   * Makes a `run()` in progress (or the next one) return `{ kind: 'interrupted' }` soon: sets
   * kvm_run.immediate_exit and signals the worker thread running KVM_RUN.
   */
  kick(): void {
    if (this.#closed) return;
    this.#run.buffer.writeUInt8(1, RUN.IMMEDIATE_EXIT);
    callI64('vblk', 'vblk_kvm_kick', [arg.i32(this.#kickSlot)]);
  }

  /** True while a `run()` is in progress. */
  get running(): boolean {
    return this.#running;
  }

  /** @internal called by Vm.close(). The vCPU must not be running. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    munmap(this.#run);
    close(this.fd);
  }
}
