/** Public API of vblk. */
export * from './errors';
export * from './disk/types';
export { DiskImage } from './disk/disk-image';
export type { ImageFile } from './disk/file';
export { NodeImageFile } from './disk/file';
// image formats: probing, raw, qcow (v1), qcow2 (read path), header codecs (src/disk, src/disk/qcow)
export { openDiskImage, probeFormat, FORMATS, MAX_BACKING_DEPTH } from './disk/open';
export type { OpenDiskOptions, FormatOpener, OpenerContext } from './disk/open';
export { openRaw, rawOps, rawReadOnlyOps, RawState } from './disk/raw';
export { Qcow2Header, QcowHeader } from './disk/qcow/header';
export { openQcow2, openQcow2State, qcow2ReadOnlyOps, Qcow2State } from './disk/qcow/qcow2';
export { openQcow1, qcowReadOnlyOps, QcowState } from './disk/qcow/qcow1';
export { L2Cache, L2Table } from './disk/qcow/l2-cache';
// read-write qcow2 / qcow, create, check, refcounts, fault injection (src/disk/qcow)
export { openQcow2ReadWrite, qcow2ReadWriteOps } from './disk/qcow/qcow2-rw';
export { Qcow2Writer } from './disk/qcow/alloc';
export { openQcow1ReadWrite, qcowReadWriteOps, QcowWriter } from './disk/qcow/qcow1-rw';
export { createImage } from './disk/qcow/create';
export type { CreateOptions } from './disk/qcow/create';
export { checkQcow2, checkQcow2File, checkExitCode, repairRefcounts } from './disk/qcow/check';
export type { CheckResult, RepairMode } from './disk/qcow/check';
export { RefcountManager, getRefcount, setRefcount } from './disk/qcow/refcount';
export { FaultyFile } from './disk/faulty-file';
export type { FaultPlan } from './disk/faulty-file';
export { readBytesAt } from './disk/qcow/chain';
export type { ByteReader } from './disk/qcow/chain';
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
// virtio-mmio transport and the KVM harness (src/transport/mmio.ts, src/kvm; ffi-rs loads lazily)
export { VirtioMmioTransport, MMIO_REG, MMIO_MAGIC, MMIO_WINDOW_SIZE, MMIO_INT } from './transport/mmio';
export type { MmioTransportOptions } from './transport/mmio';
export { Kvm, kvmUnavailableReason } from './kvm/kvm';
export { Vm, signalEventFd } from './kvm/vm';
export type { RamRegion, IoEventFd, IoEventFdOptions } from './kvm/vm';
export { Vcpu } from './kvm/vcpu';
export type { VcpuExit } from './kvm/vcpu';
export { EventFdReader } from './kvm/eventfd-reader';
export { runGuest, GUEST_LAYOUT } from './kvm/run-guest';
export type { RunGuestOptions, GuestRunReport, GuestCheck } from './kvm/run-guest';
// vhost-user-blk back-end (src/transport/vhost-user; `vblk serve`)
export { VhostUserServer, mmapRegionMapper } from './transport/vhost-user/server';
export type { VhostUserServerOptions } from './transport/vhost-user/server';
export { VhostUserBackend, OFFERED_PROTOCOL_FEATURES } from './transport/vhost-user/backend';
export type { BackendEnv, HandleResult } from './transport/vhost-user/backend';
export { MemoryTable } from './transport/vhost-user/memory-table';
export type { RegionMapper, RegionMapping } from './transport/vhost-user/memory-table';
export { MessageDecoder, encodeMessage, encodeReply } from './transport/vhost-user/codec';
export type { VhostUserMessage } from './transport/vhost-user/codec';
export { VHOST_USER, PROTOCOL_F } from './transport/vhost-user/protocol';
export { bootGuest, guestUnavailableReason } from './transport/vhost-user/qemu-guest';
export type { BootOptions, BootResult } from './transport/vhost-user/qemu-guest';
export { serveImage } from './cli/commands/serve';
export type { ServeOptions, Serving } from './cli/commands/serve';
