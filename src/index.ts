/** Public API of vblk. */
export * from './errors';
export * from './disk/types';
export { DiskImage } from './disk/disk-image';
export type { ImageFile } from './disk/file';
export { NodeImageFile } from './disk/file';
// guest memory, virtqueue, virtio-blk device, mock driver (src/memory, src/virtio)
export { GuestMemory, guestAddress } from './memory/guest-memory';
export type { MemoryRegion } from './memory/guest-memory';
export type { VirtioDevice, QueueStart } from './virtio/device';
export { VIRTIO_STATUS, VIRTIO_F } from './virtio/device';
export { SplitQueue, needsEvent } from './virtio/queue';
export type { SplitQueueOptions } from './virtio/queue';
export { DescriptorChain, VIRTQ_DESC_F } from './virtio/chain';
export { VirtioBlkDevice } from './virtio/blk';
export type { VirtioBlkOptions } from './virtio/blk';
export { VIRTIO_BLK_F, VIRTIO_BLK_T, VIRTIO_BLK_S, BLK_CONFIG, encodeBlkConfig, decodeBlkConfig } from './virtio/blk-config';
export { MockBlkDriver, MockVirtqueue, GuestAllocator, encodeDwzSegment, snapshotMemory, changedOutside } from './virtio/mock-driver';
export type { BlkRequestSpec, BlkLayout, BlkCompletion, SubmittedBlkRequest, MockBuffer, RawDescriptor, UsedEntry } from './virtio/mock-driver';
export { createMemoryDisk, memoryDiskOps } from './disk/memory-disk';
export type { MemoryDiskOptions, MemoryDiskState } from './disk/memory-disk';
