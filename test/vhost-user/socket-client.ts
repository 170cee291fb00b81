import * as fs from 'node:fs';
import { connectUnix, receiveWithFds, sendWithFds } from '../../src/native/vhost';
import { MessageDecoder, encodeMessage } from '../../src/transport/vhost-user/codec';
import type { VhostUserMessage } from '../../src/transport/vhost-user/codec';
import { FLAGS } from '../../src/transport/vhost-user/protocol';

/** A test front-end over a real Unix socket (what QEMU does, byte for byte). */
export class SocketFrontEnd {
  readonly fd: number;
  readonly #decoder = new MessageDecoder();
  readonly #replies: VhostUserMessage[] = [];
  #closed = false;

  constructor(path: string) {
    this.fd = connectUnix(path);
  }

  /** Sends a message (optionally with NEED_REPLY and descriptors). */
  send(request: number, payload: Buffer = Buffer.alloc(0), o: { fds?: number[]; needReply?: boolean } = {}): void {
    sendWithFds(this.fd, encodeMessage(request, FLAGS.VERSION | (o.needReply ? FLAGS.NEED_REPLY : 0), payload), o.fds ?? []);
  }

  /** Sends raw bytes (malformed input). */
  sendRaw(bytes: Buffer): void {
    sendWithFds(this.fd, bytes);
  }

  /** Waits for the next reply; rejects on timeout or when the server closed the connection. */
  async reply(timeoutMs = 5000): Promise<VhostUserMessage> {
    const deadline = Date.now() + timeoutMs;
    const buf = Buffer.alloc(4096);
    for (;;) {
      const r = this.#replies.shift();
      if (r) return r;
      const got = receiveWithFds(this.fd, buf);
      if (got !== undefined) {
        if (got.bytes === 0) throw new Error('server closed the connection');
        this.#replies.push(...this.#decoder.push(buf.subarray(0, got.bytes), got.fds));
        continue;
      }
      if (Date.now() > deadline) throw new Error('no reply in time');
      await new Promise((res) => setTimeout(res, 1));
    }
  }

  /** Request, wait for the reply, return its u64 payload. */
  async requestU64(request: number, payload?: Buffer, needReply = false): Promise<bigint> {
    this.send(request, payload, { needReply });
    const r = await this.reply();
    if (r.request !== request) throw new Error(`reply to ${r.request}, expected ${request}`);
    return r.payload.readBigUInt64LE(0);
  }

  /** Resolves true when the server closes the connection within `timeoutMs`. */
  async closedByServer(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    const buf = Buffer.alloc(4096);
    while (Date.now() < deadline) {
      try {
        const got = receiveWithFds(this.fd, buf);
        if (got !== undefined && got.bytes === 0) return true;
      } catch {
        return true; // ECONNRESET
      }
      await new Promise((res) => setTimeout(res, 2));
    }
    return false;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    fs.closeSync(this.fd);
  }
}

/** Resolves once `cond()` is true (polling every 2 ms), or rejects after `timeoutMs`. */
export async function until(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((res) => setTimeout(res, 2));
  }
}
