/**
 * A front-end that sends requests and never reads the replies: vblk serve keeps running its
 * event loop (no wait on the peer, no FFI call that blocks), keeps at most MAX_UNREAD_REPLY_BYTES
 * of replies for it, then disconnects it with one log line, serves the next front-end, and
 * still stops on SIGTERM while such a peer is connected.
 *
 * vblk serve runs as a child process: a regression (a synchronous retry loop on the socket)
 * then shows as a failed expectation or a SIGKILLed child, never as a hung test run.
 */
import { expect } from 'chai';
import * as child from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import { MAX_UNREAD_REPLY_BYTES } from '../../src/transport/vhost-user/server';
import { encodeConfig, encodeMessage, encodeU64 } from '../../src/transport/vhost-user/codec';
import { FLAGS, PROTOCOL_F, VHOST_USER } from '../../src/transport/vhost-user/protocol';
import { HEARTBEAT_MS } from './fixtures/heartbeat';
import { requireNativeLibrary } from '../helpers/skip';

const CLI = path.resolve(__dirname, '..', '..', 'src', 'cli', 'main.js');
const HEARTBEAT = path.resolve(__dirname, 'fixtures', 'heartbeat.js');

/** Turns on REPLY_ACK (no reply itself): from then on every NEED_REPLY message is acked. */
const ENABLE_REPLY_ACK = encodeMessage(VHOST_USER.SET_PROTOCOL_FEATURES, FLAGS.VERSION, encodeU64(1n << PROTOCOL_F.REPLY_ACK));

/** One round of requests that each get a reply: queries, an acked SET, a config read. */
const ROUND = Buffer.concat([
  encodeMessage(VHOST_USER.GET_FEATURES, FLAGS.VERSION),
  encodeMessage(VHOST_USER.GET_PROTOCOL_FEATURES, FLAGS.VERSION),
  encodeMessage(VHOST_USER.GET_QUEUE_NUM, FLAGS.VERSION),
  encodeMessage(VHOST_USER.SET_PROTOCOL_FEATURES, FLAGS.VERSION | FLAGS.NEED_REPLY, encodeU64(1n << PROTOCOL_F.REPLY_ACK)),
  encodeMessage(VHOST_USER.GET_CONFIG, FLAGS.VERSION, encodeConfig({ offset: 0, flags: 0, data: Buffer.alloc(60) })),
]);
/** Bytes of replies one ROUND earns: four 8-byte answers and a 60-byte config read, 12-byte headers. */
const ROUND_REPLY_BYTES = 4 * 20 + (12 + 12 + 60);
/** The largest single reply in ROUND (the one that may carry the queue past the cap). */
const LARGEST_REPLY = 12 + 12 + 60;

/** vblk serve in a child process, its stdout and stderr collected, a heartbeat timer preloaded. */
class Served {
  readonly proc: child.ChildProcess;
  output = '';
  /** Arrival times (ms) of the heartbeats from the child's event loop. */
  readonly beats: number[] = [];

  constructor(readonly socket: string, image: string) {
    this.proc = child.spawn(process.execPath, ['--require', HEARTBEAT, CLI, 'serve', '--socket', socket, image], {
      stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
    });
    this.proc.stdout?.on('data', (d: Buffer) => (this.output += d.toString()));
    this.proc.stderr?.on('data', (d: Buffer) => (this.output += d.toString()));
    (this.proc.stdio[3] as Readable).on('data', (d: Buffer) => {
      const now = Date.now();
      for (let i = 0; i < d.length; i++) this.beats.push(now);
    });
  }

