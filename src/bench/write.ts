/**
 * Write suite: vblk's qcow2 read-write table vs `qemu-img bench -w` on the same kind of image in
 * the same run: 4 KiB "random" writes (stride 428969984, as the read suite) at queue depth 1 and
 * 32, page cache on both sides (qemu-img bench's default -t writeback), into
 * - a fresh, empty qcow2 (every write to a new 64 KiB cluster allocates it: refcounts, L2, COW of
 *   the rest of the cluster), each side on its own fresh copy;
 * - a qcow2 created with preallocation=metadata (every cluster allocated: in-place writes).
 * Each row is the best of REPS alternating runs per side (QD1 rows swing 2-4x from run to run on
 * a shared 2-CPU machine, on both sides; best-of-3 keeps the ratio meaningful). Both sides are timed without the flush
 * that happens at close (qemu-img bench stops its clock before closing the image).
 */
import * as fs from 'node:fs';
import { openDiskImage } from '../disk/open';
import { tool, runSeconds, hasTool, type BenchSuite, type BenchRow, type BenchContext } from './suite';

const STRIDE = 428969984;
/** Alternating runs per side and row; the best of each side is reported. */
const REPS = 3;

interface Workload {
  readonly label: string;
  readonly prealloc: boolean;
  readonly depth: number;
  readonly count: number;
}

function workloads(ctx: BenchContext): Workload[] {
  const c = (n: number): number => Math.max(100, Math.round(n * ctx.scale));
  return [
    { label: 'fresh QD1', prealloc: false, depth: 1, count: c(16384) },
    { label: 'fresh QD32', prealloc: false, depth: 32, count: c(16384) },
    { label: 'prealloc QD1', prealloc: true, depth: 1, count: c(30000) },
    { label: 'prealloc QD32', prealloc: true, depth: 32, count: c(60000) },
  ];
}

function create(path: string, size: number, prealloc: boolean): void {
  fs.rmSync(path, { force: true });
  tool('qemu-img', ['create', '-q', '-f', 'qcow2', ...(prealloc ? ['-o', 'preallocation=metadata'] : []), path, String(size)]);
}

/**
 * The qemu-img bench -w loop through vblk. Timed like qemu-img bench: from the first request to
 * the last completion; the flush at close (qemu-img's too) is outside the timing.
 */
async function vblkRun(img: string, w: Workload, step: number): Promise<number> {
  const disk = await openDiskImage(img, { format: 'qcow2' });
  try {
    let issued = 0;
    let offset = 0;
    const worker = async (buf: Uint8Array): Promise<void> => {
      while (issued < w.count) {
        issued++;
        let off = offset;
        offset = (offset + step) % disk.size;
        if (off + buf.length > disk.size) off = 0;
        await disk.writeSector(off / 512, buf);
      }
    };
    const bufs = Array.from({ length: w.depth }, () => new Uint8Array(4096).fill(0xa5));
    const t0 = process.hrtime.bigint();
    await Promise.all(bufs.map((b) => worker(b)));
    return Number(process.hrtime.bigint() - t0) / 1e9;
  } finally {
    await disk.close();
  }
}

function qemuRun(img: string, w: Workload, step: number): number {
  return runSeconds(tool('qemu-img', ['bench', '-f', 'qcow2', '-w', '--pattern=0xa5', '-c', String(w.count), '-d', String(w.depth), '-s', '4096', '-S', String(step), img]));
}

export const writeSuite: BenchSuite = {
  name: 'write',
  unavailable: () => (hasTool('qemu-img') ? undefined : 'qemu-img not found (Debian qemu-utils)'),
  async run(ctx) {
    const rows: BenchRow[] = [];
    const step = STRIDE % ctx.imageSize;
    const qImg = `${ctx.dir}/q.qcow2`;
    const vImg = `${ctx.dir}/v.qcow2`;
    for (const w of workloads(ctx)) {
      let q = Infinity;
      let v = Infinity;
      for (let rep = 1; rep <= REPS; rep++) {
        // Fresh rows need a new empty image per run; preallocated ones are reused (in place).
        if (w.prealloc ? rep === 1 : true) {
          ctx.progress(`${w.label}: preparing images`);
          create(qImg, ctx.imageSize, w.prealloc);
          create(vImg, ctx.imageSize, w.prealloc);
        }
        ctx.progress(`${w.label}: qemu-img bench -w (${rep}/${REPS})`);
        q = Math.min(q, qemuRun(qImg, w, step));
        ctx.progress(`${w.label}: vblk (${rep}/${REPS})`);
        v = Math.min(v, await vblkRun(vImg, w, step));
      }
      const check = tool('qemu-img', ['check', vImg]);
      const note = /No errors were found/.test(check) ? undefined : 'vblk image NOT clean';
      rows.push({ name: `qcow2 4k rand write ${w.label}`, unit: 'IOPS', peerName: 'qemu-img bench -w', peer: w.count / q, vblk: w.count / v, ...(note ? { note } : {}) });
    }
    return rows;
  },
};
