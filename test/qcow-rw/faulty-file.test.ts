import { expect } from 'chai';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FaultyFile } from '../../src/disk/faulty-file';
import { NodeImageFile } from '../../src/disk/file';

describe('FaultyFile', () => {
  let dir: string;
  let p: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-ff-'));
    p = path.join(dir, 'f');
    fs.writeFileSync(p, Buffer.alloc(16));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  const byte = (v: number): Uint8Array => new Uint8Array([v]);

  it('fails exactly the Nth write with the injected errno, once', async () => {
    const f = new FaultyFile(await NodeImageFile.open(p, { writable: true }), { failWriteAt: 2, errno: 'ENOSPC' });
    await f.write(byte(1), 0);
    let err: unknown;
    await f.write(byte(2), 1).catch((e: unknown) => (err = e));
    expect(err).to.have.property('code', 'E_DISK_IO');
    expect((err as Error).message).to.match(/ENOSPC/);
    await f.write(byte(3), 2);
    await f.close();
    expect([...fs.readFileSync(p).subarray(0, 3)]).to.deep.equal([1, 0, 3]);
  });

  it('keeps failing after the first fault when sticky', async () => {
    const f = new FaultyFile(await NodeImageFile.open(p, { writable: true }), { failSyncAt: 1, sticky: true });
    await f.write(byte(1), 0);
    await f.sync().then(() => expect.fail('sync should fail'), () => undefined);
    await f.write(byte(2), 1).then(() => expect.fail('write should fail'), () => undefined);
    await f.close();
  });

  it('persists writes up to the crash point and drops later ones while reads still see them', async () => {
    const f = new FaultyFile(await NodeImageFile.open(p, { writable: true }), { crashAfterWrite: 2 });
    await f.write(byte(1), 0);
    await f.write(byte(2), 1);
    expect(f.crashed).to.equal(true);
    await f.write(byte(3), 2);
    await f.write(byte(9), 20);
    await f.sync();
    const b = new Uint8Array(3);
    await f.read(b, 0);
    expect([...b]).to.deep.equal([1, 2, 3]);
    expect(await f.size()).to.equal(21);
    await f.close();
    const disk = fs.readFileSync(p);
    expect(disk.length).to.equal(16);
    expect([...disk.subarray(0, 3)]).to.deep.equal([1, 2, 0]);
  });

  it('loses unsynced writes at the crash in lose mode', async () => {
    const f = new FaultyFile(await NodeImageFile.open(p, { writable: true }), { crashAfterWrite: 3, unsynced: 'lose' });
    await f.write(byte(1), 0);
    await f.sync();
    await f.write(byte(2), 1);
    await f.write(byte(3), 2);
    const b = new Uint8Array(3);
    await f.read(b, 0);
    expect([...b]).to.deep.equal([1, 2, 3]);
    await f.close();
    expect([...fs.readFileSync(p).subarray(0, 3)]).to.deep.equal([1, 0, 0]);
  });
});
