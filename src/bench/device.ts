/**
 * Device bench: how much the virtio-blk device (queue + request parsing + used ring) adds on top
 * of the disk layer. Each row runs one I/O pattern twice on the same DiskImage: once through the
 * simulated virtqueue driver and the device, once straight on the disk layer, with the same
 * offsets and the same queue depth, and prints both throughputs and their ratio.
 *
 * Standalone: `node build/src/bench/device.js IMAGE [--seconds S] [--readonly]` (write rows
 * overwrite data in IMAGE, like `qemu-img bench -w`).
 *
 * Given an image path, every measurement runs in a child process of its own, warmed up and then
 * measured, alternating disk and device. Two effects made the earlier in-process rounds (0.2 s
 * each, back to back) unreliable (4 KiB random reads at QD32 on this machine):
 * - the device path needs about a second of requests before its code is optimised (0.25 s
 *   windows: 140-220k IOPS at first, 360-390k after a second), while the disk-layer loop runs
 *   at 570-600k in its first 0.25 s and then settles at 330-370k;
 * - each side inherits the other's JIT and heap state: the disk-layer loop alone made 339-466k,
 *   but 422-549k when its rounds alternated with device rounds.
 * A fresh, warmed-up process per measurement gives each side's steady state, as a VMM serving
 * one device would run.
 */
import '../threadpool'; // children and the standalone run size libuv's pool as `vblk serve` does
import * as child from 'node:child_process';
import { GuestMemory } from '../memory/guest-memory';
import type { DiskImage } from '../disk/disk-image';
import { openDiskImage } from '../disk/open';
import { VirtioBlkDevice } from '../virtio/blk';
import { MockVirtqueue } from '../virtio/mock-driver';
import { VIRTQ_DESC_F } from '../virtio/chain';
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from '../virtio/blk-config';
import { mmap, munmap } from '../native/libc';

export interface DeviceBenchOptions {
  /** Image to measure: opened here unless `disk` is given, and by every isolated child. */
  readonly image?: string;
  /** An already open disk (not closed by the bench). */
  readonly disk?: DiskImage;
  /** Seconds measured per side and row, split over the rounds (warm-up not included). Default 1. */
  readonly seconds?: number;
  /** Skip the write rows. Default: true when the disk is read-only. */
  readonly readonly?: boolean;
  /** Alternating disk/device rounds per row (each seconds/rounds long). Default 3 isolated, else 9. */
  readonly rounds?: number;
  /** Only run rows whose name includes this string. */
  readonly filter?: string;
  /**
   * Run each measurement in a fresh child process (needs `image`). Default: true when `image`
   * is given, false for an open `disk`.
   */
  readonly isolate?: boolean;
  /** Warm-up seconds of each isolated measurement before it counts (the device path takes about a second of requests to reach its optimised code). Default 1.5. */
  readonly warmup?: number;
}

export interface Throughput {
  readonly requests: number;
  readonly seconds: number;
  readonly iops: number;
  readonly mbps: number;
}

export interface DeviceBenchRow {
  readonly name: string;
  readonly write: boolean;
  readonly blockSize: number;
  readonly queueDepth: number;
  readonly sequential: boolean;
  readonly device: Throughput;
  readonly disk: Throughput;
  /**
   * disk IOPS / device IOPS, the median over the rounds (each round measures both sides back to
   * back): 1.25 means the device adds 25 % per request.
   */
  readonly ratio: number;
}

interface Pattern {
  readonly name: string;
  readonly write: boolean;
  readonly bs: number;
  readonly qd: number;
  readonly seq: boolean;
}

