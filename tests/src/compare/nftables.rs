//! The transaction kube-proxy's nftables mode runs (`nft -f -`, through knftables), for
//! ClusterIP Services with Cluster traffic policy, no session affinity and ready endpoints.
//!
//! Mirrors kubernetes `pkg/proxy/nftables/proxier.go` (`setupNFTables`, `syncProxyRules`,
//! `writeServiceToEndpointRules`) in the shape its `TestOverallNFTablesRules` pins down:
//!
//! - table `ip kube-proxy`; base chains `filter-prerouting-pre-dnat`, `filter-output-pre-dnat`
//!   (priority dstnat-10), `filter-input`, `filter-forward`, `filter-output` (filter),
//!   `nat-prerouting`, `nat-output` (dstnat), `nat-postrouting` (srcnat), written with numeric
//!   priorities as knftables does (Debian 12's nft 1.0.6 also rejects `dstnat-10` outside
//!   prerouting);
//! - `services`: one rule, `ip daddr . meta l4proto . th dport vmap @service-ips`, a verdict
//!   map from (ClusterIP, protocol, port) to `goto service-<hash>-ns/name/tcp/port`;
//! - per Service port a chain that marks off-cluster sources for masquerade and picks an
//!   endpoint with `numgen random mod N vmap { 0 : goto endpoint-..., ... }`;
//! - per endpoint a chain `endpoint-<hash>-ns/name/tcp/port__ip/port` marking hairpin traffic
//!   and DNATing (`meta l4proto tcp dnat to ip:port`);
//! - `cluster-ips` set, `cluster-ips-check` (reject unknown ports of ClusterIPs, drop
//!   unallocated ClusterIPs), the no-endpoint and firewall verdict maps, `masquerading`;
//! - chain names: prefix + first 8 characters of base32(sha256(name)) + `-` + name;
//! - a partial sync (an endpoint changed) adds and flushes only the changed Services' chains
//!   and rewrites their rules; map elements that did not change are not touched; a stale
//!   endpoint chain is flushed now and deleted by a later sync.
//!
//! Left out, because the Services here do not use them: NodePorts, external and LoadBalancer
//! IPs, Local traffic policy, session affinity sets, firewall chains, services without
//! endpoints.

use std::{collections::BTreeSet, fmt::Write as _};

use super::{hash::sha256_base32, ProxyConfig, Service};

pub const TABLE: &str = "ip kube-proxy";

fn hash_and_truncate(name: &str) -> String {
    // chainNameBaseLengthMax = 256 - 16; these names are far shorter.
    format!("{}-{name}", &sha256_base32(name)[..8])
}

fn base(service: &Service) -> String {
    format!(
        "{}/{}/tcp/{}",
        service.namespace, service.name, service.port_name
    )
}

/// `service-XXXXXXXX-ns/name/tcp/port`.
pub fn service_chain(service: &Service) -> String {
    format!("service-{}", hash_and_truncate(&base(service)))
}

/// `endpoint-XXXXXXXX-ns/name/tcp/port__ip/port`.
pub fn endpoint_chain(service: &Service, endpoint: &std::net::SocketAddrV4) -> String {
    format!(
        "endpoint-{}",
        hash_and_truncate(&format!(
            "{}__{}/{}",
            base(service),
            endpoint.ip(),
            endpoint.port()
        ))
    )
}

/// The transaction of a full sync; `first` adds the one-time "add + delete" of the base chains
/// kube-proxy runs on its first sync (so that changed chain properties apply).
pub fn transaction_full(services: &[Service], config: &ProxyConfig, first: bool) -> String {
    let mut tx = String::new();
    setup(&mut tx, config, first);
    for service in services {
        write_service(&mut tx, service, config, true);
    }
    tx
}

/// The same objects as [`transaction_full`], cut into transactions of at most `chunk`
/// Services each, to be run in order. Not what kube-proxy does (one transaction per sync):
/// the kernel binds each anonymous verdict map by walking the whole pending transaction
/// (`__nft_set_trans_bind`), so one transaction of N Services costs O(N²) (about 2 minutes
/// for 10,000 Services x 10 endpoints on this machine); loading in chunks gives the same
/// ruleset in bounded time, so that the datapath can be measured all the same.
pub fn transaction_chunks(services: &[Service], config: &ProxyConfig, chunk: usize) -> Vec<String> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut tx = String::new();
    setup(&mut tx, config, true);
    for (i, service) in services.iter().enumerate() {
        if i > 0 && i % chunk == 0 {
            out.push(std::mem::take(&mut tx));
        }
        write_service(&mut tx, service, config, true);
    }
    out.push(tx);
    out
}

