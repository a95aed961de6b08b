//! The incremental path (engine + `Applier::apply_delta`) against real pinned maps: after any
//! sequence of object changes it leaves the maps exactly as a full sync of the same objects
//! would, and a change to one endpoint costs a handful of map operations.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    engine::Engine,
    loader::{Capacity, DatapathSettings},
    maps::read_services,
    model::{desired_state, Settings},
};
use lb_tests::packet::Harness;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// What the datapath can observe, without the ids (which may differ between the two paths).
type View = BTreeSet<(String, Vec<String>, Vec<String>, Vec<String>)>;

fn view(pin_dir: &Path) -> View {
    read_services(pin_dir)
        .unwrap()
        .into_iter()
        .map(|s| {
            let frontends = s
                .frontends
                .iter()
                .map(|f| format!("{:?} {}:{}/{}", f.kind, f.addr, f.port, f.protocol))
                .collect();
            let mut backends: Vec<String> = s
                .backends
                .iter()
                .map(|b| {
                    format!(
                        "{}:{}/{} {} remote={} maglev={:?}",
                        b.addr, b.port, b.protocol, b.state, b.remote, b.maglev_entries
                    )
                })
                .collect();
            backends.sort();
            (s.name, frontends, backends, s.source_ranges)
        })
        .collect()
}

/// Every backend entry (address, port, protocol, flags), chosen or only known.
fn backend_entries(h: &Harness) -> BTreeSet<String> {
    let map = h.array::<lb_common::BackendValue>(lb_common::map_names::BACKENDS);
    map.iter()
        .filter_map(Result::ok)
        .filter(|b| b.proto != 0)
        .map(|b| {
            format!(
                "{}:{}/{} {}",
                Ipv4Addr::from(b.addr),
                b.port,
                b.proto,
                b.flags
            )
        })
        .collect()
}

fn service(rng: &mut StdRng, i: u32) -> Service {
    let kind = ["ClusterIP", "NodePort", "LoadBalancer"][rng.random_range(0..3)];
    let node_port = if kind == "ClusterIP" {
        String::new()
    } else {
        format!(", nodePort: {}", 30000 + i)
    };
    let policy = if rng.random_bool(0.3) {
        "Local"
    } else {
        "Cluster"
    };
    let udp = if rng.random_bool(0.3) {
        format!(", {{name: dns, protocol: UDP, port: 53, targetPort: 5353{node_port}}}")
    } else {
        String::new()
    };
    // Sometimes two Services claim one address: the conflict must resolve the same way.
    let vip = if rng.random_bool(0.1) { 99 } else { i };
    let ingress = if kind == "LoadBalancer" {
        format!("status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.{i}}}]}}}}")
    } else {
        String::new()
    };
    let ranges = if kind == "LoadBalancer" && rng.random_bool(0.5) {
        "loadBalancerSourceRanges: [198.51.100.0/24], "
    } else {
        ""
    };
    // Sometimes Maglev: its tables must end up the same through both paths too.
    let algorithm = if rng.random_bool(0.3) {
        "maglev"
    } else {
        "random"
    };
    serde_yaml::from_str(&format!(
        "metadata: {{name: s{i}, namespace: ns, \
         annotations: {{lb.example.dev/lb-algorithm: {algorithm}}}}}\n\
         spec: {{type: {kind}, clusterIP: 10.96.0.{vip}, externalTrafficPolicy: {policy}, {ranges}\
         ports: [{{name: http, port: 80, targetPort: 8080{node_port}}}{udp}]}}\n{ingress}"
    ))
    .unwrap()
}

/// A pod: its conditions and node. One pod has one state in every slice that lists it, as the
/// EndpointSlice controller writes them.
#[derive(Clone, Copy)]
struct Pod {
    conditions: (bool, bool, bool),
    node: &'static str,
}

fn random_pod(rng: &mut StdRng) -> Pod {
    Pod {
        conditions: [
            (true, true, false),
            (false, true, true),
            (false, false, false),
        ][rng.random_range(0..3)],
        node: ["node-a", "node-b"][rng.random_range(0..2)],
    }
}

