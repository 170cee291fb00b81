/**
 * CPU layout of a guest benchmark: the guest's vCPU thread alone on CPU 0; QEMU's other threads
 * (main loop, RCU, I/O workers) and the block back-end on CPU 1. Both back-ends get the same
 * layout, the usual one for measuring a VMM (dedicated vCPU cores, a housekeeping core).
 *
 * Why: left to the scheduler, this 2-core machine placed the three busy parties differently from
 * boot to boot, and the placement decided more than the back-end did. fio at iodepth 1 ranged
 * from 4.2k to 6.8k IOPS on the same back-end depending on it; pinned, repeated boots agreed
 * within about 3 %.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';

/** Why pinning cannot be done here (fewer than 2 CPUs, no taskset), or undefined. */
export function pinUnavailableReason(): string | undefined {
  if (os.cpus().length < 2) return 'fewer than 2 CPUs';
  if (spawnSync('sh', ['-c', 'command -v taskset'], { stdio: 'ignore' }).status !== 0) return 'taskset (util-linux) is missing';
  return undefined;
}

function threads(pid: number): { tid: number; comm: string }[] {
  const out: { tid: number; comm: string }[] = [];
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      out.push({ tid: Number(t), comm: fs.readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim() });
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

function taskset(args: string[]): void {
  const r = spawnSync('taskset', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`taskset ${args.join(' ')} failed: ${(r.stderr ?? '').trim()}`);
}

/**
 * Applies the layout once QEMU's vCPU thread exists (QEMU must run with
 * `-name ...,debug-threads=on`, which names it "CPU 0/TCG").
 * @throws Error when no vCPU thread appears within `waitMs` or taskset fails.
 */
export async function pinGuestLayout(qemuPid: number, backendPid: number, waitMs = 5000): Promise<void> {
  const deadline = Date.now() + waitMs;
  let vcpus: number[] = [];
  for (;;) {
    vcpus = threads(qemuPid).filter((t) => /^CPU \d+/.test(t.comm)).map((t) => t.tid);
    if (vcpus.length > 0) break;
    if (Date.now() > deadline) throw new Error(`no vCPU thread ("CPU n/...") in process ${qemuPid} after ${waitMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
  // Threads created later inherit their creator's CPU: QEMU's and the back-end's workers stay on 1.
  taskset(['-a', '-pc', '1', String(qemuPid)]);
  taskset(['-a', '-pc', '1', String(backendPid)]);
  for (const tid of vcpus) taskset(['-pc', '0', String(tid)]);
}
