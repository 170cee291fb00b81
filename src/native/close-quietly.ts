import * as fs from 'node:fs';

/**
 * Closes a descriptor a peer handed us, or one we are tearing down, ignoring EBADF and the like:
 * on these paths the descriptor may already be gone and there is nothing useful to report.
 * (Plain `fs`: no native library needed, so pure modules may use it.)
 */
export function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // already closed
  }
}
