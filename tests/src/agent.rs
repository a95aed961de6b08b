//! Running the real `lb-agent` binary inside a lab namespace.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::lab::Netns;

/// The `lb-agent` binary: `$LB_AGENT_BIN`, or next to the running test executable
/// (`target/<profile>/lb-agent`, built by `cargo xtask test` before the tests run).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LB_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("lb-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "lb-agent binary not found near {}; run `cargo build` (or `cargo xtask test`) first",
        exe.display()
    )
}

/// A running agent; stopped with SIGTERM on drop (SIGKILL if it does not exit in time).
pub struct Agent {
    child: Option<Child>,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `lb-agent run` in `ns`, logging to `log`.
    pub fn start(
        ns: &Netns,
        pin_dir: &Path,
        manifests: &Path,
        interfaces: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with(ns, pin_dir, manifests, interfaces, log, &[])
    }

    /// Same, with extra `run` flags.
    pub fn start_with(
        ns: &Netns,
        pin_dir: &Path,
        manifests: &Path,
        interfaces: &[String],
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let manifests = manifests.to_string_lossy().to_string();
        let mut args = vec!["--manifests", manifests.as_str()];
        args.extend_from_slice(extra);
        Self::start_run(ns, pin_dir, interfaces, log, &args)
    }

    /// `lb-agent --pin-dir P run --interface I <args>` in `ns`, logging to `log`.
    pub fn start_run(
        ns: &Netns,
        pin_dir: &Path,
        interfaces: &[String],
        log: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let binary = agent_binary()?;
        let log_file =
            fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = ns
            .command(&binary)
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("run")
            .arg("--interface")
            .arg(interfaces.join(","))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child: Some(child),
            pin_dir: pin_dir.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// Waits until `ready` holds (polled), failing with the agent's log if it exits or the
    /// deadline passes.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ready() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("agent exited early ({status}); log:\n{}", self.log_text());
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "agent not ready within {timeout:?}; log:\n{}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait()?;
        bail!("agent ignored SIGTERM for 10 s and was killed ({status})")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// The value of the one sample of `series` (name with labels, exactly as exposed) in the
/// agent's Prometheus text.
pub fn metric_sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Runs an `lb-agent` CLI command (a second process) and returns its stdout.
pub fn cli(pin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let binary = agent_binary()?;
    crate::lab::run(
        Command::new(binary)
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(args),
    )
}
