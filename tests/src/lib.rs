//! Test harness of the service load balancer: labs of network namespaces ([`lab`]), echo
//! servers and clients ([`echo`]), the real agent run as a process ([`agent`]), and packets
//! through the real program with BPF_PROG_TEST_RUN ([`packet`]).
//!
//! Everything here needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN).

pub mod agent;
pub mod cgroup;
pub mod echo;
pub mod fake_api;
pub mod lab;
pub mod packet;
pub mod soak;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use lb_agent::model::{Backend, DesiredService, Frontend, FrontendKind, Protocol};

/// The repository's example manifests.
pub fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// `dir/manifests`: the examples plus `extra` as `extra_name`, for a test's own Services.
pub fn examples_with(dir: &Path, extra_name: &str, extra: &str) -> PathBuf {
    let out = dir.join("manifests");
    std::fs::create_dir_all(&out).expect("manifest directory");
    for entry in std::fs::read_dir(examples()).expect("examples") {
        let path = entry.expect("examples entry").path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, out.join(name)).expect("copying an example");
        }
    }
    std::fs::write(out.join(extra_name), extra).expect("writing the extra manifests");
    out
}

/// Datapath counter `name` (as `lb-agent stats` names it) of the maps pinned at `pin_dir`.
pub fn counter(pin_dir: &Path, name: &str) -> u64 {
    lb_agent::maps::read_counters(pin_dir)
        .expect("read counters")
        .into_iter()
        .find(|(c, _)| c.name() == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// A ClusterIP backend set for tests that program the maps directly.
pub fn cluster_ip_service(
    vip: &str,
    port: u16,
    target_port: u16,
    protocol: Protocol,
    backends: &[&str],
) -> DesiredService {
    DesiredService {
        frontends: [Frontend {
            addr: vip.parse().expect("test VIP"),
            port,
            protocol,
            kind: FrontendKind::ClusterIP,
        }]
        .into(),
        backends: backends
            .iter()
            .map(|b| Backend {
                addr: b.parse().expect("test backend"),
                port: target_port,
                protocol,
            })
            .collect(),
        ..DesiredService::default()
    }
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Keeps the kernel's run-time accounting of BPF programs (`kernel.bpf_stats_enabled`) off
/// while it lives, and restores the setting after: when on, every program run reads the
/// clock twice (on this VM about 35 ns a run, 1% of a connection on our paths), a cost the
/// benchmarks would mix in (`lb-compare`: only the modes with programs pay it; `lb-bench`: the
/// floor and the program alike, which moves every absolute figure).
pub struct BpfStatsOff {
    was: Option<String>,
}

impl BpfStatsOff {
    pub fn new() -> anyhow::Result<Self> {
        let was = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        if was == "0" {
            return Ok(Self { was: None });
        }
        std::fs::write(BPF_STATS, "0").with_context(|| format!("writing 0 to {BPF_STATS}"))?;
        eprintln!("kernel.bpf_stats_enabled was {was}; off for the run");
        Ok(Self { was: Some(was) })
    }
}

impl Drop for BpfStatsOff {
    fn drop(&mut self) {
        if let Some(was) = &self.was {
            if let Err(err) = std::fs::write(BPF_STATS, was) {
                eprintln!("restoring kernel.bpf_stats_enabled to {was}: {err}");
            }
        }
    }
}
