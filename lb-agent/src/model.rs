//! The pure part of the control plane: from Kubernetes objects to the desired datapath state of
//! this node. No I/O here; everything is a function of its inputs, and this is where most of
//! the control-plane tests live.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Service annotation choosing how new flows pick a backend: `random` (the default) or
/// `maglev` (consistent hashing of the 5-tuple, see datapath.md).
pub const ANNOTATION_ALGORITHM: &str = "lb.example.dev/lb-algorithm";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// Kubernetes spelling; unset means TCP.
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(format!(
                "protocol {other:?} is not supported (TCP and UDP are)"
            )),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// How a frontend came to be, in Kubernetes words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
}

impl FrontendKind {
    pub fn number(self) -> u8 {
        match self {
            FrontendKind::ClusterIP => lb_common::KIND_CLUSTER_IP,
            FrontendKind::NodePort => lb_common::KIND_NODE_PORT,
            FrontendKind::LoadBalancer => lb_common::KIND_LOAD_BALANCER,
            FrontendKind::ExternalIP => lb_common::KIND_EXTERNAL_IP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::KIND_CLUSTER_IP => Some(FrontendKind::ClusterIP),
            lb_common::KIND_NODE_PORT => Some(FrontendKind::NodePort),
            lb_common::KIND_LOAD_BALANCER => Some(FrontendKind::LoadBalancer),
            lb_common::KIND_EXTERNAL_IP => Some(FrontendKind::ExternalIP),
            _ => None,
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An address clients send to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub kind: FrontendKind,
}

/// An IPv4 prefix (`loadBalancerSourceRanges`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Ipv4Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Prefix {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = text.trim().split_once('/').unwrap_or((text.trim(), "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 CIDR"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|&l| l <= 32)
            .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        })
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// This node's name: endpoints whose `nodeName` matches are local.
    pub node_name: String,
    /// This node's `topology.kubernetes.io/zone` label, if any.
    pub node_zone: Option<String>,
    /// Addresses NodePorts are served on (every address of the node by default).
    pub node_addresses: Vec<Ipv4Addr>,
    /// Every address known to be this node's (a LoadBalancer IP or externalIP among them is
    /// answered from the node itself).
    pub local_addresses: Vec<Ipv4Addr>,
}

/// Label of the node's zone, matched against endpoints' zone hints.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// What a new flow gets when a frontend's backend list is empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenEmpty {
    /// The Service has no usable endpoint anywhere: TCP reset / ICMP port unreachable.
    #[default]
    Reject,
    /// A Local traffic policy leaves this node without endpoints while others have some.
    Drop,
}

/// An endpoint traffic may be sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One backend set of a Service port, with the frontends that use it. A Service port has one
/// (all usable endpoints, topology applied) or, with a Local traffic policy, two (the second
/// holding this node's endpoints only, keyed with a `#local` suffix).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredService {
    /// `namespace/name` of the Service, and the port's name (`None` when unnamed).
    pub service: String,
    pub port_name: Option<String>,
    pub frontends: BTreeSet<Frontend>,
    pub backends: BTreeSet<Backend>,
    /// The subset of `backends` that are terminating (used because nothing else is).
    pub terminating: BTreeSet<Backend>,
    /// `loadBalancerSourceRanges`: when `Some`, only these clients may use the LoadBalancer
    /// frontends (an empty list then admits nobody: every listed range was invalid).
    pub source_ranges: Option<BTreeSet<Ipv4Prefix>>,
    pub when_empty: WhenEmpty,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_timeout_seconds: Option<u32>,
    /// New flows are placed by Maglev consistent hashing (annotation `ANNOTATION_ALGORITHM`).
    pub maglev: bool,
}

/// The whole desired state, keyed by `namespace/name:port/protocol` (the port's name, or its
/// number when unnamed), plus `#local` for a Local policy's node-local backend set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<String, DesiredService>,
    /// Every endpoint of every served Service port, chosen or not (terminating, not ready):
    /// the datapath keeps knowing them so established flows to them are not cut.
    pub known_backends: BTreeSet<Backend>,
    /// This node's addresses: frontends on them answer from the node itself.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// Endpoints known to run on another node (their `nodeName` is not ours).
    pub remote_backends: BTreeSet<Backend>,
    /// Endpoints whose conditions say terminating (chosen or not), for operators.
    pub terminating_backends: BTreeSet<Backend>,
    /// `healthCheckNodePort` of each LoadBalancer Service with `externalTrafficPolicy: Local`.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Objects or parts of objects that were left out, with the reason (bad field values).
    pub errors: Vec<ModelError>,
    /// Services that rightly get no frontend (headless, ExternalName, other proxy), with why.
    pub skipped: Vec<(String, String)>,
}

/// What a health-check NodePort reports, kube-proxy's way: 200 while this node has local
/// endpoints for the Service, 503 otherwise, so cloud load balancers pick nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// A field value that made the model leave (part of) an object out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelError {
    /// `Kind namespace/name`.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: field `{}`: {}",
            self.object, self.field, self.message
        )
    }
}

/// Computes what this node must program.
pub fn desired_state(
    services: &[Service],
    slices: &[EndpointSlice],
    settings: &Settings,
) -> DesiredState {
    let mut state = DesiredState {
        node_addresses: settings
            .node_addresses
            .iter()
            .chain(&settings.local_addresses)
            .copied()
            .collect(),
        ..DesiredState::default()
    };
    let slices_by_service = group_slices(slices);
    for service in services {
        let slices = slices_by_service
            .get(&namespaced(&service.metadata))
            .map(Vec::as_slice)
            .unwrap_or_default();
        add_service(service, slices, settings, &mut state);
    }
    state
}

/// The part of the desired state one Service contributes, from that Service and its slices
/// alone (`slices` must be the ones labelled for it). [`desired_state`] is the union of these
/// parts, which is what lets the agent recompute only the Services a change touches.
pub fn service_part(
    service: &Service,
    slices: &[&EndpointSlice],
    settings: &Settings,
) -> DesiredState {
    let mut state = DesiredState::default();
    let mut sorted = slices.to_vec();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    add_service(service, &sorted, settings, &mut state);
    state
}

