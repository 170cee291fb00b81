#!/usr/bin/env node
// Builds vblk's native shim, build/native/libvblk.so, from native-bindings/*.c: the one
// definition of that build, used by `make native` (with --strict) and by the package's `install`
// script, so a clone and an installed tarball compile it the same way.
//
// Without a working C compiler the install still succeeds (exit 0) with one line saying what is
// missing: the disk-image commands (info, create, convert, check, map, compare, io, bench) and the
// library need no shim; `vblk serve` and `vblk run` then fail with an error naming the missing
// library. Failing the install instead would take the disk commands away from every machine
// without gcc. npm shows a dependency's install output only when the script fails, so the line is
// seen with `npm rebuild vblk --foreground-scripts`, which also builds the shim once gcc is there.
// `--strict` (the Makefile) turns both failures into exit 1.
//
// CommonJS with no dependencies: it runs before anything else of the package can be trusted.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const strict = process.argv.includes('--strict');
const cc = process.env.CC || 'cc';
const prefix = 'vblk: cannot build the native shim';
const consequence = 'Disk-image commands work without it; vblk serve and vblk run need it';

/** Prints the one line and exits: 0 for `npm install`, 1 under --strict. */
function giveUp(reason) {
  console.error(`${prefix}: ${reason}. ${consequence}`);
  process.exit(strict ? 1 : 0);
}

const sources = fs
  .readdirSync(path.join(root, 'native-bindings'))
  .filter((f) => f.endsWith('.c'))
  .sort()
  .map((f) => path.join('native-bindings', f));
const out = path.join('build', 'native', 'libvblk.so');

if (spawnSync(cc, ['--version'], { stdio: 'ignore' }).status !== 0) {
  giveUp(`no C compiler (${cc}) found; install gcc (apt-get install gcc libc6-dev)`);
}
fs.mkdirSync(path.join(root, 'build', 'native'), { recursive: true });
const args = ['-O2', '-Wall', '-Wextra', '-fPIC', '-shared', '-o', out, ...sources];
console.log(`${cc} ${args.join(' ')}`);
const r = spawnSync(cc, args, { cwd: root, stdio: 'inherit' });
if (r.status !== 0) {
  // The compiler's own messages are above; a compiler without the C library headers is the
  // usual cause on a fresh machine.
  giveUp(`${cc} exited with ${r.status ?? r.signal} (are the C library headers installed? apt-get install libc6-dev)`);
}
