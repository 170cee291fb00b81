#!/usr/bin/env node
// Builds vblk's native shim, build/native/libvblk.so, from native-bindings/*.c: the one
// definition of that build, used by `make native` and by `npm install` of the package.
//
// Without a C compiler the install still succeeds (exit 0) with one line saying what is missing:
// the disk-image commands (info, create, convert, check, map, compare, io, bench) and the library
// need no shim; `vblk serve` and `vblk run` then fail with a clear error naming the missing
// library. `--strict` (the Makefile) turns the missing compiler into a failure.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const strict = process.argv.includes('--strict');
const cc = process.env.CC || 'cc';
const sources = fs
  .readdirSync(path.join(root, 'native-bindings'))
  .filter((f) => f.endsWith('.c'))
  .sort()
  .map((f) => path.join('native-bindings', f));
const out = path.join('build', 'native', 'libvblk.so');

if (spawnSync(cc, ['--version'], { stdio: 'ignore' }).status !== 0) {
  const line = `vblk: cannot build the native shim: no C compiler (${cc}) found; install gcc (apt-get install gcc libc6-dev). Disk-image commands work without it; vblk serve and vblk run need it`;
  console.error(line);
  process.exit(strict ? 1 : 0);
}
fs.mkdirSync(path.join(root, 'build', 'native'), { recursive: true });
const args = ['-O2', '-Wall', '-Wextra', '-fPIC', '-shared', '-o', out, ...sources];
console.log(`${cc} ${args.join(' ')}`);
const r = spawnSync(cc, args, { cwd: root, stdio: 'inherit' });
if (r.status !== 0) {
  console.error(`vblk: cannot build the native shim: ${cc} exited with ${r.status ?? r.signal}`);
  process.exit(strict ? 1 : 0);
}