/// `namespace/name` of an object.
pub fn namespaced(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// EndpointSlices by the `namespace/name` of the Service they belong to, in name order so the
/// result does not depend on the order objects arrived in.
fn group_slices(slices: &[EndpointSlice]) -> BTreeMap<String, Vec<&EndpointSlice>> {
    let mut grouped: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            continue; // not managed for a Service: nothing routes to it
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        grouped
            .entry(format!("{namespace}/{service}"))
            .or_default()
            .push(slice);
    }
    for group in grouped.values_mut() {
        group.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    grouped
}

fn add_service(
    service: &Service,
    slices: &[&EndpointSlice],
    settings: &Settings,
    state: &mut DesiredState,
) {
    let name = namespaced(&service.metadata);
    let object = format!("Service {name}");
    if let Some(proxy) = service
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
    {
        state
            .skipped
            .push((object, format!("belongs to service proxy {proxy:?}")));
        return;
    }
    let error = |field: &str, message: String| ModelError {
        object: object.clone(),
        field: field.to_string(),
        message,
    };
    let Some(spec) = &service.spec else {
        state.errors.push(error("spec", "missing".to_string()));
        return;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        state.skipped.push((
            object,
            "ExternalName: answered by DNS, no frontend".to_string(),
        ));
        return;
    }
    let cluster_ips = cluster_ips(spec);
    if cluster_ips.iter().any(|ip| ip == "None") {
        state
            .skipped
            .push((object, "headless: no virtual IP".to_string()));
        return;
    }
    let mut frontend_addrs = Vec::new();
    let mut bad_cluster_ip = false;
    for (index, ip) in cluster_ips.iter().enumerate() {
        let field = if spec.cluster_ips.is_some() {
            format!("spec.clusterIPs[{index}]")
        } else {
            "spec.clusterIP".to_string()
        };
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(addr)) => frontend_addrs.push(addr),
            // IPv6 frontends are not programmed yet; the IPv4 family still is.
            Ok(std::net::IpAddr::V6(_)) => state.skipped.push((
                object.clone(),
                format!("{field} {ip}: IPv6 not supported yet"),
            )),
            Err(_) => {
                bad_cluster_ip = true;
                state
                    .errors
                    .push(error(&field, format!("{ip:?} is not an IP address")));
            }
        }
    }
    if frontend_addrs.is_empty() {
        if bad_cluster_ip {
            return; // reported above
        }
        state
            .skipped
            .push((object, "no IPv4 cluster IP assigned".to_string()));
        return;
    }

    // Kubernetes refuses any other type; the cluster IP is the part that is surely meant.
    let type_ = match spec.type_.as_deref().unwrap_or("") {
        "" => "ClusterIP",
        known @ ("ClusterIP" | "NodePort" | "LoadBalancer") => known,
        other => {
            state.errors.push(error(
                "spec.type",
                format!("{other:?} is not a Service type; serving the cluster IP only"),
            ));
            "ClusterIP"
        }
    };
    // kube-proxy serves a NodePort whenever one is set on a NodePort or LoadBalancer Service;
    // `allocateLoadBalancerNodePorts: false` only means none is allocated automatically.
    let wants_node_port = type_ == "NodePort" || type_ == "LoadBalancer";
    // The API holds external IPs to the rules of endpoint addresses.
    let external_ips = parse_addresses(
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.as_str())),
        true,
        &object,
        state,
    );
    let lb_ips = if type_ == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        parse_addresses(
            ingress
                .into_iter()
                .flatten()
                .enumerate()
                // `ipMode: Proxy`: the cloud load balancer proxies; traffic arrives with the
                // node as destination, so the ingress IP itself is not a frontend here.
                .filter(|(_, ing)| ing.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|(i, ing)| {
                    ing.ip
                        .as_deref()
                        .map(|ip| (format!("status.loadBalancer.ingress[{i}].ip"), ip))
                }),
            false,
            &object,
            state,
        )
    } else {
        Vec::new()
    };
    // Ranges are per family: IPv6 ones say nothing about IPv4 clients, so a list of IPv6
    // ranges only leaves IPv4 unrestricted; invalid entries narrow, never widen.
    let source_ranges = spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|r| !r.is_empty() && type_ == "LoadBalancer")
        .and_then(|ranges| {
            let mut v4 = BTreeSet::new();
            let mut invalid = false;
            for (i, range) in ranges.iter().enumerate() {
                let range = range.trim();
                let is_v6 = range
                    .split_once('/')
                    .map_or(range, |(a, _)| a)
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok();
                if is_v6 {
                    continue;
                }
                match Ipv4Prefix::parse(range) {
                    Ok(p) => {
                        v4.insert(p);
                    }
                    Err(message) => {
                        invalid = true;
                        state.errors.push(ModelError {
                            object: object.clone(),
                            field: format!("spec.loadBalancerSourceRanges[{i}]"),
                            message,
                        });
                    }
                }
            }
            (!v4.is_empty() || invalid).then_some(v4)
        });

    let affinity = match spec.session_affinity.as_deref() {
        None | Some("" | "None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
            if (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&timeout) {
                Some(timeout as u32)
            } else {
                state.errors.push(ModelError {
                    object: object.clone(),
                    field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".to_string(),
                    message: format!(
                        "{timeout} is outside 1-{MAX_AFFINITY_TIMEOUT_SECONDS}; using {DEFAULT_AFFINITY_TIMEOUT_SECONDS}"
                    ),
                });
                Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS as u32)
            }
        }
        Some(other) => {
            state.errors.push(error(
                "spec.sessionAffinity",
                format!("{other:?} is neither ClientIP nor None; no affinity"),
            ));
            None
        }
    };
    let maglev = match service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_ALGORITHM))
        .map(|v| v.trim())
    {
        None | Some("" | "random") => false,
        Some("maglev") => true,
        Some(other) => {
            state.errors.push(error(
                &format!("metadata.annotations[{ANNOTATION_ALGORITHM}]"),
                format!("{other:?} is neither random nor maglev; using random"),
            ));
            false
        }
    };
    // Unknown values mean Cluster, the default, as they do to kube-proxy.
    let mut local_policy = |field: &str, value: Option<&String>| match value.map(String::as_str) {
        None | Some("" | "Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            state.errors.push(error(
                field,
                format!("{other:?} is neither Cluster nor Local; using Cluster"),
            ));
            false
        }
    };
    let internal_local = local_policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_ref(),
    );
    let external_local = local_policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_ref(),
    );
    if spec.ports.as_ref().is_none_or(Vec::is_empty) {
        state.errors.push(error(
            "spec.ports",
            "no ports: a Service with a cluster IP needs at least one".to_string(),
        ));
    }

    let mut local_endpoints: BTreeSet<Ipv4Addr> = BTreeSet::new();
    // Earlier valid ports by name and by number: a duplicate would overwrite or shadow them.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut numbers: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let (port_number, protocol) = match service_port(port) {
            Ok(p) => p,
            Err((field, message)) => {
                state
                    .errors
                    .push(error(&format!("spec.ports[{index}].{field}"), message));
                continue;
            }
        };
        if let Some(first) = numbers.get(&(port_number, protocol)) {
            state.errors.push(error(
                &format!("spec.ports[{index}].port"),
                format!("{port_number}/{protocol} is already spec.ports[{first}]"),
            ));
            continue;
        }
        // Slices match ports by name, so two ports of one name would share backends.
        let port_name = port.name.as_deref().unwrap_or("");
        if let Some(first) = names.get(port_name) {
            let message = if port_name.is_empty() {
                format!("unnamed, as is spec.ports[{first}]: each port of a multi-port Service needs a name")
            } else {
                format!("{port_name:?} is already the name of spec.ports[{first}]")
            };
            state
                .errors
                .push(error(&format!("spec.ports[{index}].name"), message));
            continue;
        }
        numbers.insert((port_number, protocol), index);
        names.insert(port_name, index);
        let key = format!(
            "{name}:{}/{protocol}",
            port.name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| port_number.to_string())
        );
        let frontend = |addr, port, kind| Frontend {
            addr,
            port,
            protocol,
            kind,
        };
        let mut frontends: BTreeSet<Frontend> = frontend_addrs
            .iter()
            .map(|&addr| frontend(addr, port_number, FrontendKind::ClusterIP))
            .collect();
        if wants_node_port {
            // 0 is the API's "unset" (omitted on the wire): not allocated, nothing to serve.
            match port.node_port.filter(|&p| p != 0).map(u16::try_from) {
                Some(Ok(node_port)) => frontends.extend(
                    settings
                        .node_addresses
                        .iter()
                        .map(|&addr| frontend(addr, node_port, FrontendKind::NodePort)),
                ),
                Some(Err(_)) => state.errors.push(error(
                    &format!("spec.ports[{index}].nodePort"),
                    format!(
                        "node port {} is outside 1-65535",
                        port.node_port.unwrap_or_default()
                    ),
                )),
                None => {}
            }
        }
        frontends.extend(
            lb_ips
                .iter()
                .map(|&addr| frontend(addr, port_number, FrontendKind::LoadBalancer)),
        );
        frontends.extend(
            external_ips
                .iter()
                .map(|&addr| frontend(addr, port_number, FrontendKind::ExternalIP)),
        );
        let endpoints = endpoints_for_port(port.name.as_deref(), protocol, slices, settings, state);
        state
            .known_backends
            .extend(endpoints.iter().map(|e| e.backend));
        state
            .remote_backends
            .extend(endpoints.iter().filter(|e| e.remote).map(|e| e.backend));
        state.terminating_backends.extend(
            endpoints
                .iter()
                .filter(|e| e.terminating)
                .map(|e| e.backend),
        );
        let externally_accessible = frontends.iter().any(|f| f.kind != FrontendKind::ClusterIP);
        let policy = Policy {
            internal_local,
            external_local,
            externally_accessible,
        };
        let sets = categorize(
            &endpoints,
            policy,
            &settings.node_name,
            settings.node_zone.as_deref(),
        );
        let (cluster_frontends, local_frontends): (BTreeSet<Frontend>, BTreeSet<Frontend>) =
            frontends.into_iter().partition(|f| {
                let local = if f.kind == FrontendKind::ClusterIP {
                    policy.internal_local
                } else {
                    policy.external_local
                };
                !local
            });
        let backend_set =
            |chosen: &[&EndpointInfo], frontends: BTreeSet<Frontend>, when_empty| DesiredService {
                service: name.clone(),
                port_name: port.name.clone().filter(|n| !n.is_empty()),
                frontends,
                backends: chosen.iter().map(|e| e.backend).collect(),
                terminating: chosen
                    .iter()
                    .filter(|e| e.terminating)
                    .map(|e| e.backend)
                    .collect(),
                source_ranges: source_ranges.clone(),
                when_empty,
                affinity_timeout_seconds: affinity,
                maglev,
            };
        if !cluster_frontends.is_empty() {
            let chosen = sets.cluster.clone().unwrap_or_default();
            state.services.insert(
                key.clone(),
                backend_set(&chosen, cluster_frontends, WhenEmpty::Reject),
            );
        }
        if !local_frontends.is_empty() {
            let chosen = sets.local.clone().unwrap_or_default();
            local_endpoints.extend(chosen.iter().map(|e| e.backend.addr));
            // No local endpoint, but some elsewhere: drop (the client's load balancer should
            // not have sent it here); none anywhere: reject, as for any empty Service.
            let when_empty = if sets.has_any {
                WhenEmpty::Drop
            } else {
                WhenEmpty::Reject
            };
            state.services.insert(
                format!("{key}#local"),
                backend_set(&chosen, local_frontends, when_empty),
            );
        }
    }
    if type_ == "LoadBalancer" && external_local {
        match spec
            .health_check_node_port
            .filter(|&p| p != 0)
            .map(u16::try_from)
        {
            Some(Ok(port)) => {
                let (namespace, service_name) = name.split_once('/').unwrap_or(("", &name));
                state.health_checks.insert(
                    port,
                    HealthCheck {
                        namespace: namespace.to_string(),
                        name: service_name.to_string(),
                        local_endpoints: local_endpoints.len(),
                    },
                );
            }
            Some(Err(_)) => state.errors.push(error(
                "spec.healthCheckNodePort",
                format!(
                    "{} is outside 1-65535",
                    spec.health_check_node_port.unwrap_or_default()
                ),
            )),
            None => {}
        }
    }
}