const PATTERNS: readonly Pattern[] = [
  { name: '4k randread qd1', write: false, bs: 4096, qd: 1, seq: false },
  { name: '4k randread qd32', write: false, bs: 4096, qd: 32, seq: false },
  { name: '4k randread qd128', write: false, bs: 4096, qd: 128, seq: false },
  { name: '4k randwrite qd1', write: true, bs: 4096, qd: 1, seq: false },
  { name: '4k randwrite qd32', write: true, bs: 4096, qd: 32, seq: false },
  { name: '4k randwrite qd128', write: true, bs: 4096, qd: 128, seq: false },
  { name: '64k seqread qd32', write: false, bs: 65536, qd: 32, seq: true },
  { name: '64k seqwrite qd32', write: true, bs: 65536, qd: 32, seq: true },
];

function patternNamed(name: string): Pattern {
  const p = PATTERNS.find((x) => x.name === name);
  if (p === undefined) throw new RangeError(`Cannot run the device bench: no pattern named '${name}'`);
  return p;
}

/** Offsets (in sectors) for a pattern: random block-aligned, or sequential wrapping at the end. */
class OffsetGen {
  #x = 0x9e3779b9;
  #next = 0;
  readonly #blocks: number;
  readonly #sectorsPerBlock: number;
  readonly #seq: boolean;

  constructor(diskBytes: number, bs: number, seq: boolean) {
    this.#blocks = Math.max(1, Math.floor(diskBytes / bs));
    this.#sectorsPerBlock = bs / 512;
    this.#seq = seq;
  }

