import { expect } from 'chai';
import * as fs from 'node:fs';
import { NodeImageFile } from '../../src/disk/file';
import { SyncFirstPolicy } from '../../src/disk/sync-first';
import { isVblkError } from '../../src/errors';
import { useTempDir } from '../helpers/qemu';

/** A policy whose event-loop turns the test ends by hand. */
function manualPolicy(opts: { slowNs?: number; maxBytes?: number } = {}): { policy: SyncFirstPolicy; endTurn: () => void } {
  let pending: (() => void)[] = [];
  const policy = new SyncFirstPolicy({ ...opts, nextTurn: (fn) => pending.push(fn) });
  return {
    policy,
    endTurn: () => {
      const fns = pending;
      pending = [];
      for (const fn of fns) fn();
    },
  };
}

/** What `p` rejects with (undefined when it resolves). */
async function rejectionOf(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  return undefined;
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

describe('SyncFirstPolicy: when an idle file may skip the thread pool', () => {
  it('allows a small transfer on an idle file', () => {
    const { policy } = manualPolicy();
    expect(policy.shouldTry(4096, 0)).to.equal(true);
  });

  it('allows one synchronous transfer per event-loop turn', () => {
    const { policy, endTurn } = manualPolicy();
    expect(policy.shouldTry(4096, 0)).to.equal(true);
    expect(policy.shouldTry(4096, 0)).to.equal(false);
    endTurn();
    expect(policy.shouldTry(4096, 0)).to.equal(true);
  });

  it('refuses while the file has requests in the pool', () => {
    const { policy } = manualPolicy();
    expect(policy.shouldTry(4096, 1)).to.equal(false);
  });

  it('refuses transfers above maxBytes', () => {
    const { policy } = manualPolicy({ maxBytes: 8192 });
    expect(policy.shouldTry(8193, 0)).to.equal(false);
    expect(policy.shouldTry(8192, 0)).to.equal(true);
  });

  it('after each slow call skips twice as many chances, and fast calls shrink the back-off', () => {
    const { policy, endTurn } = manualPolicy({ slowNs: 1000 });
    const tries = (n: number): number => {
      let yes = 0;
      for (let i = 0; i < n; i++) {
        if (policy.shouldTry(512, 0)) yes++;
        endTurn();
      }
      return yes;
    };
    policy.record(5000); // slow: skip 1
    expect(tries(1)).to.equal(0);
    expect(tries(1)).to.equal(1);
    policy.record(5000); // slow again: skip 3
    expect(tries(3)).to.equal(0);
    expect(tries(1)).to.equal(1);
    policy.record(10); // two fast calls undo the two slow ones: the next slow call skips 1 again
    policy.record(10);
    policy.record(5000);
    expect(tries(1)).to.equal(0);
    expect(tries(1)).to.equal(1);
    expect(policy.slowCalls).to.equal(3);
    expect(policy.syncCalls).to.equal(5);
  });

  it('caps the back-off at 4095 skipped chances', () => {
    const { policy, endTurn } = manualPolicy({ slowNs: 1 });
    for (let i = 0; i < 20; i++) policy.record(100);
    let skipped = 0;
    while (!policy.shouldTry(512, 0)) {
      skipped++;
      endTurn();
    }
    expect(skipped).to.equal(4095);
  });
});

describe('NodeImageFile: synchronous-first I/O', function () {
  const tmp = useTempDir();

  async function fileWith(name: string, data: Buffer, syncFirst?: boolean): Promise<NodeImageFile> {
    const p = tmp.file(name);
    fs.writeFileSync(p, data);
    return NodeImageFile.open(p, { writable: true, ...(syncFirst !== undefined ? { syncFirst } : {}) });
  }

  it('serves an idle file synchronously', async () => {
    const data = pattern(64 * 1024, 1);
    const f = await fileWith('idle.img', data);
    try {
      const buf = Buffer.alloc(4096);
      expect(await f.read(buf, 8192)).to.equal(4096);
      expect(buf.equals(data.subarray(8192, 12288))).to.equal(true);
      expect(f.syncFirst?.syncCalls).to.equal(1);
    } finally {
      await f.close();
    }
  });

  it('sends a batch issued in one turn to the pool after the first request, with every result right', async () => {
    const data = pattern(256 * 1024, 2);
    const f = await fileWith('batch.img', data);
    try {
      const bufs = Array.from({ length: 16 }, () => Buffer.alloc(4096));
      const counts = await Promise.all(bufs.map((b, i) => f.read(b, i * 8192)));
      expect(counts).to.deep.equal(bufs.map(() => 4096));
      bufs.forEach((b, i) => expect(b.equals(data.subarray(i * 8192, i * 8192 + 4096)), `read ${i}`).to.equal(true));
      expect(f.syncFirst?.syncCalls).to.equal(1);
    } finally {
      await f.close();
    }
  });

  it('writes synchronously when idle and the data reads back', async () => {
    const f = await fileWith('write.img', Buffer.alloc(16384));
    try {
      const w = pattern(4096, 3);
      await f.write(w, 4096);
      expect(f.syncFirst?.syncCalls).to.equal(1);
      await new Promise((r) => setImmediate(r));
      const back = Buffer.alloc(4096);
      await f.read(back, 4096);
      expect(back.equals(w)).to.equal(true);
    } finally {
      await f.close();
    }
  });

  it('a synchronous read across end of file returns the short count', async () => {
    const f = await fileWith('short.img', pattern(6000, 4));
    try {
      const buf = Buffer.alloc(4096);
      expect(await f.read(buf, 4096)).to.equal(6000 - 4096);
      await new Promise((r) => setImmediate(r));
      expect(await f.read(Buffer.alloc(512), 8192)).to.equal(0);
    } finally {
      await f.close();
    }
  });

  it('a failing synchronous read rejects with E_DISK_IO rather than throwing', async () => {
    const f = await fileWith('closed.img', pattern(8192, 5));
    fs.closeSync(f.fd); // pull the fd from under it
    const p = f.read(Buffer.alloc(512), 0);
    expect(p).to.be.instanceOf(Promise);
    expect(isVblkError(await rejectionOf(p), 'E_DISK_IO')).to.equal(true);
  });

  it('a failing synchronous write rejects with E_DISK_IO rather than throwing', async () => {
    const f = await fileWith('closed-w.img', pattern(8192, 8));
    fs.closeSync(f.fd);
    const p = f.write(Buffer.alloc(512, 1), 0);
    expect(p).to.be.instanceOf(Promise);
    expect(isVblkError(await rejectionOf(p), 'E_DISK_IO')).to.equal(true);
    expect(f.syncFirst?.syncCalls, 'the failure came from the synchronous attempt').to.equal(1);
  });

  it('with syncFirst: false every request goes through the pool', async () => {
    const f = await fileWith('pool.img', pattern(8192, 6), false);
    try {
      expect(f.syncFirst).to.equal(null);
      const buf = Buffer.alloc(512);
      expect(await f.read(buf, 512)).to.equal(512);
      expect(buf.equals(pattern(8192, 6).subarray(512, 1024))).to.equal(true);
    } finally {
      await f.close();
    }
  });

  it('VBLK_IO=pool in the environment turns it off', async () => {
    const saved = process.env['VBLK_IO'];
    process.env['VBLK_IO'] = 'pool';
    try {
      const f = await fileWith('env.img', pattern(4096, 7));
      expect(f.syncFirst).to.equal(null);
      await f.close();
    } finally {
      if (saved === undefined) delete process.env['VBLK_IO'];
      else process.env['VBLK_IO'] = saved;
    }
  });
});

describe('NodeImageFile.extent (SEEK_DATA / SEEK_HOLE)', () => {
  const tmp = useTempDir();

  /** 1 MiB: data at 256-384 KiB only. */
  async function sparse(): Promise<NodeImageFile> {
    const f = tmp.file('extent.raw');
    fs.writeFileSync(f, '');
    fs.truncateSync(f, 1 << 20);
    const fd = fs.openSync(f, 'r+');
    fs.writeSync(fd, Buffer.alloc(128 << 10, 1), 0, 128 << 10, 256 << 10);
    fs.closeSync(fd);
    return NodeImageFile.open(f, { writable: false });
  }

  it('a hole runs up to the next data', async () => {
    const file = await sparse();
    expect(file.extent(0, 1 << 20)).to.deep.equal({ data: false, length: 256 << 10 });
    await file.close();
  });

  it('data runs up to the next hole, and never past the length asked', async () => {
    const file = await sparse();
    expect(file.extent(256 << 10, 1 << 20)).to.deep.equal({ data: true, length: 128 << 10 });
    expect(file.extent(256 << 10, 4096)).to.deep.equal({ data: true, length: 4096 });
    await file.close();
  });

  it('the tail after the last data, and past EOF, is a hole', async () => {
    const file = await sparse();
    expect(file.extent(512 << 10, 512 << 10)).to.deep.equal({ data: false, length: 512 << 10 });
    expect(file.extent(2 << 20, 4096)).to.deep.equal({ data: false, length: 4096 });
    await file.close();
  });
});

describe('NodeImageFile.close: drains the thread pool first', function () {
  this.timeout(30000);
  const tmp = useTempDir('vblk-close-');
  const CHUNK = 64 * 1024;
  const COUNT = 64;

  it('writes still in the pool complete into their own file, not into the file that reuses the descriptor', async () => {
    const a = await NodeImageFile.open(tmp.file('a.img'), { writable: true, create: true, truncate: true, syncFirst: false });
    const writes = Array.from({ length: COUNT }, (_, i) => a.write(pattern(CHUNK, i + 1), i * CHUNK));
    const closed = a.close();
    await closed;
    // The kernel hands out the lowest free descriptor: this file gets a's number if a is closed.
    fs.writeFileSync(tmp.file('b.img'), Buffer.alloc(COUNT * CHUNK));
    const b = await NodeImageFile.open(tmp.file('b.img'), { writable: true, syncFirst: false });
    const outcomes = await Promise.allSettled(writes);
    await b.close();
    expect(outcomes.filter((o) => o.status === 'rejected'), 'writes that failed').to.deep.equal([]);
    const bytesA = fs.readFileSync(tmp.file('a.img'));
    for (let i = 0; i < COUNT; i++) expect(bytesA.subarray(i * CHUNK, (i + 1) * CHUNK).equals(pattern(CHUNK, i + 1)), `chunk ${i} of a`).to.equal(true);
    expect(fs.readFileSync(tmp.file('b.img')).equals(Buffer.alloc(COUNT * CHUNK)), 'b received stray writes').to.equal(true);
  });

  it('close resolves only after every read still in the pool has resolved', async () => {
    fs.writeFileSync(tmp.file('r.img'), pattern(COUNT * CHUNK, 7));
    const f = await NodeImageFile.open(tmp.file('r.img'), { writable: false, syncFirst: false });
    const order: string[] = [];
    const reads = Array.from({ length: COUNT }, (_, i) => {
      const buf = Buffer.alloc(CHUNK);
      return f.read(buf, i * CHUNK).then((n) => {
        order.push('read');
        return { n, ok: buf.equals(pattern(COUNT * CHUNK, 7).subarray(i * CHUNK, (i + 1) * CHUNK)) };
      });
    });
    await f.close().then(() => order.push('close'));
    const results = await Promise.all(reads);
    expect(order.indexOf('close')).to.equal(COUNT);
    expect(results.every((r) => r.n === CHUNK && r.ok)).to.equal(true);
  });

  it('an operation started after close() began is refused with E_DISK_CLOSED', async () => {
    const f = await NodeImageFile.open(tmp.file('late.img'), { writable: true, create: true, truncate: true, syncFirst: false });
    const closed = f.close();
    const late = await rejectionOf(f.write(Buffer.alloc(512), 0));
    await closed;
    expect(isVblkError(late, 'E_DISK_CLOSED'), String(late)).to.equal(true);
  });

  it('a read that fs refuses outright (position past 2^53) rejects, and close still resolves', async () => {
    fs.writeFileSync(tmp.file('far.img'), Buffer.alloc(512));
    const f = await NodeImageFile.open(tmp.file('far.img'), { writable: false, syncFirst: false });
    expect(await rejectionOf(f.read(Buffer.alloc(512), 2 ** 60))).to.be.instanceOf(Error);
    await f.close();
  });

  it('close is idempotent: a second call gets the same outcome', async () => {
    const f = await NodeImageFile.open(tmp.file('twice.img'), { writable: true, create: true, truncate: true });
    const first = f.close();
    expect(f.close()).to.equal(first);
    await first;
  });
});
