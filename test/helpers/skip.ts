/**
 * Skipping with a reason. A skipped test is not a passed one: the runner (scripts/run-tests.js)
 * lists every reason given here at the end of the run, and flags skips that gave none.
 */
import * as fs from 'node:fs';
import Mocha from 'mocha';
import { nativeLibraryPath } from '../../src/native/library';

/** Where the runner finds the reasons (shared through globalThis: the runner is plain JS). */
interface SkipLedger {
  __vblkSkipReasons?: string[];
}

/**
 * Prints `why`, records it for the run's summary, and skips the current test (or, from a
 * `before` hook, the whole suite). Call from a `function () {}` callback, not an arrow.
 */
export function skipBecause(ctx: Mocha.Context, why: string): never {
  // From a hook, the suite it skips; from a test, the test.
  const runnable = ctx.test;
  const where = (runnable instanceof Mocha.Hook ? runnable.parent?.fullTitle() : runnable?.fullTitle()) ?? '';
  console.log(`      (skipped: ${why})`);
  const ledger = globalThis as SkipLedger;
  (ledger.__vblkSkipReasons ??= []).push(`${where}: ${why}`);
  ctx.skip();
}

/** Skips (with the reason) when vblk's native library has not been built: `make native` builds it. */
export function requireNativeLibrary(ctx: Mocha.Context): void {
  if (!fs.existsSync(nativeLibraryPath())) skipBecause(ctx, `${nativeLibraryPath()} is missing; run \`make native\``);
}
