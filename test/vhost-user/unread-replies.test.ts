/**
 * A front-end that sends requests and never reads the replies: vblk serve keeps serving (the
 * event loop never waits on the peer), keeps at most MAX_UNREAD_REPLY_BYTES of replies for it,
 * then disconnects it, and still stops on SIGTERM while such a peer is connected.
 */
import { expect } from 'chai';
import * as child from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { nativeLibraryPath } from '../../src/native/library';
import { MAX_UNREAD_REPLY_BYTES } from '../../src/transport/vhost-user/server';
import { VHOST_USER, FLAGS } from '../../src/transport/vhost-user/protocol';
import { skipBecause } from '../helpers/skip';

const CLI = path.resolve(__dirname, '..', '..', 'src', 'cli', 'main.js');

/** One GET_FEATURES request (12-byte header, no payload): each gets a 20-byte reply. */
function getFeatures(): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt32LE(VHOST_USER.GET_FEATURES, 0);
  b.writeUInt32LE(FLAGS.VERSION, 4);
  return b;
}

/** Requests whose replies add up to well past the cap (and past any socket buffer). */
const FLOOD = Math.ceil((8 * MAX_UNREAD_REPLY_BYTES) / 20);

/** Connects and writes FLOOD requests in batches, never reading; resolves when the server hangs up. */
function hostileFrontEnd(sock: string): Promise<{ sent: number }> {
  return new Promise((resolve, reject) => {
    const c = net.createConnection(sock);
    let sent = 0;
    const batch = Buffer.concat(Array.from({ length: 1024 }, getFeatures));
    c.on('connect', () => {
      c.pause(); // never read a reply
      const pump = (): void => {
        while (sent < FLOOD) {
          sent += 1024;
          if (!c.write(batch)) return void c.once('drain', pump);
        }
      };
      pump();
    });
    c.on('close', () => resolve({ sent }));
    c.on('error', (e: NodeJS.ErrnoException) => (e.code === 'EPIPE' || e.code === 'ECONNRESET' ? undefined : reject(e)));
  });
}

class Served {
  readonly proc: child.ChildProcess;
  output = '';
  constructor(readonly socket: string, image: string) {
    this.proc = child.spawn(process.execPath, [CLI, 'serve', '--socket', socket, image], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stdout?.on('data', (d: Buffer) => (this.output += d.toString()));
    this.proc.stderr?.on('data', (d: Buffer) => (this.output += d.toString()));
  }

  async until(text: string, ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    while (!this.output.includes(text)) {
      if (this.proc.exitCode !== null) throw new Error(`vblk serve exited: ${this.output}`);
      if (Date.now() > deadline) throw new Error(`no "${text}" from vblk serve within ${ms} ms: ${this.output}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** SIGTERM; resolves to the exit code, or 'hung' when it has not exited within `ms`. */
  stop(ms: number): Promise<number | null | 'hung'> {
    if (this.proc.exitCode !== null) return Promise.resolve(this.proc.exitCode);
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.proc.kill('SIGKILL');
        resolve('hung');
      }, ms);
      this.proc.once('exit', (code) => {
        clearTimeout(t);
        resolve(code);
      });
      this.proc.kill('SIGTERM');
    });
  }
}

describe('vhost-user: a front-end that never reads its replies', function () {
  this.timeout(60000);
  let dir = '';
  let image = '';

  before(function () {
    if (!fs.existsSync(nativeLibraryPath())) skipBecause(this, `${nativeLibraryPath()} is missing; run \`make native\``);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-unread-'));
    image = path.join(dir, 'disk.raw');
    fs.writeFileSync(image, Buffer.alloc(1 << 20));
  });
  after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('is disconnected once its unread replies pass the cap, and the server serves the next front-end', async () => {
    const s = new Served(path.join(dir, 'a.sock'), image);
    try {
      await s.until('vblk serve: serving', 10000);
      const { sent } = await hostileFrontEnd(s.socket);
      expect(sent).to.be.greaterThan(0);
      await s.until('does not read its replies', 10000);
      // The next front-end is served: GET_FEATURES answered.
      const reply = await new Promise<Buffer>((resolve, reject) => {
        const c = net.createConnection(s.socket, () => c.write(getFeatures()));
        c.once('data', (d: Buffer) => {
          c.destroy();
          resolve(d);
        });
        c.on('error', reject);
      });
      expect(reply.readUInt32LE(0)).to.equal(VHOST_USER.GET_FEATURES);
    } finally {
      expect(await s.stop(10000)).to.equal(0);
    }
  });

  it('SIGTERM stops vblk serve while such a front-end is connected and flooding', async () => {
    const s = new Served(path.join(dir, 'b.sock'), image);
    await s.until('vblk serve: serving', 10000);
    const c = net.createConnection(s.socket);
    await new Promise<void>((resolve) => c.once('connect', resolve));
    c.pause();
    c.on('error', () => undefined);
    // Fill the server's send buffer without reaching the cap: replies wait, none are read.
    const requests = Math.floor(MAX_UNREAD_REPLY_BYTES / 20 / 2);
    c.write(Buffer.concat(Array.from({ length: requests }, getFeatures)));
    await new Promise((r) => setTimeout(r, 500));
    const code = await s.stop(10000);
    c.destroy();
    expect(code, s.output).to.equal(0);
  });
});
