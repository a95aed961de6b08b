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

use lb_agent::model::{Backend, DesiredService, Frontend, FrontendKind, Protocol};

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
