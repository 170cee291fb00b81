/**
 * scripts/run-tests.js counts honestly: no tests is a failure, a failed set-up hook fails the
 * tests it stranded, a skip names its reason, and an open handle cannot hang the run.
 */
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { useTempDir } from '../helpers/qemu';

const ROOT = path.resolve(__dirname, '..', '..', '..');
const RUNNER = path.join(ROOT, 'scripts', 'run-tests.js');
const SKIP_HELPER = path.join(ROOT, 'build', 'test', 'helpers', 'skip.js');

interface RunOutcome {
  readonly status: number | null;
  readonly out: string;
  readonly summary: string | undefined;
}

function runOn(dir: string): RunOutcome {
  const r = spawnSync(process.execPath, [RUNNER, dir], { encoding: 'utf8', timeout: 30000 });
  const out = r.stdout + r.stderr;
  const summary = out.split('\n').filter((l) => /^\d+ passed, \d+ failed/.test(l)).pop();
  return { status: r.status, out, summary };
}

describe('scripts/run-tests.js', function () {
  this.timeout(40000);
  const tmp = useTempDir('vblk-runner-');

  function fixture(name: string, body: string): string {
    const dir = path.join(tmp.dir, name);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'fixture.test.js'), body);
    return dir;
  }

  it('fails when no test runs', () => {
    const dir = path.join(tmp.dir, 'empty');
    fs.mkdirSync(dir);
    const r = runOn(dir);
    expect(r.status, r.out).to.equal(1);
    expect(r.summary).to.equal('0 passed, 1 failed, 0 skipped');
    expect(r.out).to.match(/no tests ran/);
  });

  it('counts the tests a failed before hook kept from running as failed', () => {
    const dir = fixture('before', `
      describe('a suite whose set-up fails', () => {
        before(() => { throw new Error('set-up broke'); });
        it('one', () => {});
        it('two', () => {});
        describe('nested', () => { it('three', () => {}); });
      });
      describe('a healthy suite', () => { it('passes', () => {}); });
    `);
    const r = runOn(dir);
    expect(r.status, r.out).to.equal(1);
    expect(r.summary).to.equal('1 passed, 3 failed, 0 skipped');
  });

  it('counts a failed beforeEach hook against the tests it stopped', () => {
    const dir = fixture('before-each', `
      describe('each', () => {
        beforeEach(() => { throw new Error('no'); });
        it('one', () => {});
        it('two', () => {});
      });
    `);
    const r = runOn(dir);
    expect(r.status, r.out).to.equal(1);
    expect(r.summary).to.equal('0 passed, 2 failed, 0 skipped');
  });

  it('lists the reason of every skip at the end of the run', () => {
    const dir = fixture('skip', `
      const { skipBecause } = require(${JSON.stringify(SKIP_HELPER)});
      describe('needs a thing', function () {
        before(function () { skipBecause(this, 'the thing is missing here'); });
        it('uses the thing', () => {});
      });
      describe('other', () => { it('passes', () => {}); });
    `);
    const r = runOn(dir);
    expect(r.status, r.out).to.equal(0);
    expect(r.summary).to.equal('1 passed, 0 failed, 1 skipped');
    expect(r.out).to.match(/reasons given:\n\s+- needs a thing: the thing is missing here/);
  });

  it('exits after the last test even when a handle stays open, and names it', () => {
    const dir = fixture('handle', `
      const net = require('node:net');
      describe('leaky', () => {
        it('leaves a server listening', (done) => { net.createServer().listen(0, '127.0.0.1', done); });
      });
    `);
    const t0 = Date.now();
    const r = runOn(dir);
    expect(r.status, r.out).to.equal(0);
    expect(r.summary).to.equal('1 passed, 0 failed, 0 skipped');
    expect(r.out).to.match(/handles still open .*TCPServerWrap/);
    expect(Date.now() - t0).to.be.below(25000);
  });
});
