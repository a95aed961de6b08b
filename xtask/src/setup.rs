//! Idempotent machine set-up: installs what the project needs when it is missing, and is cheap
//! (a few process spawns) when everything is already there.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{cmd, cmd_output};

/// The toolchain that builds the kernel programs (aya-build runs `rustup run nightly`).
pub const EBPF_TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages and a binary each provides, checked before installing.
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("util-linux", "nsenter"),
    // kube-proxy's datapaths for `lb-compare`, called by their explicit names (never through
    // update-alternatives, which stays as the host has it): iptables-legacy-restore,
    // iptables-nft-restore (both in Debian's `iptables`), and nft.
    ("iptables", "iptables-legacy-restore"),
    ("iptables", "iptables-nft-restore"),
    ("nftables", "nft"),
];

pub fn run() -> anyhow::Result<()> {
    let root = is_root();
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages(root)?;
    bpffs(root)?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = cmd_output(Command::new("rustc").args([
        &format!("+{EBPF_TOOLCHAIN}"),
        "--print",
        "sysroot",
    ]))
    .with_context(|| {
        format!(
            "the `{EBPF_TOOLCHAIN}` toolchain is needed to build the kernel programs; \
             install it with `rustup toolchain install {EBPF_TOOLCHAIN} --profile minimal`"
        )
    })?;
    Ok(PathBuf::from(out.trim()))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the {EBPF_TOOLCHAIN} toolchain");
    cmd(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
}

/// Where `cargo install` puts binaries (on PATH for any rustup user).
fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// The libLLVM shipped inside the nightly: (major version, library stem for `-l dylib=`).
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<(u32, String)> {
    let version = cmd_output(Command::new("rustc").args([&format!("+{EBPF_TOOLCHAIN}"), "-vV"]))?;
    let major: u32 = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .context("cannot read the LLVM version from `rustc -vV`")?;
    // The linker script `libLLVM-<major>-rust-<version>.so` names the shared library.
    let lib_dir = sysroot.join("lib");
    let prefix = format!("libLLVM-{major}");
    let stem = fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with(&prefix) && n.ends_with(".so"))
        .and_then(|n| {
            n.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .map(str::to_owned)
        })
        .with_context(|| format!("no {prefix}*.so in {}", lib_dir.display()))?;
    Ok((major, stem))
}

/// bpf-linker built against the nightly's own libLLVM, so its LLVM always equals the LLVM that
/// emits the bitcode. A stamp records which nightly it was built for; a new nightly rebuilds it.
fn bpf_linker() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    let (major, stem) = nightly_llvm(&sysroot)?;
    let home = cargo_home()?;
    let binary = home.join("bin/bpf-linker");
    let stamp_path = home.join("bpf-linker.stamp");
    let wanted_stamp = format!("{BPF_LINKER_VERSION} {}\n", sysroot.display());
    let works = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && fs::read_to_string(&stamp_path).is_ok_and(|s| s == wanted_stamp) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {stem} (about a minute)");
    let lib_dir = sysroot.join("lib");
    let rustflags = format!(
        "-L native={dir} -l dylib={stem} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    cmd(Command::new("cargo")
        .env("RUSTFLAGS", rustflags)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major},no-llvm-linking"),
            "--root",
        ])
        .arg(&home))?;
    fs::write(&stamp_path, wanted_stamp)
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}

fn on_path(binary: &str) -> bool {
    env::var_os("PATH").is_some_and(|path| {
        env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(binary).is_file())
    })
}

fn debian_packages(root: bool) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, binary)| !on_path(binary))
        .map(|(package, _)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !root {
        bail!("missing packages; as root, run: {install}");
    }
    eprintln!("setup: installing {}", missing.join(" "));
    cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

fn bpffs(root: bool) -> anyhow::Result<()> {
    let mounted = fs::read_to_string("/proc/self/mounts")
        .context("reading /proc/self/mounts")?
        .lines()
        .any(|l| {
            let mut fields = l.split_whitespace();
            let (_, dir, fstype) = (fields.next(), fields.next(), fields.next());
            dir == Some("/sys/fs/bpf") && fstype == Some("bpf")
        });
    if mounted {
        return Ok(());
    }
    if !root {
        bail!("bpffs is not mounted; as root, run: mount -t bpf bpf /sys/fs/bpf");
    }
    eprintln!("setup: mounting bpffs on /sys/fs/bpf");
    cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
