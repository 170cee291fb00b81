/**
 * `vblk serve --socket PATH [--readonly] [--num-queues N] [--queue-size Q] [--poll-max-us U] [-f FMT] IMG`: a
 * vhost-user-blk back-end, as `qemu-storage-daemon --export type=vhost-user-blk` is: QEMU (or
 * cloud-hypervisor) connects to PATH and its guest sees IMG as a virtio-blk disk.
 *
 * Serves one front-end at a time until SIGINT or SIGTERM, then waits for in-flight requests,
 * flushes and closes the image. A front-end that disconnects (even killed mid-request) leaves the
 * image flushed and consistent, and the next connection is accepted.
 * Exit codes: 0 after a clean stop, 1 when the image or the socket cannot be opened.
 */
import { openDiskImage } from '../../disk/open';
import type { DiskImage } from '../../disk/disk-image';
import { VirtioBlkDevice } from '../../virtio/blk';
import { VhostUserServer } from '../../transport/vhost-user/server';
import { parseArgs, parseCount, parseFormat } from '../args';
import { UsageError, type CliIO, type Command } from '../command';

/** Options of `serveImage`. */
export interface ServeOptions {
  readonly image: string;
  readonly socketPath: string;
  readonly readonly?: boolean;
  readonly format?: 'raw' | 'qcow' | 'qcow2';
  readonly numQueues?: number;
  readonly queueSize?: number;
  /** Longest adaptive poll window per queue in µs (0: off). Default `DEFAULT_POLL_MAX_US`. */
  readonly pollMaxUs?: number;
  /** Log sink (one line per event); default stderr. */
  readonly log?: (line: string) => void;
}

/**
 * Default longest poll window of `vblk serve` (µs). QEMU's iothreads poll up to 32 µs by default;
 * the TCG test guest needed ~250 µs to be caught at iodepth 1 (its round trip is ~170 µs). The
 * window shrinks to twice the gaps it catches, so a faster guest polls for less
 * (docs/vhost-user.md, "Adaptive polling").
 */
export const DEFAULT_POLL_MAX_US = 300;

/** A running `vblk serve`: the server, the device, the disk, and `stop()`. */
export interface Serving {
  readonly server: VhostUserServer;
  readonly device: VirtioBlkDevice;
  readonly disk: DiskImage;
  /** Drains the current session, flushes and closes the image, removes the socket. Idempotent. */
  stop(): Promise<void>;
}

/**
 * Opens the image and starts serving it on the socket (the programmatic `vblk serve`).
 * @example
 *   const s = await serveImage({ image: 'disk.qcow2', socketPath: '/tmp/vblk.sock' });
 *   ...
 *   await s.stop();
 */
export async function serveImage(o: ServeOptions): Promise<Serving> {
  const disk = await openDiskImage(o.image, { ...(o.readonly ? { readonly: true } : {}), ...(o.format ? { format: o.format } : {}) });
  let server: VhostUserServer;
  let device: VirtioBlkDevice;
  const log = o.log ?? ((line: string): void => void process.stderr.write(line + '\n'));
  try {
    device = new VirtioBlkDevice(disk, {
      numQueues: o.numQueues ?? 1,
      queueSize: o.queueSize ?? 256,
      pollMaxUs: o.pollMaxUs ?? DEFAULT_POLL_MAX_US,
      ...(o.readonly ? { readonly: true } : {}),
    });
    server = await VhostUserServer.listen({
      socketPath: o.socketPath,
      device,
      log,
      afterSession: async () => {
        if (!disk.readonly && !disk.closed) await disk.flush();
      },
    });
  } catch (e) {
    await disk.close();
    throw e;
  }
  let stopping: Promise<void> | undefined;
  return {
    server,
    device,
    disk,
    stop(): Promise<void> {
      stopping ??= (async () => {
        try {
          await server.close();
        } finally {
          await disk.close();
        }
      })();
      return stopping;
    },
  };
}

export const serveCommand: Command = {
  name: 'serve',
  summary: 'serve an image as a vhost-user-blk back-end on a Unix socket (for QEMU, cloud-hypervisor)',
  usage: 'serve --socket PATH [--readonly] [--num-queues N] [--queue-size Q] [--poll-max-us U] [-f FMT] IMG',
  async run(argv, io: CliIO) {
    const a = parseArgs(argv, { values: 'f', longValues: ['socket', 'num-queues', 'queue-size', 'poll-max-us'], longFlags: ['readonly'] });
    const image = a.positional[0];
    if (image === undefined || a.positional.length > 1) throw new UsageError('serve needs exactly one image');
    const socketPath = a.get('socket');
    if (socketPath === undefined) throw new UsageError('serve needs --socket PATH');
    const numQueues = a.has('num-queues') ? parseCount(a.get('num-queues') ?? '', 'num-queues') : 1;
    if (numQueues < 1 || numQueues > 64) throw new UsageError(`--num-queues ${numQueues} is not 1..64`);
    const queueSize = a.has('queue-size') ? parseCount(a.get('queue-size') ?? '', 'queue-size') : 256;
    if (queueSize < 2 || queueSize > 32768 || (queueSize & (queueSize - 1)) !== 0) {
      throw new UsageError(`--queue-size ${queueSize} is not a power of two in 2..32768`);
    }
    const pollMaxUs = a.has('poll-max-us') ? parseCount(a.get('poll-max-us') ?? '', 'poll-max-us') : DEFAULT_POLL_MAX_US;
    if (pollMaxUs > 1_000_000) throw new UsageError(`--poll-max-us ${pollMaxUs} is not 0..1000000`);
    const format = parseFormat(a.get('f'));
    const log = (line: string): void => void io.stderr.write(`vblk serve: ${line}\n`);
    const s = await serveImage({
      image,
      socketPath,
      readonly: a.has('readonly'),
      numQueues,
      queueSize,
      pollMaxUs,
      ...(format ? { format } : {}),
      log,
    });
    const ro = s.device.readonly ? ', read-only' : '';
    io.stdout.write(`vblk serve: serving ${image} (${s.disk.format}, ${s.disk.size} bytes${ro}) on ${socketPath}\n`);
    s.server.on('connect', () => log(`front-end connected (session ${s.server.sessions})`));
    let signalled = false;
    let polledBefore = s.device.pollCounts;
    s.server.on('disconnect', (info: { kicks: number[] }) => {
      const p = s.device.pollCounts;
      const hits = p.hits - polledBefore.hits;
      const windows = hits + p.misses - polledBefore.misses;
      polledBefore = p;
      const polled = s.device.pollMaxNs > 0 ? `; requests found by polling: ${hits} (of ${windows} poll windows)` : '';
      log(`front-end disconnected (kicks per queue: ${info.kicks.join(', ')}${polled}); image flushed${signalled ? '' : ', waiting for the next connection'}`);
    });
    await new Promise<void>((resolve) => {
      const onSignal = (sig: NodeJS.Signals): void => {
        signalled = true;
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        log(`${sig}: draining, flushing and closing the image`);
        resolve();
      };
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
    });
    await s.stop();
    io.stdout.write('vblk serve: stopped\n');
    return 0;
  },
};
