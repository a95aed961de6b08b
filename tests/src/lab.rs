//! A lab: closed network namespaces joined by veth pairs, created by the test itself.
//!
//! Rules (see `lab.md`): no link or route to the machine's uplink, nothing added to the root
//! namespace, names unique per run (`<prefix>-<pid>-<n>-<role>`), cleanup on drop and on
//! panic, and a sweep that removes leftovers of dead runs by the project's prefix only.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

/// Prefix of every namespace and pin directory the tests create.
pub const TEST_PREFIX: &str = "lbt";
const NETNS_DIR: &str = "/run/netns";
const BPFFS: &str = "/sys/fs/bpf";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its command line and stderr when it does not succeed.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `bpftool -j` with `args`, its JSON parsed; `Null` when it prints nothing (`cgroup show` of
/// a cgroup without programs).
pub fn bpftool_json<I, S>(args: I) -> anyhow::Result<serde_json::Value>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = run(Command::new("bpftool").arg("-j").args(args))?;
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&out).with_context(|| format!("bpftool's JSON: {out}"))
}

/// `ip` with arguments split on whitespace.
pub fn ip(args: &str) -> anyhow::Result<String> {
    run(Command::new("ip").args(args.split_whitespace()))
}

/// A named network namespace of a lab.
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &str) -> anyhow::Result<String> {
        ip(&format!("-n {} {args}", self.name))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]))
        .map(drop)
    }

    /// A command that runs inside this namespace without remounting /sys (unlike
    /// `ip netns exec`), so it still sees the host's bpffs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Moves the calling thread into this namespace. Only for threads the lab owns.
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        setns(file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering namespace {}", self.name))
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// Starts `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> thread::JoinHandle<anyhow::Result<T>> {
        let ns = self.clone();
        thread::spawn(move || {
            ns.enter_current_thread()?;
            f()
        })
    }
}

/// A set of namespaces (and a bpffs pin directory) removed together on drop.
pub struct Lab {
    /// `<prefix>-<pid>-<n>`, the stem of every name in this lab.
    pub id: String,
    namespaces: Vec<Netns>,
    keep: bool,
}

impl Lab {
    /// A new, empty lab. Sweeps leftovers of dead runs with the same prefix first.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        sweep(prefix);
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            id: format!("{prefix}-{}-{n}", std::process::id()),
            namespaces: Vec::new(),
            keep: false,
        })
    }

    /// Creates a namespace `<id>-<role>` with loopback up.
    pub fn add_netns(&mut self, role: &str) -> anyhow::Result<Netns> {
        let ns = Netns {
            name: format!("{}-{role}", self.id),
        };
        ip(&format!("netns add {}", ns.name))?;
        self.namespaces.push(ns.clone());
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// Joins two namespaces with a veth pair and gives each end an address (`a.b.c.d/len`).
    pub fn link(
        &self,
        a: &Netns,
        a_if: &str,
        a_addr: &str,
        b: &Netns,
        b_if: &str,
        b_addr: &str,
    ) -> anyhow::Result<()> {
        a.ip(&format!(
            "link add {a_if} type veth peer name {b_if} netns {}",
            b.name
        ))?;
        a.ip(&format!("addr add {a_addr} dev {a_if}"))?;
        b.ip(&format!("addr add {b_addr} dev {b_if}"))?;
        a.ip(&format!("link set {a_if} up"))?;
        b.ip(&format!("link set {b_if} up"))?;
        Ok(())
    }

    /// bpffs directory for this lab's agent, removed with the lab.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.id)
    }

    /// Leaves everything in place on drop (for `--keep`).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn namespaces(&self) -> &[Netns] {
        &self.namespaces
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&format!("netns del {}", ns.name));
        }
        let _ = fs::remove_dir_all(self.pin_dir());
    }
}

/// Removes namespaces, pin directories and (empty) cgroups `<prefix>-<pid>-...` whose process
/// is gone.
pub fn sweep(prefix: &str) {
    let stale = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            return false;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            return false;
        };
        !Path::new(&format!("/proc/{pid}")).exists()
    };
    if let Ok(cgroups) = crate::cgroup::own_cgroup() {
        for entry in fs::read_dir(cgroups).into_iter().flatten().flatten() {
            if stale(&entry.file_name().to_string_lossy()) {
                // rmdir: a cgroup with members or children stays.
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
    for dir in [NETNS_DIR, BPFFS] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !stale(&name) {
                continue;
            }
            if dir == NETNS_DIR {
                let _ = ip(&format!("netns del {name}"));
            } else {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The single-node lab of the walking skeleton:
///
/// ```text
///  client (192.168.77.2) ──lb-c0── node ──lb-b1── backend-1 (10.244.1.2)
///                                      ├─lb-b2── backend-2 (10.244.2.2)
///                                      └─lb-b3── backend-3 (10.244.3.2)
/// ```
///
/// The node forwards between its links; the agent attaches to every node interface. The
/// addresses match `examples/` (namespaces isolate them, so parallel labs do not clash).
pub struct NodeLab {
    pub lab: Lab,
    pub client: Netns,
    pub node: Netns,
    pub backends: Vec<Netns>,
}

pub const CLIENT_ADDR: &str = "192.168.77.2";
pub const NODE_CLIENT_SIDE_ADDR: &str = "192.168.77.1";

pub fn backend_addr(i: usize) -> String {
    format!("10.244.{i}.2")
}

impl NodeLab {
    pub fn new(prefix: &str, backends: usize) -> anyhow::Result<Self> {
        let mut lab = Lab::new(prefix)?;
        let client = lab.add_netns("client")?;
        let node = lab.add_netns("node")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // Replies leave through a different interface than requests came in on.
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        lab.link(
            &node,
            "lb-c0",
            &format!("{NODE_CLIENT_SIDE_ADDR}/24"),
            &client,
            "eth0",
            &format!("{CLIENT_ADDR}/24"),
        )?;
        client.ip(&format!("route add default via {NODE_CLIENT_SIDE_ADDR}"))?;
        let mut backend_ns = Vec::new();
        for i in 1..=backends {
            let ns = lab.add_netns(&format!("backend-{i}"))?;
            lab.link(
                &node,
                &format!("lb-b{i}"),
                &format!("10.244.{i}.1/24"),
                &ns,
                "eth0",
                &format!("{}/24", backend_addr(i)),
            )?;
            ns.ip(&format!("route add default via 10.244.{i}.1"))?;
            backend_ns.push(ns);
        }
        Ok(Self {
            lab,
            client,
            node,
            backends: backend_ns,
        })
    }

    /// The node's interfaces, where the agent attaches.
    pub fn node_interfaces(&self) -> Vec<String> {
        let mut interfaces = vec!["lb-c0".to_string()];
        interfaces.extend((1..=self.backends.len()).map(|i| format!("lb-b{i}")));
        interfaces
    }
}
