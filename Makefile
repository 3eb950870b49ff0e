# qimg: build, test and demo.
#
#   make deps    install missing Debian packages (apt-get; only when something is missing)
#   make build   swift build (debug): .build/debug/qimg
#   make test    deps + the full test suite (swift test)
#   make demo    deps + build + scripts/demo.sh on images generated in ./demo/
#   make bench   benchmarks against qemu-img (release build; writes Docs/performance.md)
#   make fuzz    mutation fuzzing of every command on malformed images (FUZZ_MINUTES=10)
#   make clean   remove build products and ./demo/

SHELL := /bin/bash
SWIFT ?= swift
QIMG  ?= .build/debug/qimg
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# CHECK:PACKAGE pairs. CHECK is a command that must be on PATH, or an
# absolute path (a header) that must exist.
DEPS := \
	pkg-config:pkgconf \
	/usr/include/zlib.h:zlib1g-dev \
	/usr/include/zstd.h:libzstd-dev \
	qemu-img:qemu-utils \
	qemu-io:qemu-utils \
	qemu-nbd:qemu-utils \
	qemu-storage-daemon:qemu-system-common \
	nbdinfo:libnbd-bin \
	openssl:openssl \
	python3:python3

.PHONY: all deps build test demo bench fuzz clean

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
fuzz: deps build
	scripts/fuzz --minutes $(FUZZ_MINUTES)

clean:
	$(SWIFT) package clean
	rm -rf demo
