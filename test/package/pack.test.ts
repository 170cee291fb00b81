/**
 * The npm package: `npm pack` ships what a user needs and nothing else, and the tarball installs
 * into an empty project where the install step builds the shim, `npx vblk` runs, `openDiskImage`
 * imports from ESM and CommonJS and the type declarations check.
 *
 * The pack uses --ignore-scripts: prepack's tsc has already run (this file is its output), and
 * re-running it here would rewrite the build/ that other test files are running from.
 * The install uses --prefer-offline, so after the first run ffi-rs comes from npm's cache.
 */
import { expect } from 'chai';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { useTempDir } from '../helpers/qemu';

const ROOT = path.resolve(__dirname, '..', '..', '..');
const SHIM_MISSING_LINE =
  'vblk: cannot build the native shim: no C compiler (no-such-cc) found; install gcc (apt-get install gcc libc6-dev). Disk-image commands work without it; vblk serve and vblk run need it';

function run(cmd: string, args: readonly string[], cwd: string, env: NodeJS.ProcessEnv = process.env): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { cwd, env, encoding: 'utf8', timeout: 120_000 });
  if (r.error) throw new Error(`cannot run ${cmd} ${args.join(' ')}: ${r.error.message}`);
  return r;
}

function ok(r: SpawnSyncReturns<string>, what: string): string {
  expect(r.status, `${what} failed:\n${r.stdout}${r.stderr}`).to.equal(0);
  return r.stdout;
}

/** What `npm pack --json` prints for one package (the fields used here). */
interface PackResult {
  readonly filename: string;
  readonly files: readonly { readonly path: string }[];
}

