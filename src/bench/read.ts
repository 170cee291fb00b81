/**
 * Read suite: vblk's disk layer vs `qemu-img bench` on the same data-filled qcow2 and raw images
 * (reference/qcow2.md section 4): 4 KiB "random" reads (stride 428969984 = 4096 x 104729, which
 * visits every 4 KiB block of a 1 GiB image in scattered order) at queue depth 1 and 32, and
 * 64 KiB sequential reads at queue depth 1 and 32. Both sides use the host page cache
 * (qemu-img bench's default -t writeback); the images are read once before measuring. Each row
 * is the best of two alternating runs per side.
 */
import { openDiskImage } from '../disk/open';
import { runBench } from '../cli/commands/bench';
import { tool, runSeconds, hasTool, type BenchSuite, type BenchRow, type BenchContext } from './suite';

const STRIDE = 428969984;

interface Workload {
  readonly label: string;
  readonly size: number;
  readonly depth: number;
  readonly step: number;
  readonly count: number;
}

function workloads(ctx: BenchContext): Workload[] {
  const c = (n: number): number => Math.max(100, Math.round(n * ctx.scale));
  // At least 16384 requests (1 GiB) so a row runs long enough to be measured; offsets wrap.
  const seqCount = Math.max(16384, Math.floor(ctx.imageSize / 65536));
  // The stride only visits every block when it is odd in 4 KiB units and the image is 1 GiB; for
  // other sizes it still scatters, just with a shorter cycle.
  return [
    { label: '4k rand read QD1', size: 4096, depth: 1, step: STRIDE % ctx.imageSize, count: c(60000) },
    { label: '4k rand read QD32', size: 4096, depth: 32, step: STRIDE % ctx.imageSize, count: c(150000) },
    { label: '64k seq read QD1', size: 65536, depth: 1, step: 65536, count: c(seqCount) },
    { label: '64k seq read QD32', size: 65536, depth: 32, step: 65536, count: c(seqCount * 2) },
  ];
}

async function vblkRun(img: string, fmt: 'raw' | 'qcow2', w: Workload): Promise<number> {
  const disk = await openDiskImage(img, { readonly: true, format: fmt });
  try {
    return await runBench(disk, { count: w.count, depth: w.depth, size: w.size, step: w.step, offset: 0, write: false, pattern: 0 });
  } finally {
    await disk.close();
  }
}

function qemuRun(img: string, fmt: string, w: Workload): number {
  return runSeconds(tool('qemu-img', ['bench', '-f', fmt, '-c', String(w.count), '-d', String(w.depth), '-s', String(w.size), '-S', String(w.step), img]));
}

/** Creates a data-filled image (qemu-img bench -w writes 0x5a everywhere). */
export function makeFilledImage(path: string, fmt: 'raw' | 'qcow2', size: number): void {
  tool('qemu-img', ['create', '-q', '-f', fmt, path, String(size)]);
  tool('qemu-img', ['bench', '-q', '-f', fmt, '-w', '--pattern=0x5a', '-s', '64k', '-d', '16', '-c', String(Math.ceil(size / 65536)), path]);
}

export const readSuite: BenchSuite = {
  name: 'read',
  unavailable: () => (hasTool('qemu-img') ? undefined : 'qemu-img not found (Debian qemu-utils)'),
  async run(ctx) {
    const rows: BenchRow[] = [];
    for (const fmt of ['qcow2', 'raw'] as const) {
      const img = `${ctx.dir}/bench.${fmt}`;
      ctx.progress(`preparing a ${ctx.imageSize >> 20} MiB ${fmt} image`);
      makeFilledImage(img, fmt, ctx.imageSize);
      // Warm the page cache for both sides.
      qemuRun(img, fmt, { label: 'warm', size: 65536, depth: 8, step: 65536, count: Math.ceil(ctx.imageSize / 65536) });
      for (const w of workloads(ctx)) {
        // Best of two alternating runs per side: the machine is shared, single runs are noisy.
        let q = Infinity;
        let v = Infinity;
        for (let rep = 1; rep <= 2; rep++) {
          ctx.progress(`${fmt} ${w.label}: qemu-img bench (${rep}/2)`);
          q = Math.min(q, qemuRun(img, fmt, w));
          ctx.progress(`${fmt} ${w.label}: vblk (${rep}/2)`);
          v = Math.min(v, await vblkRun(img, fmt, w));
        }
        const per = (s: number): number => (w.size === 4096 ? w.count / s : (w.count * w.size) / s / 2 ** 20);
        rows.push({ name: `${fmt} ${w.label}`, unit: w.size === 4096 ? 'IOPS' : 'MiB/s', peerName: 'qemu-img bench', peer: per(q), vblk: per(v) });
      }
    }
    return rows;
  },
};
