//! Side-by-side comparison of this datapath with kube-proxy's iptables and nftables modes, in
//! the same lab topology, serving the same Services (`lb-compare` runs it).
//!
//! - [`iptables`] and [`nftables`] write the rules kube-proxy writes for a set of ClusterIP
//!   Services (chain structure, names, rule order, comments), as `iptables-restore` input and
//!   as an `nft -f` transaction, for a full sync and for the partial sync that follows one
//!   endpoint change;
//! - [`bed`] builds one lab per datapath (nothing, ours, iptables-legacy, iptables-nft,
//!   nftables), programs it from empty, applies one endpoint change, and times both;
//! - [`load`] is the traffic: fast echo servers in the backends, a load generator in the
//!   client (connect, request, reply, close, to random Services), one bulk TCP stream;
//! - [`chart`] draws the SVG bar charts of the report.
//!
//! Every rule is loaded inside a lab's node namespace only, and goes away with it.

pub mod bed;
pub mod chart;
pub mod hash;
pub mod iptables;
pub mod load;
pub mod nftables;

use std::net::{Ipv4Addr, SocketAddrV4};

/// One ClusterIP Service port with its endpoints: the input of every datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The Service port's name (`ports[].name`), part of kube-proxy's chain names.
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// Ready endpoints (address, targetPort).
    pub endpoints: Vec<SocketAddrV4>,
}

impl Service {
    /// kube-proxy's `ServicePortName.String()`: `namespace/name:port` (`namespace/name` when
    /// the port has no name).
    pub fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// Endpoints in the order kube-proxy writes them: the endpoint slice cache hands them
    /// over sorted by their `ip:port` string.
    pub fn sorted_endpoints(&self) -> Vec<SocketAddrV4> {
        let mut endpoints = self.endpoints.clone();
        endpoints.sort_by_key(|e| e.to_string());
        endpoints.dedup();
        endpoints
    }
}

/// kube-proxy settings that show in its rules.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `--cluster-cidr` (local traffic detector `ClusterCIDR`): traffic from outside it to a
    /// ClusterIP is masqueraded.
    pub cluster_cidr: String,
    /// The Service CIDR (nftables mode drops traffic to unallocated ClusterIPs in it).
    pub service_cidr: String,
    /// The node's primary address (nftables mode's default `--nodeport-addresses primary`).
    pub node_ip: Ipv4Addr,
    /// `fmt.Sprintf("%#08x", 1 << masqueradeBit)`; masqueradeBit defaults to 14.
    pub masquerade_mark: String,
    /// iptables supports `MASQUERADE --random-fully` (1.6.2 and later).
    pub random_fully: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.96.0.0/12".into(),
            node_ip: Ipv4Addr::new(192, 168, 77, 1),
            masquerade_mark: format!("{:#08x}", 1u32 << 14),
            random_fully: true,
        }
    }
}

/// Namespace of the generated Services.
pub const NAMESPACE: &str = "bench";
/// The Services' port and the endpoints' target port.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// Endpoints per Service.
pub const ENDPOINTS_PER_SERVICE: usize = 10;

/// The ClusterIP of Service `i`: 10.96.0.1 onwards.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// `count` Services of [`ENDPOINTS_PER_SERVICE`] endpoints each, drawn from `pool` (a pool
/// smaller than the number of Services is shared: endpoints repeat across Services). Within
/// one Service the endpoints are distinct and spread across the pool.
pub fn services(count: usize, pool: &[Ipv4Addr]) -> Vec<Service> {
    assert!(
        pool.len() >= ENDPOINTS_PER_SERVICE,
        "the pool needs at least {ENDPOINTS_PER_SERVICE} addresses"
    );
    (0..count)
        .map(|i| Service {
            namespace: NAMESPACE.into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            cluster_ip: cluster_ip(i),
            port: SERVICE_PORT,
            endpoints: pick(i, pool)
                .into_iter()
                .map(|a| SocketAddrV4::new(a, TARGET_PORT))
                .collect(),
        })
        .collect()
}

/// Distinct addresses for Service `i`: steps of a stride coprime with the pool size.
fn pick(i: usize, pool: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let n = pool.len();
    let stride = (1..n)
        .rev()
        .find(|s| gcd(*s, n) == 1 && *s <= n / 2 + 1)
        .unwrap_or(1);
    (0..ENDPOINTS_PER_SERVICE)
        .map(|j| pool[(i * 7 + j * stride) % n])
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One endpoint change: endpoint 3 of Service `index` moves to an address of `pool` the
/// Service does not use yet (a pod rescheduled). Returns the Services after the change.
pub fn change_one_endpoint(services: &[Service], index: usize, pool: &[Ipv4Addr]) -> Vec<Service> {
    let mut next = services.to_vec();
    let service = &mut next[index];
    let used: Vec<Ipv4Addr> = service.endpoints.iter().map(|e| *e.ip()).collect();
    let fresh = pool
        .iter()
        .copied()
        .find(|a| !used.contains(a))
        .expect("the pool has an address the Service does not use");
    let slot = 3.min(service.endpoints.len() - 1);
    service.endpoints[slot] = SocketAddrV4::new(fresh, service.endpoints[slot].port());
    next
}

/// A Service on port 80 (port name `p80`) with endpoints on port 80: the fixture both rule
/// generators' tests build theirs from.
#[cfg(test)]
pub(crate) fn test_service(ns: &str, name: &str, ip: [u8; 4], endpoints: &[[u8; 4]]) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        port_name: "p80".into(),
        cluster_ip: Ipv4Addr::from(ip),
        port: 80,
        endpoints: endpoints
            .iter()
            .map(|e| SocketAddrV4::new(Ipv4Addr::from(*e), 80))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u8) -> Vec<Ipv4Addr> {
        (0..n).map(|i| Ipv4Addr::new(10, 244, 1, 10 + i)).collect()
    }

    #[test]
    fn services_have_distinct_endpoints_and_addresses() {
        let pool = pool(60);
        let services = services(1000, &pool);
        assert_eq!(services.len(), 1000);
        assert_eq!(services[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(services[999].cluster_ip, Ipv4Addr::new(10, 96, 3, 232));
        for s in &services {
            let mut e = s.endpoints.clone();
            e.sort();
            e.dedup();
            assert_eq!(e.len(), ENDPOINTS_PER_SERVICE, "{}", s.name);
        }
        // The whole pool is used.
        let mut used: Vec<_> = services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| *e.ip()))
            .collect();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), pool.len());
    }

    #[test]
    fn one_endpoint_change_changes_one_endpoint() {
        let pool = pool(60);
        let before = services(10, &pool);
        let after = change_one_endpoint(&before, 5, &pool);
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            let differing = a
                .endpoints
                .iter()
                .zip(&b.endpoints)
                .filter(|(x, y)| x != y)
                .count();
            assert_eq!(differing, usize::from(i == 5), "service {i}");
        }
    }

    #[test]
    fn port_name_string_is_kube_proxys() {
        let mut s = services(1, &pool(10)).remove(0);
        assert_eq!(s.port_name_string(), "bench/svc-0:http");
        s.port_name.clear();
        assert_eq!(s.port_name_string(), "bench/svc-0");
        assert_eq!(ProxyConfig::default().masquerade_mark, "0x004000");
    }
}
