import { arg, callI64, checkErrno } from '../native/library';

/**
 * ioctl on a KVM fd with an integer argument; failures throw TransportError E_KVM
 * "Cannot <what>: ENAME" (data.errno set).
 */
export function kvmIoctl(fd: number, request: number, value: number | bigint, what: string): number {
  return checkErrno(callI64('vblk', 'vblk_ioctl', [arg.i32(fd), arg.i64(request), arg.i64(value)]), what, 'E_KVM');
}

/** ioctl on a KVM fd whose argument is the struct in `buf` (read and/or written in place). */
export function kvmIoctlBuffer(fd: number, request: number, buf: Uint8Array, what: string): number {
  return checkErrno(callI64('vblk', 'vblk_ioctl_buf', [arg.i32(fd), arg.i64(request), arg.buffer(buf)]), what, 'E_KVM');
}
