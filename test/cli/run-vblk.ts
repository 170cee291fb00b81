/**
 * Runs the vblk CLI for tests: in-process through `main()` (fast, used by most tests) or as the
 * real `bin.vblk` entry in a child process (exit codes, stderr, the shebang).
 */
import * as path from 'node:path';
import { main } from '../../src/cli/main';
import { run, type ToolResult } from '../helpers/qemu';

/** Runs `vblk ...args` in this process and captures its output. */
export function vblk(...args: string[]): Promise<ToolResult> {
  return vblkWith({ tty: false }, ...args);
}

/** Same as `vblk`, with stdout presented as a TTY or not (progress output depends on it). */
export async function vblkWith(opts: { readonly tty: boolean }, ...args: string[]): Promise<ToolResult> {
  let stdout = '';
  let stderr = '';
  const status = await main(args, {
    stdout: { write: (s: string) => (stdout += s), isTTY: opts.tty },
    stderr: { write: (s: string) => (stderr += s) },
  });
  return { status, stdout, stderr };
}

/** Path of the compiled entry (build/src/cli/main.js). */
export const VBLK_BIN = path.resolve(__dirname, '../../src/cli/main.js');

/** Runs the compiled `vblk` in a child process. */
export function vblkProcess(...args: string[]): ToolResult {
  return run(process.execPath, [VBLK_BIN, ...args]);
}
