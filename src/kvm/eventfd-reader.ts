import { once } from 'node:events';
import { Worker } from 'node:worker_threads';
import { TransportError } from '../errors';
import { signalEventFd } from './vm';

/**
 * The reader thread: blocks in read(2) on the eventfd and posts one message per wake-up.
 * A dedicated worker thread, not libuv's pool: KVM_RUN already holds a pool thread while the
 * guest runs (ffi-rs runInNewThread), and a second blocked pool thread per eventfd would leave
 * too few for the disk's file I/O (with UV_THREADPOOL_SIZE <= 2 the VMM would deadlock).
 */
const READER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');
const stop = new Int32Array(workerData.stop);
const buf = Buffer.alloc(8);
for (;;) {
  try {
    fs.readSync(workerData.fd, buf, 0, 8, null);
  } catch (e) {
    if (e && (e.code === 'EAGAIN' || e.code === 'EINTR')) continue;
    if (Atomics.load(stop, 0) === 0) parentPort.postMessage({ error: String(e && e.message || e) });
    break;
  }
  if (Atomics.load(stop, 0) !== 0) break;
  parentPort.postMessage(1);
}
`;

/**
 * Waits on an eventfd (an ioeventfd the guest kicks) and calls `onSignal` once per wake-up, on
 * the main thread. Each wake-up may stand for several guest kicks: the eventfd counter coalesces
 * them, and virtio tolerates that (the device drains the whole avail ring per notification).
 *
 * `stop()` sets a stop flag and writes to the eventfd itself to wake the blocked read; the fd may
 * be closed once `stop()` resolves.
 */
export class EventFdReader {
  readonly fd: number;
  readonly #worker: Worker;
  readonly #stop = new Int32Array(new SharedArrayBuffer(4));
  readonly #exited: Promise<unknown>;
  #stopped = false;
  /** Wake-ups delivered. */
  wakeups = 0;

  constructor(fd: number, onSignal: () => void, onError: (e: unknown) => void = () => undefined) {
    this.fd = fd;
    this.#worker = new Worker(READER_SOURCE, { eval: true, workerData: { fd, stop: this.#stop.buffer } });
    this.#exited = once(this.#worker, 'exit');
    this.#worker.on('message', (m: unknown) => {
      if (this.#stopped) return;
      if (typeof m === 'object' && m !== null && 'error' in m) {
        onError(new TransportError('E_KVM', `Cannot read eventfd ${fd}: ${String(m.error)}`));
        return;
      }
      this.wakeups++;
      onSignal();
    });
    this.#worker.on('error', (e) => onError(e));
  }

  /** Ends the reader thread (waking its blocked read) and resolves when it has exited. */
  async stop(): Promise<void> {
    if (!this.#stopped) {
      this.#stopped = true;
      Atomics.store(this.#stop, 0, 1);
      signalEventFd(this.fd);
    }
    await this.#exited;
  }
}
