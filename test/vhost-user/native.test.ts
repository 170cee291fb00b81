import { expect } from 'chai';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { EFD_NONBLOCK, eventfd } from '../../src/native/libc';
import { Poller, acceptConnection, connectUnix, listenUnix, receiveWithFds, sendWithFds } from '../../src/native/vhost';
import { until } from './socket-client';
import { requireNativeLibrary } from '../helpers/skip';

function signal(fd: number, n = 1n): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(n);
  fs.writeSync(fd, b);
}

describe('native vhost shim (SCM_RIGHTS, poller)', () => {
  let dir: string;
  before(function () {
    requireNativeLibrary(this);
  });
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-vun-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('passes descriptors with SCM_RIGHTS; the received fd refers to the same eventfd', () => {
    const sock = path.join(dir, 's');
    const l = listenUnix(sock);
    const c = connectUnix(sock);
    const s = acceptConnection(l) as number;
    const e = eventfd(0, EFD_NONBLOCK);
    sendWithFds(c, Buffer.from('hi'), [e]);
    const buf = Buffer.alloc(16);
    const r = receiveWithFds(s, buf);
    expect(r?.bytes).to.equal(2);
    expect(r?.fds).to.have.length(1);
    const got = r?.fds[0] as number;
    expect(got).to.not.equal(e);
    signal(got, 5n);
    const out = Buffer.alloc(8);
    fs.readSync(e, out, 0, 8, null);
    expect(out.readBigUInt64LE(0)).to.equal(5n);
    expect(receiveWithFds(s, buf)).to.equal(undefined); // nothing more: EAGAIN, not a block
    for (const fd of [l, c, s, e, got]) fs.closeSync(fd);
  });

  it('accept on an idle listening socket returns undefined instead of blocking', () => {
    const l = listenUnix(path.join(dir, 'idle'));
    expect(acceptConnection(l)).to.equal(undefined);
    fs.closeSync(l);
  });

  it('the poller drains an eventfd and reports one token per wake-up; after remove it is silent', async () => {
    const tokens: number[] = [];
    const p = new Poller((t) => tokens.push(t));
    const e = eventfd(0, EFD_NONBLOCK);
    try {
      p.add(e, 7, 'eventfd');
      signal(e, 3n);
      await until(() => tokens.length === 1, 'a token');
      await new Promise((r) => setTimeout(r, 20));
      expect(tokens).to.deep.equal([7]); // counter drained: level-triggered epoll stays quiet
      signal(e);
      await until(() => tokens.length === 2, 'a second token');
      p.remove(e);
      signal(e);
      await new Promise((r) => setTimeout(r, 30));
      expect(tokens).to.deep.equal([7, 7]);
    } finally {
      p.close();
      fs.closeSync(e);
    }
  });

  it('a oneshot registration reports once until re-armed', async () => {
    const tokens: number[] = [];
    const p = new Poller((t) => tokens.push(t));
    const sock = path.join(dir, 'o');
    const l = listenUnix(sock);
    const c = connectUnix(sock);
    const s = acceptConnection(l) as number;
    try {
      p.add(s, 9, 'oneshot');
      sendWithFds(c, Buffer.from('a'));
      await until(() => tokens.length === 1, 'readiness');
      sendWithFds(c, Buffer.from('b'));
      await new Promise((r) => setTimeout(r, 30));
      expect(tokens).to.deep.equal([9]);
      receiveWithFds(s, Buffer.alloc(8));
      sendWithFds(c, Buffer.from('c'));
      p.rearm(s, 9);
      await until(() => tokens.length === 2, 'readiness after re-arm');
    } finally {
      p.close();
      for (const fd of [l, c, s]) fs.closeSync(fd);
    }
  });

  it('a oneshot registration re-armed for writability reports a socket that can take more bytes', async () => {
    const tokens: number[] = [];
    const p = new Poller((t) => tokens.push(t));
    const sock = path.join(dir, 'w');
    const l = listenUnix(sock);
    const c = connectUnix(sock);
    const s = acceptConnection(l) as number;
    try {
      p.add(s, 11, 'oneshot');
      p.rearm(s, 11, { writable: true }); // nothing to read, but an empty send buffer: writable now
      await until(() => tokens.length === 1, 'writability');
      expect(tokens).to.deep.equal([11]);
    } finally {
      p.close();
      for (const fd of [l, c, s]) fs.closeSync(fd);
    }
  });

  it('re-arming for neither reading nor writing is refused (a registration that could never report)', () => {
    const p = new Poller(() => undefined);
    try {
      expect(() => p.rearm(0, 1, {})).to.throw(RangeError, /readable, writable or both/);
    } finally {
      p.close();
    }
  });
});
