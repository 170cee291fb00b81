/**
 * virtio-blk constants and the device configuration space layout (virtio spec 5.2).
 * All multi-byte config fields are little-endian.
 */

/** virtio-blk feature bits (spec 5.2.3), as bigint bit numbers. */
export const VIRTIO_BLK_F = {
  SIZE_MAX: 1n,
  SEG_MAX: 2n,
  GEOMETRY: 4n,
  RO: 5n,
  BLK_SIZE: 6n,
  FLUSH: 9n,
  TOPOLOGY: 10n,
  CONFIG_WCE: 11n,
  MQ: 12n,
  DISCARD: 13n,
  WRITE_ZEROES: 14n,
} as const;

/** Request types (spec 5.2.6). */
export const VIRTIO_BLK_T = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

/** Request status byte values. */
export const VIRTIO_BLK_S = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;

/** Size of the request header `{ le32 type; le32 reserved; le64 sector }`. */
export const BLK_HEADER_SIZE = 16;
/** Size of one discard / write-zeroes segment `{ le64 sector; le32 num_sectors; le32 flags }`. */
export const BLK_DWZ_SEGMENT_SIZE = 16;
/** Discard / write-zeroes segment flag: the device may deallocate (unmap). */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
/** GET_ID answer length. */
export const VIRTIO_BLK_ID_BYTES = 20;

/** Byte offsets of the config space fields (checked against virtio-bindings' offset asserts). */
export const BLK_CONFIG = {
  capacity: 0x00,
  sizeMax: 0x08,
  segMax: 0x0c,
  cylinders: 0x10,
  heads: 0x12,
  sectors: 0x13,
  blkSize: 0x14,
  physicalBlockExp: 0x18,
  alignmentOffset: 0x19,
  minIoSize: 0x1a,
  optIoSize: 0x1c,
  writeback: 0x20,
  numQueues: 0x22,
  maxDiscardSectors: 0x24,
  maxDiscardSeg: 0x28,
  discardSectorAlignment: 0x2c,
  maxWriteZeroesSectors: 0x30,
  maxWriteZeroesSeg: 0x34,
  writeZeroesMayUnmap: 0x38,
  maxSecureEraseSectors: 0x3c,
  maxSecureEraseSeg: 0x40,
  secureEraseSectorAlignment: 0x44,
  zoneSectors: 0x48,
  maxOpenZones: 0x4c,
  maxActiveZones: 0x50,
  maxAppendSectors: 0x54,
  writeGranularity: 0x58,
  model: 0x5c,
  /** Total size of the config space. */
  size: 0x60,
} as const;

/** The values a virtio-blk device exposes in its config space. */
export interface BlkConfigValues {
  capacity: number;
  sizeMax: number;
  segMax: number;
  blkSize: number;
  physicalBlockExp: number;
  alignmentOffset: number;
  minIoSize: number;
  optIoSize: number;
  writeback: number;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: number;
}

/**
 * Serialises the config space. Geometry, secure-erase and zoned fields stay 0 (those features are
 * not offered) and every padding byte is zero, as the spec requires.
 */
export function encodeBlkConfig(v: BlkConfigValues): Buffer {
  const b = Buffer.alloc(BLK_CONFIG.size);
  b.writeBigUInt64LE(BigInt(v.capacity), BLK_CONFIG.capacity);
  b.writeUInt32LE(v.sizeMax, BLK_CONFIG.sizeMax);
  b.writeUInt32LE(v.segMax, BLK_CONFIG.segMax);
  b.writeUInt32LE(v.blkSize, BLK_CONFIG.blkSize);
  b.writeUInt8(v.physicalBlockExp, BLK_CONFIG.physicalBlockExp);
  b.writeUInt8(v.alignmentOffset, BLK_CONFIG.alignmentOffset);
  b.writeUInt16LE(v.minIoSize, BLK_CONFIG.minIoSize);
  b.writeUInt32LE(v.optIoSize, BLK_CONFIG.optIoSize);
  b.writeUInt8(v.writeback, BLK_CONFIG.writeback);
  b.writeUInt16LE(v.numQueues, BLK_CONFIG.numQueues);
  b.writeUInt32LE(v.maxDiscardSectors, BLK_CONFIG.maxDiscardSectors);
  b.writeUInt32LE(v.maxDiscardSeg, BLK_CONFIG.maxDiscardSeg);
  b.writeUInt32LE(v.discardSectorAlignment, BLK_CONFIG.discardSectorAlignment);
  b.writeUInt32LE(v.maxWriteZeroesSectors, BLK_CONFIG.maxWriteZeroesSectors);
  b.writeUInt32LE(v.maxWriteZeroesSeg, BLK_CONFIG.maxWriteZeroesSeg);
  b.writeUInt8(v.writeZeroesMayUnmap, BLK_CONFIG.writeZeroesMayUnmap);
  return b;
}

/** Decodes a config space buffer (for drivers, tests and diagnostics). */
export function decodeBlkConfig(b: Uint8Array): BlkConfigValues {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  return {
    capacity: Number(buf.readBigUInt64LE(BLK_CONFIG.capacity)),
    sizeMax: buf.readUInt32LE(BLK_CONFIG.sizeMax),
    segMax: buf.readUInt32LE(BLK_CONFIG.segMax),
    blkSize: buf.readUInt32LE(BLK_CONFIG.blkSize),
    physicalBlockExp: buf.readUInt8(BLK_CONFIG.physicalBlockExp),
    alignmentOffset: buf.readUInt8(BLK_CONFIG.alignmentOffset),
    minIoSize: buf.readUInt16LE(BLK_CONFIG.minIoSize),
    optIoSize: buf.readUInt32LE(BLK_CONFIG.optIoSize),
    writeback: buf.readUInt8(BLK_CONFIG.writeback),
    numQueues: buf.readUInt16LE(BLK_CONFIG.numQueues),
    maxDiscardSectors: buf.readUInt32LE(BLK_CONFIG.maxDiscardSectors),
    maxDiscardSeg: buf.readUInt32LE(BLK_CONFIG.maxDiscardSeg),
    discardSectorAlignment: buf.readUInt32LE(BLK_CONFIG.discardSectorAlignment),
    maxWriteZeroesSectors: buf.readUInt32LE(BLK_CONFIG.maxWriteZeroesSectors),
    maxWriteZeroesSeg: buf.readUInt32LE(BLK_CONFIG.maxWriteZeroesSeg),
    writeZeroesMayUnmap: buf.readUInt8(BLK_CONFIG.writeZeroesMayUnmap),
  };
}
