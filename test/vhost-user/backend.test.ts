import { expect } from 'chai';
import { FakeFrontEnd, GUEST_BASE, USER_BASE, dummyFd, isOpen, replyU64 } from './helpers';
import { OFFERED_PROTOCOL_FEATURES } from '../../src/transport/vhost-user/backend';
import { decodeConfig, encodeConfig, encodeMemTable, encodeU64, encodeVringAddr, encodeVringState } from '../../src/transport/vhost-user/codec';
import { PROTOCOL_F, VHOST_USER, VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/transport/vhost-user/protocol';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../../src/virtio/blk-config';

function replyConfig(r: { reply?: Buffer }): Buffer {
  if (!r.reply) throw new Error('no reply');
  return decodeConfig({ request: VHOST_USER.GET_CONFIG, flags: 1, payload: r.reply.subarray(12), fds: [] }).data;
}

describe('vhost-user back-end state machine', () => {
  let fe: FakeFrontEnd;
  afterEach(async () => {
    await fe.dispose();
  });

  describe('negotiation', () => {
    beforeEach(() => {
      fe = new FakeFrontEnd({ dev: { numQueues: 2 } });
    });

    it('GET_FEATURES offers the device features plus VHOST_USER_F_PROTOCOL_FEATURES', async () => {
      const f = replyU64(await fe.send(VHOST_USER.GET_FEATURES));
      expect(f).to.equal(fe.dev.deviceFeatures | (1n << VHOST_USER_F_PROTOCOL_FEATURES));
    });

    it('GET_PROTOCOL_FEATURES offers MQ, REPLY_ACK, CONFIG and RESET_DEVICE', async () => {
      const f = replyU64(await fe.send(VHOST_USER.GET_PROTOCOL_FEATURES));
      expect(f).to.equal(OFFERED_PROTOCOL_FEATURES);
      for (const b of [PROTOCOL_F.MQ, PROTOCOL_F.REPLY_ACK, PROTOCOL_F.CONFIG]) expect(f & (1n << b)).to.not.equal(0n);
    });

    it('GET_QUEUE_NUM reports the device queue count', async () => {
      expect(replyU64(await fe.send(VHOST_USER.GET_QUEUE_NUM))).to.equal(2n);
    });

    it('acks with 0 when REPLY_ACK is negotiated and NEED_REPLY is set, and stays silent otherwise', async () => {
      expect((await fe.send(VHOST_USER.SET_OWNER, undefined, { needReply: true })).reply).to.equal(undefined);
      await fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64(1n << PROTOCOL_F.REPLY_ACK));
      expect(replyU64(await fe.send(VHOST_USER.SET_OWNER, undefined, { needReply: true }))).to.equal(0n);
      expect((await fe.send(VHOST_USER.SET_OWNER)).reply).to.equal(undefined);
    });

    it('SET_FEATURES refuses bits that were not offered', async () => {
      await fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64(1n << PROTOCOL_F.REPLY_ACK));
      const r = await fe.send(VHOST_USER.SET_FEATURES, encodeU64(fe.dev.deviceFeatures | (1n << 60n)), { needReply: true });
      expect(replyU64(r)).to.equal(1n);
      expect(fe.logs).to.have.length(1);
      expect(fe.logs[0]).to.match(/SET_FEATURES failed: Cannot set features: bits 0x1000000000000000 were not offered/);
    });

    it('GET_CONFIG returns the virtio-blk config space (capacity first)', async () => {
      const r = await fe.send(VHOST_USER.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: Buffer.alloc(0x60) }));
      const cfg = replyConfig(r);
      expect(cfg).to.have.length(0x60);
      expect(cfg.readBigUInt64LE(0)).to.equal(BigInt((1 << 20) / 512));
      expect(cfg.readUInt16LE(0x22)).to.equal(2); // num_queues
    });

    it('SET_CONFIG changes the writeback field once CONFIG_WCE is negotiated', async () => {
      await fe.send(VHOST_USER.SET_FEATURES, encodeU64(fe.dev.deviceFeatures));
      expect(fe.dev.writeback, 'writeback before SET_CONFIG').to.equal(1);
      await fe.send(VHOST_USER.SET_CONFIG, encodeConfig({ offset: 0x20, flags: 0, data: Buffer.from([0]) }));
      expect(fe.dev.writeback).to.equal(0);
      const cfg = replyConfig(await fe.send(VHOST_USER.GET_CONFIG, encodeConfig({ offset: 0x20, flags: 0, data: Buffer.alloc(1) })));
      expect(cfg[0]).to.equal(0);
    });
  });

  describe('data path', () => {
    beforeEach(() => {
      fe = new FakeFrontEnd();
    });

    it('runs a write then a read through rings given as front-end user addresses', async () => {
      const { kick, call } = await fe.start();
      const data = Buffer.alloc(4096, 0x5a);
      const w = fe.drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 8, data });
      fe.kick(kick[0] as number);
      await fe.waitUsed(0, 1);
      expect(fe.mem.readU8(w.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
      expect(fe.disk.priv.data.subarray(8 * 512, 8 * 512 + 4096).equals(data)).to.equal(true);
      const r = fe.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 8, readLen: 4096 });
      fe.kick(kick[0] as number);
      await fe.waitUsed(0, 2);
      expect(fe.mem.read(r.dataAddr, 4096).equals(data)).to.equal(true);
      expect(FakeFrontEnd.signals(call[0] as number)).to.be.greaterThan(0);
    });

    it('GET_VRING_BASE waits for in-flight requests and returns the next avail index', async () => {
      await fe.dispose();
      fe = new FakeFrontEnd({ disk: { maxDelayTurns: 20, random: () => 0.99 } });
      const { kick } = await fe.start();
      const reqs = [0, 1, 2].map((i) => fe.drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: i, data: Buffer.alloc(512, i + 1) }));
      fe.kick(kick[0] as number);
      const r = await fe.send(VHOST_USER.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
      expect(r.reply?.readUInt32LE(12)).to.equal(0);
      expect(r.reply?.readUInt32LE(16)).to.equal(3);
      // Every request completed before the reply: used idx caught up, statuses written.
      expect(fe.queue(0).usedIdx).to.equal(3);
      for (const q of reqs) expect(fe.mem.readU8(q.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
      expect(fe.backend.isRunning(0)).to.equal(false);
      expect(isOpen(kick[0] as number)).to.equal(false);
    });

    it('SET_VRING_BASE resumes at the given avail index', async () => {
      // The driver already published (and the previous back-end consumed) 5 requests.
      const q = fe.queue(0);
      q.setAvailIdx(5);
      fe.mem.writeU16(q.usedRing + 2, 5);
      const { kick } = await fe.start({ base: 5 });
      // MockVirtqueue numbers its ring from its own idx; push a request at slot 5.
      const s = fe.drv.submit(0, { type: VIRTIO_BLK_T.IN, sector: 0, readLen: 512 });
      fe.kick(kick[0] as number);
      await fe.waitUsed(0, 6);
      expect(fe.mem.readU8(s.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
    });

    it('does not process a ring before SET_VRING_ENABLE when protocol features were negotiated', async () => {
      await fe.send(VHOST_USER.SET_FEATURES, encodeU64(fe.dev.deviceFeatures | (1n << VHOST_USER_F_PROTOCOL_FEATURES)));
      await fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable(fe.oneRegion()), { fds: [dummyFd()] });
      const q = fe.queue(0);
      await fe.send(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: q.size }));
      await fe.send(VHOST_USER.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, desc: fe.user(q.descTable), used: fe.user(q.usedRing), avail: fe.user(q.availRing), log: 0n }));
      const k = dummyFd();
      await fe.send(VHOST_USER.SET_VRING_KICK, encodeU64(0n), { fds: [k] });
      expect(fe.backend.isRunning(0)).to.equal(false);
      await fe.send(VHOST_USER.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
      expect(fe.backend.isRunning(0)).to.equal(true);
    });

    it('keeps a running ring working across a new SET_MEM_TABLE', async () => {
      const { kick } = await fe.start();
      await fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable(fe.oneRegion()), { fds: [dummyFd()] });
      expect(fe.unmapped).to.equal(1);
      expect(fe.backend.isRunning(0)).to.equal(true);
      const s = fe.drv.submit(0, { type: VIRTIO_BLK_T.OUT, sector: 1, data: Buffer.alloc(512, 7) });
      fe.kick(kick[0] as number);
      await fe.waitUsed(0, 1);
      expect(fe.mem.readU8(s.statusAddr)).to.equal(VIRTIO_BLK_S.OK);
    });

    it('ring corruption (avail idx jumps past the ring size): one log line and the err fd is signalled', async () => {
      const { kick } = await fe.start();
      const err = fe.callFd(); // a temp file: each signal appends 8 bytes
      await fe.send(VHOST_USER.SET_VRING_ERR, encodeU64(0n), { fds: [err] });
      fe.queue(0).setAvailIdx(100); // 100 new entries in a 16-entry ring
      fe.kick(kick[0] as number);
      expect(fe.dev.needsReset).to.equal(true);
      expect(fe.logs).to.deep.equal(['vhost-user: device needs reset (ring corruption); signalling the error fds']);
      expect(FakeFrontEnd.signals(err)).to.equal(1);
    });

    it('shutdown drains, unmaps and closes every descriptor it kept', async () => {
      const { kick, call } = await fe.start();
      await fe.backend.shutdown();
      expect(fe.unmapped).to.equal(fe.mapped);
      for (const fd of [...kick, ...call]) expect(isOpen(fd)).to.equal(false);
      expect(fe.kicks.size).to.equal(0);
    });
  });

  describe('bad input: one log line, an error ack, no crash', () => {
    beforeEach(async () => {
      fe = new FakeFrontEnd();
      await fe.send(VHOST_USER.SET_PROTOCOL_FEATURES, encodeU64(1n << PROTOCOL_F.REPLY_ACK));
    });

    async function expectFailure(request: number, payload: Buffer, re: RegExp, fds: number[] = []): Promise<void> {
      const before = fe.logs.length;
      const r = await fe.send(request, payload, { needReply: true, fds });
      expect(replyU64(r), 'ack value').to.equal(1n);
      expect(fe.logs.length - before).to.equal(1);
      expect(fe.logs[fe.logs.length - 1]).to.match(re);
      for (const fd of fds) expect(isOpen(fd), `fd ${fd} closed`).to.equal(false);
    }

    it('an unknown request', async () => {
      await expectFailure(77, Buffer.alloc(0), /request 77 failed: .*not supported/);
    });

    it('a known request this back-end does not implement (SET_LOG_BASE: LOG_SHMFD was never offered), closing its fd', async () => {
      await expectFailure(VHOST_USER.SET_LOG_BASE, encodeU64(0n), /SET_LOG_BASE failed/, [dummyFd()]);
    });

    it('overlapping memory regions (guest addresses)', async () => {
      const regions = [
        { guestAddr: 0x10_0000n, size: 0x10_0000n, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n },
        { guestAddr: 0x18_0000n, size: 0x1_0000n, userAddr: 0x7f00_1000_0000n, mmapOffset: 0n },
      ];
      await expectFailure(VHOST_USER.SET_MEM_TABLE, encodeMemTable(regions), /region 0 \(guest 0x100000\+0x100000\) overlaps region 1 at 0x180000/, [dummyFd(), dummyFd()]);
      expect(fe.mapped).to.equal(0);
    });

    it('overlapping memory regions (user addresses)', async () => {
      const regions = [
        { guestAddr: 0x10_0000n, size: 0x1000n, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n },
        { guestAddr: 0x20_0000n, size: 0x1000n, userAddr: 0x7f00_0000_0800n, mmapOffset: 0x1000n },
      ];
      await expectFailure(VHOST_USER.SET_MEM_TABLE, encodeMemTable(regions), /overlaps region 1/, [dummyFd(), dummyFd()]);
    });

    it('an unmappable region leaves nothing mapped', async () => {
      const regions = [
        { guestAddr: BigInt(GUEST_BASE), size: 0x1000n, userAddr: BigInt(USER_BASE), mmapOffset: 0n },
        { guestAddr: 0x1_0000_0000n, size: BigInt(fe.ram.length), userAddr: 0x7f10_0000_0000n, mmapOffset: 0x1000n },
      ];
      await expectFailure(VHOST_USER.SET_MEM_TABLE, encodeMemTable(regions), /region 1 \(guest 0x100000000\+0x200000\) cannot be mapped/, [dummyFd(), dummyFd()]);
      expect(fe.mapped).to.equal(1);
      expect(fe.unmapped).to.equal(1);
      expect(fe.backend.memoryTable).to.equal(undefined);
    });

    it('a memory table whose descriptor count does not match', async () => {
      await expectFailure(VHOST_USER.SET_MEM_TABLE, encodeMemTable(fe.oneRegion()), /1 regions but 0 file descriptors/);
    });

    it('ring sizes that are 0, not a power of two or above the maximum', async () => {
      await expectFailure(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: 0 }), /0 is not a power of two in 1\.\.16/);
      await expectFailure(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: 12 }), /12 is not a power of two/);
      await expectFailure(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: 32 }), /32 is not a power of two in 1\.\.16/);
    });

    it('a vring index the device does not have, in every per-ring request', async () => {
      const missing = /vring 5 does not exist \(the device has 1\)/;
      await expectFailure(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 5, num: 8 }), missing);
      await expectFailure(VHOST_USER.SET_VRING_BASE, encodeVringState({ index: 5, num: 0 }), missing);
      await expectFailure(VHOST_USER.SET_VRING_ENABLE, encodeVringState({ index: 5, num: 1 }), missing);
      await expectFailure(VHOST_USER.SET_VRING_CALL, encodeU64(5n), missing, [dummyFd()]);
      await expectFailure(VHOST_USER.SET_VRING_KICK, encodeU64(5n), missing, [dummyFd()]);
    });

    it('a vring base above 65535 (not a split-ring index)', async () => {
      await expectFailure(VHOST_USER.SET_VRING_BASE, encodeVringState({ index: 0, num: 0x1_0000 }), /65536 is not a split-ring index/);
    });

    it('a SET_VRING_NUM that makes already-checked ring addresses overflow the memory table', async () => {
      await fe.send(VHOST_USER.SET_FEATURES, encodeU64(fe.dev.deviceFeatures));
      await fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable(fe.oneRegion()), { fds: [dummyFd()] });
      const q = fe.queue(0);
      // A used ring 16 bytes before the end of RAM: room for 1 entry (6 + 8 bytes), not for 16.
      const used = fe.user(GUEST_BASE + fe.ram.length - 16);
      const addr = encodeVringAddr({ index: 0, flags: 0, desc: fe.user(q.descTable), used, avail: fe.user(q.availRing), log: 0n });
      expect(replyU64(await fe.send(VHOST_USER.SET_VRING_ADDR, addr, { needReply: true }))).to.equal(0n);
      await expectFailure(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: 16 }), /vring 0 used ring: user address .* is outside the memory table/);
      await fe.send(VHOST_USER.SET_VRING_KICK, encodeU64(0n), { fds: [dummyFd()] });
      expect(fe.backend.isRunning(0), 'a ring without a valid size does not start').to.equal(false);
    });

    it('ring addresses outside the memory table', async () => {
      await fe.send(VHOST_USER.SET_MEM_TABLE, encodeMemTable(fe.oneRegion()), { fds: [dummyFd()] });
      await fe.send(VHOST_USER.SET_VRING_NUM, encodeVringState({ index: 0, num: 16 }));
      const q = fe.queue(0);
      const bad = encodeVringAddr({ index: 0, flags: 0, desc: 0x1000n, used: fe.user(q.usedRing), avail: fe.user(q.availRing), log: 0n });
      await expectFailure(VHOST_USER.SET_VRING_ADDR, bad, /vring 0 descriptor table: user address 0x1000\+0x100 is outside the memory table/);
      const end = fe.user(GUEST_BASE + fe.ram.length - 8);
      const bad2 = encodeVringAddr({ index: 0, flags: 0, desc: fe.user(q.descTable), used: end, avail: fe.user(q.availRing), log: 0n });
      await expectFailure(VHOST_USER.SET_VRING_ADDR, bad2, /vring 0 used ring: user address .* is outside the memory table/);
    });

    it('ring addresses before any memory table', async () => {
      await expectFailure(VHOST_USER.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, desc: 0n, used: 0n, avail: 0n, log: 0n }), /no memory table yet/);
    });

    it('a kick message without its descriptor', async () => {
      await expectFailure(VHOST_USER.SET_VRING_KICK, encodeU64(0n), /expected 1 file descriptor, got 0/);
    });

    it('a kick fd that cannot be watched is closed, not installed, and the ring does not start', async () => {
      fe.failWatch = true;
      await expectFailure(VHOST_USER.SET_VRING_KICK, encodeU64(0n), /Cannot watch the kick fd of vring 0: EMFILE/, [dummyFd()]);
      expect(fe.kicks.size).to.equal(0);
      expect(fe.backend.isRunning(0)).to.equal(false);
    });

    it('a truncated payload', async () => {
      await expectFailure(VHOST_USER.SET_VRING_NUM, Buffer.alloc(3), /vring state needs 8 payload bytes, got 3/);
    });

    it('a failing request whose reply is mandatory closes the connection instead of hanging the front-end', async () => {
      const r = await fe.send(VHOST_USER.GET_VRING_BASE, encodeVringState({ index: 9, num: 0 }));
      expect(r.close).to.equal(true);
      expect(r.reply).to.equal(undefined);
      expect(fe.logs[0]).to.match(/GET_VRING_BASE failed: .*vring 9 does not exist/);
    });
  });
});
