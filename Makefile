# vblk — every target installs what it needs on a fresh Debian machine (we run as root).
SHELL := /bin/bash
NODE_MODULES := node_modules/.package-lock.json
NATIVE_SRC := $(wildcard native-bindings/*.c)
NATIVE_LIB := build/native/libvblk.so

.PHONY: all build deps test demo bench fuzz clean native guest-kvm apt-qemu-utils apt-qemu-system

all: build

$(NODE_MODULES): package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

# Debian packages, installed only when the tool is missing.
apt-qemu-utils:
	@command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || { \
	  echo "installing qemu-utils (qemu-img, qemu-io)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null; }

apt-qemu-system:
	@command -v qemu-system-x86_64 >/dev/null && command -v qemu-storage-daemon >/dev/null || { \
	  echo "installing qemu-system-x86 (qemu-system-x86_64, qemu-storage-daemon)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null; }

deps: $(NODE_MODULES) apt-qemu-utils
	@command -v cc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; }

$(NATIVE_LIB): $(NATIVE_SRC) scripts/build-native.js
	node scripts/build-native.js --strict

native: $(NATIVE_LIB)

# KVM test guest (issue 5): freestanding C -> flat binary loaded at 0x10000 by src/kvm/run-guest.ts.
GUEST_KVM := build/guest-kvm/blk-guest.bin
GUEST_KVM_CFLAGS := -m64 -O2 -ffreestanding -fno-pic -fno-pie -no-pie -nostdlib -static -mno-red-zone \
  -mgeneral-regs-only -fno-stack-protector -fno-asynchronous-unwind-tables -fcf-protection=none -Wall -Wextra
$(GUEST_KVM): guest/blk-guest.c guest/guest.ld
	@mkdir -p build/guest-kvm
	cc $(GUEST_KVM_CFLAGS) -T guest/guest.ld -Wl,--build-id=none -o build/guest-kvm/blk-guest.elf guest/blk-guest.c
	objcopy -O binary build/guest-kvm/blk-guest.elf $@

guest-kvm: $(GUEST_KVM)

# Linux test guest for the vhost-user e2e tests, guest bench and guest demo (issue 6): Debian
# cloud kernel + busybox/e2fsprogs/fio initramfs in build/guest/ (cached; scripts/build-guest.sh).
.PHONY: guest guest-demo
guest: apt-qemu-system
	bash scripts/build-guest.sh

guest-demo: build guest
	bash scripts/guest-demo.sh

build: deps native guest-kvm
	npx tsc -p tsconfig.json

# Everything the tests need is built first (the tests themselves never install or build):
# the native shim, the KVM guest, the Linux test guest; then lint, then the suite.
test: build apt-qemu-system guest kvm-guest
	npm run --silent lint
	node scripts/run-tests.js

demo: build apt-qemu-system guest
	bash scripts/demo.sh

bench: build apt-qemu-system guest
	node build/src/bench/main.js

fuzz: build
	VBLK_FUZZ_SECONDS=$${VBLK_FUZZ_SECONDS:-300} node scripts/run-tests.js build/test/virtio

clean:
	rm -rf build

# Nested-KVM guest for scripts/with-kvm.sh (issue 14): the KVM tier runs through it on machines
# without /dev/kvm (cached in build/kvm-guest/).
.PHONY: kvm-guest
kvm-guest: apt-qemu-system
	bash scripts/build-kvm-guest.sh
