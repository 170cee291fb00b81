/**
 * Sizes libuv's thread pool for vblk's entry points (`vblk`, `make bench`). Import it first:
 * the pool is created at the first asynchronous fs call and its size is fixed from then on.
 *
 * Page-cache reads are CPU-bound copies, so about one pool thread per CPU is fastest (measured:
 * 2 threads beat 16 by 30% at QD32 on 2 CPUs). At least 2, because a running vCPU (`vblk run`)
 * holds one pool thread. UV_THREADPOOL_SIZE set by the user wins.
 */
import * as os from 'node:os';

process.env['UV_THREADPOOL_SIZE'] ??= String(Math.min(8, Math.max(2, os.cpus().length)));