/// Parses IPv4 addresses, reporting the bad ones by field; IPv6 ones are skipped quietly
/// (this datapath is IPv4 only). `as_endpoint`: also refuse what an endpoint cannot be.
fn parse_addresses<'a>(
    addresses: impl Iterator<Item = (String, &'a str)>,
    as_endpoint: bool,
    object: &str,
    state: &mut DesiredState,
) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for (field, text) in addresses {
        let message = match text.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(addr)) => match unusable(addr).filter(|_| as_endpoint) {
                None => {
                    out.push(addr);
                    continue;
                }
                Some(why) => format!("{text:?} is not a usable address ({why})"),
            },
            Ok(std::net::IpAddr::V6(_)) => continue,
            Err(_) => format!("{text:?} is not an IP address"),
        };
        state.errors.push(ModelError {
            object: object.to_string(),
            field,
            message,
        });
    }
    out
}

/// Why an address cannot be an endpoint, after Kubernetes' `ValidateEndpointIP` (plus the
/// broadcast address): these reach the node itself or nothing, never a pod.
fn unusable(addr: Ipv4Addr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("unspecified")
    } else if addr.is_loopback() {
        Some("loopback")
    } else if addr.is_link_local() {
        Some("link-local")
    } else if addr.octets()[..3] == [224, 0, 0] {
        Some("link-local multicast")
    } else if addr.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<String> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
}

/// A Service port's number and protocol, or the offending field (under `spec.ports[i]`) and why.
fn service_port(port: &ServicePort) -> Result<(u16, Protocol), (&'static str, String)> {
    let protocol = Protocol::parse(port.protocol.as_deref()).map_err(|m| ("protocol", m))?;
    let number = u16::try_from(port.port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| ("port", format!("port {} is outside 1-65535", port.port)))?;
    Ok((number, protocol))
}

