# eztunnel-plugin build, test, demo and benchmark entry points.
# Everything a fresh Debian 12 machine needs is installed from here (run as root).

SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PKG := src/eztunnel_plugin
BPF_OBJ := $(PKG)/data/eztunnel.bpf.o
SIMMARK_OBJ := $(PKG)/data/simmark.bpf.o
VMLINUX := bpf/vmlinux.h
STAMP := build/stamps
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 iptables iperf3 sockperf \
	nginx-light haproxy socat curl openssl
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

$(STAMP)/venv: pyproject.toml $(STAMP)/apt
	@mkdir -p $(STAMP)
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

$(STAMP)/npm: package.json $(STAMP)/apt
	@mkdir -p $(STAMP)
	npm install --no-audit --no-fund --silent
	@touch $@

deps: $(STAMP)/venv $(STAMP)/npm

# --- generated code -----------------------------------------------------------
$(VMLINUX): $(STAMP)/apt
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_OBJ): bpf/eztunnel.bpf.c bpf/eztunnel.h $(VMLINUX)
	@mkdir -p $(dir $@)
	clang -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_x86 -Wall -Werror \
	  -I bpf -c bpf/eztunnel.bpf.c -o $@

# The simulator's stand-in for ztunnel's SO_MARK (a cgroup sock_create program).
$(SIMMARK_OBJ): bpf/simmark.bpf.c $(VMLINUX)
	@mkdir -p $(dir $@)
	clang -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_x86 -Wall -Werror \
	  -I bpf -c bpf/simmark.bpf.c -o $@

$(PROTO_STAMP): $(PROTOS) $(STAMP)/venv
	find $(PKG)/pb -mindepth 1 -type f -not -path $(PKG)/pb/__init__.py -delete
	find $(PKG)/pb -mindepth 1 -type d -empty -delete
	$(PY) -m grpc_tools.protoc -Ieztunnel_plugin/pb=proto --python_out=src --pyi_out=src \
	  --grpc_python_out=src $(PROTOS)
	find $(PKG)/pb -type d -exec touch {}/__init__.py \;
	@touch $@

build: deps $(BPF_OBJ) $(SIMMARK_OBJ) $(PROTO_STAMP)

# --- checks -------------------------------------------------------------------
lint: build
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

test: build
	$(VENV)/bin/pytest -q tests

# --- the main job and benchmarks --------------------------------------------
demo: build
	$(VENV)/bin/eztunnel-plugin demo

bench-dataplane: build
	$(PY) -m eztunnel_plugin.bench dataplane

bench: build
	$(PY) -m eztunnel_plugin.bench all

clean:
	rm -rf build $(PKG)/data $(VMLINUX) node_modules
	find $(PKG)/pb -mindepth 1 -type f -not -path $(PKG)/pb/__init__.py -delete
	find $(PKG)/pb -mindepth 1 -type d -empty -delete
