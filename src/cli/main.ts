#!/usr/bin/env node
/**
 * `vblk`: the command-line entry (package.json `bin.vblk`). Dispatches to one file per command in
 * src/cli/commands/; to add a command, create its file and add one line to `COMMANDS`.
 *
 * Errors are printed as ONE line, `vblk: <message>`, never a stack trace (set VBLK_DEBUG=1 for
 * the stack). Exit codes follow qemu-img (see each command).
 */
import '../threadpool'; // first: sizes the libuv pool before any fs call

import type { Command, CliIO } from './command';
import { infoCommand } from './commands/info';
import { mapCommand } from './commands/map';
import { compareCommand } from './commands/compare';
import { convertCommand } from './commands/convert';
import { ioCommand } from './commands/io';
import { benchCommand } from './commands/bench';
import { runCommand } from './commands/run';
import { serveCommand } from './commands/serve';
import { createCommand } from './commands/create';
import { checkCommand } from './commands/check';

/** Every command, in `vblk --help` order. */
export const COMMANDS: readonly Command[] = [
  infoCommand,
  createCommand,
  checkCommand,
  mapCommand,
  compareCommand,
  convertCommand,
  ioCommand,
  benchCommand,
  runCommand,
  serveCommand,
];

function help(io: CliIO): void {
  io.stdout.write('usage: vblk <command> [options]\n\nCommands:\n');
  for (const c of COMMANDS) io.stdout.write(`  ${c.name.padEnd(10)}${c.summary}\n`);
  io.stdout.write('\nRun "vblk <command> --help" for the options of a command. Sizes take k, M, G, T suffixes.\n');
}

/** One line for an error: the message of a VblkError or Error, never a stack. */
export function errorLine(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  return `vblk: ${msg.split('\n')[0] ?? msg}`;
}

/** Runs `vblk argv...`; resolves to the exit code. */
export async function main(argv: readonly string[], io: CliIO): Promise<number> {
  const name = argv[0];
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    help(io);
    return name === undefined ? 1 : 0;
  }
  if (name === '--version' || name === '-V') {
    io.stdout.write('vblk 0.1.0\n');
    return 0;
  }
  const cmd = COMMANDS.find((c) => c.name === name);
  if (!cmd) {
    io.stderr.write(`vblk: unknown command "${name}" (run "vblk --help")\n`);
    return 1;
  }
  const rest = argv.slice(1);
  if (rest.includes('--help') || rest.includes('-h')) {
    io.stdout.write(`usage: vblk ${cmd.usage}\n`);
    return 0;
  }
  try {
    return await cmd.run(rest, io);
  } catch (e) {
    // A usage error stays one line too: it points at --help instead of dumping the usage text.
    const usageHint = (e as { code?: unknown }).code === 'E_USAGE' ? ` (see "vblk ${cmd.name} --help")` : '';
    io.stderr.write(errorLine(e) + usageHint + '\n');
    if (process.env['VBLK_DEBUG'] && e instanceof Error && e.stack) io.stderr.write(e.stack + '\n');
    return cmd.errorExitCode ?? 1;
  }
}

if (require.main === module) {
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  });
  main(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr }).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(errorLine(e) + '\n');
      process.exitCode = 1;
    },
  );
}
