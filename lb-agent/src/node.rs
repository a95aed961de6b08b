//! This node as the model sees it: its name, zone and NodePort addresses.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;

use crate::model::{Settings, LABEL_TOPOLOGY_ZONE};

/// Settings for `node_name`: zone and addresses from its Node object when one is given;
/// `node_port_addresses` (an operator's explicit list) wins over the Node's addresses, which win
/// over `discovered` (the addresses of the agent's own interfaces).
pub fn settings(
    node_name: &str,
    nodes: &[Node],
    node_port_addresses: &[Ipv4Addr],
    discovered: &[Ipv4Addr],
) -> Settings {
    let node = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
    let node_zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    let from_node: Vec<Ipv4Addr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let mut local_addresses: Vec<Ipv4Addr> = node_port_addresses
        .iter()
        .chain(&from_node)
        .chain(discovered)
        .copied()
        .collect();
    local_addresses.sort();
    local_addresses.dedup();
    let node_addresses = if !node_port_addresses.is_empty() {
        node_port_addresses.to_vec()
    } else if !from_node.is_empty() {
        from_node
    } else {
        discovered.to_vec()
    };
    Settings {
        node_name: node_name.to_string(),
        node_zone,
        node_addresses,
        local_addresses,
    }
}
