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

/** The host offset a qcow2 L1 or (standard, uncompressed) L2 entry holds; 0 = none. */
export function qcow2Offset(hi: number, lo: number): number {
  // `&` yields a signed 32-bit value: `>>> 0` makes the low word unsigned again.
  return (hi & QCOW2_HI_OFFSET) * TWO32 + ((lo & QCOW2_LO_OFFSET) >>> 0);
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

/** Splits a host offset into the (high, low) words a table stores. */
export function offsetWords(offset: number): [hi: number, lo: number] {
  return [Math.floor(offset / TWO32), offset % TWO32];
}
