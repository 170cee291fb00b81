import { expect } from 'chai';
import { createMemoryDisk } from '../../src/disk/memory-disk';
import { isVblkError } from '../../src/errors';
import { rng } from './helpers';

describe('memory disk (DiskImageOps over a Buffer)', () => {
  it('reads back what was written and reports its size in sectors', async () => {
    const d = createMemoryDisk({ size: 8192 });
    expect(d.sectors).to.equal(16);
    await d.writeSector(2, new Uint8Array(1024).fill(7));
    const b = new Uint8Array(1536);
    expect(await d.readSector(1, b)).to.equal(1536);
    expect([b[0], b[511], b[512], b[1535]]).to.deep.equal([0, 0, 7, 7]);
  });

  it('discard zeroes its range (discarded sectors read as zeroes)', async () => {
    const d = createMemoryDisk({ size: 4096, contents: new Uint8Array(4096).fill(9) });
    await d.discard(1, 1);
    expect([d.priv.data[511], d.priv.data[512], d.priv.data[1023], d.priv.data[1024]]).to.deep.equal([9, 0, 0, 9]);
  });

  it('write-zeroes zeroes its range', async () => {
    const d = createMemoryDisk({ size: 4096, contents: new Uint8Array(4096).fill(9) });
    await d.writeZeroes(3, 2, true);
    expect([d.priv.data[1535], d.priv.data[1536], d.priv.data[2559], d.priv.data[2560]]).to.deep.equal([9, 0, 0, 9]);
  });

  it('the no-discard variant has no discard op', () => {
    expect(createMemoryDisk({ size: 4096, discard: false }).canDiscard).to.equal(false);
  });

  it('delays operations so that concurrent ones complete in a random order', async () => {
    const d = createMemoryDisk({ size: 1 << 16, maxDelayTurns: 10, random: rng(3) });
    const order: number[] = [];
    await Promise.all(Array.from({ length: 16 }, (_, i) => d.readSector(i, new Uint8Array(512)).then(() => order.push(i))));
    expect(order.length).to.equal(16);
    expect(order).to.not.deep.equal([...order].sort((a, b) => a - b));
  });

  it('injects faults as E_DISK_IO and counts operations', async () => {
    const d = createMemoryDisk({ size: 4096, fail: (op, sector) => op === 'write' && sector === 3 });
    await d.writeSector(2, new Uint8Array(512));
    let caught: unknown;
    await d.writeSector(3, new Uint8Array(512)).catch((e: unknown) => (caught = e));
    expect(isVblkError(caught, 'E_DISK_IO')).to.equal(true);
    expect(d.priv.counts.write).to.equal(2);
  });

  it('rejects every operation after close', async () => {
    const d = createMemoryDisk({ size: 4096 });
    await d.close();
    let caught: unknown;
    await d.readSector(0, new Uint8Array(512)).catch((e: unknown) => (caught = e));
    expect(isVblkError(caught, 'E_DISK_CLOSED')).to.equal(true);
  });

  it('refuses a size that is not a whole number of sectors', () => {
    expect(() => createMemoryDisk({ size: 1000 })).to.throw(RangeError);
  });
});