  async until(text: string, ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    while (!this.output.includes(text)) {
      if (this.proc.exitCode !== null) throw new Error(`vblk serve exited: ${this.output}`);
      if (Date.now() > deadline) throw new Error(`no "${text}" from vblk serve within ${ms} ms: ${this.output}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /**
   * Checks that the heartbeat kept its pace over [from, to]: at least a quarter of the beats
   * arrived and none was more than 250 ms late (a loop blocked on a peer stops it for good).
   */
  expectSteadyHeartbeat(from: number, to: number): void {
    const inside = this.beats.filter((t) => t >= from && t <= to);
    let silence = 0;
    let prev = from;
    for (const t of [...inside, to]) {
      silence = Math.max(silence, t - prev);
      prev = t;
    }
    expect(inside.length, 'heartbeats received').to.be.at.least((to - from) / HEARTBEAT_MS / 4);
    expect(silence, `the longest silence of a ${HEARTBEAT_MS} ms timer`).to.be.below(250);
  }

  /** SIGTERM; resolves to the exit code, or 'hung' when it has not exited within `ms` (then SIGKILL). */
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

/** A front-end that never reads: connected, paused, writes ignored when the server is gone. */
async function silentFrontEnd(sock: string): Promise<net.Socket> {
  const c = net.createConnection(sock);
  c.on('error', () => undefined); // EPIPE / ECONNRESET once the server hangs up
  await new Promise<void>((resolve, reject) => {
    c.once('connect', resolve);
    c.once('error', reject);
  });
  c.pause(); // never read a reply
  return c;
}

/**
 * Enables REPLY_ACK, then writes `rounds` ROUNDs as fast as the socket takes them, never
 * reading. Resolves once they are written or the server has closed the connection; a server
 * that stops reading leaves it pending (callers that expect the cap wait for the log line).
 */
async function flood(c: net.Socket, rounds: number): Promise<void> {
  const batch = Buffer.concat(Array.from({ length: 64 }, () => ROUND));
  const closed = closing(c);
  c.write(ENABLE_REPLY_ACK);
  for (let written = 0; written < rounds && !c.destroyed; written += 64) {
    if (!c.write(batch)) await Promise.race([new Promise((r) => c.once('drain', r)), closed]);
  }
}

/** Resolves when the server has closed `c`. */
function closing(c: net.Socket): Promise<void> {
  return c.destroyed ? Promise.resolve() : new Promise((resolve) => c.once('close', () => resolve()));
}

/** Resolves true when `c` is closed within `ms`. */
async function closedWithin(c: net.Socket, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  const r = await Promise.race([closing(c).then(() => true), timeout]);
  clearTimeout(timer);
  return r;
}

/** GET_FEATURES from a well-behaved front-end: resolves to the reply's request id. */
function askFeatures(sock: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const c = net.createConnection(sock, () => c.write(encodeMessage(VHOST_USER.GET_FEATURES, FLAGS.VERSION)));
    c.once('data', (d: Buffer) => {
      c.destroy();
      resolve(d.readUInt32LE(0));
    });
    c.on('error', reject);
  });
}

describe('vhost-user: a front-end that never reads its replies', function () {
  this.timeout(60000);
  let dir = '';
  let image = '';
  let served: Served | undefined;
  /** Rounds whose replies add up to eight times the cap: far past it and past any socket buffer. */
  const FLOOD_ROUNDS = Math.ceil((8 * MAX_UNREAD_REPLY_BYTES) / ROUND_REPLY_BYTES);

  before(function () {
    requireNativeLibrary(this);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-unread-'));
    image = path.join(dir, 'disk.raw');
    fs.writeFileSync(image, Buffer.alloc(1 << 20));
  });
  afterEach(async () => {
    await served?.stop(10000);
    served = undefined;
  });
  after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function serve(name: string): Promise<Served> {
    served = new Served(path.join(dir, name), image);
    await served.until('vblk serve: serving', 10000);
    return served;
  }

  it('is disconnected once its unread replies pass the cap, with one log line', async () => {
    const s = await serve('a.sock');
    const c = await silentFrontEnd(s.socket);
    void flood(c, FLOOD_ROUNDS);
    await s.until('does not read its replies', 10000);
    expect(await closedWithin(c, 5000), 'the server closed the connection').to.equal(true);
    expect(s.output.match(/does not read its replies/g)).to.have.length(1);
  });

  it('never holds more than the cap plus the one reply that crossed it', async () => {
    const s = await serve('b.sock');
    void flood(await silentFrontEnd(s.socket), FLOOD_ROUNDS);
    await s.until('does not read its replies', 10000);
    const m = /\((\d+) bytes unread, the limit is (\d+)\)/.exec(s.output);
    expect(m, s.output).to.not.equal(null);
    expect(Number(m?.[2])).to.equal(MAX_UNREAD_REPLY_BYTES);
    expect(Number(m?.[1])).to.be.greaterThan(MAX_UNREAD_REPLY_BYTES).and.at.most(MAX_UNREAD_REPLY_BYTES + LARGEST_REPLY);
  });

  it('keeps the event loop running while it floods and while its replies wait (a timer keeps its pace)', async () => {
    const s = await serve('c.sock');
    const c = await silentFrontEnd(s.socket);
    const from = Date.now();
    // Half the cap: replies back up in the socket and in the session, the peer stays connected.
    void flood(c, Math.floor(MAX_UNREAD_REPLY_BYTES / ROUND_REPLY_BYTES / 2));
    await new Promise((r) => setTimeout(r, 1000));
    const to = Date.now();
    expect(c.destroyed, 'still connected').to.equal(false);
    s.expectSteadyHeartbeat(from, to);
  });

  it('does not starve the event loop when it keeps its socket full of requests that need no reply', async () => {
    const s = await serve('f.sock');
    const c = await silentFrontEnd(s.socket);
    const quiet = Buffer.concat(Array.from({ length: 1024 }, () => ENABLE_REPLY_ACK)); // no NEED_REPLY: no reply, no cap
    const from = Date.now();
    while (Date.now() - from < 1500 && !c.destroyed) {
      if (!c.write(quiet)) await new Promise((r) => c.once('drain', r));
      else await new Promise((r) => setImmediate(r));
    }
    const to = Date.now();
    expect(c.destroyed, 'still connected').to.equal(false);
    s.expectSteadyHeartbeat(from, to);
  });

  it('serves the next front-end after disconnecting it', async () => {
    const s = await serve('d.sock');
    void flood(await silentFrontEnd(s.socket), FLOOD_ROUNDS);
    await s.until('does not read its replies', 10000);
    expect(await askFeatures(s.socket)).to.equal(VHOST_USER.GET_FEATURES);
  });

  it('SIGTERM stops vblk serve while such a front-end is connected with replies waiting', async () => {
    const s = await serve('e.sock');
    const c = await silentFrontEnd(s.socket);
    // Half the cap: the socket buffers fill and replies wait, but the peer stays connected.
    void flood(c, Math.floor(MAX_UNREAD_REPLY_BYTES / ROUND_REPLY_BYTES / 2));
    await new Promise((r) => setTimeout(r, 500));
    expect(c.destroyed, 'still connected').to.equal(false);
    const code = await s.stop(10000);
    c.destroy();
    expect(code, s.output).to.equal(0);
  });
});
