import * as child from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

/**
 * Boots the project's Linux test guest (build/guest/, made by scripts/build-guest.sh) under
 * `qemu-system-x86_64 -accel tcg` with a vhost-user-blk disk on a socket, and collects what the
 * guest prints between `VBLK-BEGIN` and `VBLK-END`. Used by the e2e tests, the guest bench and
 * scripts/guest-demo.sh (through `vblk`-independent code: any vhost-user-blk back-end works).
 */

/** Where build-guest.sh puts the kernel and initramfs (relative to the package root). */
export function guestDir(): string {
  return path.resolve(__dirname, '..', '..', '..', '..', 'build', 'guest');
}

function which(cmd: string): boolean {
  return child.spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/**
 * Why the guest cannot run here, or undefined when it can. The one acceptable reason is a machine
 * without QEMU; with QEMU present, a missing guest is a defect of the set-up, so that throws (a
 * test then fails instead of being skipped). It never builds the guest itself: `make guest`
 * does, and `make test`, `make bench` and `make demo` run it first.
 * @throws Error when build/guest/ lacks the kernel or the initramfs.
 */
export function guestUnavailableReason(): string | undefined {
  if (!which('qemu-system-x86_64')) return 'qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)';
  for (const f of ['vmlinuz', 'initramfs.gz']) {
    if (!fs.existsSync(path.join(guestDir(), f))) {
      throw new Error(`The test guest is not built: build/guest/${f} is missing (run \`make guest\`; make test, make bench and make demo do it first)`);
    }
  }
  return undefined;
}

/** Options of `bootGuest`. */
export interface BootOptions {
  /** vhost-user socket of the back-end serving the disk. */
  readonly socket: string;
  /** Workload in scripts/guest/workloads/ (vblk.run=). */
  readonly workload: string;
  /** Extra vblk.NAME=VALUE parameters for the workload. */
  readonly params?: Readonly<Record<string, string | number>>;
  /** Guest RAM in MiB (default 512). */
  readonly memoryMiB?: number;
  /** vhost-user-blk num-queues (default 1). */
  readonly numQueues?: number;
  /** Guest vCPUs (default 1; blk-mq uses at most one queue per vCPU). */
  readonly cpus?: number;
  /** Kill QEMU after this long (default 120 s). */
  readonly timeoutMs?: number;
  /** Called for every line the guest prints with a VBLK- marker. */
  readonly onLine?: (line: string, qemu: child.ChildProcess) => void;
  /** Called once QEMU has been spawned (a benchmark pins its threads here). */
  readonly onStart?: (qemu: child.ChildProcess) => void;
}

/** What a boot produced. */
export interface BootResult {
  /** Every VBLK-… line, in order. */
  readonly lines: string[];
  /** `VBLK-RESULT` lines without the marker. */
  readonly results: string[];
  /** The workload's exit status from `VBLK-END … rc=N`, or undefined when it never got there. */
  readonly rc: number | undefined;
  /** QEMU was killed (timeout or by `onLine`). */
  readonly killed: boolean;
  /** The last lines of QEMU's output (for failure messages). */
  readonly tail: string;
  readonly seconds: number;
}

/**
 * Boots the guest once and resolves when QEMU exits (the guest powers off after its workload).
 * @example
 *   const r = await bootGuest({ socket: '/tmp/vblk.sock', workload: 'fs' });
 *   // r.rc === 0, r.results includes 'fsck ok'
 */
export function bootGuest(o: BootOptions): Promise<BootResult> {
  const dir = guestDir();
  const params = Object.entries(o.params ?? {})
    .map(([k, v]) => `vblk.${k}=${v}`)
    .join(' ');
  const mem = o.memoryMiB ?? 512;
  const args = [
    '-accel', 'tcg', '-cpu', 'max', '-m', String(mem), '-smp', String(o.cpus ?? 1),
    '-nographic', '-no-reboot', '-nodefaults', '-serial', 'stdio',
    // Thread names ("CPU 0/TCG"): lets a benchmark find and pin the vCPU thread.
    '-name', 'vblk-guest,debug-threads=on',
    '-kernel', path.join(dir, 'vmlinuz'),
    '-initrd', path.join(dir, 'initramfs.gz'),
    '-append', `console=ttyS0 reboot=t panic=-1 quiet vblk.run=${o.workload} ${params}`.trim(),
    '-object', `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    '-numa', 'node,memdev=mem',
    '-chardev', `socket,id=c0,path=${o.socket}`,
    '-device', `vhost-user-blk-pci,chardev=c0,num-queues=${o.numQueues ?? 1}`,
  ];
  const start = Date.now();
  return new Promise((resolve, reject) => {
    const q = child.spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    o.onStart?.(q);
    const lines: string[] = [];
    let tail = '';
    let partial = '';
    let killed = false;
    const timer = setTimeout(() => {
      killed = true;
      q.kill('SIGKILL');
    }, o.timeoutMs ?? 120_000);
    const onData = (chunk: Buffer): void => {
      const s = chunk.toString('latin1');
      tail = (tail + s).slice(-4000);
      partial += s;
      const parts = partial.split(/\r?\n/);
      partial = parts.pop() ?? '';
      for (const raw of parts) {
        const i = raw.indexOf('VBLK-');
        if (i < 0) continue;
        const line = raw.slice(i).trim();
        lines.push(line);
        if (o.onLine) {
          const before = q.killed;
          o.onLine(line, q);
          if (!before && q.killed) killed = true;
        }
      }
    };
    q.stdout.on('data', onData);
    q.stderr.on('data', onData);
    q.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    q.on('close', () => {
      clearTimeout(timer);
      const end = lines.find((l) => l.startsWith('VBLK-END'));
      const m = end ? /rc=(\d+)/.exec(end) : null;
      resolve({
        lines,
        results: lines.filter((l) => l.startsWith('VBLK-RESULT ')).map((l) => l.slice('VBLK-RESULT '.length)),
        rc: m ? Number(m[1]) : undefined,
        killed,
        tail,
        seconds: (Date.now() - start) / 1000,
      });
    });
  });
}
