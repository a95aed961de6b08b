//! The rules kube-proxy's iptables mode writes, for ClusterIP Services with Cluster traffic
//! policy, no session affinity and ready endpoints (what the comparison serves).
//!
//! Mirrors `syncProxyRules` and `writeServiceToEndpointRules` in kubernetes
//! `pkg/proxy/iptables/proxier.go` (with `MinimizeIPTablesRestore`, on by default since v1.27,
//! GA in v1.28), checked against the expectations of its `proxier_test.go`:
//!
//! - jump rules from the built-in chains (`iptablesJumpChains`, `iptablesKubeletJumpChains`),
//!   which kube-proxy adds with `iptables -I` (EnsureRule, Prepend) before its first
//!   `iptables-restore`, not inside it: [`jump_commands`];
//! - one `iptables-restore --noflush --counters` input with a `*filter` and a `*nat` table:
//!   filter `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`, `KUBE-FORWARD`, `KUBE-NODEPORTS`,
//!   `KUBE-PROXY-FIREWALL` (and kubelet's `KUBE-FIREWALL` localnet rule); nat
//!   `KUBE-SERVICES`, `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`, then per
//!   Service port a `KUBE-SERVICES` rule matching ClusterIP, protocol and port that jumps to
//!   `KUBE-SVC-<hash>`, whose first rule marks off-cluster sources for masquerade and whose
//!   next rules pick an endpoint with `-m statistic --mode random --probability 1/(n-i)`,
//!   the last one unconditionally; per endpoint a `KUBE-SEP-<hash>` chain marking hairpin
//!   traffic and DNATing; and last the `KUBE-NODEPORTS` tail call in `KUBE-SERVICES`;
//! - chain names: `KUBE-SVC-` + the first 16 characters of base32(sha256(portName +
//!   protocol)), `KUBE-SEP-` + the same of portName + protocol + `ip:port`;
//! - probabilities: `fmt.Sprintf("%0.10f", 1.0/float64(n))`;
//! - "large cluster mode" (more than 1,000 endpoints in all): the per-endpoint comments are
//!   left out (`appendServiceCommentLocked`);
//! - a partial sync (an endpoint changed) rewrites the filter table and the nat top-level
//!   chains (so every `KUBE-SERVICES` rule) but only the changed Services' `KUBE-SVC-*` and
//!   `KUBE-SEP-*` chains; stale endpoint chains are deleted (`-X`) only outside large cluster
//!   mode (inside it, at most once per `--iptables-sync-period`).
//!
//! Left out, because the Services here do not use them: NodePorts, external and LoadBalancer
//! IPs (`KUBE-EXT-*`, `KUBE-FW-*`), Local traffic policy (`KUBE-SVL-*`), session affinity
//! (`-m recent`), services without endpoints (filter `REJECT` rules), and the `nfacct`
//! counters (added only when the kernel has nfacct).

use std::{collections::BTreeSet, fmt::Write as _};

use super::{hash::sha256_base32, ProxyConfig, Service};

/// kube-proxy's `largeClusterEndpointsThreshold`.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

fn port_proto_hash(port_name: &str, protocol: &str) -> String {
    sha256_base32(&format!("{port_name}{protocol}"))[..16].to_string()
}

/// `servicePortPolicyClusterChain`: `KUBE-SVC-XXXXXXXXXXXXXXXX`.
pub fn service_chain(service: &Service) -> String {
    format!(
        "KUBE-SVC-{}",
        port_proto_hash(&service.port_name_string(), "tcp")
    )
}

/// `servicePortEndpointChainName`: `KUBE-SEP-XXXXXXXXXXXXXXXX`.
pub fn endpoint_chain(service: &Service, endpoint: &std::net::SocketAddrV4) -> String {
    let hash = sha256_base32(&format!("{}tcp{endpoint}", service.port_name_string()));
    format!("KUBE-SEP-{}", &hash[..16])
}

/// `computeProbability`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// One jump rule kube-proxy ensures in a built-in chain: (table, built-in chain, arguments
/// after `-I <chain>`), and the chain it jumps to (created first with `-N`).
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub args: Vec<String>,
}

