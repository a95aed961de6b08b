//! The Helm chart's tests (tests/chart/test_chart.py): lint, rendering, the values schema and
//! Kubernetes schema validation. They need Python packages (Helm's Go SDK wrapped for Python,
//! kubernetes-validate), kept in a project-local virtualenv so nothing is installed system-wide.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _};

use crate::{cmd, cmd_output};

/// Paths relative to the repository root, like the rest of xtask.
const VENV: &str = "target/chart-venv";
const REQUIREMENTS: &str = "tests/chart/requirements.txt";
const TESTS: &str = "tests/chart/test_chart.py";
/// helm-python-sdk's floor.
const PYTHON_MIN: (u32, u32) = (3, 10);

pub fn test() -> anyhow::Result<()> {
    let venv = Path::new(VENV);
    let python = venv.join("bin/python");
    // A venv whose interpreter is gone (python3 upgraded or removed) is rebuilt whole.
    if !python.is_file() {
        check_python()?;
        eprintln!("chart: creating the virtualenv {VENV}");
        cmd(Command::new("python3").args(["-m", "venv", "--clear", VENV]))
            .context("creating the virtualenv (on Debian: apt-get install python3-venv)")?;
    }
    // pip runs only when the pinned requirements changed since the last install, so a warm run
    // needs no network. The stamp is written after a successful install only.
    let requirements =
        fs::read_to_string(REQUIREMENTS).with_context(|| format!("reading {REQUIREMENTS}"))?;
    let stamp = venv.join(".installed");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(requirements.as_str()) {
        eprintln!("chart: installing {REQUIREMENTS} into {VENV}");
        cmd(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--requirement",
            REQUIREMENTS,
        ]))?;
        fs::write(&stamp, &requirements).with_context(|| format!("writing {}", stamp.display()))?;
    }
    cmd(Command::new(&python).arg(TESTS))
}

/// Fails early with a clear message instead of pip's "no matching distribution".
fn check_python() -> anyhow::Result<()> {
    let version = cmd_output(
        Command::new("python3").args(["-c", "import sys; print(*sys.version_info[:2])"]),
    )
    .context("the chart tests need python3")?;
    let found: Vec<u32> = version
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let (major, minor) = PYTHON_MIN;
    if found.as_slice() < [major, minor].as_slice() {
        bail!(
            "the chart tests need python3 >= {major}.{minor}, found {}",
            version.trim()
        );
    }
    Ok(())
}
