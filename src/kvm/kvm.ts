import * as fs from 'node:fs';
import { TransportError, isVblkError } from '../errors';
import { close, open, O_RDWR } from '../native/libc';
import { kvmIoctl } from './ioctl';
import { KVM_API_VERSION, KVM_CAP, KVM_IOCTL } from './abi';
import { Vm } from './vm';

/** Default KVM device node. */
export const KVM_DEVICE = '/dev/kvm';

/**
 * The system calls `Kvm.open` makes, injectable so tests can play a host without permission or
 * with an old KVM API (bindings-cpp's injectable syscalls, STYLE.md section 2).
 */
export interface KvmOpenSyscalls {
  exists(path: string): boolean;
  /** open(2); throws a VblkError whose data.errnoName is the errno (as src/native/libc.ts). */
  open(path: string, flags: number): number;
  ioctl(fd: number, request: number, value: number, what: string): number;
  close(fd: number): void;
}

/** The real system calls. */
export const NATIVE_KVM_SYSCALLS: KvmOpenSyscalls = {
  exists: (p) => fs.existsSync(p),
  open: (p, flags) => open(p, flags),
  ioctl: (fd, request, value, what) => kvmIoctl(fd, request, value, what),
  close: (fd) => close(fd),
};

/** Throws E_KVM "Cannot use DEV: KVM API version N, vblk needs 12" unless `version` is 12. */
export function checkKvmApiVersion(version: number, device = KVM_DEVICE): void {
  if (version !== KVM_API_VERSION) {
    throw new TransportError('E_KVM', `Cannot use ${device}: KVM API version ${version}, vblk needs ${KVM_API_VERSION}`, { device, reason: 'api', version });
  }
}

/** Why KVM cannot be used here, or null when it can (for tests that skip with a reason). */
export function kvmUnavailableReason(device = KVM_DEVICE): string | null {
  try {
    const kvm = Kvm.open(device);
    kvm.close();
    return null;
  } catch (e) {
    if (isVblkError(e)) return e.message;
    throw e;
  }
}

/**
 * An open /dev/kvm: the system-level KVM handle (API version and capability checks, VM creation).
 *
 * @example
 *   const kvm = Kvm.open();                   // throws E_KVM with one clear line if unusable
 *   kvm.requireExtension(KVM_CAP.IOEVENTFD, 'KVM_CAP_IOEVENTFD');
 *   const vm = kvm.createVm();
 */
export class Kvm {
  readonly fd: number;
  readonly apiVersion: number;
  #closed = false;

  private constructor(fd: number, apiVersion: number) {
    this.fd = fd;
    this.apiVersion = apiVersion;
  }

  /**
   * Opens the KVM device and checks the API version.
   * @throws TransportError E_KVM: missing device, no permission, or an API version other than 12.
   */
  static open(device = KVM_DEVICE, sys: KvmOpenSyscalls = NATIVE_KVM_SYSCALLS): Kvm {
    if (!sys.exists(device)) {
      throw new TransportError('E_KVM', `Cannot open ${device}: it does not exist (KVM is not available on this host)`, { device, reason: 'missing' });
    }
    let fd: number;
    try {
      fd = sys.open(device, O_RDWR);
    } catch (e) {
      const errno = isVblkError(e) ? e.data['errnoName'] : undefined;
      if (errno === 'EACCES' || errno === 'EPERM') {
        throw new TransportError('E_KVM', `Cannot open ${device}: permission denied (run as a user in the group that owns ${device}, usually 'kvm')`, { device, reason: 'permission' }, { cause: e });
      }
      // No errno: the native layer itself failed (ffi-rs missing...); its message says why.
      const why = typeof errno === 'string' ? errno : e instanceof Error ? e.message : String(e);
      throw new TransportError('E_KVM', `Cannot open ${device}: ${why}`, { device, reason: 'open' }, { cause: e });
    }
    let version: number;
    try {
      version = sys.ioctl(fd, KVM_IOCTL.GET_API_VERSION, 0, 'KVM_GET_API_VERSION');
    } catch (e) {
      sys.close(fd);
      const errno = isVblkError(e) ? e.data['errnoName'] : undefined;
      // ENOTTY: the file does not understand KVM ioctls at all (e.g. --kvm /dev/null).
      const why = errno === 'ENOTTY' ? 'it is not a KVM device (KVM_GET_API_VERSION failed with ENOTTY)' : `KVM_GET_API_VERSION failed (${e instanceof Error ? e.message : String(e)})`;
      throw new TransportError('E_KVM', `Cannot use ${device}: ${why}`, { device, reason: 'api' }, { cause: e });
    }
    try {
      checkKvmApiVersion(version, device);
    } catch (e) {
      sys.close(fd);
      throw e;
    }
    return new Kvm(fd, version);
  }

  /** KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value. */
  checkExtension(cap: number): number {
    return kvmIoctl(this.fd, KVM_IOCTL.CHECK_EXTENSION, cap, 'KVM_CHECK_EXTENSION');
  }

  /** Throws E_KVM "Cannot use KVM: the host lacks KVM_CAP_X" when the capability is missing. */
  requireExtension(cap: number, name: string): void {
    if (this.checkExtension(cap) <= 0) {
      throw new TransportError('E_KVM', `Cannot use KVM: the host lacks ${name} (capability ${cap})`, { cap, name });
    }
  }

  /** Checks the capabilities vblk's harness relies on, with one clear error for the first missing. */
  requireHarnessExtensions(): void {
    const needed: [number, string][] = [
      [KVM_CAP.USER_MEMORY, 'KVM_CAP_USER_MEMORY'],
      [KVM_CAP.IRQCHIP, 'KVM_CAP_IRQCHIP'],
      [KVM_CAP.IRQFD, 'KVM_CAP_IRQFD'],
      [KVM_CAP.IOEVENTFD, 'KVM_CAP_IOEVENTFD'],
      [KVM_CAP.SET_TSS_ADDR, 'KVM_CAP_SET_TSS_ADDR'],
      [KVM_CAP.IMMEDIATE_EXIT, 'KVM_CAP_IMMEDIATE_EXIT'],
    ];
    for (const [cap, name] of needed) this.requireExtension(cap, name);
  }

  /** Size of the per-vCPU kvm_run area to mmap. */
  vcpuMmapSize(): number {
    return kvmIoctl(this.fd, KVM_IOCTL.GET_VCPU_MMAP_SIZE, 0, 'KVM_GET_VCPU_MMAP_SIZE');
  }

  /** KVM_CREATE_VM. */
  createVm(): Vm {
    this.#checkOpen();
    const runSize = this.vcpuMmapSize();
    const fd = kvmIoctl(this.fd, KVM_IOCTL.CREATE_VM, 0, 'KVM_CREATE_VM');
    return new Vm(fd, runSize);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    close(this.fd);
  }

  #checkOpen(): void {
    if (this.#closed) throw new TransportError('E_KVM', 'Cannot create a VM: /dev/kvm handle is closed');
  }
}
