/**
 * Device suite: the virtio-blk device (simulated virtqueue driver + device, src/bench/device.ts)
 * against the disk layer alone on the same raw image, so the table shows what the device adds per
 * request. Peer = disk layer, vblk = through the device. Each measurement runs in a process of
 * its own (see device.ts).
 */
import { runDeviceBench } from './device';
import { writeFilledRaw, type BenchSuite, type BenchRow } from './suite';

export const deviceSuite: BenchSuite = {
  name: 'device',
  async run(ctx) {
    const img = `${ctx.dir}/device.raw`;
    ctx.progress('preparing a 256 MiB raw image for the device suite');
    writeFilledRaw(img, 256, 0x5a);
    ctx.progress('device suite: virtio-blk device vs disk layer');
    const rows = await runDeviceBench({ image: img, rounds: 3, warmup: 1.5, seconds: Math.max(2.4, 4.5 * ctx.scale) });
    return rows.map((r): BenchRow => {
      const mib = r.blockSize >= 65536;
      return {
        name: `virtio-blk raw ${r.name}`,
        unit: mib ? 'MiB/s' : 'IOPS',
        peerName: 'disk layer',
        peer: mib ? r.disk.mbps / 1.048576 : r.disk.iops,
        vblk: mib ? r.device.mbps / 1.048576 : r.device.iops,
        ratio: 1 / r.ratio,
        note: 'median of 3 paired rounds, each side in a fresh process',
      };
    });
  },
};
