/**
 * Kvm.open's error lines for hosts where KVM is unusable, driven through injected system calls so
 * they run everywhere (no root, no old kernel needed): missing device, no permission, a file that
 * is not KVM, an old API. Each is one E_KVM line, and the fd is closed on every failure after open.
 */
import { expect } from 'chai';
import { TransportError, isVblkError } from '../../src/errors';
import { KVM_IOCTL } from '../../src/kvm/abi';
import { Kvm, type KvmOpenSyscalls } from '../../src/kvm/kvm';

/** A fake host: `open` fails with `openErrno` if given, the API version ioctl returns `api` or fails with `apiErrno`. */
function fakeHost(o: { exists?: boolean; openErrno?: string; api?: number; apiErrno?: string }): KvmOpenSyscalls & { closed: number[] } {
  const closed: number[] = [];
  return {
    closed,
    exists: () => o.exists ?? true,
    open: (p) => {
      if (o.openErrno !== undefined) throw new TransportError('E_NATIVE', `Cannot open ${p}: ${o.openErrno}`, { errnoName: o.openErrno });
      return 42;
    },
    ioctl: (_fd, request, _value, what) => {
      if (request !== KVM_IOCTL.GET_API_VERSION) throw new Error(`unexpected ioctl ${what}`);
      if (o.apiErrno !== undefined) throw new TransportError('E_KVM', `Cannot ${what}: ${o.apiErrno}`, { errnoName: o.apiErrno });
      return o.api ?? 12;
    },
    close: (fd) => closed.push(fd),
  };
}

function openError(sys: KvmOpenSyscalls): Error {
  try {
    // Never close() a Kvm from a fake host: its fd 42 is not ours to close.
    Kvm.open('/dev/kvm', sys);
  } catch (e) {
    expect(isVblkError(e, 'E_KVM'), String(e)).to.equal(true);
    return e as Error;
  }
  throw new Error('expected Kvm.open to fail');
}

describe('Kvm.open on hosts where KVM is unusable (injected system calls)', function () {
  it('a missing device node', function () {
    expect(openError(fakeHost({ exists: false })).message).to.equal('Cannot open /dev/kvm: it does not exist (KVM is not available on this host)');
  });

  it('no permission (EACCES) says which group to join', function () {
    expect(openError(fakeHost({ openErrno: 'EACCES' })).message).to.equal("Cannot open /dev/kvm: permission denied (run as a user in the group that owns /dev/kvm, usually 'kvm')");
  });

  it('another open failure names the errno', function () {
    expect(openError(fakeHost({ openErrno: 'EBUSY' })).message).to.equal('Cannot open /dev/kvm: EBUSY');
  });

  it('an old KVM API version is refused and the fd closed', function () {
    const host = fakeHost({ api: 11 });
    expect(openError(host).message).to.equal('Cannot use /dev/kvm: KVM API version 11, vblk needs 12');
    expect(host.closed).to.deep.equal([42]);
  });

  it('a file that does not understand KVM ioctls (ENOTTY) is "not a KVM device" and the fd closed', function () {
    const host = fakeHost({ apiErrno: 'ENOTTY' });
    expect(openError(host).message).to.equal('Cannot use /dev/kvm: it is not a KVM device (KVM_GET_API_VERSION failed with ENOTTY)');
    expect(host.closed).to.deep.equal([42]);
  });

  it('API version 12 opens', function () {
    const host = fakeHost({ api: 12 });
    const kvm = Kvm.open('/dev/kvm', host);
    expect(kvm.apiVersion).to.equal(12);
    expect(host.closed).to.deep.equal([]);
  });
});
