# eztunnel-plugin build, test, demo and benchmark entry points.
# Everything a fresh Debian 12 machine needs is installed from here (run as root).

SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PKG := src/eztunnel_plugin
# The lab (simulator, demo, fake istiod, benchmarks): its own distribution, lab/pyproject.toml.
LAB := src/eztunnel_lab
BPF_OBJ := $(PKG)/data/eztunnel.bpf.o
SIMMARK_OBJ := $(LAB)/data/simmark.bpf.o
# The lab's HBONE stand-in for ztunnel (Rust, lab/hbone), built offline from Debian's crates
# with Debian's toolchain (never a rustup one that may be first on PATH).
HBONE_BIN := $(LAB)/data/eztunnel-hbone
HBONE_SRC := $(wildcard lab/hbone/src/*.rs) lab/hbone/Cargo.toml lab/hbone/.cargo/config.toml
HBONE_CARGO := env RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=$(CURDIR)/build/hbone /usr/bin/cargo
VMLINUX := bpf/vmlinux.h
STAMP := build/stamps
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 iptables iperf3 sockperf \
	nginx-light haproxy socat curl openssl \
	cargo rustc librust-tokio-dev librust-h2-dev librust-http-dev librust-bytes-dev \
	librust-tokio-rustls-dev librust-rustls-pemfile-dev librust-libc-dev librust-socket2-dev
# npm comes with NodeSource's nodejs on some images (it conflicts with Debian's npm).
NPM_PACKAGES := $(if $(shell command -v npm),,nodejs npm)
PROTOS := $(shell find proto -name '*.proto' 2>/dev/null)
PROTO_STAMP := $(PKG)/pb/.generated

.PHONY: all deps build test demo bench bench-dataplane lint clean

all: build

# --- dependencies -----------------------------------------------------------
$(STAMP)/apt: Makefile
	@mkdir -p $(STAMP)
	@missing=$$(for p in $(APT_PACKAGES) $(NPM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMP)/venv: pyproject.toml lab/pyproject.toml $(STAMP)/apt
	@mkdir -p $(STAMP)
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./lab
	@touch $@

$(STAMP)/npm: package.json $(STAMP)/apt
	@mkdir -p $(STAMP)
	npm install --no-audit --no-fund --silent
	@touch $@

deps: $(STAMP)/venv $(STAMP)/npm

# --- generated code -----------------------------------------------------------
$(VMLINUX): $(STAMP)/apt
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

# BPF target architecture, derived from the build machine as libbpf-bootstrap does
# (only PT_REGS-style macros depend on it; CO-RE does the rest). Override: ARCH=arm64.
ARCH ?= $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/arm.*/arm/' -e 's/aarch64/arm64/' \
	-e 's/ppc64le/powerpc/' -e 's/mips.*/mips/' -e 's/riscv64/riscv/' -e 's/loongarch64/loongarch/')
BPF_CFLAGS := -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) -Wall -Werror -I bpf

$(BPF_OBJ): bpf/eztunnel.bpf.c bpf/eztunnel.h $(VMLINUX)
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c bpf/eztunnel.bpf.c -o $@

# The same object somewhere else, for another ARCH or with test-only defines:
#   make bpf-object BPF_OUT=/tmp/x.o ARCH=arm64 BPF_DEFINES=-DEZ_SOCKHASH_ENTRIES=2
# (order-only on vmlinux.h: never regenerates anything in the tree).
BPF_OUT ?= build/eztunnel.bpf.o
.PHONY: bpf-object
bpf-object: bpf/eztunnel.bpf.c bpf/eztunnel.h | $(VMLINUX)
	@mkdir -p $(dir $(BPF_OUT))
	clang $(BPF_CFLAGS) $(BPF_DEFINES) -c bpf/eztunnel.bpf.c -o $(BPF_OUT)

# The simulator's stand-in for ztunnel's SO_MARK (a cgroup sock_create program).
$(SIMMARK_OBJ): bpf/simmark.bpf.c $(VMLINUX)
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c bpf/simmark.bpf.c -o $@

# Protos import each other by their path under proto/ (`protoc -I proto` works in
# any language); tools/gen_pb.py maps them into the package and adds typed stubs.
$(PROTO_STAMP): $(PROTOS) tools/gen_pb.py $(STAMP)/venv
	$(PY) tools/gen_pb.py proto $(PKG)/pb
	@touch $@

$(HBONE_BIN): $(HBONE_SRC) $(STAMP)/apt
	@mkdir -p $(dir $@)
	cd lab/hbone && $(HBONE_CARGO) build --release --quiet
	install -m 0755 build/hbone/release/eztunnel-hbone $@

build: deps $(BPF_OBJ) $(SIMMARK_OBJ) $(HBONE_BIN) $(PROTO_STAMP)

# --- checks -------------------------------------------------------------------
lint: build
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/ruff format --check src tests tools
	$(VENV)/bin/mypy

test: build
	$(VENV)/bin/pytest -q tests

# --- the main job and benchmarks --------------------------------------------
demo: build
	$(VENV)/bin/eztunnel-lab demo

bench-dataplane: build
	$(VENV)/bin/eztunnel-lab bench dataplane

bench: build
	$(VENV)/bin/eztunnel-lab bench all

clean:
	rm -rf build $(PKG)/data $(LAB)/data $(VMLINUX) node_modules
	find $(PKG)/pb -mindepth 1 -type f -not -path $(PKG)/pb/__init__.py -delete
	find $(PKG)/pb -mindepth 1 -type d -empty -delete
