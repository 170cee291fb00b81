import * as fs from 'node:fs';
import { signalEventFd } from './vm';

/**
 * Waits on an eventfd (an ioeventfd the guest kicks) and calls `onSignal` once per wake-up.
 *
 * Node has no poll() for arbitrary fds, so the read blocks on a libuv worker thread (one thread
 * per reader). `stop()` wakes the blocked read by writing to the eventfd itself, then the loop
 * ends; the caller may close the fd once `stop()` resolves.
 */
export class EventFdReader {
  readonly fd: number;
  readonly #onSignal: () => void;
  readonly #onError: (e: unknown) => void;
  #stopped = false;
  readonly #done: Promise<void>;
  /** Wake-ups delivered (each may stand for several guest kicks: the counter coalesces). */
  wakeups = 0;

  constructor(fd: number, onSignal: () => void, onError: (e: unknown) => void = () => undefined) {
    this.fd = fd;
    this.#onSignal = onSignal;
    this.#onError = onError;
    this.#done = this.#loop();
  }

  async #loop(): Promise<void> {
    const buf = Buffer.alloc(8);
    while (!this.#stopped) {
      try {
        await new Promise<void>((resolve, reject) => {
          fs.read(this.fd, buf, 0, 8, null, (err) => (err ? reject(err) : resolve()));
        });
      } catch (e) {
        if (!this.#stopped) this.#onError(e);
        return;
      }
      if (this.#stopped) return;
      this.wakeups++;
      this.#onSignal();
    }
  }

  /** Ends the loop (waking the blocked read) and resolves when it has ended. */
  async stop(): Promise<void> {
    if (!this.#stopped) {
      this.#stopped = true;
      signalEventFd(this.fd);
    }
    await this.#done;
  }
}