/// Slice `name` of Service `s<owner>`, listing pods (by index into `pods`, a small pool so
/// Services share backends).
fn slice(pods: &[Pod], owner: u32, name: u32, members: &[usize]) -> EndpointSlice {
    let endpoints: Vec<String> = members
        .iter()
        .map(|&m| {
            let Pod {
                conditions: (ready, serving, terminating),
                node,
            } = pods[m];
            format!(
                "{{addresses: [\"10.1.0.{}\"], nodeName: {node}, conditions: \
                 {{ready: {ready}, serving: {serving}, terminating: {terminating}}}}}",
                m + 1
            )
        })
        .collect();
    serde_yaml::from_str(&format!(
        "metadata: {{name: slice-{name}, namespace: ns, labels: {{kubernetes.io/service-name: s{owner}}}}}\n\
         addressType: IPv4\n\
         ports: [{{name: http, port: 8080}}, {{name: dns, protocol: UDP, port: 5353}}]\n\
         endpoints: [{}]",
        endpoints.join(",")
    ))
    .unwrap()
}

fn harness() -> Harness {
    Harness::with_settings(&DatapathSettings {
        capacity: Capacity {
            backends: 256,
            slots: 1024,
            // Room for every Service to be Maglev: the paths must not compete for tables.
            maglev_services: 256,
            ..Capacity::default()
        },
        // Small tables keep the comparison quick (and exercise the setting).
        maglev_table_size: 251,
        ..DatapathSettings::default()
    })
    .unwrap()
}

#[test]
fn deltas_leave_the_maps_as_a_full_sync_would_through_random_changes() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let settings = Settings {
        node_name: "node-a".into(),
        node_addresses: vec![Ipv4Addr::new(192, 168, 0, 1)],
        ..Settings::default()
    };
    let mut incremental = harness();
    let mut full = harness();
    let mut engine = Engine::new(settings.clone());
    let mut services: std::collections::BTreeMap<u32, Service> = Default::default();
    let mut pods: Vec<Pod> = (0..11).map(|_| random_pod(&mut rng)).collect();
    // Slice name -> (owner, pods listed).
    let mut slice_defs: std::collections::BTreeMap<u32, (u32, Vec<usize>)> = Default::default();
    let mut slices: std::collections::BTreeMap<u32, EndpointSlice> = Default::default();
    let mut maglev_seen = 0;
    for step in 0..300 {
        // A few changes per round, as a burst batched by --min-sync-period.
        for _ in 0..rng.random_range(1..4) {
            match rng.random_range(0..12) {
                0..=2 => {
                    let i = rng.random_range(0..8);
                    let s = service(&mut rng, i);
                    services.insert(i, s.clone());
                    engine.apply_service(s);
                }
                3 => {
                    let i = rng.random_range(0..8);
                    services.remove(&i);
                    engine.delete_service(&format!("ns/s{i}"));
                }
                4..=7 => {
                    // A slice created, changed or moved to another Service.
                    let name = rng.random_range(0..12);
                    let owner = rng.random_range(0..8);
                    let members: Vec<usize> = (0..rng.random_range(0..5))
                        .map(|_| rng.random_range(0..pods.len()))
                        .collect();
                    let s = slice(&pods, owner, name, &members);
                    slice_defs.insert(name, (owner, members));
                    slices.insert(name, s.clone());
                    engine.apply_slice(s);
                }
                8..=9 => {
                    // A pod changes state or moves: every slice listing it is rewritten.
                    let pod = rng.random_range(0..pods.len());
                    pods[pod] = random_pod(&mut rng);
                    for (name, (owner, members)) in &slice_defs {
                        if members.contains(&pod) {
                            let s = slice(&pods, *owner, *name, members);
                            slices.insert(*name, s.clone());
                            engine.apply_slice(s);
                        }
                    }
                }
                _ => {
                    let name = rng.random_range(0..12);
                    slices.remove(&name);
                    slice_defs.remove(&name);
                    engine.delete_slice(&format!("ns/slice-{name}"));
                }
            }
        }
        let delta = engine.take_delta();
        let report = incremental
            .applier
            .apply_delta(&delta, &engine.node_addresses())
            .unwrap();
        let services: Vec<Service> = services.values().cloned().collect();
        let slices: Vec<EndpointSlice> = slices.values().cloned().collect();
        let desired = desired_state(&services, &slices, &settings);
        assert_eq!(engine.desired(), desired, "seed {seed} step {step}");
        let full_report = full.applier.sync(&desired).unwrap();
        let (a, b) = (view(&incremental.pin_dir), view(&full.pin_dir));
        maglev_seen += a
            .iter()
            .filter(|(_, _, backends, _)| backends.iter().any(|b| b.contains("maglev=Some")))
            .count();
        assert!(
            a == b,
            "seed {seed} step {step}: only incremental {:?}\nonly full {:?}\n{delta:?}\n{report:?}\n{full_report:?}",
            a.difference(&b).collect::<Vec<_>>(),
            b.difference(&a).collect::<Vec<_>>()
        );
        assert_eq!(
            backend_entries(&incremental),
            backend_entries(&full),
            "seed {seed} step {step}"
        );
        // Conflicting claims to one address are reported by both.
        assert_eq!(
            report.errors.is_empty() && full_report.errors.is_empty(),
            full_report.errors.is_empty(),
            "seed {seed} step {step}: {:?} vs {:?}",
            report.errors,
            full_report.errors
        );
    }
    assert!(
        maglev_seen > 0,
        "seed {seed}: no Maglev service was ever programmed"
    );
}

