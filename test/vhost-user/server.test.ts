import { expect } from 'chai';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { GuestMemory } from '../../src/memory/guest-memory';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import type { MemoryDiskOptions } from '../../src/disk/memory-disk';
import { VirtioBlkDevice } from '../../src/virtio/blk';
import { MockBlkDriver } from '../../src/virtio/mock-driver';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../../src/virtio/blk-config';
import { EFD_NONBLOCK, MFD_ALLOW_SEALING, eventfd, memfdCreate, mmap, munmap } from '../../src/native/libc';
import type { Mapping } from '../../src/native/libc';
import { VhostUserServer } from '../../src/transport/vhost-user/server';
import { encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from '../../src/transport/vhost-user/codec';
import { FLAGS, MAX_QUEUED_MESSAGES, PROTOCOL_F, VHOST_USER, VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/transport/vhost-user/protocol';
import { serveImage } from '../../src/cli/commands/serve';
import { SocketFrontEnd, until } from './socket-client';
import { requireNativeLibrary } from '../helpers/skip';

const GUEST_BASE = 0x10_0000;
const USER_BASE = 0x7f00_0000_0000n;
const RAM = 2 << 20;

function readCounter(fd: number): bigint {
  const b = Buffer.alloc(8);
  try {
    fs.readSync(fd, b, 0, 8, null);
  } catch {
    return 0n; // EAGAIN: nothing signalled
  }
  return b.readBigUInt64LE(0);
}

describe('vhost-user server over a Unix socket', function () {
  this.timeout(20000);
  let dir: string;
  let sock: string;
  let ramFd: number;
  let ram: Mapping;
  let mem: GuestMemory;
  let server: VhostUserServer | undefined;
  let logs: string[];
  let flushes: number;

  before(function () {
    requireNativeLibrary(this);
  });

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-vus-'));
    sock = path.join(dir, 'vu.sock');
    ramFd = fs.openSync(path.join(dir, 'ram'), 'w+');
    fs.ftruncateSync(ramFd, RAM);
    ram = mmap({ length: RAM, fd: ramFd });
    mem = new GuestMemory([{ guestAddr: GUEST_BASE, buffer: ram.buffer }]);
    logs = [];
    flushes = 0;
  });

  afterEach(async () => {
    await server?.close();
    server = undefined;
    munmap(ram);
    fs.closeSync(ramFd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function startServer(disk: Partial<MemoryDiskOptions> = {}): Promise<{ dev: VirtioBlkDevice; data: Buffer }> {
    const d = createMemoryDisk({ size: 1 << 20, path: '/images/vus.img', ...disk });
    const dev = new VirtioBlkDevice(d, { queueSize: 16 });
    server = await VhostUserServer.listen({
      socketPath: sock,
      device: dev,
      log: (l) => logs.push(l),
      afterSession: async () => {
        flushes++;
        await d.flush();
      },
    });
    return { dev, data: d.priv.data };
  }

  /** QEMU's start sequence over the socket; returns the driver and the kick/call eventfds. */
  async function bringUp(fe: SocketFrontEnd, dev: VirtioBlkDevice): Promise<{ drv: MockBlkDriver; kick: number; call: number }> {
    const features = await fe.requestU64(VHOST_USER.GET_FEATURES);
    expect(features & (1n << VHOST_USER_F_PROTOCOL_FEATURES)).to.not.equal(0n);
    await fe.requestU64(VHOST_USER.GET_PROTOCOL_FEATURES);
    fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64((1n << PROTOCOL_F.REPLY_ACK) | (1n << PROTOCOL_F.CONFIG)));
    fe.send(VHOST_USER.SET_OWNER);
    const ack = async (request: number, payload: Buffer, fds: number[] = []): Promise<void> => {
      fe.send(request, payload, { needReply: true, fds });
      const r = await fe.reply();
      expect(r.request).to.equal(request);
      expect(r.flags & FLAGS.REPLY).to.not.equal(0);
      expect(r.payload.readBigUInt64LE(0), `ack of request ${request}: ${logs.join(' | ')}`).to.equal(0n);
    };
    await ack(VHOST_USER.SET_FEATURES, encodeU64(dev.deviceFeatures | (1n << VHOST_USER_F_PROTOCOL_FEATURES)));
    await ack(VHOST_USER.SET_MEM_TABLE, encodeMemTable([{ guestAddr: BigInt(GUEST_BASE), size: BigInt(RAM), userAddr: USER_BASE, mmapOffset: 0n }]), [ramFd]);
    const drv = new MockBlkDriver(dev, mem);
    const q = drv.queues[0];
    if (!q) throw new Error('no queue');
    const user = (gpa: number): bigint => BigInt(gpa - GUEST_BASE) + USER_BASE;
    await ack(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: q.size }));
    await ack(VHOST_USER.SET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
    await ack(VHOST_USER.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, desc: user(q.descTable), used: user(q.usedRing), avail: user(q.availRing), log: 0n }));
    const kick = eventfd(0, EFD_NONBLOCK);
    const call = eventfd(0, EFD_NONBLOCK);
    await ack(VHOST_USER.SET_VRING_KICK, encodeU64(0n), [kick]);
    await ack(VHOST_USER.SET_VRING_CALL, encodeU64(0n), [call]);
    await ack(VHOST_USER.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
    return { drv, kick, call };
  }

  function kick(fd: number): void {
    const one = Buffer.alloc(8);
    one.writeBigUInt64LE(1n);
    fs.writeSync(fd, one);
  }

  it('serves requests: shared memory from the passed fd, kicks and calls through eventfds', async () => {
    const { dev, data } = await startServer();
    const fe = new SocketFrontEnd(sock);
    const { drv, kick: k, call } = await bringUp(fe, dev);
    const payload = Buffer.alloc(8192, 0xa5);
    const w = drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 16, data: payload });
    kick(k);
    await until(() => drv.queues[0]?.usedIdx === 1, 'the write to complete');
    expect(mem.readU8(w.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
    expect(data.subarray(16 * 512, 16 * 512 + 8192).equals(payload)).to.equal(true);
    await until(() => readCounter(call) > 0n, 'a call signal');
    const r = drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 16, readLen: 8192 });
    kick(k);
    await until(() => drv.queues[0]?.usedIdx === 2, 'the read to complete');
    expect(mem.read(r.dataAddr, 8192).equals(payload)).to.equal(true);
    fe.close();
    for (const fd of [k, call]) fs.closeSync(fd);
    await until(() => !server?.connected, 'the session to end');
    expect(flushes).to.equal(1);
    expect(logs).to.deep.equal([]);
  });

  it('a front-end that disconnects with requests in flight: they complete, the disk is flushed, the next front-end is served', async () => {
    const { dev, data } = await startServer({ maxDelayTurns: 2000, random: () => 0.99 });
    const fe = new SocketFrontEnd(sock);
    const { drv, kick: k, call } = await bringUp(fe, dev);
    const reqs = [0, 1, 2, 3, 4].map((i) => drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 64 + 8 * i, data: Buffer.alloc(4096, 0x10 + i) }));
    kick(k);
    await until(() => dev.inFlight(0) > 0, 'requests to be in flight');
    fe.close(); // the front-end dies mid-request
    await until(() => !server?.connected, 'the session to end');
    expect(flushes).to.equal(1);
    // Every request was either completed whole or never started; nothing half-written.
    for (const [i, r] of reqs.entries()) {
      const sector = data.subarray((64 + 8 * i) * 512, (64 + 8 * i) * 512 + 4096);
      const written = sector.every((b) => b === 0x10 + i);
      const untouched = sector.every((b) => b === 0);
      expect(written || untouched, `request ${i} is whole or absent`).to.equal(true);
      if (written) expect(mem.readU8(r.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
    }
    expect(dev.inFlight(0)).to.equal(0);
    expect(logs).to.deep.equal([]);
    for (const fd of [k, call]) fs.closeSync(fd);
    const fe2 = new SocketFrontEnd(sock);
    expect(await fe2.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    expect(server?.sessions).to.equal(2);
    fe2.close();
  });

  it('40 connections that bring rings up and disconnect (some mid-setup) leave no descriptor or mapping behind', async () => {
    const { dev } = await startServer();
    const openFds = (): string[] =>
      fs.readdirSync('/proc/self/fd').flatMap((n) => {
        try {
          return [`${n} -> ${fs.readlinkSync(`/proc/self/fd/${n}`)}`];
        } catch {
          return []; // the fd readdir itself used
        }
      });
    // Mappings of the guest RAM file (the test's own mapping is one of them).
    const ramMaps = (): number => fs.readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.endsWith(path.join(dir, 'ram'))).length;
    // One warm-up session, so lazily created handles (poller pipe, libuv internals) exist before counting.
    const warm = new SocketFrontEnd(sock);
    expect(await warm.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    warm.close();
    await until(() => server?.sessions === 1 && !server.connected, 'the warm-up session to end');
    const fdsBefore = openFds();
    const mapsBefore = ramMaps();
    expect(mapsBefore).to.equal(1);
    for (let i = 0; i < 40; i++) {
      const fe = new SocketFrontEnd(sock);
      if (i % 4 === 3) {
        // Disconnect after the memory table and a kick fd, before the ring runs.
        fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable([{ guestAddr: BigInt(GUEST_BASE), size: BigInt(RAM), userAddr: USER_BASE, mmapOffset: 0n }]), { fds: [ramFd] });
        const k = eventfd(0, EFD_NONBLOCK);
        fe.send(VHOST_USER.SET_VRING_KICK, encodeU64(0n), { fds: [k] });
        fs.closeSync(k);
        expect(await fe.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
      } else {
        const { kick: k, call } = await bringUp(fe, dev);
        const err = eventfd(0, EFD_NONBLOCK);
        fe.send(VHOST_USER.SET_VRING_ERR, encodeU64(0n), { fds: [err] });
        // Replacing the call fd must close the one it replaces.
        const call2 = eventfd(0, EFD_NONBLOCK);
        fe.send(VHOST_USER.SET_VRING_CALL, encodeU64(0n), { fds: [call2] });
        expect(await fe.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
        for (const fd of [k, call, err, call2]) fs.closeSync(fd);
      }
      fe.close();
      await until(() => server?.sessions === i + 2 && !server.connected, `session ${i + 2} to end`);
    }
    expect(openFds()).to.deep.equal(fdsBefore);
    expect(ramMaps()).to.equal(mapsBefore);
    expect(logs).to.deep.equal([]);
  });

  it('a front-end that floods messages behind a slow GET_VRING_BASE: the server stops reading at MAX_QUEUED_MESSAGES', async () => {
    const { dev } = await startServer({ maxDelayTurns: 400_000, random: () => 0.99 });
    const fe = new SocketFrontEnd(sock);
    const { drv, kick: k, call } = await bringUp(fe, dev);
    drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 8, data: Buffer.alloc(4096, 1) });
    kick(k);
    await until(() => dev.inFlight(0) > 0, 'a request in flight');
    fe.send(VHOST_USER.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 })); // waits for the write
    // 1000 SET_OWNER messages of 112 bytes, sent in a few large writes (under the socket buffer).
    const one = Buffer.alloc(112);
    one.writeUInt32LE(VHOST_USER.SET_OWNER, 0);
    one.writeUInt32LE(FLAGS.VERSION, 4);
    one.writeUInt32LE(100, 8);
    for (let i = 0; i < 10; i++) fe.sendRaw(Buffer.concat(Array.from({ length: 100 }, () => one)));
    await until(() => (server?.backlog ?? 0) >= MAX_QUEUED_MESSAGES, 'the backlog to fill');
    await new Promise((r) => setTimeout(r, 50));
    expect(dev.inFlight(0), 'GET_VRING_BASE still waiting').to.equal(1);
    // One 8 KiB read may overshoot the cap by what it holds (73 messages), never more.
    expect(server?.backlog).to.be.at.most(MAX_QUEUED_MESSAGES + Math.ceil(8192 / 112));
    const base = await fe.reply(10_000);
    expect(base.request).to.equal(VHOST_USER.GET_VRING_BASE);
    expect(base.payload.readUInt32LE(4)).to.equal(1);
    // Every flooded message was still handled, in order, and the session goes on.
    expect(await fe.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    expect(server?.backlog).to.equal(0);
    expect(logs).to.deep.equal([]);
    for (const fd of [k, call]) fs.closeSync(fd);
    fe.close();
  });

  it('accept failing for lack of descriptors: one log line, no busy loop, and the connection is served once fds free up', async () => {
    await startServer();
    const fillers: number[] = [];
    let fe: SocketFrontEnd | undefined;
    try {
      // Exhaust this process's descriptors, keeping exactly one for the client's socket.
      for (;;) {
        try {
          fillers.push(fs.openSync('/dev/null', 'r'));
        } catch {
          break;
        }
      }
      fs.closeSync(fillers.pop() as number);
      fe = new SocketFrontEnd(sock); // connects (the kernel queues it); the server cannot accept
      const cpu0 = process.cpuUsage();
      await new Promise((r) => setTimeout(r, 300));
      const cpu = process.cpuUsage(cpu0);
      expect(logs).to.have.length(1);
      expect(logs[0]).to.match(/accept failed \(retrying every 100 ms\): .*EMFILE/);
      expect(server?.sessions).to.equal(0);
      expect((cpu.user + cpu.system) / 1000, 'ms of CPU in 300 ms (a busy loop would use ~300)').to.be.below(150);
    } finally {
      for (const fd of fillers) fs.closeSync(fd);
    }
    expect(await fe.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    expect(server?.sessions).to.equal(1);
    fe.close();
  });

  it('a message cut short by a disconnect: one log line, and the server keeps serving', async () => {
    await startServer();
    const fe = new SocketFrontEnd(sock);
    const whole = Buffer.alloc(12 + 8);
    whole.writeUInt32LE(VHOST_USER.SET_FEATURES, 0);
    whole.writeUInt32LE(FLAGS.VERSION, 4);
    whole.writeUInt32LE(8, 8);
    fe.sendRaw(whole.subarray(0, 15));
    fe.close();
    await until(() => server?.sessions === 1 && !server.connected, 'the session to end');
    expect(logs).to.have.length(1);
    expect(logs[0]).to.match(/disconnected in the middle of a message \(15 bytes of it received\)/);
    const fe2 = new SocketFrontEnd(sock);
    expect(await fe2.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    fe2.close();
  });

  it('an oversized payload closes the connection with one log line', async () => {
    await startServer();
    const fe = new SocketFrontEnd(sock);
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32LE(VHOST_USER.SET_MEM_TABLE, 0);
    hdr.writeUInt32LE(FLAGS.VERSION, 4);
    hdr.writeUInt32LE(1 << 30, 8);
    fe.sendRaw(hdr);
    expect(await fe.closedByServer()).to.equal(true);
    fe.close();
    await until(() => !server?.connected, 'the session to end');
    expect(logs).to.have.length(1);
    expect(logs[0]).to.match(/payload size 1073741824 exceeds 4096/);
  });

  it('an unknown request without NEED_REPLY is logged and the session goes on', async () => {
    await startServer();
    const fe = new SocketFrontEnd(sock);
    fe.send(99, Buffer.alloc(4));
    expect(await fe.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    expect(logs).to.have.length(1);
    expect(logs[0]).to.match(/request 99 failed: .*not supported/);
    fe.close();
  });

  it('a memory fd that cannot be mapped fails SET_MEM_TABLE with an error ack', async () => {
    await startServer();
    const fe = new SocketFrontEnd(sock);
    fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64(1n << PROTOCOL_F.REPLY_ACK));
    const pipeLike = fs.openSync('/dev/null', 'r'); // /dev/null cannot be mapped shared read-write
    fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0n, size: 0x1000n, userAddr: USER_BASE, mmapOffset: 0n }]), { fds: [pipeLike], needReply: true });
    const r = await fe.reply();
    expect(r.payload.readBigUInt64LE(0)).to.equal(1n);
    expect(logs[0]).to.match(/SET_MEM_TABLE failed: .*region 0 .* cannot be mapped from fd/);
    fs.closeSync(pipeLike);
    fe.close();
  });

  it('a memory file shorter than its region is refused (mapping it would SIGBUS the server later)', async () => {
    await startServer();
    const fe = new SocketFrontEnd(sock);
    fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64(1n << PROTOCOL_F.REPLY_ACK));
    fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable([{ guestAddr: BigInt(GUEST_BASE), size: BigInt(2 * RAM), userAddr: USER_BASE, mmapOffset: 0n }]), {
      fds: [ramFd],
      needReply: true,
    });
    const r = await fe.reply();
    expect(r.payload.readBigUInt64LE(0)).to.equal(1n);
    expect(logs).to.have.length(1);
    expect(logs[0]).to.match(/the file has 2097152 bytes, the region needs 4194304/);
    expect(await fe.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    fe.close();
  });

  it('a memfd its owner could still shrink is refused with an error ack, and the session goes on', async () => {
    await startServer();
    const fe = new SocketFrontEnd(sock);
    fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64(1n << PROTOCOL_F.REPLY_ACK));
    const unsealed = memfdCreate('vblk-test-unsealed', MFD_ALLOW_SEALING);
    fs.ftruncateSync(unsealed, RAM);
    fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable([{ guestAddr: BigInt(GUEST_BASE), size: BigInt(RAM), userAddr: USER_BASE, mmapOffset: 0n }]), {
      fds: [unsealed],
      needReply: true,
    });
    const r = await fe.reply();
    fs.closeSync(unsealed);
    expect(r.payload.readBigUInt64LE(0)).to.equal(1n);
    expect(logs).to.have.length(1);
    expect(logs[0]).to.match(/SET_MEM_TABLE failed: .*memfd without F_SEAL_SHRINK/);
    expect(await fe.requestU64(VHOST_USER.GET_QUEUE_NUM)).to.equal(1n);
    fe.close();
  });

  it('serveImage (vblk serve) serves a raw file and stop() flushes, closes and removes the socket', async () => {
    const img = path.join(dir, 'disk.raw');
    fs.writeFileSync(img, Buffer.alloc(1 << 20));
    const s = await serveImage({ image: img, socketPath: sock, log: (l) => logs.push(l) });
    const fe = new SocketFrontEnd(sock);
    const cfg = Buffer.alloc(12 + 8);
    cfg.writeUInt32LE(8, 4);
    fe.send(VHOST_USER.GET_CONFIG, cfg);
    const r = await fe.reply();
    expect(r.payload.readBigUInt64LE(12)).to.equal(2048n); // capacity in sectors
    fe.close();
    await s.stop();
    expect(fs.existsSync(sock)).to.equal(false);
    expect(s.disk.closed).to.equal(true);
  });

  it('--readonly: the device offers VIRTIO_BLK_F_RO', async () => {
    const img = path.join(dir, 'disk.raw');
    fs.writeFileSync(img, Buffer.alloc(1 << 20));
    const s = await serveImage({ image: img, socketPath: sock, readonly: true, log: (l) => logs.push(l) });
    const fe = new SocketFrontEnd(sock);
    const f = await fe.requestU64(VHOST_USER.GET_FEATURES);
    expect(f & (1n << 5n)).to.not.equal(0n);
    fe.close();
    await s.stop();
  });
});
