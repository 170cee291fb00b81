/**
 * What the VMM makes of the guest's report (src/kvm/run-guest.ts), without KVM: line splitting
 * with caps on guest-controlled sizes, and the list of checks a complete run must contain.
 */
import { expect } from 'chai';
import { MAX_REPORT_LINE, MAX_REPORT_LINES, REQUIRED_GUEST_CHECKS, ReportLines, guestString, missingGuestChecks, type GuestCheck } from '../../src/kvm/run-guest';

describe('ReportLines (guest report output)', function () {
  it('splits text arriving in pieces into lines and passes each complete line on', function () {
    const seen: string[] = [];
    const r = new ReportLines((l) => seen.push(l));
    r.push('PASS pro');
    r.push('be ok\nINFO a\nPART');
    expect(seen).to.deep.equal(['PASS probe ok', 'INFO a']);
    r.end();
    expect(r.lines).to.deep.equal(['PASS probe ok', 'INFO a', 'PART']);
    expect(r.overflowed).to.equal(false);
  });

  it('cuts a line that never ends at MAX_REPORT_LINE bytes and says it overflowed', function () {
    const r = new ReportLines();
    for (let i = 0; i < 3 * MAX_REPORT_LINE; i++) r.push('x');
    r.end();
    expect(r.lines.every((l) => l.length <= MAX_REPORT_LINE)).to.equal(true);
    expect(r.lines.join('').length).to.be.at.most(3 * MAX_REPORT_LINE);
    expect(r.overflowed).to.equal(true);
  });

  it('keeps at most MAX_REPORT_LINES lines and says it overflowed', function () {
    const r = new ReportLines();
    r.push('l\n'.repeat(MAX_REPORT_LINES + 10));
    expect(r.lines.length).to.equal(MAX_REPORT_LINES);
    expect(r.overflowed).to.equal(true);
  });
});

describe('guestString (port 0xEA: a string passed by guest address)', function () {
  it('reads up to the NUL, at most 256 bytes, and never past RAM', function () {
    const ram = Buffer.alloc(4096, 0x41);
    ram.write('PASS x\0junk', 100, 'latin1');
    expect(guestString(ram, 100)).to.equal('PASS x');
    expect(guestString(ram, 1000)).to.have.length(256); // no NUL: capped
    expect(guestString(ram, 4090)).to.equal('AAAAAA'); // clipped to RAM
    expect(guestString(ram, 5000)).to.equal(''); // outside RAM
  });
});

describe('missingGuestChecks (a run that skips a check cannot pass)', function () {
  const passed = (names: readonly string[]): GuestCheck[] => names.map((name) => ({ source: 'guest', name, ok: true, detail: '' }));

  it('a read-write run with every required check misses nothing', function () {
    expect(missingGuestChecks(passed([...REQUIRED_GUEST_CHECKS.always, ...REQUIRED_GUEST_CHECKS.readWrite]), false)).to.deep.equal([]);
  });

  it('a read-only run needs write-rejected-readonly, not the read-write checks', function () {
    const ro = passed([...REQUIRED_GUEST_CHECKS.always, ...REQUIRED_GUEST_CHECKS.readOnly]);
    expect(missingGuestChecks(ro, true)).to.deep.equal([]);
    expect(missingGuestChecks(ro, false)).to.deep.equal([...REQUIRED_GUEST_CHECKS.readWrite]);
  });

  it('names each missing check; VMM checks with the same name do not count', function () {
    const checks: GuestCheck[] = [...passed(['probe', 'features']), { source: 'vmm', name: 'queue', ok: true, detail: '' }];
    expect(missingGuestChecks(checks, true)).to.deep.equal(['queue', 'read', 'get-id', 'read-past-end', 'unknown-type', 'interrupts', 'reset', 'write-rejected-readonly']);
  });
});