/// `iptablesJumpChains` then `iptablesKubeletJumpChains`, each as EnsureRule(Prepend) adds it.
pub fn jump_commands() -> Vec<Jump> {
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    let table: [(&str, &str, &str, &str, &[&str]); 14] = [
        (
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "INPUT",
            "kubernetes externally-visible service portals",
            &new,
        ),
        (
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "FORWARD",
            "kubernetes externally-visible service portals",
            &new,
        ),
        (
            "filter",
            KUBE_NODEPORTS,
            "INPUT",
            "kubernetes health check service ports",
            &[],
        ),
        (
            "filter",
            KUBE_SERVICES,
            "FORWARD",
            "kubernetes service portals",
            &new,
        ),
        (
            "filter",
            KUBE_SERVICES,
            "OUTPUT",
            "kubernetes service portals",
            &new,
        ),
        (
            "filter",
            KUBE_FORWARD,
            "FORWARD",
            "kubernetes forwarding rules",
            &[],
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "INPUT",
            "kubernetes load balancer firewall",
            &new,
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "OUTPUT",
            "kubernetes load balancer firewall",
            &new,
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "FORWARD",
            "kubernetes load balancer firewall",
            &new,
        ),
        (
            "nat",
            KUBE_SERVICES,
            "OUTPUT",
            "kubernetes service portals",
            &[],
        ),
        (
            "nat",
            KUBE_SERVICES,
            "PREROUTING",
            "kubernetes service portals",
            &[],
        ),
        (
            "nat",
            KUBE_POSTROUTING,
            "POSTROUTING",
            "kubernetes postrouting rules",
            &[],
        ),
        // Kubelet's (created by kube-proxy too, without a comment).
        ("filter", KUBE_FIREWALL, "INPUT", "", &[]),
        ("filter", KUBE_FIREWALL, "OUTPUT", "", &[]),
    ];
    table
        .into_iter()
        .map(|(table, to, from, comment, extra)| {
            let mut args: Vec<String> = extra.iter().map(ToString::to_string).collect();
            if !comment.is_empty() {
                args.extend(["-m", "comment", "--comment", comment].map(String::from));
            }
            args.extend(["-j", to].map(String::from));
            Jump {
                table,
                from,
                to,
                args,
            }
        })
        .collect()
}

/// What a sync writes: everything (`None`), or only these Services' chains (indexes into the
/// Service list), deleting these stale chains.
#[derive(Clone, Debug, Default)]
pub struct Partial {
    pub changed: BTreeSet<usize>,
    pub stale_chains: Vec<String>,
}

/// The `iptables-restore` input of a full sync.
pub fn restore_full(services: &[Service], config: &ProxyConfig) -> String {
    restore(services, config, None)
}

/// The `iptables-restore` input of the partial sync after the Services in `changed` changed,
/// from `before` to `after` (same Services, same order).
pub fn restore_partial(
    before: &[Service],
    after: &[Service],
    changed: &BTreeSet<usize>,
    config: &ProxyConfig,
) -> String {
    let large = total_endpoints(after) > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    let mut stale_chains = Vec::new();
    if !large {
        for &i in changed {
            let now: BTreeSet<String> = after[i]
                .sorted_endpoints()
                .iter()
                .map(|e| endpoint_chain(&after[i], e))
                .collect();
            for e in before[i].sorted_endpoints() {
                let chain = endpoint_chain(&before[i], &e);
                if !now.contains(&chain) {
                    stale_chains.push(chain);
                }
            }
        }
    }
    restore(
        after,
        config,
        Some(&Partial {
            changed: changed.clone(),
            stale_chains,
        }),
    )
}

fn total_endpoints(services: &[Service]) -> usize {
    services.iter().map(|s| s.endpoints.len()).sum()
}

/// The same rules as [`restore_full`], cut into several `iptables-restore --noflush` inputs of
/// at most `chunk` Services each, to be loaded in order. Not what kube-proxy does (it loads
/// everything in one transaction): this is for back ends whose one-shot load of a large rule
/// set does not finish in reasonable time (iptables-nft-restore's `--noflush` handling is
/// quadratic in the size of its input), so that their datapath can be measured all the same.
/// The rules in the kernel at the end are the same, in the same order.
pub fn restore_chunks(services: &[Service], config: &ProxyConfig, chunk: usize) -> Vec<String> {
    let chunk = chunk.max(1);
    let large = total_endpoints(services) > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    let mut out = Vec::new();
    let mut start = 0;
    while start < services.len() || out.is_empty() {
        let end = (start + chunk).min(services.len());
        out.push(write(
            services,
            config,
            &Write {
                range: start..end,
                head: start == 0,
                tail: end == services.len(),
                large,
                partial: None,
            },
        ));
        start = end;
    }
    out
}

