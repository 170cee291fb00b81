/**
 * Typed errors with stable codes. Callers match on `code`, never on the message; messages are
 * written for a person ("Cannot read L2 table: offset 0x50200 is not cluster-aligned").
 *
 * Programmer errors (a wrong argument type, a negative length passed by our own code) use the
 * built-in TypeError / RangeError. The classes here are for conditions a caller is expected to
 * handle: a corrupt image, an unsupported feature, an I/O failure, a misbehaving guest.
 */

/** Every stable error code vblk throws. */
export type VblkErrorCode =
  // disk layer
  | 'E_DISK_RANGE' // request outside the virtual disk
  | 'E_DISK_READONLY' // write to a read-only image
  | 'E_DISK_IO' // a host file operation failed: the OS returned an error (EIO, ENOSPC, ENOENT...; data.errno) or a read came back short
  | 'E_DISK_FULL' // the image cannot grow: a new cluster would lie past the format's largest host offset
  | 'E_DISK_UNSUPPORTED' // this image's ops table does not offer the operation (e.g. discard on a format without it)
  | 'E_DISK_CLOSED' // request after close()
  | 'E_FORMAT_UNKNOWN' // probe could not tell what the file is, or a forced format does not match
  | 'E_QCOW_CORRUPT' // an on-disk structure is inconsistent; the message names the field
  | 'E_QCOW_UNSUPPORTED' // a valid image using a feature vblk does not implement
  | 'E_BACKING' // backing file missing, loop, too deep
  // virtio
  | 'E_VIRTIO_CHAIN' // malformed descriptor chain
  | 'E_VIRTIO_RING' // ring corruption: the device needs a reset
  | 'E_VIRTIO_MEMORY' // guest address outside guest memory
  | 'E_VIRTIO_STATE' // driver did something the spec forbids in this device state
  // transports
  | 'E_VHOST_PROTOCOL'
  | 'E_KVM'
  | 'E_NATIVE'
  // cli
  | 'E_USAGE';

export class VblkError extends Error {
  readonly code: VblkErrorCode;
  readonly data: Readonly<Record<string, unknown>>;

  constructor(code: VblkErrorCode, message: string, data: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.data = data;
    this.name = new.target.name;
  }

  toJSON(): { name: string; code: VblkErrorCode; message: string; data: Readonly<Record<string, unknown>> } {
    return { name: this.name, code: this.code, message: this.message, data: this.data };
  }
}

/** Errors of the disk-image layer (formats, probing, backing chains, host file I/O). */
export class DiskError extends VblkError {}

/** Errors raised while parsing guest-controlled virtio structures. */
export class VirtioError extends VblkError {}

/** Errors of a transport (vhost-user, KVM/virtio-mmio) or of the native bindings. */
export class TransportError extends VblkError {}

/** Formats a number as 0x-prefixed hex, for messages that name offsets. */
export function hex(n: number | bigint): string {
  return '0x' + n.toString(16);
}

/** True when `e` is a VblkError with the given code (works across duplicate module copies). */
export function isVblkError(e: unknown, code?: VblkErrorCode): e is VblkError {
  if (typeof e !== 'object' || e === null) return false;
  const c = (e as { code?: unknown }).code;
  if (typeof c !== 'string' || !c.startsWith('E_')) return false;
  return code === undefined || c === code;
}
