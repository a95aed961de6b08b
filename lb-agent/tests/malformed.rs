//! Malformed Services and EndpointSlices, one row each. Every row is read the way standalone mode
//! reads it (YAML files in a directory) next to a healthy control Service, and checked for what
//! the Reliability issue asks: the error names the object and the field (as the agent logs it);
//! the bad part is left out and the rest of the object is still served; the control Service is
//! programmed exactly as it is alone; `lb_invalid_objects` counts it. The incremental engine
//! (Kubernetes mode) then gets the same objects and must agree.

use std::{collections::BTreeSet, fs, net::Ipv4Addr, path::PathBuf};

use lb_agent::{
    desired_from_manifests,
    engine::Engine,
    manifest::{self, Manifests},
    metrics::Metrics,
    model::{DesiredState, ModelError, Settings, WhenEmpty},
};

const CONTROL_SERVICE: &str = "ctl/control";

/// Uses every feature a malformed neighbour could disturb: node ports, an externalIP, an
/// ingress IP, a Local policy with a health-check port, affinity, source ranges, two protocols,
/// local, remote and terminating endpoints.
const CONTROL: &str = "apiVersion: v1
kind: Service
metadata: {name: control, namespace: ctl}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.1
  externalIPs: [198.51.100.1]
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}
status: {loadBalancer: {ingress: [{ip: 203.0.113.1}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: control-1, namespace: ctl, labels: {kubernetes.io/service-name: control}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.9.1], nodeName: node-a}
- {addresses: [10.244.9.2], nodeName: node-b}
- {addresses: [10.244.9.3], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}
";

fn settings() -> Settings {
    let node = Ipv4Addr::new(192, 168, 0, 10);
    Settings {
        node_name: "node-a".to_string(),
        node_zone: None,
        node_addresses: vec![node],
        local_addresses: vec![node],
    }
}

/// One row of the matrix. Names and addresses are unique across rows, so every row can also
/// be loaded at once (`every_row_at_once`).
#[derive(Default)]
struct Case {
    /// Documents of the row, written to a file of their own.
    yaml: String,
    /// `(object, field, message fragment)` of each model error, in the model's order.
    errors: &'static [(&'static str, &'static str, &'static str)],
    /// `(object, field, message fragment)` of each document that did not load; field `""`
    /// when the document cannot name one (not YAML at all).
    documents: &'static [(Option<&'static str>, &'static str, &'static str)],
    /// What the row's objects are still programmed with, as `render` prints it.
    served: &'static [&'static str],
    /// Objects of the row rightly left out (not errors).
    skipped: &'static [&'static str],
    /// `lb_invalid_objects` for Service, EndpointSlice and document.
    invalid: [i64; 3],
}

fn service(name: &str, spec: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{{spec}}}\n")
}

/// A document of any kind, written out as is after its metadata.
fn document(api_version: &str, kind: &str, metadata: &str, rest: &str) -> String {
    format!("---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{{metadata}}}\n{rest}")
}

const SPEC_80: &str = "spec: {clusterIP: 10.96.0.54, ports: [{port: 80}]}\n";

fn typed_slice(
    name: &str,
    owner: &str,
    address_type: &str,
    ports: &str,
    endpoints: &str,
) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, \
         labels: {{kubernetes.io/service-name: {owner}}}}}\naddressType: {address_type}\nports: {ports}\n\
         endpoints: {endpoints}\n"
    )
}

fn slice(name: &str, owner: &str, ports: &str, endpoints: &str) -> String {
    typed_slice(name, owner, "IPv4", ports, endpoints)
}

/// A one-port Service `name` on 10.96.0.`n` and one slice `name-1` for it with `endpoints`.
fn with_slice(name: &str, n: u8, slice_ports: &str, endpoints: &str) -> String {
    service(
        name,
        &format!("clusterIP: 10.96.0.{n}, ports: [{{name: http, port: 80}}]"),
    ) + &slice(&format!("{name}-1"), name, slice_ports, endpoints)
}

const HTTP_8080: &str = "[{name: http, port: 8080}]";

macro_rules! matrix {
    ($($name:ident => $case:expr,)*) => {
        fn rows() -> Vec<(&'static str, Case)> {
            vec![$((stringify!($name), $case)),*]
        }
        $(
            #[test]
            fn $name() {
                check(stringify!($name), &[$case]);
            }
        )*
    };
}

