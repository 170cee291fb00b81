import { expect } from 'chai';
import { EventFdReader } from '../../src/kvm/eventfd-reader';
import { signalEventFd } from '../../src/kvm/vm';
import { close, eventfd } from '../../src/native/libc';
import { requireNativeLibrary } from '../helpers/skip';

describe('EventFdReader (ioeventfd waiter on its own thread)', function () {
  before(function () {
    requireNativeLibrary(this);
  });

  it('calls onSignal on the main thread after the eventfd is written, and stop() ends the thread', async function () {
    const fd = eventfd(0);
    try {
      let calls = 0;
      let wake: () => void = () => undefined;
      const woke = new Promise<void>((r) => (wake = r));
      const reader = new EventFdReader(fd, () => {
        calls++;
        wake();
      });
      signalEventFd(fd);
      await woke;
      await reader.stop();
      expect(calls).to.equal(1);
      expect(reader.wakeups).to.equal(1);
    } finally {
      close(fd);
    }
  });

  it('stop() on an idle reader returns without any signal being delivered', async function () {
    const fd = eventfd(0);
    try {
      let calls = 0;
      const reader = new EventFdReader(fd, () => calls++);
      await new Promise((r) => setTimeout(r, 20));
      await reader.stop();
      expect(calls).to.equal(0);
    } finally {
      close(fd);
    }
  });
});
