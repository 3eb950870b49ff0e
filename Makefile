# qimg: build, test and demo.
#
#   make deps    install missing Debian packages (apt-get; only when something is missing)
#   make build   swift build (debug): .build/debug/qimg
#   make test    deps + the full test suite (swift test)
#   make demo    deps + build + scripts/demo.sh on images generated in ./demo/
#   make bench   benchmarks against qemu-img (release build; writes Docs/performance.md)
#   make fuzz    mutation fuzzing of every command on malformed images (FUZZ_MINUTES=10)
#   make crashtest  SIGKILL qimg during writes, bitmap edits, backups, commit/rebase, convert (CRASH_KILLS=100)
#   make sanitize   the test suite under AddressSanitizer, and the CLI tests against a ThreadSanitizer qimg
#   make clean   remove build products and ./demo/

SHELL := /bin/bash
SWIFT ?= swift
QIMG  ?= .build/debug/qimg
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# CHECK:PACKAGE pairs. CHECK is a command that must be on PATH, or an
# absolute path (a header) that must exist.
DEPS := \
	pkg-config:pkgconf \
	prlimit:util-linux \
	/usr/include/zlib.h:zlib1g-dev \
	/usr/include/zstd.h:libzstd-dev \
	qemu-img:qemu-utils \
	qemu-io:qemu-utils \
	qemu-nbd:qemu-utils \
	qemu-storage-daemon:qemu-system-common \
	nbdinfo:libnbd-bin \
	openssl:openssl \
	python3:python3

.PHONY: all deps build test demo bench fuzz crashtest sanitize clean

all: build

deps:
	@missing=""; \
	for pair in $(DEPS); do \
	    check=$${pair%%:*}; pkg=$${pair#*:}; \
	    case $$check in \
	        /*) [ -e "$$check" ] && continue ;; \
	        *)  command -v "$$check" >/dev/null 2>&1 && continue ;; \
	    esac; \
	    case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg" ;; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "make deps: installing$$missing"; \
	    $(SUDO) apt-get update && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi

build:
	$(SWIFT) build

test: deps
	@$(SWIFT) build || { echo "make test: BUILD FAILED" >&2; exit 1; }
	@$(SWIFT) test || { echo "make test: TESTS FAILED" >&2; exit 1; }

demo: deps build
	QIMG="$(QIMG)" bash scripts/demo.sh

# Benchmarks against qemu-img/QEMU (not part of `make test`): Docs/performance.md.
bench: deps
	$(SWIFT) build -c release --static-swift-stdlib --scratch-path .build-release
	QIMG=.build-release/release/qimg scripts/bench

# A time-boxed mutation fuzzing campaign (default 10 minutes): Docs/reliability.md.
FUZZ_MINUTES ?= 10
# The release binary (static runtime) starts 3x faster than the debug one: more inputs per minute.
fuzz: deps
	$(SWIFT) build -c release --static-swift-stdlib --scratch-path .build-release
	scripts/fuzz --minutes $(FUZZ_MINUTES) --qimg .build-release/release/qimg

# Crash consistency (default 100 effective kills per operation kind), debug build: Docs/reliability.md.
CRASH_KILLS ?= 100
crashtest: deps build
	scripts/crashtest --kills $(CRASH_KILLS) --qimg $(QIMG)

# Sanitizers (not part of make test; about 6 + 3 minutes): Docs/reliability.md.
# AddressSanitizer: the library tests in-process and every CLI test against an ASan qimg
# (leak reports off: they come from XCTest's runtime and process-exit allocations).
# ThreadSanitizer: the CLI tests against a TSan qimg (compression runs on every core).
# UndefinedBehaviorSanitizer is not available for Swift on Linux (swiftc refuses it);
# Swift's own checks (overflow, bounds, force unwraps) trap in every build.
sanitize: deps
	$(SWIFT) build --build-tests --sanitize=address --scratch-path .build-asan
	QIMG_SANITIZER=address QIMG_BINARY=.build-asan/debug/qimg ASAN_OPTIONS=detect_leaks=0 \
	    $(SWIFT) test --skip-build --sanitize=address --scratch-path .build-asan
	$(SWIFT) build --product qimg --sanitize=thread --scratch-path .build-tsan
	$(SWIFT) build --build-tests
	QIMG_SANITIZER=thread QIMG_BINARY=.build-tsan/debug/qimg TSAN_OPTIONS=halt_on_error=1 \
	    $(SWIFT) test --skip-build --filter qimgTests

clean:
	$(SWIFT) package clean
	rm -rf demo