matrix! {
    // Services: the virtual IP.
    cluster_ip_octet_out_of_range => Case {
        yaml: service("bad-vip", "clusterIP: 10.96.0.300, ports: [{port: 80}]"),
        errors: &[("Service shop/bad-vip", "spec.clusterIP", "\"10.96.0.300\" is not an IP address")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    cluster_ip_not_an_address => Case {
        yaml: service("word-vip", "clusterIP: abc, ports: [{port: 80}]"),
        errors: &[("Service shop/word-vip", "spec.clusterIP", "\"abc\" is not an IP address")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    cluster_ips_bad_secondary_keeps_the_primary => Case {
        yaml: service(
            "bad-second-vip",
            "clusterIP: 10.96.0.3, clusterIPs: [10.96.0.3, 10.96.0.333], ports: [{port: 80}]",
        ),
        errors: &[("Service shop/bad-second-vip", "spec.clusterIPs[1]", "not an IP address")],
        served: &["shop/bad-second-vip:80/TCP ClusterIP 10.96.0.3:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    ipv6_cluster_ip_is_skipped_not_an_error => Case {
        yaml: service("v6-only", "clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ports: [{port: 80}]"),
        skipped: &["Service shop/v6-only"],
        ..Case::default()
    },
    dual_stack_serves_the_ipv4_family => Case {
        yaml: service("dual", "clusterIP: 'fd00::11', clusterIPs: ['fd00::11', 10.96.0.5], ports: [{port: 80}]"),
        served: &["shop/dual:80/TCP ClusterIP 10.96.0.5:80 -> none"],
        skipped: &["Service shop/dual"],
        ..Case::default()
    },

    // Services: ports. A bad port leaves the others served, as kube-proxy does.
    port_zero => Case {
        yaml: service("port-zero", "clusterIP: 10.96.0.6, ports: [{name: a, port: 0}, {name: b, port: 81}]")
            + &slice("port-zero-1", "port-zero", "[{name: a, port: 8080}, {name: b, port: 8081}]",
                "[{addresses: [10.244.6.1]}]"),
        errors: &[("Service shop/port-zero", "spec.ports[0].port", "port 0 is outside 1-65535")],
        served: &["shop/port-zero:b/TCP ClusterIP 10.96.0.6:81 -> 10.244.6.1:8081"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    port_above_65535 => Case {
        yaml: service("port-big", "clusterIP: 10.96.0.7, ports: [{name: a, port: 80}, {name: b, port: 70000}]"),
        errors: &[("Service shop/port-big", "spec.ports[1].port", "port 70000 is outside 1-65535")],
        served: &["shop/port-big:a/TCP ClusterIP 10.96.0.7:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    port_negative => Case {
        yaml: service("port-negative", "clusterIP: 10.96.0.8, ports: [{name: a, port: -1}, {name: b, port: 81}]"),
        errors: &[("Service shop/port-negative", "spec.ports[0].port", "port -1 is outside 1-65535")],
        served: &["shop/port-negative:b/TCP ClusterIP 10.96.0.8:81 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    protocol_unknown => Case {
        yaml: service("proto-x", "clusterIP: 10.96.0.9, ports: [{name: a, port: 80}, {name: b, port: 82, protocol: SCTPX}]"),
        errors: &[("Service shop/proto-x", "spec.ports[1].protocol", "protocol \"SCTPX\" is not supported")],
        served: &["shop/proto-x:a/TCP ClusterIP 10.96.0.9:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    // Kubernetes' protocol values are case-sensitive.
    protocol_lowercase => Case {
        yaml: service("proto-lower", "clusterIP: 10.96.0.10, \
            ports: [{name: a, port: 80, protocol: tcp}, {name: b, port: 81, protocol: UDP}]"),
        errors: &[("Service shop/proto-lower", "spec.ports[0].protocol", "protocol \"tcp\" is not supported")],
        served: &["shop/proto-lower:b/UDP ClusterIP 10.96.0.10:81 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    // Valid in Kubernetes, not translated by this datapath: reported, the TCP port kept.
    protocol_sctp_is_unsupported => Case {
        yaml: service("proto-sctp", "clusterIP: 10.96.0.11, ports: [{name: a, port: 80}, {name: b, port: 80, protocol: SCTP}]"),
        errors: &[("Service shop/proto-sctp", "spec.ports[1].protocol", "protocol \"SCTP\" is not supported")],
        served: &["shop/proto-sctp:a/TCP ClusterIP 10.96.0.11:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    duplicate_port_name => Case {
        yaml: service("dup-name", "clusterIP: 10.96.0.30, ports: [{name: a, port: 80}, {name: a, port: 81}]"),
        errors: &[("Service shop/dup-name", "spec.ports[1].name", "\"a\" is already the name of spec.ports[0]")],
        served: &["shop/dup-name:a/TCP ClusterIP 10.96.0.30:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    // Slices match ports by name: unnamed twice would give both one backend port.
    unnamed_ports_of_a_multi_port_service => Case {
        yaml: service("unnamed-two", "clusterIP: 10.96.0.64, ports: [{port: 80}, {port: 81}]"),
        errors: &[("Service shop/unnamed-two", "spec.ports[1].name", "unnamed, as is spec.ports[0]")],
        served: &["shop/unnamed-two:80/TCP ClusterIP 10.96.0.64:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    duplicate_port_number => Case {
        yaml: service("dup-port", "clusterIP: 10.96.0.31, ports: [{name: a, port: 80}, {name: b, port: 80}]"),
        errors: &[("Service shop/dup-port", "spec.ports[1].port", "80/TCP is already spec.ports[0]")],
        served: &["shop/dup-port:a/TCP ClusterIP 10.96.0.31:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    no_ports => Case {
        yaml: service("no-ports", "clusterIP: 10.96.0.29"),
        errors: &[("Service shop/no-ports", "spec.ports", "no port")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    missing_spec => Case {
        yaml: document("v1", "Service", "name: no-spec, namespace: shop", ""),
        errors: &[("Service shop/no-spec", "spec", "missing")],
        invalid: [1, 0, 0],
        ..Case::default()
    },

    // Services: node ports. Out of range loses the NodePort frontend, not the cluster IP.
    node_port_above_65535 => Case {
        yaml: service("np-big", "type: NodePort, clusterIP: 10.96.0.12, ports: [{port: 80, nodePort: 70000}]"),
        errors: &[("Service shop/np-big", "spec.ports[0].nodePort", "node port 70000 is outside 1-65535")],
        served: &["shop/np-big:80/TCP ClusterIP 10.96.0.12:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    node_port_negative => Case {
        yaml: service("np-negative", "type: NodePort, clusterIP: 10.96.0.13, ports: [{port: 80, nodePort: -30000}]"),
        errors: &[("Service shop/np-negative", "spec.ports[0].nodePort", "node port -30000 is outside 1-65535")],
        served: &["shop/np-negative:80/TCP ClusterIP 10.96.0.13:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    // The API's zero value (omitted on the wire): not allocated, as kube-proxy reads it.
    node_port_zero_means_not_allocated => Case {
        yaml: service("np-zero", "type: LoadBalancer, clusterIP: 10.96.0.14, ports: [{port: 80, nodePort: 0}]"),
        served: &["shop/np-zero:80/TCP ClusterIP 10.96.0.14:80 -> none"],
        ..Case::default()
    },
    health_check_node_port_above_65535 => Case {
        yaml: service("hc-big", "type: LoadBalancer, clusterIP: 10.96.0.26, externalTrafficPolicy: Local, \
            healthCheckNodePort: 70000, ports: [{port: 80, nodePort: 30026}]"),
        errors: &[("Service shop/hc-big", "spec.healthCheckNodePort", "70000 is outside 1-65535")],
        served: &[
            "shop/hc-big:80/TCP ClusterIP 10.96.0.26:80 -> none",
            "shop/hc-big:80/TCP#local NodePort 192.168.0.10:30026 -> none",
        ],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    health_check_node_port_negative => Case {
        yaml: service("hc-negative", "type: LoadBalancer, clusterIP: 10.96.0.27, externalTrafficPolicy: Local, \
            healthCheckNodePort: -1, ports: [{port: 80, nodePort: 30027}]"),
        errors: &[("Service shop/hc-negative", "spec.healthCheckNodePort", "-1 is outside 1-65535")],
        served: &[
            "shop/hc-negative:80/TCP ClusterIP 10.96.0.27:80 -> none",
            "shop/hc-negative:80/TCP#local NodePort 192.168.0.10:30027 -> none",
        ],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    health_check_node_port_zero_means_not_allocated => Case {
        yaml: service("hc-zero", "type: LoadBalancer, clusterIP: 10.96.0.28, externalTrafficPolicy: Local, \
            healthCheckNodePort: 0, ports: [{port: 80, nodePort: 30028}]"),
        served: &[
            "shop/hc-zero:80/TCP ClusterIP 10.96.0.28:80 -> none",
            "shop/hc-zero:80/TCP#local NodePort 192.168.0.10:30028 -> none",
        ],
        ..Case::default()
    },

    // Services: target ports are the EndpointSlice controller's input, not the proxy's.
    target_port_out_of_range_is_not_read => Case {
        yaml: service("tp-big", "clusterIP: 10.96.0.15, ports: [{name: http, port: 80, targetPort: 70000}]")
            + &slice("tp-big-1", "tp-big", HTTP_8080, "[{addresses: [10.244.15.1]}]"),
        served: &["shop/tp-big:http/TCP ClusterIP 10.96.0.15:80 -> 10.244.15.1:8080"],
        ..Case::default()
    },
    target_port_named_nowhere_has_no_backends => Case {
        yaml: service("tp-named", "clusterIP: 10.96.0.16, ports: [{name: http, port: 80, targetPort: web}]")
            + &slice("tp-named-1", "tp-named", "[{name: metrics, port: 9090}]", "[{addresses: [10.244.16.1]}]"),
        served: &["shop/tp-named:http/TCP ClusterIP 10.96.0.16:80 -> none"],
        ..Case::default()
    },

    // Services: other addresses. A bad one loses its own frontend only.
    external_ip_bad => Case {
        yaml: service("eip-bad", "clusterIP: 10.96.0.17, externalIPs: [198.51.100.17, 198.51.100.x], ports: [{port: 80}]"),
        errors: &[("Service shop/eip-bad", "spec.externalIPs[1]", "\"198.51.100.x\" is not an IP address")],
        served: &["shop/eip-bad:80/TCP ClusterIP 10.96.0.17:80, ExternalIP 198.51.100.17:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    // Kubernetes refuses loopback, link-local and unspecified external IPs.
    external_ip_loopback => Case {
        yaml: service("eip-loopback", "clusterIP: 10.96.0.18, externalIPs: [127.0.0.1], ports: [{port: 80}]"),
        errors: &[("Service shop/eip-loopback", "spec.externalIPs[0]", "loopback")],
        served: &["shop/eip-loopback:80/TCP ClusterIP 10.96.0.18:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    external_ip_ipv6_is_ignored => Case {
        yaml: service("eip-v6", "clusterIP: 10.96.0.19, externalIPs: ['2001:db8::19'], ports: [{port: 80}]"),
        served: &["shop/eip-v6:80/TCP ClusterIP 10.96.0.19:80 -> none"],
        ..Case::default()
    },
    load_balancer_ingress_ip_bad => Case {
        yaml: service("lb-ingress", "type: LoadBalancer, clusterIP: 10.96.0.20, ports: [{port: 80, nodePort: 30020}]")
            + "status: {loadBalancer: {ingress: [{ip: 203.0.113.20}, {ip: 203.0.113.300}]}}\n",
        errors: &[("Service shop/lb-ingress", "status.loadBalancer.ingress[1].ip", "\"203.0.113.300\" is not an IP address")],
        served: &["shop/lb-ingress:80/TCP ClusterIP 10.96.0.20:80, LoadBalancer 203.0.113.20:80, NodePort 192.168.0.10:30020 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    source_range_bad_prefix_length => Case {
        yaml: service("ranges-bad", "type: LoadBalancer, clusterIP: 10.96.0.21, \
            loadBalancerSourceRanges: [10.0.0.0/8, 10.0.0.0/40], ports: [{port: 80}]"),
        errors: &[("Service shop/ranges-bad", "spec.loadBalancerSourceRanges[1]", "invalid prefix length")],
        served: &["shop/ranges-bad:80/TCP ClusterIP 10.96.0.21:80 -> none ranges=[10.0.0.0/8]"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    // Invalid ranges narrow, never widen: nothing valid left admits nobody.
    source_range_only_bad_admits_nobody => Case {
        yaml: service("ranges-none", "type: LoadBalancer, clusterIP: 10.96.0.22, \
            loadBalancerSourceRanges: [everyone], ports: [{port: 80}]"),
        errors: &[("Service shop/ranges-none", "spec.loadBalancerSourceRanges[0]", "not an IPv4 CIDR")],
        served: &["shop/ranges-none:80/TCP ClusterIP 10.96.0.22:80 -> none ranges=[]"],
        invalid: [1, 0, 0],
        ..Case::default()
    },

    // Services: enumerations Kubernetes validates; an unknown value is reported and the
    // default applies.
    affinity_timeout_zero => Case {
        yaml: service("aff-zero", "clusterIP: 10.96.0.23, sessionAffinity: ClientIP, \
            sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]"),
        errors: &[("Service shop/aff-zero", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "0 is outside 1-86400")],
        served: &["shop/aff-zero:80/TCP ClusterIP 10.96.0.23:80 -> none affinity=10800"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    affinity_timeout_above_a_day => Case {
        yaml: service("aff-long", "clusterIP: 10.96.0.24, sessionAffinity: ClientIP, \
            sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ports: [{port: 80}]"),
        errors: &[("Service shop/aff-long", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "86401 is outside 1-86400")],
        served: &["shop/aff-long:80/TCP ClusterIP 10.96.0.24:80 -> none affinity=10800"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    affinity_unknown => Case {
        yaml: service("aff-sticky", "clusterIP: 10.96.0.25, sessionAffinity: Sticky, ports: [{port: 80}]"),
        errors: &[("Service shop/aff-sticky", "spec.sessionAffinity", "\"Sticky\"")],
        served: &["shop/aff-sticky:80/TCP ClusterIP 10.96.0.25:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    type_unknown_serves_the_cluster_ip_only => Case {
        yaml: service("type-x", "type: Balancer, clusterIP: 10.96.0.32, ports: [{port: 80, nodePort: 30032}]"),
        errors: &[("Service shop/type-x", "spec.type", "\"Balancer\"")],
        served: &["shop/type-x:80/TCP ClusterIP 10.96.0.32:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    external_traffic_policy_unknown => Case {
        yaml: service("etp-x", "type: NodePort, clusterIP: 10.96.0.33, externalTrafficPolicy: local, \
            ports: [{port: 80, nodePort: 30033}]"),
        errors: &[("Service shop/etp-x", "spec.externalTrafficPolicy", "\"local\"")],
        served: &["shop/etp-x:80/TCP ClusterIP 10.96.0.33:80, NodePort 192.168.0.10:30033 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    internal_traffic_policy_unknown => Case {
        yaml: service("itp-x", "clusterIP: 10.96.0.34, internalTrafficPolicy: Node, ports: [{port: 80}]"),
        errors: &[("Service shop/itp-x", "spec.internalTrafficPolicy", "\"Node\"")],
        served: &["shop/itp-x:80/TCP ClusterIP 10.96.0.34:80 -> none"],
        invalid: [1, 0, 0],
        ..Case::default()
    },

    // EndpointSlices: a bad endpoint is left out, the others still serve.
    slice_address_octet_out_of_range => Case {
        yaml: with_slice("ep-octet", 35, HTTP_8080, "[{addresses: [10.244.35.999]}, {addresses: [10.244.35.2]}]"),
        errors: &[("EndpointSlice shop/ep-octet-1", "endpoints[0].addresses[0]", "\"10.244.35.999\" is not a usable IPv4 address")],
        served: &["shop/ep-octet:http/TCP ClusterIP 10.96.0.35:80 -> 10.244.35.2:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_address_hostname => Case {
        yaml: with_slice("ep-host", 36, HTTP_8080, "[{addresses: [10.244.36.1]}, {addresses: [web-0.shop.svc]}]"),
        errors: &[("EndpointSlice shop/ep-host-1", "endpoints[1].addresses[0]", "\"web-0.shop.svc\" is not a usable IPv4 address")],
        served: &["shop/ep-host:http/TCP ClusterIP 10.96.0.36:80 -> 10.244.36.1:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_address_ipv6_in_an_ipv4_slice => Case {
        yaml: with_slice("ep-v6", 37, HTTP_8080, "[{addresses: ['fd00::37']}, {addresses: [10.244.37.2]}]"),
        errors: &[("EndpointSlice shop/ep-v6-1", "endpoints[0].addresses[0]", "\"fd00::37\" is not a usable IPv4 address")],
        served: &["shop/ep-v6:http/TCP ClusterIP 10.96.0.37:80 -> 10.244.37.2:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_address_unspecified => Case {
        yaml: with_slice("ep-zero", 38, HTTP_8080, "[{addresses: [0.0.0.0]}, {addresses: [10.244.38.2]}]"),
        errors: &[("EndpointSlice shop/ep-zero-1", "endpoints[0].addresses[0]", "unspecified")],
        served: &["shop/ep-zero:http/TCP ClusterIP 10.96.0.38:80 -> 10.244.38.2:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_address_loopback => Case {
        yaml: with_slice("ep-loopback", 39, HTTP_8080, "[{addresses: [127.0.0.1]}, {addresses: [10.244.39.2]}]"),
        errors: &[("EndpointSlice shop/ep-loopback-1", "endpoints[0].addresses[0]", "loopback")],
        served: &["shop/ep-loopback:http/TCP ClusterIP 10.96.0.39:80 -> 10.244.39.2:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    // The cloud metadata service must not become a Service backend.
    slice_address_link_local => Case {
        yaml: with_slice("ep-link-local", 40, HTTP_8080, "[{addresses: [169.254.169.254]}, {addresses: [10.244.40.2]}]"),
        errors: &[("EndpointSlice shop/ep-link-local-1", "endpoints[0].addresses[0]", "link-local")],
        served: &["shop/ep-link-local:http/TCP ClusterIP 10.96.0.40:80 -> 10.244.40.2:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_address_broadcast => Case {
        yaml: with_slice("ep-broadcast", 41, HTTP_8080, "[{addresses: [255.255.255.255]}, {addresses: [10.244.41.2]}]"),
        errors: &[("EndpointSlice shop/ep-broadcast-1", "endpoints[0].addresses[0]", "broadcast")],
        served: &["shop/ep-broadcast:http/TCP ClusterIP 10.96.0.41:80 -> 10.244.41.2:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    endpoint_without_addresses => Case {
        yaml: with_slice("ep-empty", 48, HTTP_8080, "[{addresses: []}, {addresses: [10.244.48.2]}]"),
        errors: &[("EndpointSlice shop/ep-empty-1", "endpoints[0].addresses", "no address")],
        served: &["shop/ep-empty:http/TCP ClusterIP 10.96.0.48:80 -> 10.244.48.2:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    // One slice feeding two Service ports: its bad endpoint is one error, not one per port.
    slice_bad_address_reported_once_for_two_ports => Case {
        yaml: service("ep-two-ports", "clusterIP: 10.96.0.50, ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]")
            + &slice("ep-two-ports-1", "ep-two-ports", "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
                "[{addresses: [bogus]}, {addresses: [10.244.50.2]}]"),
        errors: &[("EndpointSlice shop/ep-two-ports-1", "endpoints[0].addresses[0]", "\"bogus\" is not a usable IPv4 address")],
        served: &[
            "shop/ep-two-ports:dns/UDP ClusterIP 10.96.0.50:53 -> 10.244.50.2:5353",
            "shop/ep-two-ports:http/TCP ClusterIP 10.96.0.50:80 -> 10.244.50.2:8080",
        ],
        invalid: [0, 1, 0],
        ..Case::default()
    },

    // EndpointSlices: ports and address types.
    slice_port_zero => Case {
        yaml: with_slice("sp-zero", 42, "[{name: http, port: 0}]", "[{addresses: [10.244.42.1]}]"),
        errors: &[("EndpointSlice shop/sp-zero-1", "ports[0].port", "port 0 is outside 1-65535")],
        served: &["shop/sp-zero:http/TCP ClusterIP 10.96.0.42:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_port_above_65535 => Case {
        yaml: with_slice("sp-big", 43, "[{name: http, port: 70000}]", "[{addresses: [10.244.43.1]}]"),
        errors: &[("EndpointSlice shop/sp-big-1", "ports[0].port", "port 70000 is outside 1-65535")],
        served: &["shop/sp-big:http/TCP ClusterIP 10.96.0.43:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    // A bad port the Service does not use is still a bad object.
    slice_port_unused_and_negative => Case {
        yaml: with_slice("sp-unused", 44, "[{name: http, port: 8080}, {name: metrics, port: -9}]", "[{addresses: [10.244.44.1]}]"),
        errors: &[("EndpointSlice shop/sp-unused-1", "ports[1].port", "port -9 is outside 1-65535")],
        served: &["shop/sp-unused:http/TCP ClusterIP 10.96.0.44:80 -> 10.244.44.1:8080"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_port_protocol_lowercase => Case {
        yaml: with_slice("sp-proto", 45, "[{name: http, port: 8080, protocol: tcp}]", "[{addresses: [10.244.45.1]}]"),
        errors: &[("EndpointSlice shop/sp-proto-1", "ports[0].protocol", "protocol \"tcp\" is not supported")],
        served: &["shop/sp-proto:http/TCP ClusterIP 10.96.0.45:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    slice_address_type_unknown => Case {
        yaml: service("at-x", "clusterIP: 10.96.0.46, ports: [{name: http, port: 80}]")
            + &typed_slice("at-x-1", "at-x", "IPv5", HTTP_8080, "[{addresses: [10.244.46.1]}]"),
        errors: &[("EndpointSlice shop/at-x-1", "addressType", "\"IPv5\"")],
        served: &["shop/at-x:http/TCP ClusterIP 10.96.0.46:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    // Valid address types this IPv4 datapath has no use for: not errors.
    slice_fqdn_is_ignored => Case {
        yaml: service("at-fqdn", "clusterIP: 10.96.0.47, ports: [{name: http, port: 80}]")
            + &typed_slice("at-fqdn-1", "at-fqdn", "FQDN", HTTP_8080, "[{addresses: [web.example.com]}]"),
        served: &["shop/at-fqdn:http/TCP ClusterIP 10.96.0.47:80 -> none"],
        ..Case::default()
    },
    slice_ipv6_is_ignored => Case {
        yaml: service("at-v6", "clusterIP: 10.96.0.49, ports: [{name: http, port: 80}]")
            + &typed_slice("at-v6-1", "at-v6", "IPv6", HTTP_8080, "[{addresses: ['fd00::49']}]"),
        served: &["shop/at-v6:http/TCP ClusterIP 10.96.0.49:80 -> none"],
        ..Case::default()
    },
    // Not managed for a Service: nothing routes to it, whatever it holds.
    slice_without_service_label_is_ignored => Case {
        yaml: service("no-label", "clusterIP: 10.96.0.51, ports: [{name: http, port: 80}]")
            + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: no-label-1, namespace: shop}\n\
               addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [bogus]}, {addresses: [10.244.51.1]}]\n",
        served: &["shop/no-label:http/TCP ClusterIP 10.96.0.51:80 -> none"],
        ..Case::default()
    },
    slice_of_an_absent_service_is_not_read => Case {
        yaml: slice("ghost-1", "ghost", HTTP_8080, "[{addresses: [bogus]}]"),
        ..Case::default()
    },

    // Documents that do not deserialise at all: the manifest reader names them.
    document_port_not_a_number => Case {
        yaml: service("doc-port-word", "clusterIP: 10.96.0.52, ports: [{port: eighty}]"),
        documents: &[(Some("Service shop/doc-port-word"), "spec.ports[0].port", "invalid type")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    document_port_quoted => Case {
        yaml: service("doc-port-quoted", "clusterIP: 10.96.0.53, ports: [{port: '80'}]"),
        documents: &[(Some("Service shop/doc-port-quoted"), "spec.ports[0].port", "invalid type")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    document_spec_is_a_list => Case {
        yaml: document("v1", "Service", "name: doc-spec-list, namespace: shop", "spec: []\n"),
        documents: &[(Some("Service shop/doc-spec-list"), "spec", "invalid type")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    document_service_without_name => Case {
        yaml: document("v1", "Service", "namespace: shop", SPEC_80),
        documents: &[(Some("Service shop/<unnamed>"), "metadata.name", "missing")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    document_name_not_a_string => Case {
        yaml: document("v1", "Service", "name: [x], namespace: shop", SPEC_80),
        documents: &[(Some("Service shop/<unnamed>"), "metadata.name", "invalid type")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    document_wrong_api_version => Case {
        yaml: document("v2", "Service", "name: doc-v2, namespace: shop", SPEC_80),
        documents: &[(Some("Service shop/doc-v2"), "apiVersion", "\"v2\"")],
        invalid: [1, 0, 0],
        ..Case::default()
    },
    // k8s-openapi reads a missing required field as empty: the model names it.
    slice_without_address_type => Case {
        yaml: service("doc-no-type", "clusterIP: 10.96.0.57, ports: [{name: http, port: 80}]")
            + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: doc-no-type-1, namespace: shop, \
               labels: {kubernetes.io/service-name: doc-no-type}}\nports: [{name: http, port: 8080}]\n\
               endpoints: [{addresses: [10.244.57.1]}]\n",
        errors: &[("EndpointSlice shop/doc-no-type-1", "addressType", "missing")],
        served: &["shop/doc-no-type:http/TCP ClusterIP 10.96.0.57:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    endpoint_without_addresses_field => Case {
        yaml: with_slice("doc-no-addr", 58, HTTP_8080, "[{conditions: {ready: true}}]"),
        errors: &[("EndpointSlice shop/doc-no-addr-1", "endpoints[0].addresses", "no address")],
        served: &["shop/doc-no-addr:http/TCP ClusterIP 10.96.0.58:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    document_condition_not_a_bool => Case {
        yaml: with_slice("doc-ready", 59, HTTP_8080, "[{addresses: [10.244.59.1], conditions: {ready: maybe}}]"),
        documents: &[(Some("EndpointSlice shop/doc-ready-1"), "endpoints[0].conditions.ready", "invalid type")],
        served: &["shop/doc-ready:http/TCP ClusterIP 10.96.0.59:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    document_slice_port_not_a_number => Case {
        yaml: with_slice("doc-slice-port", 60, "[{name: http, port: http}]", "[{addresses: [10.244.60.1]}]"),
        documents: &[(Some("EndpointSlice shop/doc-slice-port-1"), "ports[0].port", "invalid type")],
        served: &["shop/doc-slice-port:http/TCP ClusterIP 10.96.0.60:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    document_endpoints_is_a_map => Case {
        yaml: with_slice("doc-eps-map", 61, HTTP_8080, "{addresses: [10.244.61.1]}"),
        documents: &[(Some("EndpointSlice shop/doc-eps-map-1"), "endpoints", "invalid type")],
        served: &["shop/doc-eps-map:http/TCP ClusterIP 10.96.0.61:80 -> none"],
        invalid: [0, 1, 0],
        ..Case::default()
    },
    document_without_kind => Case {
        yaml: "---\napiVersion: v1\nmetadata: {name: doc-no-kind, namespace: shop}\nspec: {clusterIP: 10.96.0.62}\n".to_string(),
        documents: &[(None, "kind", "missing")],
        invalid: [0, 0, 1],
        ..Case::default()
    },
    document_not_yaml => Case {
        yaml: "---\napiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n".to_string(),
        documents: &[(None, "", "not valid YAML")],
        invalid: [0, 0, 1],
        ..Case::default()
    },
}

/// The row's entries (the control Service's left out), one line each:
/// `key frontends -> backends`, then whatever differs from a plain entry.
fn render(state: &DesiredState) -> Vec<String> {
    let mut lines: Vec<String> = state
        .services
        .iter()
        .filter(|(_, entry)| entry.service != CONTROL_SERVICE)
        .map(|(key, entry)| {
            let frontends: Vec<String> = entry
                .frontends
                .iter()
                .map(|f| format!("{} {}:{}", f.kind, f.addr, f.port))
                .collect();
            let mut frontends = frontends;
            frontends.sort();
            let backends: Vec<String> = entry
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.addr, b.port))
                .collect();
            let mut line = format!(
                "{key} {} -> {}",
                frontends.join(", "),
                if backends.is_empty() {
                    "none".to_string()
                } else {
                    backends.join(", ")
                }
            );
            if let Some(ranges) = &entry.source_ranges {
                let ranges: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                line += &format!(" ranges=[{}]", ranges.join(", "));
            }
            if let Some(timeout) = entry.affinity_timeout_seconds {
                line += &format!(" affinity={timeout}");
            }
            if entry.when_empty == WhenEmpty::Drop {
                line += " drop";
            }
            line
        })
        .collect();
    lines.extend(
        state
            .health_checks
            .iter()
            .filter(|(_, check)| check.namespace != "ctl")
            .map(|(port, check)| format!("health {port} {}/{}", check.namespace, check.name)),
    );
    lines
}

/// Everything the datapath gets for the control Service.
fn control_view(state: &DesiredState) -> String {
    let mine = |addr: &Ipv4Addr| addr.octets()[..3] == [10, 244, 9];
    format!(
        "{:#?}\n{:?}\n{:?}\n{:?}\n{:?}",
        state
            .services
            .iter()
            .filter(|(_, e)| e.service == CONTROL_SERVICE)
            .collect::<Vec<_>>(),
        state
            .health_checks
            .iter()
            .filter(|(_, c)| c.namespace == "ctl")
            .collect::<Vec<_>>(),
        state
            .known_backends
            .iter()
            .filter(|b| mine(&b.addr))
            .collect::<Vec<_>>(),
        state
            .remote_backends
            .iter()
            .filter(|b| mine(&b.addr))
            .collect::<Vec<_>>(),
        state
            .terminating_backends
            .iter()
            .filter(|b| mine(&b.addr))
            .collect::<Vec<_>>(),
    )
}

/// Writes the control and each row to files of their own and reads the directory back.
fn load(rows: &[&str]) -> Manifests {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("control.yaml"), CONTROL).expect("write control");
    for (i, yaml) in rows.iter().enumerate() {
        fs::write(dir.path().join(format!("row-{i:02}.yaml")), yaml).expect("write row");
    }
    manifest::read_dir(dir.path()).expect("read manifests")
}

fn baseline() -> DesiredState {
    let manifests = load(&[]);
    assert!(manifests.errors.is_empty(), "{:?}", manifests.errors);
    desired_from_manifests(&manifests, &settings())
}

/// The path in ``field `path`: ...``, as the manifest reader words a field error.
fn document_field(message: &str) -> &str {
    message
        .strip_prefix("field `")
        .and_then(|rest| rest.split_once('`'))
        .map_or("", |(field, _)| field)
}

/// `lb_invalid_objects` by kind, as the agent feeds it.
fn invalid_objects<'a>(objects: impl Iterator<Item = Option<&'a str>>) -> [i64; 3] {
    let metrics = Metrics::new(PathBuf::from("/nonexistent"));
    metrics.set_invalid_objects(objects);
    let text = metrics.encode().expect("metrics encode");
    ["Service", "EndpointSlice", "document"].map(|kind| {
        let series = format!("lb_invalid_objects{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .expect("gauge value")
    })
}

fn sorted_errors<'a>(errors: impl Iterator<Item = &'a ModelError>) -> Vec<String> {
    let mut errors: Vec<String> = errors.map(ToString::to_string).collect();
    errors.sort();
    errors
}

/// Loads the rows together with the control Service and checks them all at once.
fn check(name: &str, cases: &[Case]) {
    let manifests = load(&cases.iter().map(|c| c.yaml.as_str()).collect::<Vec<_>>());
    let state = desired_from_manifests(&manifests, &settings());
    let baseline = baseline();

    // Documents that did not load: the object, the field, and a log line naming both.
    let want_documents: Vec<_> = cases.iter().flat_map(|c| c.documents).collect();
    assert_eq!(
        manifests.errors.len(),
        want_documents.len(),
        "{name}: document errors {:#?}",
        manifests.errors
    );
    for (got, (object, field, fragment)) in manifests.errors.iter().zip(want_documents) {
        assert_eq!(got.object.as_deref(), *object, "{name}: {got}");
        assert_eq!(document_field(&got.message), *field, "{name}: {got}");
        assert!(got.message.contains(fragment), "{name}: {got}");
        let logged = got.to_string();
        assert!(
            logged.contains(&format!("field `{field}`")) || field.is_empty(),
            "{name}: {logged}"
        );
        if let Some(object) = object {
            assert!(logged.contains(object), "{name}: {logged}");
        }
    }

    // Model errors: the object and the exact field, in the line the agent logs.
    let want_errors: Vec<_> = cases.iter().flat_map(|c| c.errors).collect();
    let got_errors: Vec<(&str, &str)> = state
        .errors
        .iter()
        .map(|e| (e.object.as_str(), e.field.as_str()))
        .collect();
    assert_eq!(
        got_errors,
        want_errors
            .iter()
            .map(|(o, f, _)| (*o, *f))
            .collect::<Vec<_>>(),
        "{name}: errors {:#?}",
        state.errors
    );
    for (got, (object, field, fragment)) in state.errors.iter().zip(&want_errors) {
        assert!(got.message.contains(fragment), "{name}: {got}");
        assert!(
            got.to_string()
                .starts_with(&format!("{object}: field `{field}`: ")),
            "{name}: {got}"
        );
    }

    // The bad part is left out, the rest of the object still served.
    let mut want_served: Vec<String> = cases
        .iter()
        .flat_map(|c| c.served)
        .map(ToString::to_string)
        .collect();
    want_served.sort();
    let mut got_served = render(&state);
    got_served.sort();
    assert_eq!(got_served, want_served, "{name}: served");

    let skipped: BTreeSet<&str> = state
        .skipped
        .iter()
        .map(|(object, _)| object.as_str())
        .collect();
    let want_skipped: BTreeSet<&str> = cases.iter().flat_map(|c| c.skipped).copied().collect();
    assert_eq!(skipped, want_skipped, "{name}: skipped {:?}", state.skipped);

    // The control Service is programmed exactly as without the row.
    assert_eq!(control_view(&state), control_view(&baseline), "{name}");

    // The metric, fed as standalone mode feeds it.
    // One row: its own expectation. All rows at once: each object counts once, however many
    // rows (or fields) it is bad in; documents that did not load have no name and each count.
    let mut objects: BTreeSet<&str> = BTreeSet::new();
    let mut want_invalid = [0; 3];
    if let [case] = cases {
        want_invalid = case.invalid;
    }
    let named = cases
        .iter()
        .flat_map(|c| c.errors.iter().map(|e| Some(e.0)))
        .chain(cases.iter().flat_map(|c| c.documents.iter().map(|d| d.0)));
    for object in named.filter(|_| cases.len() > 1) {
        match object {
            Some(object) if !objects.insert(object) => {}
            Some(object) if object.starts_with("Service ") => want_invalid[0] += 1,
            Some(object) if object.starts_with("EndpointSlice ") => want_invalid[1] += 1,
            Some(_) => {}
            None => want_invalid[2] += 1,
        }
    }
    let invalid = invalid_objects(
        manifests
            .errors
            .iter()
            .map(|e| e.object.as_deref())
            .chain(state.errors.iter().map(|e| Some(e.object.as_str()))),
    );
    assert_eq!(invalid, want_invalid, "{name}: lb_invalid_objects");

    // Kubernetes mode: the engine, object by object, agrees on errors and entries.
    let mut engine = Engine::new(settings());
    for service in &manifests.services {
        engine.apply_service(service.clone());
    }
    for slice in &manifests.endpoint_slices {
        engine.apply_slice(slice.clone());
    }
    let delta = engine.take_delta();
    assert_eq!(
        sorted_errors(delta.errors.iter()),
        sorted_errors(state.errors.iter()),
        "{name}: engine delta errors"
    );
    assert_eq!(
        sorted_errors(engine.errors()),
        sorted_errors(state.errors.iter()),
        "{name}: engine errors"
    );
    let desired = engine.desired();
    assert_eq!(desired.services, state.services, "{name}: engine entries");
    assert_eq!(engine.health_checks(), &state.health_checks, "{name}");
    assert_eq!(control_view(&desired), control_view(&baseline), "{name}");
    // Kubernetes mode has no documents that fail to load: the model's errors alone.
    let engine_invalid = invalid_objects(engine.errors().map(|e| Some(e.object.as_str())));
    let model_invalid = invalid_objects(state.errors.iter().map(|e| Some(e.object.as_str())));
    assert_eq!(
        engine_invalid[..2],
        model_invalid[..2],
        "{name}: lb_invalid_objects in Kubernetes mode"
    );

    // The gauge tracks the current state: the bad objects gone, nothing is left of them.
    for service in &manifests.services {
        let key = lb_agent::model::namespaced(&service.metadata);
        if key != CONTROL_SERVICE {
            engine.delete_service(&key);
        }
    }
    for slice in &manifests.endpoint_slices {
        let key = lb_agent::model::namespaced(&slice.metadata);
        if !key.starts_with("ctl/") {
            engine.delete_slice(&key);
        }
    }
    engine.take_delta();
    assert_eq!(engine.errors().count(), 0, "{name}: errors after deletion");
    assert_eq!(engine.desired().services, baseline.services, "{name}");
}

/// Document errors of one kind (they never reach the engine).
#[test]
fn control_alone_is_clean_and_fully_served() {
    let state = baseline();
    assert!(state.errors.is_empty(), "{:?}", state.errors);
    assert!(state.skipped.is_empty(), "{:?}", state.skipped);
    let keys: Vec<&String> = state.services.keys().collect();
    assert_eq!(
        keys,
        [
            "ctl/control:dns/UDP",
            "ctl/control:dns/UDP#local",
            "ctl/control:http/TCP",
            "ctl/control:http/TCP#local"
        ]
    );
    assert_eq!(state.health_checks.len(), 1);
    assert_eq!(invalid_objects(std::iter::empty()), [0, 0, 0]);
}

/// Every row in one directory: the errors add up and nothing interferes.
#[test]
fn every_row_at_once() {
    let rows = rows();
    assert!(rows.len() >= 25, "{} rows", rows.len());
    let cases: Vec<Case> = rows.into_iter().map(|(_, case)| case).collect();
    check("every row at once", &cases);
}

/// The gauge's help says objects; two bad fields of one Service are one invalid object.
#[test]
fn two_bad_fields_of_one_service_count_one_object() {
    let manifests = load(&[&service(
        "two-bad",
        "clusterIP: 10.96.0.63, externalIPs: [nope], ports: [{name: a, port: 0}, {name: b, port: 80}]",
    )]);
    let state = desired_from_manifests(&manifests, &settings());
    assert_eq!(state.errors.len(), 2, "{:?}", state.errors);
    let invalid = invalid_objects(state.errors.iter().map(|e| Some(e.object.as_str())));
    assert_eq!(invalid, [1, 0, 0]);
}
