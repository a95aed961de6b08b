//! Standalone mode's stand-in for the control plane's EndpointSlice mirroring controller: v1
//! `Endpoints` objects become EndpointSlices, with the controller's four exceptions.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::{
    api::{
        core::v1::{EndpointAddress, EndpointSubset, Endpoints, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
pub const ANNOTATION_LEADER: &str = "control-plane.alpha.kubernetes.io/leader";
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

/// Slices mirrored from `endpoints`, and the Endpoints left alone with the reason.
#[derive(Debug, Default)]
pub struct Mirrored {
    pub slices: Vec<EndpointSlice>,
    pub skipped: Vec<(String, String)>,
}

pub fn mirror_endpoints(services: &[Service], endpoints: &[Endpoints]) -> Mirrored {
    let by_name: HashMap<(String, String), &Service> = services
        .iter()
        .map(|s| {
            (
                (
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default(),
                ),
                s,
            )
        })
        .collect();
    let mut out = Mirrored::default();
    for object in endpoints {
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let name = object.metadata.name.clone().unwrap_or_default();
        let label = format!("Endpoints {namespace}/{name}");
        let skip = |reason: &str| (label.clone(), reason.to_string());
        let Some(service) = by_name.get(&(namespace.clone(), name.clone())) else {
            out.skipped.push(skip("no Service of that name"));
            continue;
        };
        let has_selector = service
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|s| !s.is_empty());
        if has_selector {
            out.skipped.push(skip(
                "the Service has a selector (its slices come from the pods)",
            ));
            continue;
        }
        let labels = object.metadata.labels.as_ref();
        if labels
            .and_then(|l| l.get(LABEL_SKIP_MIRROR))
            .is_some_and(|v| v == "true")
        {
            out.skipped.push(skip("labelled skip-mirror"));
            continue;
        }
        if object
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ANNOTATION_LEADER))
        {
            out.skipped
                .push(skip("a leader-election lock, not a Service's endpoints"));
            continue;
        }
        for (index, subset) in object.subsets.iter().flatten().enumerate() {
            out.slices
                .push(mirror_subset(&namespace, &name, index, subset));
        }
    }
    out
}

/// One slice per subset (a subset shares one port list), IPv4 addresses only.
fn mirror_subset(
    namespace: &str,
    name: &str,
    index: usize,
    subset: &EndpointSubset,
) -> EndpointSlice {
    let endpoint = |address: &EndpointAddress, ready: bool| Endpoint {
        addresses: vec![address.ip.clone()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(ready),
            terminating: Some(false),
        }),
        hostname: address.hostname.clone(),
        node_name: address.node_name.clone(),
        target_ref: address.target_ref.clone(),
        ..Endpoint::default()
    };
    let endpoints = subset
        .addresses
        .iter()
        .flatten()
        .map(|a| endpoint(a, true))
        .chain(
            subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| endpoint(a, false)),
        )
        .filter(|e| {
            e.addresses
                .iter()
                .all(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        })
        .collect();
    let ports = subset
        .ports
        .iter()
        .flatten()
        .map(|p| EndpointPort {
            name: p.name.clone(),
            port: Some(p.port),
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-mirror-{index}")),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (
                    crate::model::LABEL_SERVICE_NAME.to_string(),
                    name.to_string(),
                ),
                (
                    LABEL_MANAGED_BY.to_string(),
                    MIRRORING_CONTROLLER.to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_string(),
        endpoints,
        ports: Some(ports),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest::{parse_into, Manifests};

    fn mirror(yaml: &str) -> Mirrored {
        let mut m = Manifests::default();
        parse_into(Path::new("t.yaml"), yaml, &mut m);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        mirror_endpoints(&m.services, &m.endpoints)
    }

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: 10.96.0.50, ports: [{name: pg, port: 5432}]}
";

    #[test]
    fn ready_and_not_ready_addresses_become_conditions() {
        // As in the seed text: ready addresses and notReadyAddresses in separate subsets.
        let yaml = format!(
            "{SERVICE}---
apiVersion: v1
kind: Endpoints
metadata: {{name: db}}
subsets:
- addresses: [{{ip: 10.0.0.1, nodeName: n1}}]
  notReadyAddresses: [{{ip: 10.0.0.2}}]
  ports: [{{name: pg, port: 5432, protocol: TCP}}]
"
        );
        let out = mirror(&yaml);
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        assert_eq!(out.slices.len(), 1);
        let slice = &out.slices[0];
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[crate::model::LABEL_SERVICE_NAME], "db");
        assert_eq!(labels[LABEL_MANAGED_BY], MIRRORING_CONTROLLER);
        let got: Vec<(String, Option<bool>, Option<String>)> = slice
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].clone(),
                    e.conditions.as_ref().and_then(|c| c.ready),
                    e.node_name.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1".to_string(), Some(true), Some("n1".to_string())),
                ("10.0.0.2".to_string(), Some(false), None),
            ]
        );
        assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(5432));
    }

    #[test]
    fn the_four_exceptions_are_not_mirrored() {
        let yaml = format!(
            "{SERVICE}---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.51, selector: {{app: web}}, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: orphan}}
subsets: [{{addresses: [{{ip: 10.0.0.9}}], ports: [{{port: 1}}]}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: web}}
subsets: [{{addresses: [{{ip: 10.0.0.9}}], ports: [{{port: 80}}]}}]
---
apiVersion: v1
kind: Endpoints
metadata:
  name: db
  labels: {{endpointslice.kubernetes.io/skip-mirror: \"true\"}}
subsets: [{{addresses: [{{ip: 10.0.0.9}}], ports: [{{port: 5432}}]}}]
---
apiVersion: v1
kind: Endpoints
metadata:
  name: db
  annotations: {{control-plane.alpha.kubernetes.io/leader: \"{{}}\"}}
subsets: [{{addresses: [{{ip: 10.0.0.9}}], ports: [{{port: 5432}}]}}]
"
        );
        let out = mirror(&yaml);
        assert!(out.slices.is_empty(), "{:?}", out.slices);
        let reasons: Vec<&str> = out.skipped.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(
            reasons,
            vec![
                "no Service of that name",
                "the Service has a selector (its slices come from the pods)",
                "labelled skip-mirror",
                "a leader-election lock, not a Service's endpoints",
            ]
        );
    }
}
