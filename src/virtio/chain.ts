import type { VirtioError } from '../errors';

/** Split-ring descriptor flags (virtio spec 2.7.5). */
export const VIRTQ_DESC_F = {
  NEXT: 1,
  WRITE: 2,
  INDIRECT: 4,
} as const;

/**
 * One descriptor chain popped from a split virtqueue, already translated into zero-copy views of
 * guest memory and split into its device-readable part (driver → device) and its device-writable
 * part (device → driver). The spec requires every readable descriptor to precede every writable
 * one; a chain breaking that rule comes back with `error` set.
 *
 * Objects are owned by the queue and reused per head index: a consumer must not keep a reference
 * after completing the chain with `SplitQueue.addUsed`.
 */
export class DescriptorChain {
  /** Head descriptor index: the id written to the used ring when the chain completes. */
  head = 0;
  /** Device-readable buffers in chain order (views aliasing guest memory). */
  readonly readable: Buffer[] = [];
  /** Device-writable buffers in chain order (views aliasing guest memory). */
  readonly writable: Buffer[] = [];
  readableLength = 0;
  writableLength = 0;
  /** Number of descriptors walked (direct and indirect). */
  descriptors = 0;
  /**
   * Set when the chain is malformed (loop, bad `next`, bad indirect table, buffer outside guest
   * memory, readable after writable, length over u32). The buffers are then incomplete and must
   * not be used; the chain must still be completed (used length 0) so the driver gets its head back.
   */
  error: VirtioError | undefined = undefined;

  /** @internal Clears the chain for reuse with a new head. */
  reset(head: number): void {
    this.head = head;
    this.readable.length = 0;
    this.writable.length = 0;
    this.readableLength = 0;
    this.writableLength = 0;
    this.descriptors = 0;
    this.error = undefined;
  }
}