  next(): number {
    if (this.#seq) {
      const b = this.#next;
      this.#next = (this.#next + 1) % this.#blocks;
      return b * this.#sectorsPerBlock;
    }
    let x = this.#x;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#x = x >>> 0;
    return (this.#x % this.#blocks) * this.#sectorsPerBlock;
  }
}

/** Page-aligned memory for the bench's guest pages, released after a run. */
interface GuestRam {
  readonly buffer: Buffer;
  release(): void;
}

/**
 * Anonymous mmap'd memory, as a VMM's guest RAM is (page-aligned, like the memfd a vhost-user
 * front-end shares). Without the native library, a plain Buffer (16-byte aligned only).
 */
function guestRam(bytes: number): GuestRam {
  const length = Math.ceil(bytes / 4096) * 4096;
  try {
    const m = mmap({ length });
    return { buffer: m.buffer, release: () => munmap(m) };
  } catch {
    return { buffer: Buffer.alloc(length), release: () => undefined };
  }
}

function median(xs: readonly number[]): number {
  const a = [...xs].sort((x, y) => x - y);
  const m = a.length >> 1;
  return a.length % 2 === 1 ? (a[m] as number) : ((a[m - 1] as number) + (a[m] as number)) / 2;
}

function throughput(requests: number, ns: bigint, bs: number): Throughput {
  const seconds = Number(ns) / 1e9;
  return { requests, seconds, iops: requests / seconds, mbps: (requests * bs) / seconds / 1e6 };
}

function sum(ts: readonly Throughput[], bs: number): Throughput {
  let requests = 0;
  let seconds = 0;
  for (const t of ts) {
    requests += t.requests;
    seconds += t.seconds;
  }
  return { requests, seconds, iops: requests / seconds, mbps: (requests * bs) / seconds / 1e6 };
}

/** The pattern straight on the disk layer: `qd` workers, each keeping one request in flight. */
async function runDisk(disk: DiskImage, p: Pattern, seconds: number): Promise<Throughput> {
  const gen = new OffsetGen(disk.size, p.bs, p.seq);
  const deadline = process.hrtime.bigint() + BigInt(Math.round(seconds * 1e9));
  let done = 0;
  const start = process.hrtime.bigint();
  // One page-aligned buffer per worker, like the device side's guest pages (see guestRam).
  const arena = guestRam(p.qd * p.bs);
  let nextBuf = 0;
  const worker = async (): Promise<void> => {
    const buf = arena.buffer.subarray(nextBuf * p.bs, (nextBuf + 1) * p.bs).fill(0x5a);
    nextBuf++;
    while (process.hrtime.bigint() < deadline) {
      const s = gen.next();
      if (p.write) await disk.writeSector(s, buf);
      else await disk.readSector(s, buf);
      done++;
    }
  };
  try {
    await Promise.all(Array.from({ length: p.qd }, worker));
  } finally {
    arena.release();
  }
  return throughput(done, process.hrtime.bigint() - start, p.bs);
}

/**
 * The pattern through the device: a lean guest that keeps `qd` requests in flight, each an
 * indirect chain (header, data, status) in a preallocated slot, refilled from the interrupt.
 */
async function runDevice(disk: DiskImage, p: Pattern, seconds: number): Promise<Throughput> {
  const qsize = Math.max(256, p.qd);
  const ramBase = 0x100000;
  const ringsBytes = MockVirtqueue.footprint(qsize) + 8192;
  // Guest RAM layout, page-aligned like a guest kernel's bio pages: the rings, then one 4 KiB
  // control page per slot ([0,16) header, [16,64) indirect table of 3 x 16, [64] status), then
  // the data buffers. An unaligned data buffer would make every copy straddle an extra page and
  // measure the layout, not the device.
  const ctlBase = Math.ceil((ramBase + ringsBytes) / 4096) * 4096;
  const dataBase = ctlBase + p.qd * 4096;
  const arena = guestRam(dataBase - ramBase + p.qd * p.bs);
  const ram = arena.buffer;
  const memory = new GuestMemory([{ guestAddr: ramBase, buffer: ram }]);
  const dev = new VirtioBlkDevice(disk, { queueSize: qsize, readonly: !p.write });
  if (!dev.setDriverFeatures(dev.deviceFeatures)) throw new Error('bench: feature negotiation failed');
  const q = new MockVirtqueue(memory, qsize, ramBase);
  const gen = new OffsetGen(disk.size, p.bs, p.seq);
  const heads: number[] = [];
  const slotOfHead = new Map<number, number>();
  for (let i = 0; i < p.qd; i++) {
    const a = ctlBase + i * 4096;
    const table = a + 16;
    const data = dataBase + i * p.bs;
    const status = a + 64;
    memory.writeU32(a, p.write ? VIRTIO_BLK_T.OUT : VIRTIO_BLK_T.IN);
    q.writeDescriptor(0, { addr: a, len: 16, flags: VIRTQ_DESC_F.NEXT, next: 1 }, table);
    q.writeDescriptor(1, { addr: data, len: p.bs, flags: VIRTQ_DESC_F.NEXT | (p.write ? 0 : VIRTQ_DESC_F.WRITE), next: 2 }, table);
    q.writeDescriptor(2, { addr: status, len: 1, flags: VIRTQ_DESC_F.WRITE, next: 0 }, table);
    const [head] = q.allocDescriptors(1) as [number];
    q.writeDescriptor(head, { addr: table, len: 48, flags: VIRTQ_DESC_F.INDIRECT, next: 0 });
    heads.push(head);
    slotOfHead.set(head, i);
  }
  // The guest's own view of its RAM (offsets into `ram`), as a guest kernel would use.
  const statusOff = (slot: number): number => ctlBase - ramBase + slot * 4096 + 64;
  const sectorOff = (slot: number): number => ctlBase - ramBase + slot * 4096 + 8;
  const slotOf = new Int32Array(qsize).fill(-1);
  for (const [h, i] of slotOfHead) slotOf[h] = i;
  const deadlineNs = process.hrtime.bigint() + BigInt(Math.round(seconds * 1e9));
  let done = 0;
  let inFlight = 0;
  let errors = 0;
  let finish: () => void = () => undefined;
  const finished = new Promise<void>((r) => {
    finish = r;
  });
  const submit = (head: number): void => {
    const off = sectorOff(slotOf[head] as number);
    const sector = gen.next();
    ram.writeUInt32LE(sector % 0x1_0000_0000, off);
    ram.writeUInt32LE(Math.floor(sector / 0x1_0000_0000), off + 4);
    q.publish(head);
    inFlight++;
  };
  let kickPending = false;
  const kick = (): void => {
    kickPending = false;
    dev.queueNotify(0);
  };
  const onInterrupt = (): void => {
    const stop = process.hrtime.bigint() >= deadlineNs;
    // Like Linux's virtqueue_enable_cb: reap, move used_event past what was seen, and re-check
    // (an entry published before used_event moved raised no interrupt).
    for (;;) {
      for (const u of q.reap()) {
        inFlight--;
        done++;
        if (ram[statusOff(slotOf[u.id] as number)] !== VIRTIO_BLK_S.OK) errors++;
        if (!stop) submit(u.id);
      }
      q.setUsedEvent(q.lastUsed);
      if (q.usedIdx === q.lastUsed) break;
    }
    if (inFlight === 0) finish();
    else if (!kickPending) {
      // The guest kicks after its interrupt handler returns, not from inside the device's call.
      kickPending = true;
      queueMicrotask(kick);
    }
  };
  dev.startQueue(0, { memory, size: qsize, descTable: q.descTable, availRing: q.availRing, usedRing: q.usedRing, signalUsed: onInterrupt });
  const start = process.hrtime.bigint();
  for (const h of heads) submit(h);
  q.setUsedEvent(0);
  dev.queueNotify(0);
  await finished;
  const ns = process.hrtime.bigint() - start;
  await dev.reset();
  arena.release();
  if (errors > 0) throw new Error(`bench: ${errors} requests failed through the device`);
  return throughput(done, ns, p.bs);
}

type Side = 'disk' | 'device';

/** One measurement in a fresh process: `node device.js --child SIDE PATTERN WARMUP SECONDS IMAGE`. */
function measureInChild(image: string, side: Side, p: Pattern, warmup: number, seconds: number): Promise<Throughput> {
  return new Promise((resolve, reject) => {
    const args = [__filename, '--child', side, p.name, String(warmup), String(seconds), image];
    child.execFile(process.execPath, args, { timeout: Math.ceil((warmup + seconds) * 1000) + 60_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`bench: the ${side} measurement of '${p.name}' failed: ${stderr.trim() || err.message}`));
      let t: Partial<Throughput> | undefined;
      try {
        t = JSON.parse(stdout) as Partial<Throughput>;
      } catch {
        t = undefined;
      }
      const ok = t !== undefined && [t.requests, t.seconds, t.iops, t.mbps].every((x) => typeof x === 'number' && Number.isFinite(x));
      if (!ok) return reject(new Error(`bench: the ${side} measurement of '${p.name}' printed no result`));
      resolve(t as Throughput);
    });
  });
}

