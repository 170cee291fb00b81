import { expect } from 'chai';
import { AdaptivePoll, MIN_HIT_RATE, PROBE_FIRST_NS, PROBE_MAX_NS } from '../../src/virtio/adaptive-poll';

const US = 1000;

/** A policy on a hand-driven clock (nanoseconds). */
function policy(maxNs = 300 * US, minNs?: number): { p: AdaptivePoll; advance: (ns: number) => void; now: () => number } {
  let t = 0;
  const p = new AdaptivePoll({ maxNs, ...(minNs !== undefined ? { minNs } : {}), clock: () => t });
  return {
    p,
    advance: (ns) => {
      t += ns;
    },
    now: () => t,
  };
}

/** One idle period that ends with a request `gapNs` later; returns whether it polled. */
function idleThenArrive(c: ReturnType<typeof policy>, gapNs: number): boolean {
  const polled = c.p.idle();
  c.advance(gapNs);
  c.p.arrived();
  return polled;
}

/** Windows that catch nothing until polling turns off; returns how many were polled. */
function missUntilOff(c: ReturnType<typeof policy>): number {
  let n = 0;
  while (c.p.polling) {
    c.p.idle();
    c.advance(1000 * US);
    c.p.arrived();
    n++;
  }
  return n;
}

/** Starts the first probe (polling on, window = max). */
function probe(c: ReturnType<typeof policy>): void {
  c.advance(PROBE_FIRST_NS);
}

describe('AdaptivePoll', () => {
  it('never polls with a zero maximum window', () => {
    const c = policy(0);
    c.advance(10 * PROBE_MAX_NS);
    expect(c.p.idle()).to.equal(false);
    expect(c.p.windowNs).to.equal(0);
  });

  it('starts off and probes once PROBE_FIRST_NS has passed', () => {
    const c = policy();
    expect(c.p.idle()).to.equal(false);
    c.advance(PROBE_FIRST_NS);
    expect(c.p.idle()).to.equal(true);
    expect(c.p.probes).to.equal(1);
  });

  it('a probe polls for the whole maximum window', () => {
    const c = policy(300 * US);
    probe(c);
    expect(c.p.idle()).to.equal(true);
    expect(c.p.windowNs).to.equal(300 * US);
    c.advance(299 * US);
    expect(c.p.open()).to.equal(true);
    c.advance(1 * US);
    expect(c.p.open()).to.equal(false);
  });

  it('the window settles at twice the gaps it catches', () => {
    const c = policy(300 * US);
    probe(c);
    for (let i = 0; i < 100; i++) idleThenArrive(c, 40 * US);
    expect(c.p.windowNs).to.be.closeTo(80 * US, 1 * US);
    expect(c.p.polling).to.equal(true);
  });

  it('gaps the window misses do not stretch it: it keeps to the shorter mode', () => {
    const c = policy(300 * US);
    probe(c);
    // Alternate 40 µs (caught) and 150 µs gaps: once the window is below 150 µs, those are misses.
    for (let i = 0; i < 200; i++) idleThenArrive(c, i % 2 === 0 ? 40 * US : 150 * US);
    expect(c.p.windowNs).to.be.below(100 * US);
    expect(c.p.polling).to.equal(true); // half the windows catch a request
  });

  it('never shrinks the window below minNs', () => {
    const c = policy(300 * US, 4 * US);
    probe(c);
    for (let i = 0; i < 100; i++) idleThenArrive(c, 100);
    expect(c.p.windowNs).to.equal(4 * US);
  });

  it('stops polling when fewer than MIN_HIT_RATE of the windows catch a request', () => {
    const c = policy(100 * US);
    probe(c);
    c.p.idle(); // the probe starts here
    c.advance(1000 * US);
    c.p.arrived();
    const polled = 1 + missUntilOff(c);
    expect(c.p.polling).to.equal(false);
    expect(c.p.misses).to.equal(polled);
    expect(polled).to.be.within(10, 60); // from the probe's 0.3 down to MIN_HIT_RATE
    expect(MIN_HIT_RATE).to.be.below(0.3);
  });

  it('doubles the wait after each failed probe, up to PROBE_MAX_NS', () => {
    const c = policy(100 * US);
    const waits: number[] = [];
    probe(c);
    c.p.idle();
    for (let round = 0; round < 12; round++) {
      missUntilOff(c);
      const off = c.now();
      while (!c.p.idle()) c.advance(PROBE_FIRST_NS / 8);
      waits.push(c.now() - off);
    }
    expect(waits[0]).to.equal(PROBE_FIRST_NS);
    expect(waits[1]).to.equal(2 * PROBE_FIRST_NS);
    expect(waits[2]).to.equal(4 * PROBE_FIRST_NS);
    expect(Math.max(...waits)).to.equal(PROBE_MAX_NS);
  });

  it('a probe that catches most requests resets the backoff', () => {
    const c = policy(100 * US);
    probe(c);
    c.p.idle();
    missUntilOff(c); // failed probe: the wait after the next failure doubles
    c.advance(PROBE_FIRST_NS);
    for (let i = 0; i < 100; i++) idleThenArrive(c, 10 * US); // this probe holds
    missUntilOff(c); // then the workload changes
    const off = c.now();
    c.advance(PROBE_FIRST_NS - 1);
    expect(c.p.idle()).to.equal(false);
    c.p.arrived();
    c.advance(1);
    expect(c.p.idle()).to.equal(true);
    expect(c.now() - off).to.equal(PROBE_FIRST_NS);
  });

  it('cancel() forgets the idle period: neither a hit nor a miss', () => {
    const c = policy();
    probe(c);
    c.p.idle();
    c.advance(1000 * US);
    c.p.cancel();
    c.p.arrived();
    expect(c.p.hits + c.p.misses).to.equal(0);
    expect(c.p.open()).to.equal(false);
  });

  it('a request found without an idle period (arrived twice) counts once', () => {
    const c = policy();
    probe(c);
    idleThenArrive(c, 10 * US);
    c.p.arrived();
    expect(c.p.hits).to.equal(1);
  });

  it('refuses a negative or non-finite maximum', () => {
    expect(() => new AdaptivePoll({ maxNs: -1 })).to.throw(RangeError, /window -1 ns/);
    expect(() => new AdaptivePoll({ maxNs: Number.NaN })).to.throw(RangeError);
  });
});
