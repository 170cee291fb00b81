#!/usr/bin/env node
// Runs every compiled test file under build/test with mocha's programmatic API and ends with the
// one line CI reads: "N passed, N failed, N skipped". Skipped tests print their reason (tests call
// this.skip() only after logging why, e.g. "/dev/kvm missing").
'use strict';
const path = require('node:path');
const fs = require('node:fs');
const Mocha = require('mocha');

function findTests(dir, out) {
  if (!fs.existsSync(dir)) return out;
  for (const ent of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, ent.name);
    if (ent.isDirectory()) findTests(p, out);
    else if (ent.name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

const root = path.resolve(__dirname, '..');
const args = process.argv.slice(2);
const grep = process.env.VBLK_TEST_GREP;
const dirs = args.length > 0 ? args : [path.join(root, 'build', 'test')];
const files = dirs.flatMap((d) => (d.endsWith('.js') ? [path.resolve(d)] : findTests(path.resolve(d), []))).sort();

const mocha = new Mocha({ reporter: 'spec', timeout: 60000, ...(grep ? { grep } : {}) });
for (const f of files) mocha.addFile(f);

let passed = 0;
let failed = 0;
let skipped = 0;
const runner = mocha.run((failures) => {
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exitCode = failures > 0 || failed > 0 ? 1 : 0;
});
runner.on('pass', () => passed++);
runner.on('fail', () => failed++);
runner.on('pending', () => skipped++);