/** The child side of measureInChild: warm up, measure, print the Throughput as JSON. */
async function childMain(args: readonly string[]): Promise<void> {
  const [side, name, warmup, seconds, image] = args;
  if (image === undefined || (side !== 'disk' && side !== 'device')) throw new RangeError('usage: device.js --child disk|device PATTERN WARMUP SECONDS IMAGE');
  const p = patternNamed(name as string);
  const disk = await openDiskImage(image, { readonly: !p.write });
  try {
    const run = side === 'disk' ? runDisk : runDevice;
    await run(disk, p, Number(warmup));
    const t = await run(disk, p, Number(seconds));
    process.stdout.write(JSON.stringify(t));
  } finally {
    await disk.close();
  }
}

/**
 * Runs the device rows and returns them (also used by `make bench` through src/bench/main.ts).
 *
 * @example
 *   const rows = await runDeviceBench({ image: '/tmp/bench.raw', seconds: 1 });
 *   console.log(formatDeviceBench(rows));
 */
export async function runDeviceBench(opts: DeviceBenchOptions): Promise<DeviceBenchRow[]> {
  let disk = opts.disk;
  let close = false;
  if (disk === undefined) {
    if (opts.image === undefined) throw new RangeError('Cannot run the device bench: give an image path or a disk');
    disk = await openDiskImage(opts.image, { readonly: opts.readonly === true });
    close = true;
  }
  const seconds = opts.seconds ?? 1;
  const ro = opts.readonly ?? disk.readonly;
  const isolate = opts.isolate ?? opts.image !== undefined;
  if (isolate && opts.image === undefined) throw new RangeError('Cannot run the device bench isolated: give an image path');
  const image = opts.image as string;
  const warmup = opts.warmup ?? 1.5;
  const rows: DeviceBenchRow[] = [];
  try {
    for (const p of PATTERNS) {
      if (p.write && ro) continue;
      if (opts.filter !== undefined && !p.name.includes(opts.filter)) continue;
      if (disk.size < p.bs * 16) continue;
      const rounds = Math.max(1, opts.rounds ?? (isolate ? 3 : 9));
      const measure = isolate
        ? (side: Side): Promise<Throughput> => measureInChild(image, side, p, warmup, seconds / rounds)
        : (side: Side): Promise<Throughput> => (side === 'disk' ? runDisk : runDevice)(disk, p, seconds / rounds);
      if (!isolate) {
        // Warm both paths (JIT, page cache) once; isolated children warm up on their own.
        await runDisk(disk, p, Math.min(0.2, seconds / 4));
        await runDevice(disk, p, Math.min(0.2, seconds / 4));
      }
      // Alternate rounds, so that a change in the machine's load hits both sides alike.
      const ds: Throughput[] = [];
      const vs: Throughput[] = [];
      for (let i = 0; i < rounds; i++) {
        if (i % 2 === 0) {
          ds.push(await measure('disk'));
          vs.push(await measure('device'));
        } else {
          vs.push(await measure('device'));
          ds.push(await measure('disk'));
        }
      }
      const d = sum(ds, p.bs);
      const v = sum(vs, p.bs);
      // The median of the rounds' paired ratios: a burst of load from elsewhere on this shared
      // machine spoils one pair, not the figure (a sum would carry it into the ratio).
      const ratios = ds.map((x, i) => x.iops / (vs[i] as Throughput).iops);
      rows.push({ name: p.name, write: p.write, blockSize: p.bs, queueDepth: p.qd, sequential: p.seq, device: v, disk: d, ratio: median(ratios) });
    }
  } finally {
    if (close) await disk.close();
  }
  return rows;
}