fn restore(services: &[Service], config: &ProxyConfig, partial: Option<&Partial>) -> String {
    write(
        services,
        config,
        &Write {
            range: 0..services.len(),
            head: true,
            tail: true,
            large: total_endpoints(services) > LARGE_CLUSTER_ENDPOINTS_THRESHOLD,
            partial,
        },
    )
}

/// What one `iptables-restore` input holds.
struct Write<'a> {
    /// The Services written.
    range: std::ops::Range<usize>,
    /// The filter table and the nat top-level chains (declaring them flushes them).
    head: bool,
    /// The NodePorts tail call that must end `KUBE-SERVICES`.
    tail: bool,
    /// Large cluster mode (decided on all Services).
    large: bool,
    partial: Option<&'a Partial>,
}

fn write(services: &[Service], config: &ProxyConfig, what: &Write) -> String {
    let mark = &config.masquerade_mark;
    let large = what.large;
    let partial = what.partial;
    let mut filter_chains = String::new();
    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    let chain_line = |out: &mut String, chain: &str| {
        let _ = writeln!(out, ":{chain} - [0:0]");
    };

    if what.head {
        for chain in [
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES,
            KUBE_FORWARD,
            KUBE_NODEPORTS,
            KUBE_PROXY_FIREWALL,
        ] {
            chain_line(&mut filter_chains, chain);
        }
        for chain in [
            KUBE_SERVICES,
            KUBE_NODEPORTS,
            KUBE_POSTROUTING,
            KUBE_MARK_MASQ,
        ] {
            chain_line(&mut nat_chains, chain);
        }
        let _ = writeln!(
            nat_rules,
            "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
        );
        let _ = writeln!(nat_rules, "-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}");
        let _ = writeln!(
            nat_rules,
            "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring \
             SNAT\" -j MASQUERADE{}",
            if config.random_fully {
                " --random-fully"
            } else {
                ""
            }
        );
        let _ = writeln!(nat_rules, "-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}");
        // localhostNodePorts (the default): kubelet's anti-martian rule, duplicated.
        chain_line(&mut filter_chains, KUBE_FIREWALL);
        let _ = writeln!(
            filter_rules,
            "-A {KUBE_FIREWALL} -m comment --comment \"block incoming localnet connections\" \
             -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT \
             -j DROP"
        );
    }

    let comment = |name: &str| -> String {
        if large {
            String::new()
        } else if name.contains(' ') {
            format!(" -m comment --comment \"{name}\"")
        } else {
            format!(" -m comment --comment {name}")
        }
    };
    for (index, service) in services
        .iter()
        .enumerate()
        .take(what.range.end)
        .skip(what.range.start)
    {
        let name = service.port_name_string();
        let svc_chain = service_chain(service);
        let vip = service.cluster_ip;
        let port = service.port;
        let endpoints = service.sorted_endpoints();
        if endpoints.is_empty() {
            continue; // (would be a filter REJECT rule; not used here)
        }
        // Capture the ClusterIP (always written, even in a partial sync).
        let _ = writeln!(
            nat_rules,
            "-A {KUBE_SERVICES} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d \
             {vip} --dport {port} -j {svc_chain}"
        );
        let write_chains = partial.is_none_or(|p| p.changed.contains(&index));
        if !write_chains {
            continue;
        }
        // Internal traffic: masquerade what does not come from the cluster CIDR.
        let _ = writeln!(
            nat_rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} \
             --dport {port} ! -s {} -j {KUBE_MARK_MASQ}",
            config.cluster_cidr
        );
        chain_line(&mut nat_chains, &svc_chain);
        // writeServiceToEndpointRules: load balancing.
        let n = endpoints.len();
        for (i, endpoint) in endpoints.iter().enumerate() {
            let sep = endpoint_chain(service, endpoint);
            let statistic = if i < n - 1 {
                format!(
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                nat_rules,
                "-A {svc_chain}{}{statistic} -j {sep}",
                comment(&format!("{name} -> {endpoint}"))
            );
        }
        // Per-endpoint chains.
        for endpoint in &endpoints {
            let sep = endpoint_chain(service, endpoint);
            chain_line(&mut nat_chains, &sep);
            let c = comment(&name);
            let _ = writeln!(
                nat_rules,
                "-A {sep}{c} -s {} -j {KUBE_MARK_MASQ}",
                endpoint.ip()
            );
            let _ = writeln!(
                nat_rules,
                "-A {sep}{c} -m tcp -p tcp -j DNAT --to-destination {endpoint}"
            );
        }
    }
    if let Some(partial) = partial {
        for chain in &partial.stale_chains {
            chain_line(&mut nat_chains, chain);
            let _ = writeln!(nat_rules, "-X {chain}");
        }
    }
    if what.tail {
        // The NodePorts tail call (nodePortAddresses matches all; localhost NodePorts
        // allowed).
        let _ = writeln!(
            nat_rules,
            "-A {KUBE_SERVICES} -m comment --comment \"kubernetes service nodeports; NOTE: this \
             must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j \
             {KUBE_NODEPORTS}"
        );
    }
    if what.head {
        // nf_conntrack_tcp_be_liberal is 0: drop INVALID.
        let _ = writeln!(
            filter_rules,
            "-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP"
        );
        let _ = writeln!(
            filter_rules,
            "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark \
             --mark {mark}/{mark} -j ACCEPT"
        );
        let _ = writeln!(
            filter_rules,
            "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m \
             conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );
    }

    let mut out = String::with_capacity(
        filter_chains.len() + filter_rules.len() + nat_chains.len() + nat_rules.len() + 32,
    );
    if what.head {
        out.push_str("*filter\n");
        out.push_str(&filter_chains);
        out.push_str(&filter_rules);
        out.push_str("COMMIT\n");
    }
    out.push_str("*nat\n");
    out.push_str(&nat_chains);
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::compare::test_service as service;

    /// kube-proxy's own test fixture (`proxier_test.go`): masquerade mark 0x4000, pod CIDR
    /// 10.0.0.0/24, a fake iptables without --random-fully.
    fn config() -> ProxyConfig {
        ProxyConfig {
            cluster_cidr: "10.0.0.0/24".into(),
            masquerade_mark: "0x4000".into(),
            random_fully: false,
            ..ProxyConfig::default()
        }
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // From kubernetes pkg/proxy/iptables/proxier_test.go.
        let s1 = service("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]);
        assert_eq!(service_chain(&s1), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            endpoint_chain(&s1, &s1.endpoints[0]),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        let s2 = service("ns2", "svc2", [172, 30, 0, 42], &[]);
        assert_eq!(service_chain(&s2), "KUBE-SVC-GNZBNJ2PO5MGZ6GT");
        let s3 = service("ns3", "svc3", [172, 30, 0, 43], &[]);
        assert_eq!(service_chain(&s3), "KUBE-SVC-X27LE4BHSL4DOUIK");
    }

    #[test]
    fn probabilities_are_one_over_remaining() {
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(10), "0.1000000000");
    }

    #[test]
    fn two_services_full_sync_is_kube_proxys_structure() {
        let s1 = service("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]);
        let s2 = service(
            "ns2",
            "svc2",
            [172, 30, 0, 42],
            &[[10, 180, 0, 3], [10, 180, 0, 2], [10, 180, 0, 4]],
        );
        let text = restore_full(&[s1.clone(), s2.clone()], &config());
        let svc2 = service_chain(&s2);
        let sep = |s: &Service, i: usize| endpoint_chain(s, &s.sorted_endpoints()[i]);
        let expected = format!(
            r#"*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:{svc2} - [0:0]
:{s2e0} - [0:0]
:{s2e1} - [0:0]
:{s2e2} - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/24 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j {svc2}
-A {svc2} -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/24 -j KUBE-MARK-MASQ
-A {svc2} -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -m statistic --mode random --probability 0.3333333333 -j {s2e0}
-A {svc2} -m comment --comment "ns2/svc2:p80 -> 10.180.0.3:80" -m statistic --mode random --probability 0.5000000000 -j {s2e1}
-A {svc2} -m comment --comment "ns2/svc2:p80 -> 10.180.0.4:80" -j {s2e2}
-A {s2e0} -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A {s2e0} -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A {s2e1} -m comment --comment ns2/svc2:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A {s2e1} -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A {s2e2} -m comment --comment ns2/svc2:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A {s2e2} -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"#,
            s2e0 = sep(&s2, 0),
            s2e1 = sep(&s2, 1),
            s2e2 = sep(&s2, 2),
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn partial_sync_rewrites_only_the_changed_service() {
        let s1 = service("ns1", "svc1", [172, 30, 0, 41], &[[10, 180, 0, 1]]);
        let s2 = service("ns2", "svc2", [172, 30, 0, 42], &[[10, 180, 0, 2]]);
        let before = vec![s1.clone(), s2.clone()];
        let mut after = before.clone();
        after[1].endpoints[0] = SocketAddrV4::new(Ipv4Addr::new(10, 180, 0, 9), 80);
        let text = restore_partial(&before, &after, &[1].into(), &config());
        // Both Services are still captured in KUBE-SERVICES ...
        assert!(text.contains("-j KUBE-SVC-XPGD46QRK7WJZT7O\n"));
        assert!(text.contains(&format!("-j {}\n", service_chain(&after[1]))));
        // ... but only svc2's chains are written, and its old endpoint chain deleted.
        assert!(!text.contains(":KUBE-SVC-XPGD46QRK7WJZT7O"));
        assert!(!text.contains(":KUBE-SEP-SXIVWICOYRO3J4NJ"));
        assert!(text.contains(&format!(":{} - [0:0]", service_chain(&after[1]))));
        let old = endpoint_chain(&before[1], &before[1].endpoints[0]);
        let new = endpoint_chain(&after[1], &after[1].endpoints[0]);
        assert!(text.contains(&format!(":{new} - [0:0]")));
        assert!(text.contains(&format!(":{old} - [0:0]\n")));
        assert!(text.contains(&format!("-X {old}\n")));
        assert!(text.contains("--to-destination 10.180.0.9:80"));
    }

    #[test]
    fn chunks_load_the_same_rules_in_the_same_order() {
        let pool: Vec<Ipv4Addr> = (0..60).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
        let services = super::super::services(250, &pool);
        let config = ProxyConfig::default();
        let full = restore_full(&services, &config);
        let chunks = restore_chunks(&services, &config, 100);
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].starts_with("*filter\n"));
        for chunk in &chunks[1..] {
            assert!(chunk.starts_with("*nat\n"));
            assert!(
                !chunk.contains(":KUBE-SERVICES "),
                "re-declaring flushes it"
            );
        }
        // Same lines in the end; same order within each chain.
        let lines = |texts: &[String]| -> Vec<String> {
            let mut v: Vec<String> = texts
                .iter()
                .flat_map(|t| t.lines().map(String::from))
                .filter(|l| l.starts_with('-') || l.starts_with(':'))
                .collect();
            v.sort();
            v
        };
        assert_eq!(lines(&chunks), lines(std::slice::from_ref(&full)));
        let services_rules = |texts: &[String]| -> Vec<String> {
            texts
                .iter()
                .flat_map(|t| t.lines().map(String::from))
                .filter(|l| l.starts_with("-A KUBE-SERVICES "))
                .collect()
        };
        assert_eq!(services_rules(&chunks), services_rules(&[full]));
    }

    #[test]
    fn large_clusters_drop_endpoint_comments() {
        let pool: Vec<Ipv4Addr> = (0..60).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
        let services = super::super::services(101, &pool);
        let text = restore_full(&services, &ProxyConfig::default());
        assert!(text.contains("cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j KUBE-SVC-"));
        assert!(!text.contains(" -> "), "no per-endpoint comments");
        assert!(text.contains("-j MASQUERADE --random-fully"));
        assert!(text.contains("--mark 0x004000/0x004000"));
        let rules = text.lines().filter(|l| l.starts_with("-A ")).count();
        // Per Service: capture, masquerade, 10 picks, 10 x 2 endpoint rules.
        assert_eq!(rules, 101 * 32 + 4 + 1 + 4);
    }
}
