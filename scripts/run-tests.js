#!/usr/bin/env node
// Runs every compiled test file under build/test (or the files and folders named) with mocha's
// programmatic API and ends with the one line CI reads: "N passed, N failed, N skipped".
//
// Honest counting:
// - a run in which no test passed or failed is a failure ("no tests ran");
// - when a `before`/`beforeEach` hook fails, the tests it kept from running count as failed
//   (at least one failure per failed hook), so a broken set-up cannot make tests vanish;
// - every skip lists its reason at the end (tests skip through test/helpers/skip.ts, which
//   records it); a skip without a recorded reason is listed as such;
// - mocha is not allowed to hang the run: once it has finished, handles still open are named
//   and the process exits anyway (mocha's --exit, made visible).
//
// The KVM tier (build/test/kvm) needs /dev/kvm. With VBLK_KVM_NESTED=1 those files run in a
// nested QEMU guest through scripts/with-kvm.sh, after the rest, and their counts join the one
// summary line (a tier that cannot run at all counts as a failure, with the reason).
'use strict';
const path = require('node:path');
const fs = require('node:fs');
const { spawn } = require('node:child_process');
const Mocha = require('mocha');

/** How long a finished run may wait for open handles to close by themselves. */
const EXIT_GRACE_MS = 3000;

function findTests(dir, out) {
  if (!fs.existsSync(dir)) return out;
  for (const ent of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, ent.name);
    if (ent.isDirectory()) findTests(p, out);
    else if (ent.name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

/** Every test below `suite`, its sub-suites included. */
function testsOf(suite) {
  return [...suite.tests, ...suite.suites.flatMap(testsOf)];
}

const root = path.resolve(__dirname, '..');
const args = process.argv.slice(2);
const grep = process.env.VBLK_TEST_GREP;
const dirs = args.length > 0 ? args : [path.join(root, 'build', 'test')];
const files = dirs.flatMap((d) => (d.endsWith('.js') ? [path.resolve(d)] : findTests(path.resolve(d), []))).sort();

/**
 * The KVM tier runs in the nested guest only when asked (VBLK_KVM_NESTED=1), and never from
 * inside that guest. Without /dev/kvm and without the request, its tests skip with the reason.
 */
const runNestedTier = process.env.VBLK_IN_NESTED_KVM !== '1' && process.env.VBLK_KVM_NESTED === '1';
const kvmDir = path.join(root, 'build', 'test', 'kvm') + path.sep;
const nestedFiles = runNestedTier ? files.filter((f) => f.startsWith(kvmDir)) : [];
const hostFiles = files.filter((f) => !nestedFiles.includes(f));

/**
 * Runs the KVM tier in the nested guest, its output streamed as it comes; resolves to its
 * counts, or to one failure saying why it could not run.
 */
function runNested() {
  console.log(`\n  KVM tier: running ${nestedFiles.length} file(s) in a nested guest (VBLK_KVM_NESTED=1, scripts/with-kvm.sh)`);
  const env = { ...process.env, ...(grep ? { VBLK_TEST_GREP: grep } : {}) };
  const child = spawn('bash', [path.join(root, 'scripts', 'with-kvm.sh'), process.execPath, __filename, ...nestedFiles], {
    env,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let summary;
  let rest = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (chunk) => {
    const lines = (rest + chunk).split('\n');
    rest = lines.pop() ?? '';
    for (const l of lines) {
      // The nested run's own summary line is folded into ours, not printed as a second one.
      if (/^\d+ passed, \d+ failed, \d+ skipped$/.test(l)) summary = l;
      else console.log(l);
    }
  });
  return new Promise((resolve) => {
    child.on('close', (code, signal) => {
      if (rest !== '') console.log(rest);
      if (summary === undefined) {
        console.log(`  KVM tier did not run (with-kvm.sh exit ${code ?? signal}): that is a failure`);
        return resolve({ passed: 0, failed: 1, skipped: 0 });
      }
      const [p, f, sk] = summary.match(/\d+/g).map(Number);
      resolve({ passed: p, failed: f + (code !== 0 && f === 0 ? 1 : 0), skipped: sk });
    });
  });
}

const mocha = new Mocha({ reporter: 'spec', timeout: 60000, ...(grep ? { grep } : {}) });
for (const f of hostFiles) mocha.addFile(f);

let passed = 0;
let failed = 0;
let skipped = 0;
/** Tests that reached an outcome (passed, failed or skipped). */
const settled = new Set();
/** Hooks that failed, with the suite whose tests they stopped. */
const failedHooks = [];
const skippedTitles = [];

const runner = mocha.run(async () => {
  // Tests a failed hook kept from running: failed, not vanished.
  let stranded = 0;
  for (const hook of failedHooks) {
    const lost = testsOf(hook.parent).filter((t) => !settled.has(t));
    for (const t of lost) settled.add(t);
    stranded += Math.max(1, lost.length);
    console.log(`  ${hook.fullTitle()}: failed, so ${lost.length} test(s) did not run and count as failed`);
  }
  failed += stranded;
  if (nestedFiles.length > 0) {
    const n = await runNested();
    passed += n.passed;
    failed += n.failed;
    skipped += n.skipped;
  }
  if (passed + failed === 0) {
    console.log(`  no tests ran (${files.length} test file(s) found in ${dirs.join(', ')}): that is a failure`);
    failed = 1;
  }
  const reasons = globalThis.__vblkSkipReasons ?? [];
  if (skipped > 0) {
    console.log(`  skipped ${skipped} test(s); reasons given:`);
    for (const r of reasons) console.log(`    - ${r}`);
    // A skip that went around test/helpers/skip.ts (it.skip, a bare this.skip()) has no reason.
    if (reasons.length === 0) for (const t of skippedTitles) console.log(`    - ${t}: no reason recorded`);
  }
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exitCode = failed > 0 ? 1 : 0;
  const timer = setTimeout(() => {
    const open = process.getActiveResourcesInfo().filter((r) => r !== 'TTYWrap' && r !== 'Timeout');
    console.error(`run-tests: handles still open ${EXIT_GRACE_MS} ms after the last test: ${open.join(', ') || '(unnamed)'}; exiting anyway`);
    process.exit(process.exitCode);
  }, EXIT_GRACE_MS);
  timer.unref();
});
runner.on('pass', (t) => {
  settled.add(t);
  passed++;
});
runner.on('fail', (t) => {
  if (t.type === 'hook') {
    // An after/afterEach hook fails after its tests ran: one failure. A before hook strands its
    // tests: counted when the run ends.
    if (/"before (all|each)" hook/.test(t.title)) failedHooks.push(t);
    else failed++;
    return;
  }
  settled.add(t);
  failed++;
});
runner.on('pending', (t) => {
  settled.add(t);
  skipped++;
  skippedTitles.push(t.fullTitle());
});
