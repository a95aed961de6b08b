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
    discovery::v1::{Endpoint, EndpointSlice},
};
use serde::Serialize;

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

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

/// What the model needs to know about this node and the agent's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Addresses NodePorts are served on (every address of the node by default).
    pub node_addresses: Vec<Ipv4Addr>,
}

/// An endpoint traffic may be sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One Service port as this node must serve it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredService {
    pub frontends: BTreeSet<Frontend>,
    pub backends: BTreeSet<Backend>,
    /// `loadBalancerSourceRanges`: when `Some`, only these clients may use the LoadBalancer
    /// frontends (an empty list then admits nobody: every listed range was invalid).
    pub source_ranges: Option<BTreeSet<Ipv4Prefix>>,
}

/// The whole desired state, keyed by `namespace/name:port/protocol` (the port's name, or its
/// number when unnamed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<String, DesiredService>,
    /// Objects or parts of objects that were left out, with the reason (bad field values).
    pub errors: Vec<ModelError>,
    /// Services that rightly get no frontend (headless, ExternalName, other proxy), with why.
    pub skipped: Vec<(String, String)>,
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
    let mut state = DesiredState::default();
    let slices_by_service = group_slices(slices);
    for service in services {
        add_service(service, &slices_by_service, settings, &mut state);
    }
    state
}

fn namespaced(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
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
    slices_by_service: &BTreeMap<String, Vec<&EndpointSlice>>,
    settings: &Settings,
    state: &mut DesiredState,
) {
    let name = namespaced(&service.metadata);
    let object = format!("Service {name}");
    let Some(spec) = &service.spec else {
        state.skipped.push((object, "no spec".to_string()));
        return;
    };
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
                state.errors.push(ModelError {
                    object: object.clone(),
                    field,
                    message: format!("{ip:?} is not an IP address"),
                });
                return;
            }
        }
    }
    if frontend_addrs.is_empty() {
        state
            .skipped
            .push((object, "no IPv4 cluster IP assigned".to_string()));
        return;
    }

    let slices = slices_by_service
        .get(&name)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let wants_node_port = type_ == "NodePort"
        || (type_ == "LoadBalancer" && spec.allocate_load_balancer_node_ports != Some(false));
    let external_ips = parse_addresses(
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.as_str())),
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
            &object,
            state,
        )
    } else {
        Vec::new()
    };
    let source_ranges = spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|r| !r.is_empty() && type_ == "LoadBalancer")
        .map(|ranges| {
            ranges
                .iter()
                .enumerate()
                .filter_map(|(i, r)| match Ipv4Prefix::parse(r) {
                    Ok(p) => Some(p),
                    Err(message) => {
                        state.errors.push(ModelError {
                            object: object.clone(),
                            field: format!("spec.loadBalancerSourceRanges[{i}]"),
                            message,
                        });
                        None
                    }
                })
                .collect::<BTreeSet<_>>()
        });

    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let (port_number, protocol) = match service_port(port) {
            Ok(p) => p,
            Err(message) => {
                state.errors.push(ModelError {
                    object: object.clone(),
                    field: format!("spec.ports[{index}]"),
                    message,
                });
                continue;
            }
        };
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
            match port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => frontends.extend(
                    settings
                        .node_addresses
                        .iter()
                        .map(|&addr| frontend(addr, node_port, FrontendKind::NodePort)),
                ),
                Some(_) => state.errors.push(ModelError {
                    object: object.clone(),
                    field: format!("spec.ports[{index}].nodePort"),
                    message: format!(
                        "node port {} is outside 1-65535",
                        port.node_port.unwrap_or_default()
                    ),
                }),
                None => {} // not allocated yet: nothing to serve
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
        let backends = backends_for_port(port.name.as_deref(), protocol, slices, state);
        state.services.insert(
            key,
            DesiredService {
                frontends,
                backends,
                source_ranges: source_ranges.clone(),
            },
        );
    }
}

