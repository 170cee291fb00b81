import type { GuestMemory } from '../memory/guest-memory';

/**
 * The contract between a virtio transport (virtio-mmio in `src/transport/mmio.ts`, vhost-user in
 * `src/transport/vhost-user/`) and a virtio device (virtio-blk in `src/virtio/blk.ts`).
 *
 * A transport owns the register model / protocol and the notification mechanism (ioeventfd,
 * irqfd, vhost-user kick and call fds); the device owns features, config space and request
 * processing. Neither knows how the other is implemented, and the device never learns how guest
 * memory was mapped.
 *
 * Obligations on the device:
 * - `setDriverFeatures` refuses (returns false) any bit it did not offer; the transport then
 *   refuses FEATURES_OK.
 * - `startQueue` validates the ring geometry (size a power of two <= maxQueueSize, alignment,
 *   rings inside guest memory) and throws `VirtioError` (code E_VIRTIO_RING) if it is wrong.
 * - `stopQueue` stops popping new chains, waits for every popped request to complete (each
 *   completed exactly once, its used entry written), leaves the ring asking the driver for kicks
 *   again (NO_NOTIFY clear, avail_event current), and resolves to the next avail index the
 *   device would have read (vhost-user GET_VRING_BASE). A transport must not start the same
 *   queue again before the returned promise settles.
 * - `reset` stops every queue the same way and returns the device to its initial state.
 * - On ring corruption the device stops the queue, sets `needsReset` and calls
 *   the callback registered with `onConfigChange`, so the transport can raise a config interrupt
 *   with DEVICE_NEEDS_RESET; it never throws out of `queueNotify`.
 */
export interface VirtioDevice {
  /** Virtio device id (2 = block). */
  readonly deviceType: number;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  /** Feature bits offered (including transport-generic bits such as VERSION_1, EVENT_IDX). */
  readonly deviceFeatures: bigint;
  /** Features accepted by the last successful setDriverFeatures. */
  readonly driverFeatures: bigint;
  /** Incremented whenever the config space changes (virtio-mmio ConfigGeneration). */
  readonly configGeneration: number;
  /** True after the device detected an unrecoverable driver error (DEVICE_NEEDS_RESET). */
  readonly needsReset: boolean;

  setDriverFeatures(features: bigint): boolean;
  /** Copies `out.length` bytes of config space starting at `offset` (bytes past the end read 0). */
  readConfig(offset: number, out: Uint8Array): void;
  /** Writes to config space; read-only fields ignore writes (virtio-blk: only `writeback`). */
  writeConfig(offset: number, data: Uint8Array): void;

  startQueue(index: number, q: QueueStart): void;
  stopQueue(index: number): Promise<number>;
  /** The driver kicked queue `index` (spurious kicks must be tolerated). */
  queueNotify(index: number): void;
  reset(): Promise<void>;
  /** Registers the callback for config-change notifications (capacity change, NEEDS_RESET). */
  onConfigChange(cb: () => void): void;
}

export interface QueueStart {
  readonly memory: GuestMemory;
  readonly size: number;
  /** Guest physical addresses of the three parts of the split ring. */
  readonly descTable: number;
  readonly availRing: number;
  readonly usedRing: number;
  /** Next avail index to read (vhost-user SET_VRING_BASE); 0 for a fresh queue. */
  readonly nextAvail?: number;
  /** Next used index to write; defaults to nextAvail (all earlier requests were completed). */
  readonly nextUsed?: number;
  /** Tells the driver that used buffers are available (irqfd, vhost-user call fd, MSI). */
  readonly signalUsed: () => void;
}

/** Device status bits (virtio spec 2.1). */
export const VIRTIO_STATUS = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
} as const;

/** Transport-generic feature bits (virtio spec 6). */
export const VIRTIO_F = {
  INDIRECT_DESC: 28n,
  EVENT_IDX: 29n,
  VERSION_1: 32n,
  ACCESS_PLATFORM: 33n,
  RING_PACKED: 34n,
} as const;
