//! Project tasks: `cargo xtask setup | build | test | chart | fuzz | bench | demo`.

mod chart;
mod setup;

use std::process::Command;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (rust-src, bpf-linker, Debian packages, bpffs). Idempotent.
    Setup,
    /// Set up, then build everything (agent with its embedded kernel object, tests, demo).
    Build,
    /// Set up, build, lint (fmt, clippy) and run every test: unit, packet and lab tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Only the Helm chart's tests (lint, render, schemas), in a project-local virtualenv.
    Chart,
    /// The packet fuzzer at length: random and mutated frames through the real program
    /// (`cargo xtask test` runs a bounded part of it).
    Fuzz {
        /// Cases to run (a release build does about 300,000 a second here).
        #[arg(long, default_value_t = 2_000_000)]
        cases: u64,
        /// Seed (decimal or 0x-hex) to reproduce a run; default: a fresh one, printed.
        #[arg(long)]
        seed: Option<String>,
    },
    /// Benchmarks, ours and side by side with kube-proxy's iptables and nftables modes;
    /// results go to docs/benchmarks.md (about 45 minutes).
    Bench {
        /// A smoke run with small sizes (what `cargo xtask test` runs); results not written.
        #[arg(long)]
        quick: bool,
    },
    /// Set up, build, and run the demo: a lab of namespaces, the example manifests, traffic.
    Demo {
        /// Leave the lab and the agent running, and print how to explore them.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Fuzz { cases, seed } => {
            setup::run()?;
            require_root("the fuzzer loads the BPF program")?;
            let mut fuzz = Command::new("cargo");
            fuzz.args([
                "test",
                "--release",
                "--package",
                "lb-tests",
                "--test",
                "packet_fuzz",
                "--",
                "--nocapture",
            ])
            .env("LB_FUZZ_CASES", cases.to_string());
            if let Some(seed) = seed {
                fuzz.env("LB_FUZZ_SEED", seed);
            }
            cmd(&mut fuzz)
        }
        Task::Chart => {
            build()?;
            chart::test()
        }
        Task::Build => {
            setup::run()?;
            build()
        }
        Task::Test { args } => {
            setup::run()?;
            require_root("the packet and lab tests load BPF programs and create namespaces")?;
            build()?;
            lint()?;
            // The Helm chart: lint, render, schemas, and the agent parsing its arguments.
            chart::test()?;
            cmd(Command::new("cargo")
                .args(["test", "--workspace", "--exclude", "lb-ebpf", "--"])
                .args(args))?;
            // Keep the benchmark code from rotting: a short run, nothing written.
            cmd(Command::new("target/debug/lb-bench").arg("--quick"))?;
            // The comparison with kube-proxy's iptables and nftables modes, short (nothing
            // written).
            cmd(Command::new("target/debug/lb-compare").arg("--quick"))
        }
        Task::Bench { quick } => {
            setup::run()?;
            require_root("the benchmarks load BPF programs")?;
            // The lab parts (churn soak) run the agent binary next to lb-bench.
            cmd(Command::new("cargo").args(["build", "--release", "--package", "lb-agent"]))?;
            let mut bench = Command::new("cargo");
            bench.args([
                "run",
                "--release",
                "--package",
                "lb-tests",
                "--bin",
                "lb-bench",
                "--",
            ]);
            if quick {
                bench.arg("--quick");
            } else {
                bench.args(["--output", "docs/benchmarks.md"]);
            }
            cmd(&mut bench)?;
            // Side by side with kube-proxy's iptables and nftables modes (docs/benchmarks.md
            // and the charts next to it).
            let mut compare = Command::new("cargo");
            compare.args([
                "run",
                "--release",
                "--package",
                "lb-tests",
                "--bin",
                "lb-compare",
                "--",
            ]);
            if quick {
                compare.arg("--quick");
            }
            cmd(&mut compare)
        }
        Task::Demo { keep } => {
            setup::run()?;
            require_root("the demo creates network namespaces and loads BPF programs")?;
            build()?;
            let mut demo = Command::new("target/debug/lb-demo");
            demo.args([
                "--agent",
                "target/debug/lb-agent",
                "--manifests",
                "examples",
            ]);
            if keep {
                demo.arg("--keep");
            }
            cmd(&mut demo)
        }
    }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): {why}");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    cmd(Command::new("cargo").args(["build", "--workspace", "--exclude", "lb-ebpf", "--bins"]))
}

fn lint() -> anyhow::Result<()> {
    cmd(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    cmd(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel crate only builds for the BPF target, with the nightly toolchain.
    cmd(Command::new("cargo")
        .args([
            &format!("+{}", setup::EBPF_TOOLCHAIN),
            "clippy",
            "--package",
            "lb-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", "target/ebpf-clippy"))
}

/// Runs a command, failing with its command line when it does not succeed.
pub fn cmd(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output.
pub fn cmd_output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{command:?}: output is not UTF-8"))
}