#[test]
fn one_endpoint_change_in_a_thousand_endpoint_service_is_a_handful_of_operations() {
    let mut h = Harness::with_settings(&DatapathSettings {
        capacity: Capacity {
            backends: 4096,
            slots: 8192,
            ..Capacity::default()
        },
        ..DatapathSettings::default()
    })
    .unwrap();
    let mut engine = Engine::default();
    engine.apply_service(
        serde_yaml::from_str::<Service>(
            "metadata: {name: big, namespace: ns}\n\
             spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80, targetPort: 8080}]}",
        )
        .unwrap(),
    );
    // Ten slices of 100 endpoints, as the EndpointSlice controller cuts them.
    let slice = |n: u32, replaced: Option<u32>| -> EndpointSlice {
        let endpoints: Vec<String> = (0..100)
            .map(|j| {
                let i = n * 100 + j;
                let addr = if Some(i) == replaced {
                    Ipv4Addr::new(10, 200, 0, 1)
                } else {
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)
                };
                format!("{{addresses: [\"{addr}\"]}}")
            })
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: big-{n}, namespace: ns, labels: {{kubernetes.io/service-name: big}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]",
            endpoints.join(",")
        ))
        .unwrap()
    };
    for n in 0..10 {
        engine.apply_slice(slice(n, None));
    }
    let report = h
        .applier
        .apply_delta(&engine.take_delta(), &engine.node_addresses())
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        report.writes,
        1000 + 1000 + 1 + 1,
        "backends, slots, service, frontend"
    );

    // A pod rescheduled: one address out, another in, in one slice.
    engine.apply_slice(slice(5, Some(550)));
    let delta = engine.take_delta();
    assert_eq!(delta.upsert.len(), 1);
    let report = h
        .applier
        .apply_delta(&delta, &engine.node_addresses())
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // New backend, its slot, the old backend's removal: nothing else.
    assert_eq!((report.writes, report.deletes), (2, 1), "{report:?}");
    let programmed = read_services(&h.pin_dir).unwrap();
    let addrs: BTreeSet<Ipv4Addr> = programmed[0].backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs.len(), 1000);
    assert!(addrs.contains(&Ipv4Addr::new(10, 200, 0, 1)));
    assert!(
        !addrs.contains(&Ipv4Addr::new(10, 128, 2, 38)),
        "10.128.0.0 + 550 is gone"
    );
}