const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10_800;
const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// One endpoint of a Service port, as the categorisation needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub backend: Backend,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` equals ours).
    pub local: bool,
    /// Known to be on another node (`nodeName` set and not ours).
    pub remote: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl EndpointInfo {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// The endpoints of one Service port: the union of its slices, deduplicated by address and port
/// (the first copy wins unless a later one is local to this node, as kube-proxy does), with the
/// target port resolved through each slice's port of the same name.
fn endpoints_for_port(
    port_name: Option<&str>,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    settings: &Settings,
    state: &mut DesiredState,
) -> Vec<EndpointInfo> {
    let port_name = port_name.unwrap_or("");
    let mut endpoints: Vec<EndpointInfo> =
        Vec::with_capacity(slices.iter().map(|s| s.endpoints.len()).sum());
    for slice in slices {
        // Each port of the Service reads the slice again: report its faults once.
        let mut report = |field: String, message: String| {
            let error = ModelError {
                object: format!("EndpointSlice {}", namespaced(&slice.metadata)),
                field,
                message,
            };
            if !state.errors.contains(&error) {
                state.errors.push(error);
            }
        };
        match slice.address_type.as_str() {
            "IPv4" => {}
            // Nothing this IPv4 datapath can use, rightly.
            "IPv6" | "FQDN" => continue,
            "" => {
                report("addressType".to_string(), "missing".to_string());
                continue;
            }
            other => {
                report(
                    "addressType".to_string(),
                    format!("{other:?} is not one of IPv4, IPv6, FQDN"),
                );
                continue;
            }
        }
        let mut target = None;
        for (index, port) in slice.ports.iter().flatten().enumerate() {
            let port_protocol = match port.protocol.as_deref() {
                // Valid, only not served here: the Service port reports it.
                Some("SCTP") => None,
                other => match Protocol::parse(other) {
                    Ok(p) => Some(p),
                    Err(message) => {
                        report(format!("ports[{index}].protocol"), message);
                        continue;
                    }
                },
            };
            // No number means "no port": nothing to send to, and not an error.
            let number = match port.port.map(|n| (n, u16::try_from(n))) {
                None => None,
                Some((_, Ok(n))) if n != 0 => Some(n),
                Some((n, _)) => {
                    report(
                        format!("ports[{index}].port"),
                        format!("port {n} is outside 1-65535"),
                    );
                    continue;
                }
            };
            if target.is_none()
                && port.name.as_deref().unwrap_or("") == port_name
                && port_protocol == Some(protocol)
            {
                target = Some(number);
            }
        }
        let Some(Some(target_port)) = target else {
            continue;
        };
        for (endpoint_index, endpoint) in slice.endpoints.iter().enumerate() {
            // Conditions as kube-proxy reads them: `ready` and `serving` unset mean true,
            // `terminating` unset means false.
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let local = !settings.node_name.is_empty()
                && endpoint.node_name.as_deref() == Some(settings.node_name.as_str());
            let remote = !settings.node_name.is_empty()
                && endpoint
                    .node_name
                    .as_deref()
                    .is_some_and(|n| n != settings.node_name);
            let hints = endpoint.hints.as_ref();
            let zone_hints: BTreeSet<String> = hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect();
            let node_hints: BTreeSet<String> = hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect();
            if endpoint.addresses.is_empty() {
                report(
                    format!("endpoints[{endpoint_index}].addresses"),
                    "no address (an endpoint needs at least one)".to_string(),
                );
            }
            // Like kube-proxy, only the first address: the others are the same pod in other
            // families or aliases, not more endpoints.
            for (address_index, address) in endpoint.addresses.iter().enumerate().take(1) {
                let reason = match address.parse::<Ipv4Addr>() {
                    Ok(addr) => match unusable(addr) {
                        None => Ok(addr),
                        Some(why) => Err(format!(" ({why})")),
                    },
                    Err(_) => Err(String::new()),
                };
                let addr = match reason {
                    Ok(addr) => addr,
                    Err(why) => {
                        report(
                            format!("endpoints[{endpoint_index}].addresses[{address_index}]"),
                            format!("{address:?} is not a usable IPv4 address{why}"),
                        );
                        continue;
                    }
                };
                let info = EndpointInfo {
                    backend: Backend {
                        addr,
                        port: target_port,
                        protocol,
                    },
                    // Ready wins even when terminating (publishNotReadyAddresses), as in
                    // kube-proxy.
                    ready,
                    serving,
                    terminating,
                    local,
                    remote,
                    zone_hints: zone_hints.clone(),
                    node_hints: node_hints.clone(),
                };
                match endpoints.iter_mut().find(|e| e.backend == info.backend) {
                    Some(existing) if info.local && !existing.local => *existing = info,
                    Some(_) => {}
                    None => endpoints.push(info),
                }
            }
        }
    }
    endpoints
}

/// Which traffic policies a Service port applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub internal_local: bool,
    pub external_local: bool,
    /// Has NodePort, LoadBalancer or externalIP frontends.
    pub externally_accessible: bool,
}

impl Policy {
    /// Cluster endpoints serve ClusterIP traffic unless `internalTrafficPolicy: Local`, and
    /// external traffic unless `externalTrafficPolicy: Local`.
    pub fn uses_cluster(self) -> bool {
        !self.internal_local || (self.externally_accessible && !self.external_local)
    }

    pub fn uses_local(self) -> bool {
        self.internal_local || (self.externally_accessible && self.external_local)
    }
}

/// The endpoint sets of a Service port on this node (kube-proxy's `CategorizeEndpoints`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized<'a> {
    /// Usable endpoints for Cluster policy, topology applied; `None` if the port never uses
    /// Cluster policy.
    pub cluster: Option<Vec<&'a EndpointInfo>>,
    /// This node's usable endpoints for Local policy; `None` if never used.
    pub local: Option<Vec<&'a EndpointInfo>>,
    /// Whether the Service has usable endpoints anywhere (even if none here).
    pub has_any: bool,
}

/// Ready endpoints by default; serving-and-terminating ones when none is ready (separately for
/// the Cluster and the Local set). Topology (node then zone hints) narrows the Cluster set when
/// every ready endpoint carries hints and some are for this node or zone.
pub fn categorize<'a>(
    endpoints: &'a [EndpointInfo],
    policy: Policy,
    node_name: &str,
    zone: Option<&str>,
) -> Categorized<'a> {
    let mut out = Categorized::default();
    if policy.uses_cluster() {
        let mode = topology_mode(endpoints, node_name, zone);
        let mut cluster: Vec<&EndpointInfo> = endpoints
            .iter()
            .filter(|e| e.ready && mode.admits(e, node_name, zone))
            .collect();
        if cluster.is_empty() {
            cluster = endpoints
                .iter()
                .filter(|e| e.serving_terminating())
                .collect();
        }
        out.has_any = !cluster.is_empty();
        out.cluster = Some(cluster);
    }
    if policy.uses_local() {
        out.has_any |= endpoints.iter().any(|e| e.ready || e.serving_terminating());
        let ready_local: Vec<&EndpointInfo> =
            endpoints.iter().filter(|e| e.local && e.ready).collect();
        out.local = Some(if ready_local.is_empty() {
            endpoints
                .iter()
                .filter(|e| e.local && e.serving_terminating())
                .collect()
        } else {
            ready_local
        });
    }
    out
}

/// Topology-aware routing, from the hints the EndpointSlice controller set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    All,
    SameNode,
    SameZone,
}

impl TopologyMode {
    fn admits(self, endpoint: &EndpointInfo, node_name: &str, zone: Option<&str>) -> bool {
        match self {
            TopologyMode::All => true,
            TopologyMode::SameNode => endpoint.node_hints.contains(node_name),
            TopologyMode::SameZone => zone.is_some_and(|z| endpoint.zone_hints.contains(z)),
        }
    }
}

/// Same node if every ready endpoint has node hints and one is for this node; else same zone
/// if every ready endpoint has zone hints and one is for this zone; else no topology.
pub fn topology_mode(
    endpoints: &[EndpointInfo],
    node_name: &str,
    zone: Option<&str>,
) -> TopologyMode {
    let ready: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::All;
    }
    if !node_name.is_empty()
        && ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(node_name))
    {
        return TopologyMode::SameNode;
    }
    if let Some(zone) = zone.filter(|z| !z.is_empty()) {
        if ready.iter().all(|e| !e.zone_hints.is_empty())
            && ready.iter().any(|e| e.zone_hints.contains(zone))
        {
            return TopologyMode::SameZone;
        }
    }
    TopologyMode::All
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest::{parse_into, Manifests};

    fn state_of(yaml: &str) -> DesiredState {
        let mut m = Manifests::default();
        parse_into(Path::new("t.yaml"), yaml, &mut m);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        desired_state(&m.services, &m.endpoint_slices, &Settings::default())
    }

    fn backends(state: &DesiredState, key: &str) -> Vec<String> {
        state.services[key]
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
    }

    const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: http-alt}
  - {name: dns, port: 53, protocol: UDP}