/// The transaction of the partial sync after the Services in `changed` changed from `before`
/// to `after` (same Services, same order).
pub fn transaction_partial(
    before: &[Service],
    after: &[Service],
    changed: &BTreeSet<usize>,
    config: &ProxyConfig,
) -> String {
    let mut tx = String::new();
    for &i in changed {
        write_service(&mut tx, &after[i], config, false);
    }
    // Stale endpoint chains: flushed now, deleted by a sync at least a second later.
    for &i in changed {
        let now: BTreeSet<String> = after[i]
            .sorted_endpoints()
            .iter()
            .map(|e| endpoint_chain(&after[i], e))
            .collect();
        for e in before[i].sorted_endpoints() {
            let chain = endpoint_chain(&before[i], &e);
            if !now.contains(&chain) {
                let _ = writeln!(tx, "flush chain {TABLE} {chain}");
            }
        }
    }
    tx
}

/// `ensureChain`: add, then flush (so nothing from before this transaction stays).
fn ensure_chain(tx: &mut String, chain: &str) {
    let _ = writeln!(tx, "add chain {TABLE} {chain}");
    let _ = writeln!(tx, "flush chain {TABLE} {chain}");
}

fn setup(tx: &mut String, config: &ProxyConfig, first: bool) {
    let mark = &config.masquerade_mark;
    let _ = writeln!(
        tx,
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // name, type, hook, priority (dstnat = -100, filter = 0, srcnat = 100).
    let base_chains = [
        ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
        ("filter-output-pre-dnat", "filter", "output", -110),
        ("filter-input", "filter", "input", 0),
        ("filter-forward", "filter", "forward", 0),
        ("filter-output", "filter", "output", 0),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    if first {
        for (name, ..) in base_chains {
            let _ = writeln!(tx, "add chain {TABLE} {name}");
            let _ = writeln!(tx, "delete chain {TABLE} {name}");
        }
    }
    for (name, kind, hook, priority) in base_chains {
        let _ = writeln!(
            tx,
            "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        );
        let _ = writeln!(tx, "flush chain {TABLE} {name}");
    }
    // nftablesJumpChains: (to, from, extra).
    let jumps = [
        ("nodeport-endpoints-check", "filter-input", "ct state new"),
        ("service-endpoints-check", "filter-input", "ct state new"),
        ("service-endpoints-check", "filter-forward", "ct state new"),
        ("service-endpoints-check", "filter-output", "ct state new"),
        (
            "firewall-check",
            "filter-prerouting-pre-dnat",
            "ct state new",
        ),
        ("firewall-check", "filter-output-pre-dnat", "ct state new"),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new"),
        ("cluster-ips-check", "filter-output", "ct state new"),
    ];
    let mut created = BTreeSet::new();
    for (to, from, extra) in jumps {
        if created.insert(to) {
            ensure_chain(tx, to);
        }
        let space = if extra.is_empty() { "" } else { " " };
        let _ = writeln!(tx, "add rule {TABLE} {from} {extra}{space}jump {to}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        if created.insert(chain) {
            ensure_chain(tx, chain);
        }
    }
    let _ = writeln!(
        tx,
        "add rule {TABLE} mark-for-masquerade mark set mark or {mark}"
    );
    let _ = writeln!(
        tx,
        "add rule {TABLE} masquerading mark and {mark} == 0 return"
    );
    let _ = writeln!(tx, "add rule {TABLE} masquerading mark set mark xor {mark}");
    let _ = writeln!(tx, "add rule {TABLE} masquerading masquerade fully-random");
    let _ = writeln!(
        tx,
        "add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add rule {TABLE} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject \
         traffic to invalid ports of ClusterIPs\""
    );
    let _ = writeln!(
        tx,
        "add rule {TABLE} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to \
         unallocated ClusterIPs\"",
        config.service_cidr
    );
    // --nodeport-addresses primary: the node's address.
    let _ = writeln!(
        tx,
        "add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort \
         traffic\" ; }}"
    );
    let _ = writeln!(tx, "flush set {TABLE} nodeport-ips");
    let _ = writeln!(
        tx,
        "add element {TABLE} nodeport-ips {{ {} }}",
        config.node_ip
    );
    let _ = writeln!(
        tx,
        "add map {TABLE} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : \
         verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add map {TABLE} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add chain {TABLE} reject-chain {{ comment \"helper for @no-endpoint-services / \
         @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(tx, "flush chain {TABLE} reject-chain");
    let _ = writeln!(tx, "add rule {TABLE} reject-chain reject");
    let _ = writeln!(
        tx,
        "add rule {TABLE} service-endpoints-check ip daddr . meta l4proto . th dport vmap \
         @no-endpoint-services"
    );
    let _ = writeln!(
        tx,
        "add rule {TABLE} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th \
         dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        tx,
        "add map {TABLE} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict \
         ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add rule {TABLE} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        tx,
        "add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        tx,
        "add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        tx,
        "add rule {TABLE} services ip daddr @nodeport-ips meta l4proto . th dport vmap \
         @service-nodeports"
    );
    // Flush the containers: a full sync writes every element again.
    let _ = writeln!(tx, "flush set {TABLE} cluster-ips");
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        let _ = writeln!(tx, "flush map {TABLE} {map}");
    }
}

/// One Service port: its chains (added and flushed), its map elements (only on a full sync:
/// on a partial one they exist already with the same value), its rules.
fn write_service(tx: &mut String, service: &Service, config: &ProxyConfig, elements: bool) {
    let endpoints = service.sorted_endpoints();
    if endpoints.is_empty() {
        return;
    }
    let svc_chain = service_chain(service);
    let endpoint_chains: Vec<String> = endpoints
        .iter()
        .map(|e| endpoint_chain(service, e))
        .collect();
    for chain in &endpoint_chains {
        ensure_chain(tx, chain);
    }
    ensure_chain(tx, &svc_chain);
    let vip = service.cluster_ip;
    if elements {
        let _ = writeln!(tx, "add element {TABLE} cluster-ips {{ {vip} }}");
        let _ = writeln!(
            tx,
            "add element {TABLE} service-ips {{ {vip} . tcp . {} : goto {svc_chain} }}",
            service.port
        );
    }
    let _ = writeln!(
        tx,
        "add rule {TABLE} {svc_chain} ip daddr {vip} ip saddr != {} jump mark-for-masquerade",
        config.cluster_cidr
    );
    let picks: Vec<String> = endpoint_chains
        .iter()
        .enumerate()
        .map(|(i, chain)| format!("{i} : goto {chain}"))
        .collect();
    let _ = writeln!(
        tx,
        "add rule {TABLE} {svc_chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        picks.join(" , ")
    );
    for (endpoint, chain) in endpoints.iter().zip(&endpoint_chains) {
        let _ = writeln!(
            tx,
            "add rule {TABLE} {chain} ip saddr {} jump mark-for-masquerade",
            endpoint.ip()
        );
        let _ = writeln!(
            tx,
            "add rule {TABLE} {chain} meta l4proto tcp dnat to {endpoint}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::compare::test_service as service;

    /// kube-proxy's test fixture (`nftables/proxier_test.go`): pod CIDR 10.0.0.0/8, Service
    /// CIDR 172.30.0.0/16, node 192.168.0.2, mark 0x4000.
    fn config() -> ProxyConfig {
        ProxyConfig {
            cluster_cidr: "10.0.0.0/8".into(),
            service_cidr: "172.30.0.0/16".into(),
            node_ip: Ipv4Addr::new(192, 168, 0, 2),
            masquerade_mark: "0x4000".into(),
            random_fully: true,
        }
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // From kubernetes pkg/proxy/nftables/proxier_test.go (TestOverallNFTablesRules).
        let s1 = service("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]);
        assert_eq!(service_chain(&s1), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            endpoint_chain(&s1, &s1.endpoints[0]),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let s2 = service("ns2", "svc2", [172, 30, 0, 42], &[[10, 180, 0, 2]]);
        assert_eq!(service_chain(&s2), "service-42NFTM6N-ns2/svc2/tcp/p80");
        assert_eq!(
            endpoint_chain(&s2, &s2.endpoints[0]),
            "endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80"
        );
    }

    #[test]
    fn two_services_full_sync_is_kube_proxys_structure() {
        let s1 = service("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]);
        let s2 = service(
            "ns2",
            "svc2",
            [172, 30, 0, 42],
            &[[10, 180, 0, 5], [10, 180, 0, 4]],
        );
        let tx = transaction_full(&[s1, s2], &config(), false);
        let lines: Vec<&str> = tx.lines().collect();
        // The lines kube-proxy's TestOverallNFTablesRules expects for these objects (its
        // svc1 and svc4 with the same endpoints), in transaction form.
        for expected in [
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }",
            "add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
            "add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }",
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }",
            "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }",
            "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check",
            "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check",
            "add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check",
            "add rule ip kube-proxy nat-prerouting jump services",
            "add rule ip kube-proxy nat-postrouting jump masquerading",
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000",
            "add rule ip kube-proxy masquerading mark and 0x4000 == 0 return",
            "add rule ip kube-proxy masquerading mark set mark xor 0x4000",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
            "add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
            "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            "add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
            // svc1
            "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }",
            "add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80",
            "add element ip kube-proxy cluster-ips { 172.30.0.41 }",
            "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
        ] {
            assert!(lines.contains(&expected), "missing: {expected}\n{tx}");
        }
        // Two endpoints: one vmap over both, in address order.
        let s2 = service_chain(&service("ns2", "svc2", [0; 4], &[]));
        let e4 = "endpoint-".to_string() + &hash_and_truncate("ns2/svc2/tcp/p80__10.180.0.4/80");
        let e5 = "endpoint-".to_string() + &hash_and_truncate("ns2/svc2/tcp/p80__10.180.0.5/80");
        let vmap = format!(
            "add rule ip kube-proxy {s2} numgen random mod 2 vmap {{ 0 : goto {e4} , 1 : goto {e5} }}"
        );
        assert!(lines.contains(&vmap.as_str()), "missing: {vmap}\n{tx}");
        // Every chain is flushed right after it is added (ensureChain), and every chain a
        // rule goes to exists before it.
        let mut added = BTreeSet::new();
        for (i, line) in lines.iter().enumerate() {
            if let Some(rest) = line.strip_prefix("add chain ip kube-proxy ") {
                let name = rest.split(' ').next().unwrap_or_default();
                added.insert(name.to_string());
                if !rest.contains("comment") {
                    assert_eq!(lines[i + 1], format!("flush chain ip kube-proxy {name}"));
                }
            }
            if let Some(rest) = line.strip_prefix("add rule ip kube-proxy ") {
                let chain = rest.split(' ').next().unwrap_or_default();
                assert!(added.contains(chain), "rule before its chain: {line}");
                for target in rest
                    .split(' ')
                    .skip_while(|w| *w != "goto" && *w != "jump")
                    .skip(1)
                    .step_by(1)
                {
                    if target.starts_with("service-") || target.starts_with("endpoint-") {
                        assert!(added.contains(target.trim_end_matches(',')), "{line}");
                    }
                }
            }
        }
        // One rule in `services`, however many Services.
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("add rule ip kube-proxy services "))
                .count(),
            2
        );
    }

    #[test]
    fn chunks_hold_the_same_transaction() {
        let pool: Vec<Ipv4Addr> = (0..60).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
        let services = super::super::services(25, &pool);
        let full = transaction_full(&services, &config(), true);
        let chunks = transaction_chunks(&services, &config(), 10);
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].starts_with("add table "));
        assert!(!chunks[1].contains("add table ") && !chunks[1].contains("flush map "));
        assert_eq!(chunks.concat(), full);
    }

    #[test]
    fn partial_sync_touches_only_the_changed_service() {
        let before = vec![
            service("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]),
            service("ns2", "svc2", [172, 30, 0, 42], &[[10, 180, 0, 2]]),
        ];
        let mut after = before.clone();
        after[1].endpoints[0] = SocketAddrV4::new(Ipv4Addr::new(10, 180, 0, 9), 80);
        let tx = transaction_partial(&before, &after, &[1].into(), &config());
        assert!(!tx.contains("svc1"), "{tx}");
        assert!(!tx.contains("add element"), "{tx}");
        assert!(!tx.contains("add table"), "{tx}");
        let new = endpoint_chain(&after[1], &after[1].endpoints[0]);
        let old = endpoint_chain(&before[1], &before[1].endpoints[0]);
        assert!(tx.contains(&format!("add chain ip kube-proxy {new}\n")));
        assert!(tx.contains("dnat to 10.180.0.9:80"));
        assert!(
            tx.ends_with(&format!("flush chain ip kube-proxy {old}\n")),
            "{tx}"
        );
    }
}
