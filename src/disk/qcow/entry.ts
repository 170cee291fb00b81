/**
 * Decoding of qcow and qcow2 table entries (qcow2.md, "L1 and L2 entries"). Tables are kept as
 * pairs of 32-bit words (high, low) so that the hot read path never allocates a BigInt; these
 * helpers are the one place that turns a pair, or a whole 64-bit entry, into a host offset.
 */

/** 2^32: the weight of an entry's high word. */
export const TWO32 = 0x100000000;

/** qcow2 L1/L2 entries: host offset bits 9..55, split over the high and the low word. */
export const QCOW2_HI_OFFSET = 0x00ffffff;
export const QCOW2_LO_OFFSET = 0xfffffe00;
/** The same offset bits of a whole 64-bit qcow2 entry. */
export const QCOW2_OFFSET_MASK = 0x00fffffffffffe00n;

/** qcow2 entry flags, in the high word (`HI`), the low word (`LO`) and the whole 64-bit entry. */
export const QCOW2_HI_COPIED = 0x80000000;
export const QCOW2_HI_COMPRESSED = 0x40000000;
export const QCOW2_LO_ZERO = 1;
export const QCOW2_COPIED = 1n << 63n;
export const QCOW2_COMPRESSED = 1n << 62n;
export const QCOW2_ZERO = 1n;

/** qcow (version 1) L2 entries: bit 63 marks a compressed cluster. */
export const QCOW_HI_COMPRESSED = 0x80000000;

/** The host offset a qcow2 L1 or (standard, uncompressed) L2 entry holds; 0 = none. */
export function qcow2Offset(hi: number, lo: number): number {
  // `&` yields a signed 32-bit value: `>>> 0` makes the low word unsigned again.
  return (hi & QCOW2_HI_OFFSET) * TWO32 + ((lo & QCOW2_LO_OFFSET) >>> 0);
}

/**
 * Where the stream of a qcow2 compressed L2 entry starts (any byte offset) and how many 512-byte
 * sectors, counted from the sector it starts in, it may span (qcow2.md, "Compressed clusters").
 */
export function qcow2Compressed(entry: bigint, clusterBits: number): { host: number; sectors: number } {
  const shift = BigInt(62 - (clusterBits - 8));
  const host = Number(entry & ((1n << shift) - 1n));
  const sectors = Number((entry >> shift) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
  return { host, sectors };
}

/** `qcow2Offset` of a whole 64-bit entry. */
export function qcow2EntryOffset(entry: bigint): number {
  return Number(entry & QCOW2_OFFSET_MASK);
}

/**
 * The host offset a qcow (version 1) L1 or uncompressed L2 entry holds: the whole 64 bits. Past
 * 2^53 the result is not a safe integer; callers check it against the file size.
 */
export function qcowOffset(hi: number, lo: number): number {
  return hi * TWO32 + lo;
}

/**
 * Where the stream of a qcow (version 1) compressed L2 entry starts and its length in bytes:
 * `csize = (e >> (63 - cluster_bits)) & (cluster_size - 1)`, the offset in the bits below.
 */
export function qcowCompressed(hi: number, lo: number, clusterBits: number): { host: number; csize: number } {
  const e = wordsEntry(hi, lo);
  const shift = BigInt(63 - clusterBits);
  return { host: Number(e & ((1n << shift) - 1n)), csize: Number((e >> shift) & ((1n << BigInt(clusterBits)) - 1n)) };
}

/** The whole 64-bit entry of a (high, low) pair of words. */
export function wordsEntry(hi: number, lo: number): bigint {
  return (BigInt(hi) << 32n) | BigInt(lo);
}

/** The (high, low) words of a whole 64-bit entry. */
export function entryWords(entry: bigint): [hi: number, lo: number] {
  return [Number((entry >> 32n) & 0xffffffffn), Number(entry & 0xffffffffn)];
}

/** Splits a host offset into the (high, low) words a table stores. */
export function offsetWords(offset: number): [hi: number, lo: number] {
  return [Math.floor(offset / TWO32), offset % TWO32];
}