describe('npm package', function () {
  this.timeout(120_000);
  const tmp = useTempDir('vblk-pack-');
  let files: string[] = [];
  let project = '';
  let installOutput = '';
  let installed = '';

  before(function () {
    const npm = spawnSync('npm', ['--version'], { encoding: 'utf8' });
    if (npm.error || npm.status !== 0) {
      throw new Error(`npm is needed to test the package and does not run (${npm.error?.message ?? npm.stderr.trim()})`);
    }
    const packed = JSON.parse(ok(run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', tmp.dir], ROOT), 'npm pack')) as PackResult[];
    const first = packed[0];
    if (first === undefined) throw new Error('npm pack --json printed no package');
    files = first.files.map((f) => f.path);
    project = path.join(tmp.dir, 'project');
    installed = path.join(project, 'node_modules', 'vblk');
    fs.mkdirSync(project);
    fs.writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'uses-vblk', version: '1.0.0', private: true }));
    // --foreground-scripts: npm otherwise swallows the install script's output when it succeeds.
    const args = ['install', '--prefer-offline', '--no-audit', '--no-fund', '--foreground-scripts', path.join(tmp.dir, first.filename)];
    installOutput = ok(run('npm', args, project), 'npm install of the tarball');
  });

  it('ships the compiled library with its types, the shim sources and the install script', () => {
    for (const f of ['build/src/index.js', 'build/src/index.d.ts', 'build/src/cli/main.js', 'native-bindings/vhost_shim.c', 'native-bindings/kvm_shim.c', 'scripts/build-native.js', 'package.json', 'README.md']) {
      expect(files, f).to.include(f);
    }
  });

  it('ships no tests, examples or host-built library', () => {
    const unwanted = files.filter((f) => /^(build\/)?(test|examples)\//.test(f) || f.startsWith('build/native/') || f.endsWith('.so') || f.endsWith('.tgz'));
    expect(unwanted).to.deep.equal([]);
  });

  it('ships no stale output: every compiled file has its source, every source map its sources', () => {
    const shipped = new Set(files);
    const stale = files.filter((f) => /^build\/src\/.*\.js$/.test(f) && !shipped.has(f.replace(/^build\//, '').replace(/\.js$/, '.ts')));
    expect(stale, 'compiled files whose source is gone').to.deep.equal([]);
    const unresolved: string[] = [];
    for (const map of files.filter((f) => f.endsWith('.js.map'))) {
      const { sources } = JSON.parse(fs.readFileSync(path.join(installed, map), 'utf8')) as { sources: string[] };
      for (const s of sources) {
        const target = path.posix.normalize(path.posix.join(path.posix.dirname(map), s));
        if (!shipped.has(target)) unresolved.push(`${map} -> ${target}`);
      }
    }
    expect(unresolved, 'source-map sources not in the tarball').to.deep.equal([]);
  });

  it('is public, names its types and compiles the library before packing', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(installed, 'package.json'), 'utf8')) as { private?: boolean; types?: string; scripts?: Record<string, string> };
    expect(pkg.private).to.equal(undefined);
    expect(pkg.types).to.equal('build/src/index.d.ts');
    expect(pkg.scripts?.['prepack']).to.equal('tsc -p tsconfig.build.json');
  });

  it('builds the native shim at install time', () => {
    expect(installOutput).to.include('-shared -o build/native/libvblk.so');
    expect(fs.existsSync(path.join(installed, 'build', 'native', 'libvblk.so'))).to.equal(true);
  });

  it('npx vblk create and info work in the project', () => {
    ok(run('npx', ['--no', 'vblk', 'create', '-f', 'qcow2', 'x.qcow2', '1M'], project), 'npx vblk create');
    const info = ok(run('npx', ['--no', 'vblk', 'info', '--output=json', 'x.qcow2'], project), 'npx vblk info');
    expect(JSON.parse(info)).to.include({ format: 'qcow2', 'virtual-size': 1048576 });
  });

  /**
   * Writes a raw image whose sector 1 starts with 0xab 0xcd, and a script that loads vblk with
   * `importLine`, opens the image and prints its format, size and those two bytes.
   */
  function sectorReader(script: string, importLine: string): void {
    const image = Buffer.alloc(4096);
    image.set([0xab, 0xcd], 512);
    fs.writeFileSync(path.join(project, `${script}.raw`), image);
    const body = [
      importLine,
      'void (async () => {',
      '  const d = await openDiskImage(process.argv[2], { readonly: true });',
      '  const sector = new Uint8Array(512);',
      '  await d.readSector(1, sector);',
      "  console.log(d.format, d.size, Buffer.from(sector.subarray(0, 2)).toString('hex'));",
      '  await d.close();',
      '})();',
    ];
    fs.writeFileSync(path.join(project, script), body.join('\n'));
  }

  it('openDiskImage imports from an ES module and reads a sector', () => {
    sectorReader('esm.mjs', "import { openDiskImage } from 'vblk';");
    expect(ok(run(process.execPath, ['esm.mjs', 'esm.mjs.raw'], project), 'the ESM import').trim()).to.equal('raw 4096 abcd');
  });

  it('openDiskImage requires from CommonJS and reads a sector', () => {
    sectorReader('cjs.cjs', "const { openDiskImage } = require('vblk');");
    expect(ok(run(process.execPath, ['cjs.cjs', 'cjs.cjs.raw'], project), 'the CommonJS require').trim()).to.equal('raw 4096 abcd');
  });

  // The compiled code is CommonJS; Node's ESM sees its exports only as far as cjs-module-lexer
  // recognises tsc's output, so a new export pattern could silently vanish from ESM.
  it('every CommonJS export is a named ESM export', () => {
    fs.writeFileSync(
      path.join(project, 'names.mjs'),
      [
        "import { createRequire } from 'node:module';",
        "import * as esm from 'vblk';",
        "const cjs = createRequire(import.meta.url)('vblk');",
        "console.log(JSON.stringify(Object.keys(cjs).filter((k) => k !== '__esModule' && !(k in esm))));",
      ].join('\n'),
    );
    expect(JSON.parse(ok(run(process.execPath, ['names.mjs'], project), 'the export comparison'))).to.deep.equal([]);
  });

  it('its type declarations check in a strict ESM and CommonJS consumer', () => {
    fs.writeFileSync(
      path.join(project, 'use.mts'),
      "import { openDiskImage, type DiskImage } from 'vblk';\nconst d: DiskImage = await openDiskImage('x.qcow2', { readonly: true });\nexport const size: number = d.size;\n",
    );
    fs.writeFileSync(path.join(project, 'use.cts'), "import vblk = require('vblk');\nexport const opened: Promise<vblk.DiskImage> = vblk.openDiskImage('x.qcow2');\n");
    // The repository's own compiler and @types/node: no download, and no skipLibCheck, so every
    // shipped .d.ts is checked.
    const tsc = path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
    const args = ['--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022'];
    args.push('--typeRoots', path.join(ROOT, 'node_modules', '@types'), '--types', 'node', 'use.mts', 'use.cts');
    ok(run(process.execPath, [tsc, ...args], project), 'tsc on the consumer');
  });

  it('without the shim the disk commands work and serve names the missing library', () => {
    const lib = path.join(installed, 'build', 'native', 'libvblk.so');
    fs.renameSync(lib, `${lib}.away`);
    try {
      ok(run('npx', ['--no', 'vblk', 'info', 'x.qcow2'], project), 'npx vblk info without the shim');
      const serve = run('npx', ['--no', 'vblk', 'serve', '--socket', path.join(tmp.dir, 'serve.sock'), 'x.qcow2'], project);
      expect(serve.status).to.not.equal(0);
      expect(serve.stderr).to.include('libvblk.so');
    } finally {
      fs.renameSync(`${lib}.away`, lib);
    }
  });

  it('the shipped install script without a C compiler prints one line and lets the install succeed', () => {
    const r = run(process.execPath, [path.join(installed, 'scripts', 'build-native.js')], project, { ...process.env, CC: 'no-such-cc' });
    expect(r.status).to.equal(0);
    expect(r.stderr.trim().split('\n')).to.deep.equal([SHIM_MISSING_LINE]);
  });

  it('with --strict (make native) a missing C compiler fails the build', () => {
    const r = run(process.execPath, [path.join(installed, 'scripts', 'build-native.js'), '--strict'], project, { ...process.env, CC: 'no-such-cc' });
    expect(r.status).to.equal(1);
    expect(r.stderr.trim()).to.equal(SHIM_MISSING_LINE);
  });
});
