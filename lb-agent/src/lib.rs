//! The node agent of the service load balancer: Kubernetes objects in, BPF maps out.
//!
//! - [`manifest`] reads Services and EndpointSlices from files (standalone mode);
//! - [`mirror`] turns v1 Endpoints into EndpointSlices (standalone mode);
//! - [`node`] tells who this node is (name, zone, NodePort addresses);
//! - [`model`] computes this node's desired datapath state (pure);
//! - [`plan`] renders that state for operators (`lb-agent plan`);
//! - [`engine`] recomputes only the Services a change touches (Kubernetes mode);
//! - [`maglev`] computes Maglev lookup tables;
//! - [`maps`] opens the pinned maps, applies the desired state, reads it back;
//! - [`filter`] keeps the datapath's address filter (`LB_ADDR_FILTER`);
//! - [`loader`] loads the kernel object and attaches it;
//! - [`metrics`] and [`health`] are the agent's HTTP endpoints.

mod batch;
pub mod engine;
pub mod filter;
pub mod health;
pub mod kubernetes;
pub mod loader;
pub mod maglev;
pub mod manifest;
pub mod maps;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod node;
pub mod plan;

pub use loader::EBPF_OBJECT;

/// The desired state from a set of manifests: v1 Endpoints mirrored into slices first.
pub fn desired_from_manifests(
    manifests: &manifest::Manifests,
    settings: &model::Settings,
) -> model::DesiredState {
    let mirrored = mirror::mirror_endpoints(&manifests.services, &manifests.endpoints);
    let mut slices = manifests.endpoint_slices.clone();
    slices.extend(mirrored.slices);
    let mut state = model::desired_state(&manifests.services, &slices, settings);
    state.skipped.extend(mirrored.skipped);
    state
}
