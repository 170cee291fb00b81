/**
 * The one seed of a test run's random inputs: `VBLK_FUZZ_SEED` when set (to replay a run),
 * else chosen now. Printed once, so that any failure can be replayed with the same inputs;
 * fast-check's properties draw from it too (their failure message adds the exact path).
 */
import * as fc from 'fast-check';

function chooseSeed(): number {
  const env = process.env['VBLK_FUZZ_SEED'];
  if (env !== undefined && env !== '') {
    const n = Number(env);
    if (!Number.isSafeInteger(n)) throw new Error(`VBLK_FUZZ_SEED must be an integer, got ${JSON.stringify(env)}`);
    return n;
  }
  return Date.now() % 0x7fffffff;
}

export const FUZZ_SEED = chooseSeed();

let announced = false;

/** Prints the seed (once per process) and makes fast-check use it. Call at the top of a test file. */
export function useFuzzSeed(): number {
  if (!announced) {
    announced = true;
    console.log(`    random inputs: seed ${FUZZ_SEED} (replay with VBLK_FUZZ_SEED=${FUZZ_SEED})`);
    fc.configureGlobal({ ...fc.readConfigureGlobal(), seed: FUZZ_SEED });
  }
  return FUZZ_SEED;
}