";

    fn slice(name: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: {ports}
endpoints: {endpoints}
"
        )
    }

    #[test]
    fn cluster_ip_frontend_per_port_with_named_target_ports_resolved_per_slice() {
        // The two slices name the same port differently numbered (a rolling update that
        // changed the container port): each slice's own number is used.
        let yaml = format!(
            "{WEB}{}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
                "[{addresses: [10.244.1.2]}]"
            ),
            slice(
                "web-b",
                "[{name: http, port: 9090}]",
                "[{addresses: [10.244.2.2], conditions: {ready: true}}]"
            )
        );
        let state = state_of(&yaml);
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        let http = &state.services["shop/web:http/TCP"];
        assert_eq!(
            http.frontends.iter().collect::<Vec<_>>(),
            vec![&Frontend {
                addr: Ipv4Addr::new(10, 96, 0, 20),
                port: 80,
                protocol: Protocol::Tcp,
                kind: FrontendKind::ClusterIP,
            }]
        );
        assert_eq!(
            backends(&state, "shop/web:http/TCP"),
            vec!["10.244.1.2:8080", "10.244.2.2:9090"]
        );
        assert_eq!(
            backends(&state, "shop/web:dns/UDP"),
            vec!["10.244.1.2:5353"]
        );
    }

    #[test]
    fn duplicates_across_slices_are_merged() {
        let yaml = format!(
            "{WEB}{}{}",
            slice(
                "web-a",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.2]}]"
            ),
            slice(
                "web-b",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.2]}, {addresses: [10.244.1.3]}]"
            )
        );
        let state = state_of(&yaml);
        assert_eq!(
            backends(&state, "shop/web:http/TCP"),
            vec!["10.244.1.2:8080", "10.244.1.3:8080"]
        );
    }

    #[test]
    fn not_ready_endpoints_are_left_out_and_terminating_ones_are_the_fallback() {
        let eps = "[{addresses: [10.244.1.2], conditions: {ready: false}},
                    {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}},
                    {addresses: [10.244.1.4], conditions: {ready: true}}]";
        let state = state_of(&format!(
            "{WEB}{}",
            slice("web-a", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            backends(&state, "shop/web:http/TCP"),
            vec!["10.244.1.4:8080"]
        );

        let eps = "[{addresses: [10.244.1.2], conditions: {ready: false}},
                    {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}},
                    {addresses: [10.244.1.5], conditions: {ready: false, serving: false, terminating: true}}]";
        let state = state_of(&format!(
            "{WEB}{}",
            slice("web-a", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            backends(&state, "shop/web:http/TCP"),
            vec!["10.244.1.3:8080"]
        );
    }

    #[test]
    fn service_without_endpoints_still_gets_its_frontend() {
        // The datapath needs the frontend to answer "no backend" instead of ignoring traffic.
        let state = state_of(WEB);
        assert!(state.services["shop/web:http/TCP"].backends.is_empty());
        assert_eq!(state.services["shop/web:http/TCP"].frontends.len(), 1);
    }

    #[test]
    fn headless_external_name_and_other_proxies_get_no_frontend() {
        let yaml = "apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: db.example.com}
---
apiVersion: v1
kind: Service
metadata:
  name: other
  labels: {service.kubernetes.io/service-proxy-name: someone-else}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
";
        let state = state_of(yaml);
        assert!(state.services.is_empty(), "{:?}", state.services);
        let skipped: Vec<_> = state.skipped.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(
            skipped,
            vec![
                "Service default/headless",
                "Service default/ext",
                "Service default/other"
            ]
        );
    }

    #[test]
    fn bad_values_are_reported_with_object_and_field_and_the_rest_is_kept() {
        let yaml = "apiVersion: v1
kind: Service
metadata: {name: bad-ip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-port}
spec: {clusterIP: 10.96.0.31, ports: [{name: a, port: 70000}, {name: b, port: 81}, {name: c, port: 82, protocol: SCTP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad-port-1, labels: {kubernetes.io/service-name: bad-port}}
addressType: IPv4
ports: [{name: b, port: 8081}]
endpoints: [{addresses: [10.244.1.999]}, {addresses: [10.244.1.7]}]
";
        let state = state_of(yaml);
        let errors: Vec<String> = state.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec![
                "Service default/bad-ip: field `spec.clusterIP`: \"10.96.0.300\" is not an IP address",
                "Service default/bad-port: field `spec.ports[0].port`: port 70000 is outside 1-65535",
                "EndpointSlice default/bad-port-1: field `endpoints[0].addresses[0]`: \"10.244.1.999\" is not a usable IPv4 address",
                "Service default/bad-port: field `spec.ports[2].protocol`: protocol \"SCTP\" is not supported (TCP and UDP are)",
            ]
        );
        assert_eq!(
            state.services.keys().collect::<Vec<_>>(),
            vec!["default/bad-port:b/TCP"]
        );
        assert_eq!(
            backends(&state, "default/bad-port:b/TCP"),
            vec!["10.244.1.7:8081"]
        );
    }

    #[test]
    fn slices_of_other_namespaces_or_services_do_not_leak_in() {
        let other_ns = slice(
            "web-x",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.244.9.9]}]",
        )
        .replace("namespace: shop", "namespace: other");
        let state = state_of(&format!("{WEB}{other_ns}"));
        assert!(state.services["shop/web:http/TCP"].backends.is_empty());
    }

    fn state_with_nodes(yaml: &str) -> DesiredState {
        let mut m = Manifests::default();
        parse_into(Path::new("t.yaml"), yaml, &mut m);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let settings = Settings {
            node_addresses: vec![Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(10, 0, 0, 1)],
            ..Settings::default()
        };
        desired_state(&m.services, &m.endpoint_slices, &settings)
    }

    fn frontends(state: &DesiredState, key: &str) -> Vec<String> {
        state.services[key]
            .frontends
            .iter()
            .map(|f| format!("{} {}:{}", f.kind, f.addr, f.port))
            .collect()
    }

    #[test]
    fn load_balancer_gets_cluster_ip_node_ports_ingress_ips_and_external_ips() {
        let yaml = "apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  externalIPs: [198.51.100.7, 2001:db8::7]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.7}, {ip: 203.0.113.8, ipMode: Proxy}, {hostname: lb.example.com}]
";
        let state = state_with_nodes(yaml);
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        let mut got = frontends(&state, "default/lb:443/TCP");
        got.sort();
        assert_eq!(
            got,
            vec![
                "ClusterIP 10.96.0.40:443",
                "ExternalIP 198.51.100.7:443",
                "LoadBalancer 203.0.113.7:443",
                "NodePort 10.0.0.1:30443",
                "NodePort 192.168.0.1:30443",
            ]
        );
    }

    #[test]
    fn node_ports_only_for_node_port_and_load_balancer_services() {
        let yaml = "apiVersion: v1
kind: Service
metadata: {name: plain}
spec: {clusterIP: 10.96.0.41, ports: [{port: 80, nodePort: 30001}]}
---
apiVersion: v1
kind: Service
metadata: {name: no-alloc}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.0.42
  ports: [{port: 80, nodePort: 30002}]
---
apiVersion: v1
kind: Service
metadata: {name: np}
spec: {type: NodePort, clusterIP: 10.96.0.43, ports: [{port: 80, nodePort: 70000}]}
";
        let state = state_with_nodes(yaml);
        assert_eq!(
            frontends(&state, "default/plain:80/TCP"),
            vec!["ClusterIP 10.96.0.41:80"]
        );
        // Not allocated automatically, but set by hand: served, as kube-proxy does.
        assert_eq!(
            frontends(&state, "default/no-alloc:80/TCP"),
            vec![
                "NodePort 10.0.0.1:30002",
                "ClusterIP 10.96.0.42:80",
                "NodePort 192.168.0.1:30002"
            ]
        );
        assert_eq!(
            frontends(&state, "default/np:80/TCP"),
            vec!["ClusterIP 10.96.0.43:80"]
        );
        assert_eq!(
            state.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["Service default/np: field `spec.ports[0].nodePort`: node port 70000 is outside 1-65535"]
        );
    }

    #[test]
    fn source_ranges_apply_to_load_balancers_and_bad_entries_narrow_never_widen() {
        let yaml = "apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.44
  loadBalancerSourceRanges: [10.1.2.3/16, not-a-cidr, 192.168.0.0/33]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: only-bad}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.45
  loadBalancerSourceRanges: [bogus]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: cluster}
