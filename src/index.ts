/** Public API of vblk. */
export * from './errors';
export * from './disk/types';
export { DiskImage } from './disk/disk-image';
export type { ImageFile } from './disk/file';
export { NodeImageFile } from './disk/file';
