//! A cgroup v2 directory of the test's own for the agent's socket-level programs
//! (`--socket-lb-cgroup`). It is a threaded cgroup, so single threads of the test (its clients)
//! move into it, and the programs act on those threads and on nothing else on the machine.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

pub struct ThreadCgroup {
    path: PathBuf,
}

impl ThreadCgroup {
    /// Creates `<this process's cgroup>/<name>-<pid>` in the cgroup v2 hierarchy. Give it a
    /// name that starts with a lab's id, so that `lab::sweep` removes it after a crash.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let own = own_cgroup()?;
        let path = own.join(format!("{name}-{}", std::process::id()));
        if path.exists() {
            // Left by an earlier run of this process id that died mid-test.
            let _ = fs::remove_dir(&path);
        }
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let cgroup = Self { path };
        fs::write(cgroup.path.join("cgroup.type"), "threaded").with_context(|| {
            format!(
                "making {} a threaded cgroup (its parent must have no domain controllers on)",
                cgroup.path.display()
            )
        })?;
        Ok(cgroup)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling thread (only it) into this cgroup: the sockets it creates from now on
    /// belong here.
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        let tid = nix::unistd::gettid();
        fs::write(self.path.join("cgroup.threads"), tid.to_string())
            .with_context(|| format!("moving thread {tid} into {}", self.path.display()))
    }
}

impl Drop for ThreadCgroup {
    fn drop(&mut self) {
        // Threads that entered it are gone by now, but the kernel may take a moment to let go.
        let deadline = Instant::now() + Duration::from_secs(2);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// This process's directory in the cgroup v2 hierarchy (the `0::` line of /proc/self/cgroup
/// under the cgroup2 mount).
pub(crate) fn own_cgroup() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let Some(mount) = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    }) else {
        bail!("no cgroup2 file system mounted");
    };
    let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let Some(relative) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        bail!("this process has no cgroup v2 directory");
    };
    Ok(mount.join(relative.trim_start_matches('/')))
}