spec: {clusterIP: 10.96.0.46, loadBalancerSourceRanges: [10.0.0.0/8], ports: [{port: 80}]}
";
        let state = state_with_nodes(yaml);
        let ranges = |key: &str| {
            state.services[key]
                .source_ranges
                .as_ref()
                .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(
            ranges("default/lb:80/TCP"),
            Some(vec!["10.1.0.0/16".to_string()])
        );
        assert_eq!(
            ranges("default/only-bad:80/TCP"),
            Some(vec![]),
            "nobody, not everybody"
        );
        assert_eq!(
            ranges("default/cluster:80/TCP"),
            None,
            "only LoadBalancers are restricted"
        );
        let fields: Vec<&str> = state.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.loadBalancerSourceRanges[1]",
                "spec.loadBalancerSourceRanges[2]",
                "spec.loadBalancerSourceRanges[0]"
            ]
        );
    }

    #[test]
    fn ipv6_source_ranges_leave_ipv4_unrestricted() {
        let yaml = "apiVersion: v1
kind: Service
metadata: {name: v6}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.47
  loadBalancerSourceRanges: [2001:db8::/32]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.48
  loadBalancerSourceRanges: [2001:db8::/32, 192.0.2.0/24]
  ports: [{port: 80}]
";
        let state = state_with_nodes(yaml);
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        assert_eq!(state.services["default/v6:80/TCP"].source_ranges, None);
        assert_eq!(
            state.services["default/mixed:80/TCP"]
                .source_ranges
                .as_ref()
                .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Some(vec!["192.0.2.0/24".to_string()])
        );
    }

    #[test]
    fn only_the_first_address_counts_and_every_endpoint_is_known() {
        let eps = "[{addresses: [10.244.1.2, 10.244.1.99]},
                    {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}},
                    {addresses: [10.244.1.4], conditions: {ready: false}}]";
        let state = state_of(&format!(
            "{WEB}{}",
            slice("web-a", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            backends(&state, "shop/web:http/TCP"),
            vec!["10.244.1.2:8080"]
        );
        let known: Vec<String> = state
            .known_backends
            .iter()
            .filter(|b| b.port == 8080)
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(known, vec!["10.244.1.2", "10.244.1.3", "10.244.1.4"]);
    }

    #[test]
    fn ready_wins_even_when_terminating_and_unset_serving_counts_as_serving() {
        // publishNotReadyAddresses makes the controller publish ready=true while terminating.
        let eps = "[{addresses: [10.244.1.2], conditions: {ready: true, terminating: true}},
                    {addresses: [10.244.1.3], conditions: {ready: false}}]";
        let state = state_of(&format!(
            "{WEB}{}",
            slice("web-a", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            backends(&state, "shop/web:http/TCP"),
            vec!["10.244.1.2:8080"]
        );
        // No ready endpoint; serving unset on a terminating one: kube-proxy uses it.
        let eps = "[{addresses: [10.244.1.3], conditions: {ready: false, terminating: true}}]";
        let state = state_of(&format!(
            "{WEB}{}",
            slice("web-a", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            backends(&state, "shop/web:http/TCP"),
            vec!["10.244.1.3:8080"]
        );
    }

    /// Slice merging, case by case after kube-proxy's `TestEndpointsMapFromESC`
    /// (`pkg/proxy/endpointslicecache_test.go`), rewritten against this model.
    mod slice_merging_table {
        use super::super::*;
        use crate::manifest::{parse_into, Manifests};

        /// `count` endpoints 10.0.<n>.1.., on `hosts` in turn, every `unready`-th not ready.
        fn slice(
            service: &str,
            ns: &str,
            n: u32,
            count: u32,
            unready: u32,
            hosts: &[&str],
            ports: &[Option<i32>],
        ) -> String {
            let endpoints: String = (1..=count)
                .map(|i| {
                    let host = if hosts.is_empty() {
                        String::new()
                    } else {
                        format!(", nodeName: {}", hosts[(i as usize - 1) % hosts.len()])
                    };
                    format!(
                        "\n- {{addresses: [10.0.{n}.{i}], conditions: {{ready: {}}}{host}}}",
                        i % unready != 0
                    )
                })
                .collect();
            let ports: Vec<String> = ports
                .iter()
                .enumerate()
                .map(|(i, p)| match p {
                    Some(p) => format!("{{name: port-{i}, port: {p}}}"),
                    None => format!("{{name: port-{i}}}"),
                })
                .collect();
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{n}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{}]\nendpoints:{endpoints}\n",
                ports.join(", ")
            )
        }

        /// `(address:port, ready, local)` of one port of ns1/svc1, as kube-proxy lists them.
        fn merged(slices: &[String], host: &str, port: usize) -> Vec<(String, bool, bool)> {
            let mut m = Manifests::default();
            parse_into(std::path::Path::new("t.yaml"), &slices.concat(), &mut m);
            assert!(m.errors.is_empty(), "{:?}", m.errors);
            let settings = Settings {
                node_name: host.to_string(),
                ..Settings::default()
            };
            let grouped = group_slices(&m.endpoint_slices);
            let mine = grouped
                .get("ns1/svc1")
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut state = DesiredState::default();
            let name = format!("port-{port}");
            let mut got: Vec<(String, bool, bool)> =
                endpoints_for_port(Some(&name), Protocol::Tcp, mine, &settings, &mut state)
                    .into_iter()
                    .map(|e| {
                        (
                            format!("{}:{}", e.backend.addr, e.backend.port),
                            e.ready,
                            e.local,
                        )
                    })
                    .collect();
            got.sort();
            got
        }

        fn eps(list: &[(&str, bool, bool)]) -> Vec<(String, bool, bool)> {
            let mut v: Vec<_> = list
                .iter()
                .map(|(a, r, l)| (a.to_string(), *r, *l))
                .collect();
            v.sort();
            v
        }

        const ALL_READY: u32 = 999;

        #[test]
        fn one_slice_two_hosts_two_ports() {
            let slices = [slice(
                "svc1",
                "ns1",
                1,
                3,
                ALL_READY,
                &["host1", "host2"],
                &[Some(80), Some(443)],
            )];
            // Endpoints alternate host1, host2, host1; this node is host2, so 10.0.1.2 is local.
            assert_eq!(
                merged(&slices, "host2", 0),
                eps(&[
                    ("10.0.1.1:80", true, false),
                    ("10.0.1.2:80", true, true),
                    ("10.0.1.3:80", true, false)
                ])
            );
            assert_eq!(
                merged(&slices, "host2", 1),
                eps(&[
                    ("10.0.1.1:443", true, false),
                    ("10.0.1.2:443", true, true),
                    ("10.0.1.3:443", true, false)
                ])
            );
        }

        #[test]
        fn two_slices_same_port_are_a_union() {
            let slices = [
                slice("svc1", "ns1", 1, 3, ALL_READY, &[], &[Some(80)]),
                slice("svc1", "ns1", 2, 3, ALL_READY, &[], &[Some(80)]),
            ];
            let got: Vec<String> = merged(&slices, "", 0).into_iter().map(|e| e.0).collect();
            assert_eq!(
                got,
                [
                    "10.0.1.1:80",
                    "10.0.1.2:80",
                    "10.0.1.3:80",
                    "10.0.2.1:80",
                    "10.0.2.2:80",
                    "10.0.2.3:80"
                ]
            );
        }

        #[test]
        fn overlapping_slices_are_deduplicated() {
            let mut second = slice("svc1", "ns1", 1, 4, ALL_READY, &[], &[Some(80)]);
            second = second.replace("name: svc1-1,", "name: svc1-1b,");
            let slices = [
                slice("svc1", "ns1", 1, 3, ALL_READY, &[], &[Some(80)]),
                second,
            ];
            let got: Vec<String> = merged(&slices, "", 0).into_iter().map(|e| e.0).collect();
            assert_eq!(
                got,
                ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80", "10.0.1.4:80"]
            );
        }

        #[test]
        fn overlapping_copies_first_wins_unless_a_later_one_is_local() {
            // The same address in two slices (the controller moving it): the first copy's
            // conditions hold, but a later local copy replaces a remote one.
            let first = slice("svc1", "ns1", 1, 3, 3, &["host2"], &[Some(80)]);
            let second = slice("svc1", "ns1", 1, 3, ALL_READY, &["host1"], &[Some(80)])
                .replace("name: svc1-1,", "name: svc1-2,");
            let got = merged(&[first.clone(), second.clone()], "host1", 0);
            assert_eq!(
                got,
                eps(&[
                    ("10.0.1.1:80", true, true),
                    ("10.0.1.2:80", true, true),
                    ("10.0.1.3:80", true, true)
                ])
            );
            // From another node neither copy is local: the first one (3 not ready) stays.
            let got = merged(&[first, second], "host9", 0);
            assert_eq!(
                got,
                eps(&[
                    ("10.0.1.1:80", true, false),
                    ("10.0.1.2:80", true, false),
                    ("10.0.1.3:80", false, false)
                ])
            );
        }

        #[test]
        fn other_services_and_namespaces_are_not_merged_in() {
            let slices = [
                slice("svc1", "ns1", 1, 3, ALL_READY, &[], &[Some(80)]),
                slice("svc2", "ns1", 2, 3, ALL_READY, &[], &[Some(80)]),
                slice("svc1", "ns2", 3, 3, ALL_READY, &[], &[Some(80)]),
            ];
            let got: Vec<String> = merged(&slices, "", 0).into_iter().map(|e| e.0).collect();
            assert_eq!(got, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]);
        }

        #[test]
        fn a_slice_port_without_a_number_gives_nothing() {
            let slices = [slice("svc1", "ns1", 1, 3, ALL_READY, &["host1"], &[None])];
            assert!(merged(&slices, "host1", 0).is_empty());
        }

        #[test]
        fn same_address_on_different_ports_is_two_endpoints() {
            let a = slice("svc1", "ns1", 1, 2, ALL_READY, &[], &[Some(80)]);
            let b = slice("svc1", "ns1", 1, 2, ALL_READY, &[], &[Some(8080)])
                .replace("name: svc1-1,", "name: svc1-2,");
            let got: Vec<String> = merged(&[a, b], "", 0).into_iter().map(|e| e.0).collect();
            assert_eq!(
                got,
                [
                    "10.0.1.1:80",
                    "10.0.1.1:8080",
                    "10.0.1.2:80",
                    "10.0.1.2:8080"
                ]
            );
        }
    }

    /// Endpoint categorisation, case by case after kube-proxy's `TestCategorizeEndpoints`
    /// (`pkg/proxy/topology_test.go`), rewritten for this model: hints are honoured whenever
    /// every ready endpoint carries them, as kube-proxy does since `trafficDistribution`.
    mod categorize_table {
        use super::super::*;

        struct Ep {
            addr: &'static str,
            zones: &'static [&'static str],
            nodes: &'static [&'static str],
            ready: bool,
            serving: bool,
            terminating: bool,
            local: bool,
        }

        const fn ep(addr: &'static str, zones: &'static [&'static str]) -> Ep {
            Ep {
                addr,
                zones,
                nodes: &[],
                ready: true,
                serving: true,
                terminating: false,
                local: false,
            }
        }

        impl Ep {
            const fn unready(mut self) -> Self {
                self.ready = false;
                self.serving = false;
                self
            }
            const fn terminating(mut self, serving: bool) -> Self {
                self.ready = false;
                self.serving = serving;
                self.terminating = true;
                self
            }
            const fn local(mut self) -> Self {
                self.local = true;
                self
            }
            const fn nodes(mut self, nodes: &'static [&'static str]) -> Self {
                self.nodes = nodes;
                self
            }
        }

        struct Case {
            name: &'static str,
            zone: Option<&'static str>,
            policy: Policy,
            endpoints: Vec<Ep>,
            cluster: Option<&'static [&'static str]>,
            local: Option<&'static [&'static str]>,
            has_any: bool,
        }

        const CLUSTER: Policy = Policy {
            internal_local: false,
            external_local: false,
            externally_accessible: false,
        };
        const ETP_LOCAL: Policy = Policy {
            internal_local: false,
            external_local: true,
            externally_accessible: true,
        };
        const ITP_LOCAL: Policy = Policy {
            internal_local: true,
            external_local: false,
            externally_accessible: false,
        };
        const ITP_LOCAL_NODEPORT: Policy = Policy {
            internal_local: true,
            external_local: false,
            externally_accessible: true,
        };

        fn four_zoned() -> Vec<Ep> {
            vec![
                ep("10.1.2.3", &["zone-a"]),
                ep("10.1.2.4", &["zone-b"]),
                ep("10.1.2.5", &["zone-c"]),
                ep("10.1.2.6", &["zone-a"]),
            ]
        }

        const ALL4: &[&str] = &["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"];

        fn cases() -> Vec<Case> {
            vec![
                Case {
                    name: "zone hints for every endpoint: same zone only",
                    zone: Some("zone-a"),
                    policy: CLUSTER,
                    endpoints: four_zoned(),
                    cluster: Some(&["10.1.2.3", "10.1.2.6"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "one ready endpoint without hints: no filtering",
                    zone: Some("zone-a"),
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.1.2.3", &["zone-a"]),
                        ep("10.1.2.4", &["zone-b"]),
                        ep("10.1.2.5", &[]),
                        ep("10.1.2.6", &["zone-a"]),
                    ],
                    cluster: Some(ALL4),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "node in a zone no endpoint is hinted for: no filtering",
                    zone: Some("zone-d"),
                    policy: CLUSTER,
                    endpoints: four_zoned(),
                    cluster: Some(ALL4),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "node without a zone label: no filtering",
                    zone: None,
                    policy: CLUSTER,
                    endpoints: four_zoned(),
                    cluster: Some(ALL4),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "empty zone label: no filtering",
                    zone: Some(""),
                    policy: CLUSTER,
                    endpoints: four_zoned(),
                    cluster: Some(ALL4),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "unready endpoint in the zone is left out",
                    zone: Some("zone-a"),
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.1.2.3", &["zone-a"]),
                        ep("10.1.2.4", &["zone-b"]),
                        ep("10.1.2.5", &["zone-c"]),
                        ep("10.1.2.6", &["zone-a"]).unready(),
                    ],
                    cluster: Some(&["10.1.2.3"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "only unready endpoints in the zone: no filtering",
                    zone: Some("zone-a"),
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.1.2.3", &["zone-a"]).unready(),
                        ep("10.1.2.4", &["zone-b"]),
                        ep("10.1.2.5", &["zone-c"]),
                        ep("10.1.2.6", &["zone-a"]).unready(),
                    ],
                    cluster: Some(&["10.1.2.4", "10.1.2.5"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "several hints per endpoint: any match counts",
                    zone: Some("zone-c"),
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.1.2.3", &["zone-a", "zone-b", "zone-c"]),
                        ep("10.1.2.4", &["zone-b", "zone-c"]),
                        ep("10.1.2.5", &["zone-b", "zone-d"]),
                        ep("10.1.2.6", &["zone-c"]),
                    ],
                    cluster: Some(&["10.1.2.3", "10.1.2.4", "10.1.2.6"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "externalTrafficPolicy Local: topology ignored for the local set",
                    zone: Some("zone-a"),
                    policy: ETP_LOCAL,
                    endpoints: vec![
                        ep("10.1.2.3", &["zone-a"]).local(),
                        ep("10.1.2.4", &["zone-b"]).local(),
                        ep("10.1.2.5", &["zone-c"]),
                        ep("10.1.2.6", &["zone-a"]),
                    ],
                    cluster: Some(&["10.1.2.3", "10.1.2.6"]),
                    local: Some(&["10.1.2.3", "10.1.2.4"]),
                    has_any: true,
                },
                Case {
                    name: "internalTrafficPolicy Local with a NodePort: both sets",
                    zone: Some("zone-a"),
                    policy: ITP_LOCAL_NODEPORT,
                    endpoints: vec![
                        ep("10.1.2.3", &["zone-a"]).local(),
                        ep("10.1.2.4", &["zone-b"]).local(),
                        ep("10.1.2.5", &["zone-c"]),
                        ep("10.1.2.6", &["zone-a"]),
                    ],
                    cluster: Some(&["10.1.2.3", "10.1.2.6"]),
                    local: Some(&["10.1.2.3", "10.1.2.4"]),
                    has_any: true,
                },
                Case {
                    name: "internalTrafficPolicy Local, no endpoints at all",
                    zone: None,
                    policy: ITP_LOCAL,
                    endpoints: vec![],
                    cluster: None,
                    local: Some(&[]),
                    has_any: false,
                },
                Case {
                    name: "internalTrafficPolicy Local, all endpoints remote",
                    zone: None,
                    policy: ITP_LOCAL,
                    endpoints: vec![ep("10.0.0.0", &[]), ep("10.0.0.1", &[])],
                    cluster: None,
                    local: Some(&[]),
                    has_any: true,
                },
                Case {
                    name: "internalTrafficPolicy Local, all endpoints local",
                    zone: None,
                    policy: ITP_LOCAL,
                    endpoints: vec![ep("10.0.0.0", &[]).local(), ep("10.0.0.1", &[]).local()],
                    cluster: None,
                    local: Some(&["10.0.0.0", "10.0.0.1"]),
                    has_any: true,
                },
                Case {
                    name: "no ready endpoint: serving terminating ones, not the non-serving",
                    zone: None,
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.0.0.0", &[]).terminating(true),
                        ep("10.0.0.1", &[]).terminating(false),
                        ep("10.0.0.2", &[]).unready(),
                    ],
                    cluster: Some(&["10.0.0.0"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "ready endpoints win over terminating ones",
                    zone: None,
                    policy: CLUSTER,
                    endpoints: vec![ep("10.0.0.0", &[]).terminating(true), ep("10.0.0.1", &[])],
                    cluster: Some(&["10.0.0.1"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "local fallback to terminating is independent of the cluster set",
                    zone: None,
                    policy: ETP_LOCAL,
                    endpoints: vec![
                        ep("10.0.0.0", &[]).terminating(true).local(),
                        ep("10.0.0.1", &[]),
                    ],
                    cluster: Some(&["10.0.0.1"]),
                    local: Some(&["10.0.0.0"]),
                    has_any: true,
                },
                Case {
                    name: "only non-serving terminating endpoints: nothing anywhere",
                    zone: None,
                    policy: ETP_LOCAL,
                    endpoints: vec![ep("10.0.0.0", &[]).terminating(false).local()],
                    cluster: Some(&[]),
                    local: Some(&[]),
                    has_any: false,
                },
                Case {
                    name: "PreferSameNode: node hints for every endpoint, one for this node",
                    zone: Some("zone-a"),
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.0.0.0", &["zone-a"]).nodes(&["node-1"]),
                        ep("10.0.0.1", &["zone-a"]).nodes(&["node-2"]),
                        ep("10.0.0.2", &["zone-b"]).nodes(&["node-3"]),
                    ],
                    cluster: Some(&["10.0.0.0"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "PreferSameNode with no hint for this node falls back to the zone",
                    zone: Some("zone-a"),
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.0.0.1", &["zone-a"]).nodes(&["node-2"]),
                        ep("10.0.0.2", &["zone-b"]).nodes(&["node-3"]),
                    ],
                    cluster: Some(&["10.0.0.1"]),
                    local: None,
                    has_any: true,
                },
                Case {
                    name: "node hints on some endpoints only: zone hints decide",
                    zone: Some("zone-b"),
                    policy: CLUSTER,
                    endpoints: vec![
                        ep("10.0.0.0", &["zone-a"]).nodes(&["node-1"]),
                        ep("10.0.0.2", &["zone-b"]),
                    ],
                    cluster: Some(&["10.0.0.2"]),
                    local: None,
                    has_any: true,
                },
            ]
        }

        fn addrs(set: &Option<Vec<&EndpointInfo>>) -> Option<Vec<String>> {
            set.as_ref().map(|v| {
                let mut a: Vec<String> = v.iter().map(|e| e.backend.addr.to_string()).collect();
                a.sort();
                a
            })
        }

        #[test]
        fn categorize_endpoints() {
            for case in cases() {
                let endpoints: Vec<EndpointInfo> = case
                    .endpoints
                    .iter()
                    .map(|e| EndpointInfo {
                        backend: Backend {
                            addr: e.addr.parse().unwrap(),
                            port: 80,
                            protocol: Protocol::Tcp,
                        },
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                        local: e.local,
                        remote: false,
                        zone_hints: e.zones.iter().map(|z| z.to_string()).collect(),
                        node_hints: e.nodes.iter().map(|n| n.to_string()).collect(),
                    })
                    .collect();
                let got = categorize(&endpoints, case.policy, "node-1", case.zone);
                let want =
                    |s: Option<&[&str]>| s.map(|s| s.iter().map(|a| a.to_string()).collect());
                assert_eq!(
                    addrs(&got.cluster),
                    want(case.cluster),
                    "{}: cluster",
                    case.name
                );
                assert_eq!(addrs(&got.local), want(case.local), "{}: local", case.name);
                assert_eq!(got.has_any, case.has_any, "{}: has_any", case.name);
            }
        }
    }
}
