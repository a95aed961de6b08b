//! The node agent of the service load balancer: Kubernetes objects in, BPF maps out.
//!
//! - [`manifest`] reads Services and EndpointSlices from files (standalone mode);
//! - [`model`] computes this node's desired datapath state (pure);
//! - [`maps`] opens the pinned maps, applies the desired state, reads it back;
//! - [`loader`] loads the kernel object and attaches it.

pub mod loader;
pub mod manifest;
pub mod maps;
pub mod model;

pub use loader::EBPF_OBJECT;