/// Parses IPv4 addresses, reporting the bad ones by field; IPv6 ones are skipped quietly
/// (this datapath is IPv4 only).
fn parse_addresses<'a>(
    addresses: impl Iterator<Item = (String, &'a str)>,
    object: &str,
    state: &mut DesiredState,
) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for (field, text) in addresses {
        match text.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(addr)) => out.push(addr),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => state.errors.push(ModelError {
                object: object.to_string(),
                field,
                message: format!("{text:?} is not an IP address"),
            }),
        }
    }
    out
}

fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<String> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
}

fn service_port(port: &ServicePort) -> Result<(u16, Protocol), String> {
    let protocol = Protocol::parse(port.protocol.as_deref())?;
    let number = u16::try_from(port.port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("port {} is outside 1-65535", port.port))?;
    Ok((number, protocol))
}

/// The backends of one Service port: the union of its slices, deduplicated by address and port,
/// with the target port resolved through each slice's port of the same name. Ready endpoints
/// are used; when none is ready, serving and terminating ones take over (graceful termination).
fn backends_for_port(
    port_name: Option<&str>,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    state: &mut DesiredState,
) -> BTreeSet<Backend> {
    let port_name = port_name.unwrap_or("");
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue; // IPv6 and FQDN slices carry nothing this IPv4 datapath can use
        }
        let object = format!("EndpointSlice {}", namespaced(&slice.metadata));
        let target = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::parse(p.protocol.as_deref()).ok() == Some(protocol)
        });
        let Some((port_index, target)) = target else {
            continue;
        };
        let Some(target_port) = target.port else {
            continue; // a slice port without a number means "no port": nothing to send to
        };
        let Some(target_port) = u16::try_from(target_port).ok().filter(|&p| p != 0) else {
            state.errors.push(ModelError {
                object,
                field: format!("ports[{port_index}].port"),
                message: format!("port {target_port} is outside 1-65535"),
            });
            continue;
        };
        for (endpoint_index, endpoint) in slice.endpoints.iter().enumerate() {
            let class = classify(endpoint);
            if class == Readiness::NotUsable {
                continue;
            }
            for (address_index, address) in endpoint.addresses.iter().enumerate() {
                let Ok(addr) = address.parse::<Ipv4Addr>() else {
                    state.errors.push(ModelError {
                        object: object.clone(),
                        field: format!("endpoints[{endpoint_index}].addresses[{address_index}]"),
                        message: format!("{address:?} is not an IPv4 address"),
                    });
                    continue;
                };
                let backend = Backend {
                    addr,
                    port: target_port,
                    protocol,
                };
                match class {
                    Readiness::Ready => ready.insert(backend),
                    Readiness::ServingTerminating => terminating.insert(backend),
                    Readiness::NotUsable => false,
                };
            }
        }
    }
    if ready.is_empty() {
        terminating
    } else {
        ready
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    ServingTerminating,
    NotUsable,
}

/// EndpointConditions: `ready` unset means ready; `serving` unset equals `ready`;
/// `terminating` unset means false.
fn classify(endpoint: &Endpoint) -> Readiness {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Readiness::Ready
    } else if serving && terminating {
        Readiness::ServingTerminating
    } else {
        Readiness::NotUsable
    }
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
                "Service default/bad-port: field `spec.ports[0]`: port 70000 is outside 1-65535",
                "EndpointSlice default/bad-port-1: field `endpoints[0].addresses[0]`: \"10.244.1.999\" is not an IPv4 address",
                "Service default/bad-port: field `spec.ports[2]`: protocol \"SCTP\" is not supported (TCP and UDP are)",
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
    fn node_ports_only_for_node_port_and_allocating_load_balancers() {
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
        assert_eq!(
            frontends(&state, "default/no-alloc:80/TCP"),
            vec!["ClusterIP 10.96.0.42:80"]
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
}
