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
