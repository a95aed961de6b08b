# syntax=docker/dockerfile:1
# The lb-agent image: `docker build -t lb-agent:0.1.0 .` (BuildKit). The Helm chart in
# charts/lb-agent runs it as a DaemonSet; its default image is lb-agent:<appVersion>.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src

# The kernel programs build with the nightly toolchain (-Z build-std=core, hence rust-src) and
# link with bpf-linker. `cargo xtask setup` installs both, but also mounts bpffs, which a build
# cannot do: the same steps by hand.
RUN rustup toolchain install nightly --profile minimal --component rust-src

# bpf-linker built against the nightly's own libLLVM, so that its LLVM is the one emitting the
# bitcode (xtask/src/setup.rs does the same; the version is read from there to stay in step).
COPY xtask/src/setup.rs /tmp/setup.rs
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    set -eu; \
    version="$(sed -n 's/^const BPF_LINKER_VERSION: &str = "\(.*\)";$/\1/p' /tmp/setup.rs)"; \
    test -n "$version"; \
    sysroot="$(rustc +nightly --print sysroot)"; \
    major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    lib="$(cd "$sysroot/lib" && ls libLLVM-"$major"*.so | head -n 1)"; \
    stem="${lib#lib}"; stem="${stem%.so}"; \
    RUSTFLAGS="-L native=$sysroot/lib -l dylib=$stem -C link-arg=-Wl,-rpath,$sysroot/lib" \
        cargo install bpf-linker --version "$version" --locked \
        --no-default-features --features "llvm-$major,no-llvm-linking"

# Every workspace member must be present for cargo to load the workspace.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY lb-common lb-common
COPY lb-ebpf lb-ebpf
COPY lb-agent lb-agent
COPY xtask xtask
COPY tests tests
# lb-agent's build.rs builds lb-ebpf with the nightly and embeds the object: one binary.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package lb-agent \
    && install -D -m 0755 target/release/lb-agent /out/lb-agent

FROM debian:${DEBIAN_RELEASE}-slim
# The chart's bpffs init container runs this image with /bin/sh, grep and mount; mount is not
# essential in Debian, so it is installed explicitly. Nothing else: rustls, no OpenSSL.
RUN apt-get update \
    && apt-get install -y --no-install-recommends mount \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/lb-agent /usr/local/bin/lb-agent
# Root on purpose, with the capabilities narrowed by the pod instead (the chart drops ALL and
# adds BPF, NET_ADMIN, PERFMON, SYS_ADMIN): Kubernetes grants added capabilities to root only
# (no ambient capabilities for other users), file capabilities (setcap) are ignored under
# allowPrivilegeEscalation: false, and the host's /sys/fs/bpf is root's with mode 0700.
USER 0:0
LABEL org.opencontainers.image.title="lb-agent" \
      org.opencontainers.image.description="Kubernetes service load balancer with an eBPF datapath" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["lb-agent"]
CMD ["--help"]
