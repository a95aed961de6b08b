//! `lb-agent plan`: the desired state of one node, as JSON for operators and tests. Frontends
//! and backends are sorted, so the output is deterministic.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde::Serialize;

use crate::model::{DesiredState, FrontendKind, Protocol, WhenEmpty};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub node: String,
    pub frontends: Vec<PlanFrontend>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PlanFrontend {
    /// `namespace/name`.
    pub service: String,
    pub port_name: Option<String>,
    pub kind: FrontendKind,
    /// The frontend address, or `*` for a NodePort (served on every node address).
    pub address: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The backends this node uses for new flows on this frontend.
    pub backends: Vec<PlanBackend>,
    pub when_empty: WhenEmpty,
    pub affinity_timeout_seconds: Option<u32>,
    /// Maglev consistent hashing; left out of the JSON when false (the default, random).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub maglev: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PlanBackend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub terminating: bool,
}

/// The node addresses to plan with when none is known: NodePorts are shown as `*` anyway, so
/// one placeholder is enough for them to appear.
pub const ANY_NODE_ADDRESS: [Ipv4Addr; 1] = [Ipv4Addr::UNSPECIFIED];

pub fn plan(node: &str, state: &DesiredState) -> Plan {
    let mut frontends = BTreeSet::new();
    for service in state.services.values() {
        let backends: Vec<PlanBackend> = service
            .backends
            .iter()
            .map(|b| PlanBackend {
                address: b.addr,
                port: b.port,
                terminating: service.terminating.contains(b),
            })
            .collect();
        for frontend in &service.frontends {
            let address = if frontend.kind == FrontendKind::NodePort {
                "*".to_string()
            } else {
                frontend.addr.to_string()
            };
            frontends.insert(PlanFrontend {
                service: service.service.clone(),
                port_name: service.port_name.clone(),
                kind: frontend.kind,
                address,
                port: frontend.port,
                protocol: frontend.protocol,
                backends: backends.clone(),
                when_empty: service.when_empty,
                affinity_timeout_seconds: service.affinity_timeout_seconds,
                maglev: service.maglev,
            });
        }
    }
    Plan {
        node: node.to_string(),
        frontends: frontends.into_iter().collect(),
    }
}
