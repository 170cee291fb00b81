/**
 * The layering rule of ARCHITECTURE.md, checked on the source: no module imports itself back
 * through a chain of relative imports (type-only imports included: they couple the files just
 * the same).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';

const SRC = path.resolve(__dirname, '..', '..', '..', 'src');
const IMPORT = /^(?:import|export)\b[^'"]*?\bfrom\s+'(\.[^']+)'/gm;

function sourceFiles(dir: string, out: string[] = []): string[] {
  for (const ent of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, ent.name);
    if (ent.isDirectory()) sourceFiles(p, out);
    else if (ent.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

function resolveImport(from: string, spec: string): string {
  const target = path.resolve(path.dirname(from), spec);
  return fs.existsSync(target) && fs.statSync(target).isDirectory() ? path.join(target, 'index.ts') : `${target}.ts`;
}

function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const file of sourceFiles(SRC)) {
    const text = fs.readFileSync(file, 'utf8');
    graph.set(file, [...text.matchAll(IMPORT)].map((m) => resolveImport(file, m[1] ?? '')));
  }
  return graph;
}

/** The first import cycle found, as a list of files ending where it began, or undefined (depth-first search). */
function findCycle(graph: Map<string, string[]>): string[] | undefined {
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (file: string): string[] | undefined => {
    state.set(file, 'open');
    stack.push(file);
    for (const dep of graph.get(file) ?? []) {
      if (!graph.has(dep)) continue;
      const s = state.get(dep);
      if (s === 'open') return [...stack.slice(stack.indexOf(dep)), dep];
      if (s === undefined) {
        const found = visit(dep);
        if (found) return found;
      }
    }
    stack.pop();
    state.set(file, 'done');
    return undefined;
  };
  for (const file of graph.keys()) {
    if (state.has(file)) continue;
    const found = visit(file);
    if (found) return found;
  }
  return undefined;
}

describe('source layout', () => {
  it('reads the import graph of src/ (the check below has something to check)', () => {
    const graph = importGraph();
    expect(graph.size).to.be.greaterThan(50);
    expect([...graph.values()].some((deps) => deps.length > 0)).to.equal(true);
  });

  it('has no import cycle between modules of src/', () => {
    const cycle = findCycle(importGraph());
    expect(cycle?.map((f) => path.relative(SRC, f)).join(' -> '), 'import cycle').to.equal(undefined);
  });
});

describe('Node APIs', () => {
  it('src/ reaches no Node internals (process.binding, internalBinding): they warn and go away', () => {
    const offenders = sourceFiles(SRC).filter((f) => /\bprocess\.binding\b|\binternalBinding\b/.test(fs.readFileSync(f, 'utf8').replace(/\/\/.*$|\/\*[\s\S]*?\*\//gm, '')));
    expect(offenders.map((f) => path.relative(SRC, f))).to.deep.equal([]);
  });
});