/** A plain-text table of the rows. */
export function formatDeviceBench(rows: readonly DeviceBenchRow[]): string {
  const lines = ['device bench (virtio-blk through the simulated virtqueue vs the disk layer alone)'];
  lines.push(
    ['pattern'.padEnd(20), 'device IOPS'.padStart(12), 'device MB/s'.padStart(12), 'disk IOPS'.padStart(12), 'disk MB/s'.padStart(12), 'disk/device'.padStart(12)].join(' '),
  );
  for (const r of rows) {
    lines.push(
      [
        r.name.padEnd(20),
        r.device.iops.toFixed(0).padStart(12),
        r.device.mbps.toFixed(1).padStart(12),
        r.disk.iops.toFixed(0).padStart(12),
        r.disk.mbps.toFixed(1).padStart(12),
        r.ratio.toFixed(2).padStart(12),
      ].join(' '),
    );
  }
  return lines.join('\n');
}

async function main(argv: string[]): Promise<void> {
  if (argv[0] === '--child') return childMain(argv.slice(1));
  const args = [...argv];
  let seconds: number | undefined;
  let readonly = false;
  let filter: string | undefined;
  let image: string | undefined;
  while (args.length > 0) {
    const a = args.shift() as string;
    if (a === '--seconds') seconds = Number(args.shift());
    else if (a === '--readonly') readonly = true;
    else if (a === '--filter') filter = args.shift();
    else image = a;
  }
  if (image === undefined) {
    console.error('usage: node build/src/bench/device.js IMAGE [--seconds S] [--readonly] [--filter NAME]');
    process.exitCode = 1;
    return;
  }
  const rows = await runDeviceBench({ image, ...(seconds !== undefined ? { seconds } : {}), readonly, ...(filter !== undefined ? { filter } : {}) });
  console.log(formatDeviceBench(rows));
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : String(e));
    process.exitCode = 1;
  });
}
