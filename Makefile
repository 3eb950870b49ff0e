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
#   make release    release build (static Swift runtime), man pages and completion scripts
#                   in .build-release/ (nothing installed)
#   make install    release, then installs qimg, its man pages and its bash/zsh/fish
#                   completions under $(DESTDIR)$(PREFIX) (PREFIX=/usr/local)
#   make uninstall  removes what make install installed
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
	/usr/include/isa-l/igzip_lib.h:libisal-dev \
	/usr/include/libnbd.h:libnbd-dev \
	qemu-img:qemu-utils \
	qemu-io:qemu-utils \
	qemu-nbd:qemu-utils \
	qemu-storage-daemon:qemu-system-common \
	qemu-system-x86_64:qemu-system-x86 \
	/vmlinuz:linux-image-amd64 \
	busybox:busybox-static \
	/usr/sbin/qemu-ga:qemu-guest-agent \
	/sbin/debugfs:e2fsprogs \
	nbdinfo:libnbd-bin \
	nbdcopy:libnbd-bin \
	/usr/lib/python3/dist-packages/nbd.py:python3-libnbd \
	/usr/sbin/libvirtd:libvirt-daemon \
	virsh:libvirt-clients \
	unshare:util-linux \
	virtnbdbackup:virtnbdbackup \
	openssl:openssl \
	python3:python3 \
	script:bsdutils

.PHONY: all deps build test demo bench fuzz crashtest sanitize release install uninstall clean

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

# The release build (static Swift runtime: the binary needs no Swift installation) that
# bench, fuzz and install use. --disable-local-rpath: no $ORIGIN run path, so the installed
# binary does not look for its system libraries in its own directory first (24 failed
# openat/stat calls at every start, and a library dropped beside it would be loaded).
RELEASE_BUILD := $(SWIFT) build -c release --static-swift-stdlib --disable-local-rpath --scratch-path .build-release
RELEASE_QIMG  := .build-release/release/qimg

# Benchmarks against qemu-img/QEMU (not part of `make test`): Docs/performance.md.
bench: deps
	$(RELEASE_BUILD)
	QIMG=$(RELEASE_QIMG) scripts/bench

# A time-boxed mutation fuzzing campaign (default 10 minutes): Docs/reliability.md.
FUZZ_MINUTES ?= 10
# The release binary (static runtime) starts 3x faster than the debug one: more inputs per minute.
fuzz: deps
	$(RELEASE_BUILD)
	scripts/fuzz --minutes $(FUZZ_MINUTES) --qimg $(RELEASE_QIMG)

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

# Installation. `make release` builds as the user who runs it; a later `sudo make install`
# then only copies (the binary is rebuilt only when a source changed).
# The man pages come from the command definitions (swift-argument-parser's
# generate-manual tool, built from the package's own checkout: no network); qimg.1 is
# the whole reference on one page, qimg.SUBCOMMAND.1 one page per subcommand.
# The completion scripts come from `qimg --generate-completion-script`.
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR     = $(PREFIX)/bin
MAN1DIR    = $(PREFIX)/share/man/man1
BASHCOMPDIR = $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  = $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR = $(PREFIX)/share/fish/vendor_completions.d
GENMAN  := .build-release/release/generate-manual
DIST    := .build-release/dist
SOURCES := Package.swift $(shell find Sources -name '*.swift' -o -name '*.modulemap' -o -name '*.h')
# The date on the man pages: the last commit's (reproducible), else today's.
MAN_DATE := $(shell git log -1 --format=%cs 2>/dev/null || date +%F)

# (touch: a build that finds nothing to do leaves the binary's date alone; the Makefile is a
# prerequisite because RELEASE_BUILD's flags live here)
$(RELEASE_QIMG): $(SOURCES) Makefile
	$(RELEASE_BUILD)
	touch $@

$(GENMAN):
	$(RELEASE_BUILD) --product generate-manual

# Empty lines of the discussions become paragraph breaks (mdoc warns about empty lines).
$(DIST)/stamp: $(RELEASE_QIMG) $(GENMAN)
	rm -rf $(DIST) && mkdir -p $(DIST)/man/pages $(DIST)/completions
	$(GENMAN) $(RELEASE_QIMG) --date $(MAN_DATE) --output-directory - | sed 's/^$$/.Pp/' > $(DIST)/man/qimg.1
	$(GENMAN) $(RELEASE_QIMG) --date $(MAN_DATE) --multi-page --output-directory $(DIST)/man/pages
	rm -f $(DIST)/man/pages/qimg.1 $(DIST)/man/pages/qimg.help.1
	sed -i 's/^$$/.Pp/' $(DIST)/man/pages/*.1
	$(RELEASE_QIMG) --generate-completion-script bash > $(DIST)/completions/qimg.bash
	$(RELEASE_QIMG) --generate-completion-script zsh > $(DIST)/completions/_qimg
	$(RELEASE_QIMG) --generate-completion-script fish > $(DIST)/completions/qimg.fish
	touch $@

release: $(DIST)/stamp

install: $(DIST)/stamp
	install -D -m 755 $(RELEASE_QIMG) $(DESTDIR)$(BINDIR)/qimg
	install -D -m 644 $(DIST)/man/qimg.1 $(DESTDIR)$(MAN1DIR)/qimg.1
	for page in $(DIST)/man/pages/qimg.*.1; do \
	    install -D -m 644 "$$page" "$(DESTDIR)$(MAN1DIR)/$${page##*/}" || exit 1; \
	done
	install -D -m 644 $(DIST)/completions/qimg.bash $(DESTDIR)$(BASHCOMPDIR)/qimg
	install -D -m 644 $(DIST)/completions/_qimg $(DESTDIR)$(ZSHCOMPDIR)/_qimg
	install -D -m 644 $(DIST)/completions/qimg.fish $(DESTDIR)$(FISHCOMPDIR)/qimg.fish

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/qimg $(DESTDIR)$(MAN1DIR)/qimg.1 $(DESTDIR)$(MAN1DIR)/qimg.*.1
	rm -f $(DESTDIR)$(BASHCOMPDIR)/qimg $(DESTDIR)$(ZSHCOMPDIR)/_qimg $(DESTDIR)$(FISHCOMPDIR)/qimg.fish

clean:
	$(SWIFT) package clean
	rm -rf demo
