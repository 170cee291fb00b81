import { expect } from 'chai';
import fc from 'fast-check';
import {
  MessageDecoder,
  decodeConfig,
  decodeMemTable,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeMemTable,
  encodeMessage,
  encodeReply,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
} from '../../src/transport/vhost-user/codec';
import type { VhostUserMessage } from '../../src/transport/vhost-user/codec';
import { FLAGS, MAX_PAYLOAD, VHOST_USER } from '../../src/transport/vhost-user/protocol';
import { isVblkError } from '../../src/errors';

function msg(request: number, payload: Buffer, fds: number[] = []): VhostUserMessage {
  return { request, flags: FLAGS.VERSION, payload, fds };
}

function expectProtocolError(fn: () => unknown, re: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(isVblkError(err, 'E_VHOST_PROTOCOL'), `expected E_VHOST_PROTOCOL, got ${String(err)}`).to.equal(true);
  expect((err as Error).message).to.match(re);
}

describe('vhost-user codec', () => {
  describe('MessageDecoder framing', () => {
    it('decodes a header and payload in one chunk', () => {
      const d = new MessageDecoder();
      const out = d.push(encodeMessage(VHOST_USER.SET_FEATURES, FLAGS.VERSION, encodeU64(0x1234n)));
      expect(out).to.have.length(1);
      expect(out[0]?.request).to.equal(VHOST_USER.SET_FEATURES);
      expect(decodeU64(out[0] as VhostUserMessage)).to.equal(0x1234n);
    });

    it('reassembles a message split at every byte boundary', () => {
      const wire = encodeMessage(VHOST_USER.SET_VRING_NUM, FLAGS.VERSION, encodeVringState({ index: 1, num: 256 }));
      const d = new MessageDecoder();
      const out: VhostUserMessage[] = [];
      for (let i = 0; i < wire.length; i++) out.push(...d.push(wire.subarray(i, i + 1)));
      expect(out).to.have.length(1);
      expect(decodeVringState(out[0] as VhostUserMessage)).to.deep.equal({ index: 1, num: 256 });
      expect(d.pendingBytes).to.equal(0);
    });

    it('returns several messages from one chunk, in order', () => {
      const wire = Buffer.concat([
        encodeMessage(VHOST_USER.GET_FEATURES, FLAGS.VERSION),
        encodeMessage(VHOST_USER.SET_OWNER, FLAGS.VERSION),
        encodeMessage(VHOST_USER.GET_QUEUE_NUM, FLAGS.VERSION | FLAGS.NEED_REPLY),
      ]);
      const out = new MessageDecoder().push(wire);
      expect(out.map((m) => m.request)).to.deep.equal([VHOST_USER.GET_FEATURES, VHOST_USER.SET_OWNER, VHOST_USER.GET_QUEUE_NUM]);
      expect(out[2]?.flags).to.equal(FLAGS.VERSION | FLAGS.NEED_REPLY);
    });

    it('gives the descriptors of a chunk to the last message that starts in it', () => {
      // recvmsg returns data of earlier sends plus the send carrying descriptors, then stops.
      const wire = Buffer.concat([
        encodeMessage(VHOST_USER.SET_VRING_NUM, FLAGS.VERSION, encodeVringState({ index: 0, num: 8 })),
        encodeMessage(VHOST_USER.SET_VRING_KICK, FLAGS.VERSION, encodeU64(0n)),
      ]);
      const out = new MessageDecoder().push(wire, [42]);
      expect(out[0]?.fds).to.deep.equal([]);
      expect(out[1]?.fds).to.deep.equal([42]);
    });

    it('keeps descriptors for a message whose payload arrives in a later chunk', () => {
      const wire = encodeMessage(VHOST_USER.SET_MEM_TABLE, FLAGS.VERSION, encodeMemTable([{ guestAddr: 0n, size: 4096n, userAddr: 0x1000n, mmapOffset: 0n }]));
      const d = new MessageDecoder();
      expect(d.push(wire.subarray(0, 20), [7])).to.deep.equal([]);
      const out = d.push(wire.subarray(20));
      expect(out[0]?.fds).to.deep.equal([7]);
    });

    it('property: any message stream read back under Unix-socket recvmsg rules decodes to the same messages and descriptors', () => {
      const message = fc.record({
        request: fc.integer({ min: 1, max: 40 }),
        payload: fc.uint8Array({ maxLength: 300 }),
        nfds: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 8 })),
      });
      fc.assert(
        fc.property(fc.array(message, { minLength: 1, maxLength: 12 }), fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 8 }), (msgs, sizes) => {
          // Each message is one send (one skb) carrying its fds; fd numbers are unique.
          let nextFd = 100;
          const skbs = msgs.map((m) => ({
            bytes: encodeMessage(m.request, FLAGS.VERSION, Buffer.from(m.payload)),
            fds: Array.from({ length: m.nfds }, () => nextFd++),
          }));
          // recvmsg: copies from successive skbs up to the buffer size; takes the fds of an skb
          // the first time it copies from it, and then stops.
          const d = new MessageDecoder();
          const out: VhostUserMessage[] = [];
          let i = 0;
          let off = 0;
          let read = 0;
          while (i < skbs.length) {
            const size = sizes[read++ % sizes.length] as number;
            const parts: Buffer[] = [];
            let fds: number[] = [];
            let n = 0;
            while (i < skbs.length && n < size) {
              const skb = skbs[i] as { bytes: Buffer; fds: number[] };
              const take = Math.min(size - n, skb.bytes.length - off);
              parts.push(skb.bytes.subarray(off, off + take));
              n += take;
              const first = off === 0;
              off += take;
              if (off === skb.bytes.length) {
                i++;
                off = 0;
              }
              if (first && skb.fds.length > 0) {
                fds = skb.fds;
                break;
              }
            }
            out.push(...d.push(Buffer.concat(parts), fds));
          }
          expect(out.map((m) => m.request)).to.deep.equal(msgs.map((m) => m.request));
          out.forEach((m, k) => {
            expect(m.payload.equals(Buffer.from((msgs[k] as { payload: Uint8Array }).payload))).to.equal(true);
            expect(m.fds).to.deep.equal((skbs[k] as { fds: number[] }).fds);
          });
          expect(d.takeFds()).to.deep.equal([]);
        }),
        { numRuns: 300 },
      );
    });

    it('rejects a header with a protocol version other than 1', () => {
      expectProtocolError(() => new MessageDecoder().push(encodeMessage(VHOST_USER.GET_FEATURES, 0x2)), /version 2, expected 1/);
    });

    it('rejects a payload size above the cap before buffering it', () => {
      const hdr = Buffer.alloc(12);
      hdr.writeUInt32LE(VHOST_USER.SET_MEM_TABLE, 0);
      hdr.writeUInt32LE(FLAGS.VERSION, 4);
      hdr.writeUInt32LE(0xffff_ffff, 8);
      expectProtocolError(() => new MessageDecoder().push(hdr), new RegExp(`payload size 4294967295 exceeds ${MAX_PAYLOAD}`));
    });

    it('reports a truncated message as pending bytes and hands back its descriptors', () => {
      const d = new MessageDecoder();
      const wire = encodeMessage(VHOST_USER.SET_VRING_CALL, FLAGS.VERSION, encodeU64(0n));
      expect(d.push(wire.subarray(0, 15), [9])).to.deep.equal([]);
      expect(d.pendingBytes).to.equal(15);
      expect(d.takeFds()).to.deep.equal([9]);
    });
  });

  describe('payloads', () => {
    it('round-trips a vring address', () => {
      const a = { index: 3, flags: 0, desc: 0x7f00_0000_1000n, used: 0x7f00_0000_3000n, avail: 0x7f00_0000_2000n, log: 0n };
      expect(decodeVringAddr(msg(VHOST_USER.SET_VRING_ADDR, encodeVringAddr(a)))).to.deep.equal(a);
    });

    it('round-trips a memory table', () => {
      const regions = [
        { guestAddr: 0n, size: 0xa0000n, userAddr: 0x7f12_0000_0000n, mmapOffset: 0n },
        { guestAddr: 0xc0000n, size: 0x1ff40000n, userAddr: 0x7f12_000c_0000n, mmapOffset: 0xc0000n },
      ];
      expect(decodeMemTable(msg(VHOST_USER.SET_MEM_TABLE, encodeMemTable(regions)))).to.deep.equal(regions);
    });

    it('rejects a memory table with zero or more than 8 regions', () => {
      const zero = Buffer.alloc(8);
      expectProtocolError(() => decodeMemTable(msg(VHOST_USER.SET_MEM_TABLE, zero)), /0 regions \(expected 1\.\.8\)/);
      const nine = Buffer.alloc(8 + 32 * 9);
      nine.writeUInt32LE(9, 0);
      expectProtocolError(() => decodeMemTable(msg(VHOST_USER.SET_MEM_TABLE, nine)), /9 regions/);
    });

    it('rejects a memory table shorter than its region count says', () => {
      const b = Buffer.alloc(8 + 32);
      b.writeUInt32LE(2, 0);
      expectProtocolError(() => decodeMemTable(msg(VHOST_USER.SET_MEM_TABLE, b)), /2 memory regions needs 72 payload bytes, got 40/);
    });

    it('rejects truncated u64, vring state and vring address payloads', () => {
      expectProtocolError(() => decodeU64(msg(VHOST_USER.SET_FEATURES, Buffer.alloc(4))), /SET_FEATURES: a u64 needs 8 payload bytes, got 4/);
      expectProtocolError(() => decodeVringState(msg(VHOST_USER.SET_VRING_NUM, Buffer.alloc(7))), /vring state needs 8/);
      expectProtocolError(() => decodeVringAddr(msg(VHOST_USER.SET_VRING_ADDR, Buffer.alloc(39))), /vring address needs 40/);
    });

    it('round-trips a config access and checks its range', () => {
      const c = encodeConfig({ offset: 0x20, flags: 0, data: Buffer.from([1]) });
      expect(decodeConfig(msg(VHOST_USER.SET_CONFIG, c))).to.deep.equal({ offset: 0x20, size: 1, flags: 0, data: Buffer.from([1]) });
      const big = Buffer.alloc(12);
      big.writeUInt32LE(0xf0, 0);
      big.writeUInt32LE(0x20, 4);
      expectProtocolError(() => decodeConfig(msg(VHOST_USER.GET_CONFIG, big)), /range 0xf0\+32 is outside the 256-byte config space/);
      const short = Buffer.alloc(12);
      short.writeUInt32LE(8, 4);
      expectProtocolError(() => decodeConfig(msg(VHOST_USER.SET_CONFIG, short)), /8-byte config access needs 20 payload bytes/);
    });

    it('encodes replies with version 1 and the reply flag', () => {
      const r = encodeReply(VHOST_USER.GET_FEATURES, encodeU64(5n));
      expect(r.readUInt32LE(0)).to.equal(VHOST_USER.GET_FEATURES);
      expect(r.readUInt32LE(4)).to.equal(FLAGS.VERSION | FLAGS.REPLY);
      expect(r.readUInt32LE(8)).to.equal(8);
      expect(r.readBigUInt64LE(12)).to.equal(5n);
    });
  });
});
