/**
 * The contract between `vblk` (src/cli/main.ts) and its commands: each command is one file in
 * src/cli/commands/ exporting a `Command`; adding a command is that file plus one line in the
 * table in main.ts.
 */
import { VblkError } from '../errors';

/** Where a command writes; tests pass in-memory sinks. */
export interface CliIO {
  readonly stdout: { write(s: string): unknown; readonly isTTY?: boolean };
  readonly stderr: { write(s: string): unknown; readonly isTTY?: boolean };
}

export interface Command {
  /** `vblk <name>`. */
  readonly name: string;
  /** One line for `vblk --help`. */
  readonly summary: string;
  /** Usage text (after "usage: vblk "), printed on `--help` and usage errors. */
  readonly usage: string;
  /** Exit code when the command fails with an error (qemu-img: 1; compare: 2). */
  readonly errorExitCode?: number;
  /** Runs the command; resolves to the exit code. Errors thrown are printed as one line. */
  run(argv: readonly string[], io: CliIO): Promise<number>;
}

/** A usage error (bad option, missing argument); printed as `vblk: <message>`. */
export class UsageError extends VblkError {
  constructor(message: string) {
    super('E_USAGE', message);
  }
}

/** Progress output of a long command (`-p`), as qemu-img prints it. */
export interface ProgressPrinter {
  /** `done` of the total bytes are finished. */
  update(done: number): void;
  /** Prints the final `(100.00/100%)` line. */
  finish(): void;
}

/**
 * qemu-img's `-p` progress: `    (NN.NN/100%)` rewritten in place on a TTY (at most every 0.5%),
 * and only the final line when stdout is not a TTY (a log file should not fill with `\r` lines).
 */
export function progressPrinter(io: CliIO, total: number): ProgressPrinter {
  const tty = io.stdout.isTTY === true;
  let last = -1;
  return {
    update(done) {
      if (!tty) return;
      const pct = total === 0 ? 100 : (done / total) * 100;
      if (pct - last < 0.5 && pct < 100) return;
      last = pct;
      io.stdout.write(`    (${pct.toFixed(2)}/100%)\r`);
    },
    finish() {
      io.stdout.write('    (100.00/100%)\n');
    },
  };
}
