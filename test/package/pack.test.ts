/**
 * The npm package: `npm pack` ships what a user needs and nothing else, and the tarball installs
 * into an empty project where `npx vblk` runs and `openDiskImage` imports from ESM and CommonJS.
 */
import { expect } from 'chai';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { useTempDir } from '../helpers/qemu';

const ROOT = path.resolve(__dirname, '..', '..', '..');

function run(cmd: string, args: string[], cwd: string): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout: 180_000 });
  if (r.error) throw new Error(`${cmd} ${args.join(' ')}: ${r.error.message}`);
  return r;
}

function ok(r: SpawnSyncReturns<string>, what: string): string {
  expect(r.status, `${what} failed:\n${r.stdout}${r.stderr}`).to.equal(0);
  return r.stdout;
}

describe('npm package', function () {
  this.timeout(240_000);
  const tmp = useTempDir('vblk-pack-');
  let tarball = '';
  let files: string[] = [];
  let project = '';

  before(function () {
    const npm = run('npm', ['--version'], ROOT);
    if (npm.status !== 0) throw new Error(`npm is needed to test the package and does not run: ${npm.stderr}`);
    const packed = JSON.parse(ok(run('npm', ['pack', '--json', '--pack-destination', tmp.dir], ROOT), 'npm pack')) as { filename: string; files: { path: string }[] }[];
    const first = packed[0];
    if (first === undefined) throw new Error('npm pack --json printed no package');
    tarball = path.join(tmp.dir, first.filename);
    files = first.files.map((f) => f.path);
    project = path.join(tmp.dir, 'project');
    fs.mkdirSync(project);
    fs.writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'uses-vblk', version: '1.0.0', private: true }));
    ok(run('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', tarball], project), 'npm install of the tarball');
  });

  it('ships the compiled library with its types, the shim sources and the install script', () => {
    for (const f of ['build/src/index.js', 'build/src/index.d.ts', 'build/src/cli/main.js', 'native-bindings/vhost_shim.c', 'scripts/build-native.js', 'package.json', 'README.md']) {
      expect(files, f).to.include(f);
    }
  });

  it('ships no tests, no host-built library and no source maps', () => {
    expect(files.filter((f) => f.startsWith('build/test/') || f.startsWith('test/') || f.endsWith('.so') || f.endsWith('.map'))).to.deep.equal([]);
  });

  it('is not private and names its types', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(project, 'node_modules', 'vblk', 'package.json'), 'utf8')) as { private?: boolean; types?: string };
    expect(pkg.private).to.equal(undefined);
    expect(pkg.types).to.equal('build/src/index.d.ts');
  });

  it('builds the native shim at install time', () => {
    expect(fs.existsSync(path.join(project, 'node_modules', 'vblk', 'build', 'native', 'libvblk.so'))).to.equal(true);
  });

  it('npx vblk create and info work in the project', () => {
    ok(run('npx', ['vblk', 'create', '-f', 'qcow2', 'x.qcow2', '1M'], project), 'npx vblk create');
    const info = ok(run('npx', ['vblk', 'info', '--output=json', 'x.qcow2'], project), 'npx vblk info');
    expect(JSON.parse(info)).to.include({ format: 'qcow2', 'virtual-size': 1048576 });
  });

  it('openDiskImage imports from an ES module', () => {
    fs.writeFileSync(path.join(project, 'esm.mjs'), "import { openDiskImage } from 'vblk';\nconst d = await openDiskImage(process.argv[2], { readonly: true });\nconsole.log(d.format, d.size);\nawait d.close();\n");
    fs.writeFileSync(path.join(project, 'esm.raw'), Buffer.alloc(4096));
    expect(ok(run(process.execPath, ['esm.mjs', 'esm.raw'], project), 'the ESM import').trim()).to.equal('raw 4096');
  });

  it('openDiskImage requires from CommonJS', () => {
    fs.writeFileSync(path.join(project, 'cjs.cjs'), "const { openDiskImage } = require('vblk');\nopenDiskImage(process.argv[2], { readonly: true }).then(async (d) => { console.log(d.format, d.size); await d.close(); });\n");
    fs.writeFileSync(path.join(project, 'cjs.raw'), Buffer.alloc(8192));
    expect(ok(run(process.execPath, ['cjs.cjs', 'cjs.raw'], project), 'the CommonJS require').trim()).to.equal('raw 8192');
  });

  it('without a C compiler the install step says so in one line and does not fail the install', () => {
    const r = spawnSync(process.execPath, [path.join(ROOT, 'scripts', 'build-native.js')], { cwd: tmp.dir, encoding: 'utf8', env: { ...process.env, CC: 'no-such-cc' } });
    expect(r.status).to.equal(0);
    expect(r.stderr.trim().split('\n')).to.deep.equal([
      'vblk: cannot build the native shim: no C compiler (no-such-cc) found; install gcc (apt-get install gcc libc6-dev). Disk-image commands work without it; vblk serve and vblk run need it',
    ]);
  });

  it('make native (--strict) fails without a C compiler', () => {
    const r = spawnSync(process.execPath, [path.join(ROOT, 'scripts', 'build-native.js'), '--strict'], { encoding: 'utf8', env: { ...process.env, CC: 'no-such-cc' } });
    expect(r.status).to.equal(1);
  });
});
