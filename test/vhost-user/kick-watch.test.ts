/**
 * Kicks reach vblk serve through public Node APIs only: a request served through a kick eventfd
 * prints no DeprecationWarning, even with --pending-deprecation (which makes Node warn about
 * process.binding and the other internals it will remove).
 */
import { expect } from 'chai';
import * as child from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { GuestMemory } from '../../src/memory/guest-memory';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../../src/virtio/blk-config';
import { EFD_NONBLOCK, eventfd, mmap, munmap } from '../../src/native/libc';
import { encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from '../../src/transport/vhost-user/codec';
import { FLAGS, PROTOCOL_F, VHOST_USER, VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/transport/vhost-user/protocol';
import { SocketFrontEnd, until } from './socket-client';
import { useTempDir } from '../helpers/qemu';
import { requireNativeLibrary } from '../helpers/skip';

const CLI = path.resolve(__dirname, '..', '..', 'src', 'cli', 'main.js');
const GUEST_BASE = 0x10_0000;
const USER_BASE = 0x7f00_0000_0000n;
const RAM = 2 << 20;

describe('vhost-user kick watching', function () {
  this.timeout(30000);
  const tmp = useTempDir('vblk-kick-');
  before(function () {
    requireNativeLibrary(this);
  });

  it('serves a request through a kick eventfd without a DeprecationWarning under --pending-deprecation', async () => {
    const image = tmp.file('disk.raw');
    fs.writeFileSync(image, Buffer.alloc(1 << 20));
    const sock = tmp.file('vu.sock');
    const proc = child.spawn(process.execPath, ['--pending-deprecation', CLI, 'serve', '--socket', sock, image], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    proc.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => proc.once('exit', resolve));

    const ramFd = fs.openSync(tmp.file('ram'), 'w+');
    fs.ftruncateSync(ramFd, RAM);
    const ram = mmap({ length: RAM, fd: ramFd });
    const kick = eventfd(0, EFD_NONBLOCK);
    const call = eventfd(0, EFD_NONBLOCK);
    let fe: SocketFrontEnd | undefined;
    let code: number | null = null;
    try {
      await until(() => stdout.includes('vblk serve: serving'), 'vblk serve to listen', 10000);
      fe = new SocketFrontEnd(sock);
      const mem = new GuestMemory([{ guestAddr: GUEST_BASE, buffer: ram.buffer }]);
      // The driver side lays out rings and requests in the shared RAM; its device is never used.
      const drv = new MockBlkDriver(new VirtioBlkDevice(createMemoryDisk({ size: 1 << 20, path: '/images/layout.img' }), { queueSize: 256 }), mem);
      const q = drv.queues[0];
      if (q === undefined) throw new Error('no queue');
      const user = (gpa: number): bigint => BigInt(gpa - GUEST_BASE) + USER_BASE;
      const features = await fe.requestU64(VHOST_USER.GET_FEATURES);
      fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64(1n << PROTOCOL_F.REPLY_ACK));
      const conn = fe;
      const ack = async (request: number, payload: Buffer, fds: number[] = []): Promise<void> => {
        conn.send(request, payload, { needReply: true, fds });
        const r = await conn.reply();
        expect(r.flags & FLAGS.REPLY).to.not.equal(0);
        expect(r.payload.readBigUInt64LE(0), `ack of request ${request}: ${stderr}`).to.equal(0n);
      };
      await ack(VHOST_USER.SET_FEATURES, encodeU64(features | (1n << VHOST_USER_F_PROTOCOL_FEATURES)));
      await ack(VHOST_USER.SET_MEM_TABLE, encodeMemTable([{ guestAddr: BigInt(GUEST_BASE), size: BigInt(RAM), userAddr: USER_BASE, mmapOffset: 0n }]), [ramFd]);
      await ack(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: q.size }));
      await ack(VHOST_USER.SET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
      await ack(VHOST_USER.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, desc: user(q.descTable), used: user(q.usedRing), avail: user(q.availRing), log: 0n }));
      await ack(VHOST_USER.SET_VRING_KICK, encodeU64(0n), [kick]);
      await ack(VHOST_USER.SET_VRING_CALL, encodeU64(0n), [call]);
      await ack(VHOST_USER.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));

      const r = drv.submit(0, { type: VIRTIO_BLK_T.GET_ID, sector: 0, readLen: 20 });
      const one = Buffer.alloc(8);
      one.writeBigUInt64LE(1n);
      fs.writeSync(kick, one);
      await until(() => q.usedIdx === 1, 'the request to complete through the kick', 10000);
      expect(mem.readU8(r.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
    } finally {
      fe?.close();
      proc.kill('SIGTERM');
      code = await exited;
      munmap(ram);
      for (const fd of [ramFd, kick, call]) fs.closeSync(fd);
    }
    expect(code, stderr).to.equal(0);
    expect(stderr).to.not.match(/DeprecationWarning/);
  });
});
