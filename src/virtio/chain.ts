import type { VirtioError } from '../errors';

/** Split-ring descriptor flags (virtio spec 2.7.5). */
export const VIRTQ_DESC_F = {
  NEXT: 1,
  WRITE: 2,
  INDIRECT: 4,
} as const;

/**
 * One descriptor chain popped from a split virtqueue, translated into guest memory: buffer `i`
 * is `lens[i]` bytes at offset `offs[i]` of the host Buffer `bufs[i]` (a guest memory region, so
 * no view is created per descriptor on the hot path; `view(i)` makes one when needed).
 * Buffers `0 .. firstWritable-1` are device-readable (driver → device), the rest device-writable;
 * the spec requires every readable descriptor to precede every writable one, and a chain breaking
 * that rule comes back with `error` set. Zero-length descriptors contribute no buffer; a
 * descriptor crossing from one memory region into an adjacent one contributes one per region.
 *
 * Objects are owned by the queue and reused per head index: a consumer must not keep a reference
 * after completing the chain with `SplitQueue.addUsed`.
 */
export class DescriptorChain {
  /** Head descriptor index: the id written to the used ring when the chain completes. */
  head = 0;
  /** Number of buffers. */
  count = 0;
  /** Index of the first device-writable buffer (`count` when there is none). */
  firstWritable = 0;
  readonly bufs: Buffer[] = [];
  readonly offs: number[] = [];
  readonly lens: number[] = [];
  readableLength = 0;
  writableLength = 0;
  /** Number of descriptors walked (direct and indirect, not counting the INDIRECT one itself). */
  descriptors = 0;
  /**
   * Set when the chain is malformed (loop, bad `next`, bad indirect table, buffer outside guest
   * memory, readable after writable, length over u32). The buffers are then cleared and must not
   * be used; the chain must still be completed (used length 0) so the driver gets its head back.
   */
  error: VirtioError | undefined = undefined;

  /** A zero-copy view of buffer `i`. */
  view(i: number): Buffer {
    const off = this.offs[i] as number;
    return (this.bufs[i] as Buffer).subarray(off, off + (this.lens[i] as number));
  }

  /** Views of the device-readable buffers (allocates; for tests and slow paths). */
  get readable(): Buffer[] {
    const out: Buffer[] = [];
    for (let i = 0; i < this.firstWritable; i++) out.push(this.view(i));
    return out;
  }

  /** Views of the device-writable buffers (allocates; for tests and slow paths). */
  get writable(): Buffer[] {
    const out: Buffer[] = [];
    for (let i = this.firstWritable; i < this.count; i++) out.push(this.view(i));
    return out;
  }

  /** @internal Clears the chain for reuse with a new head. */
  reset(head: number): void {
    this.head = head;
    this.count = 0;
    this.firstWritable = 0;
    this.readableLength = 0;
    this.writableLength = 0;
    this.descriptors = 0;
    this.error = undefined;
  }

  /** @internal Appends a buffer. */
  push(buf: Buffer, off: number, len: number, writable: boolean): void {
    const n = this.count;
    this.bufs[n] = buf;
    this.offs[n] = off;
    this.lens[n] = len;
    this.count = n + 1;
    if (writable) this.writableLength += len;
    else {
      this.readableLength += len;
      this.firstWritable = n + 1;
    }
  }

  /** @internal Drops every buffer (malformed chain). */
  clear(): void {
    this.count = 0;
    this.firstWritable = 0;
    this.readableLength = 0;
    this.writableLength = 0;
  }
}
