//! Maglev consistent hashing through the real program: a Service annotated
//! `lb.example.dev/lb-algorithm: maglev` places each new flow by its 5-tuple, the same way on
//! every node, and removing a backend moves (almost) only that backend's flows.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use lb_agent::{
    loader::DatapathSettings,
    manifest::{parse_into, Manifests},
    maps::read_services,
    model::{desired_state, Backend, DesiredState, Protocol, Settings, ANNOTATION_ALGORITHM},
};
use lb_common::{flow_hash, CtKey, PROTO_TCP};
use lb_tests::packet::{parse_checked, Flow, Harness, TCP_SYN, TC_ACT_OK};

const CLIENT: &str = "192.168.77.2";
const VIP: &str = "10.96.0.10";
const FLOWS: u16 = 4000;

fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, (i / 200) as u8 + 1, (i % 200) as u8 + 2)
}

/// A ClusterIP Service with the given algorithm annotation and these endpoints.
fn manifests(algorithm: &str, endpoints: &[usize], affinity: bool) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|&i| format!("- addresses: [{}]\n", backend_addr(i)))
        .collect();
    let affinity = if affinity {
        "  sessionAffinity: ClientIP\n"
    } else {
        ""
    };
    format!(
        "
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {{{ANNOTATION_ALGORITHM}: {algorithm}}}
spec:
  clusterIP: {VIP}
{affinity}  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"
    )
}

fn desired_from(text: &str) -> DesiredState {
    let mut m = Manifests::default();
    parse_into(Path::new("maglev.yaml"), text, &mut m);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    desired_state(&m.services, &m.endpoint_slices, &Settings::default())
}

fn desired(endpoints: &[usize]) -> DesiredState {
    let state = desired_from(&manifests("maglev", endpoints, false));
    assert!(state.errors.is_empty(), "{:?}", state.errors);
    assert!(state.services.values().all(|s| s.maglev));
    state
}

fn syn(sport: u16) -> Flow {
    Flow::tcp(CLIENT, sport, VIP, 80, TCP_SYN)
}

/// Sends a fresh SYN for each client port; returns the backend each was sent to.
fn place(h: &mut Harness, ports: impl Iterator<Item = u16>) -> BTreeMap<u16, Ipv4Addr> {
    ports
        .map(|port| {
            let verdict = h.run(&syn(port).build()).expect("test run");
            assert_eq!(verdict.action, TC_ACT_OK);
            let out = parse_checked(&verdict.packet).expect("valid packet");
            assert_eq!(out.dport, 8080);
            (port, out.dst)
        })
        .collect()
}

/// Forgets every flow, so the next SYNs are placed afresh (by the table, not by conntrack).
fn clear_conntrack(h: &Harness) {
    let mut ct = h.conntrack();
    let keys: Vec<CtKey> = ct.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = ct.remove(&key);
    }
}

fn harness(settings: &DatapathSettings) -> Harness {
    Harness::with_settings(settings).expect("load the program (run as root)")
}

/// Where the agent's own table says a client port's flow goes.
fn predicted(endpoints: &[usize], size: u32, sport: u16) -> Ipv4Addr {
    let backends: Vec<Backend> = endpoints
        .iter()
        .map(|&i| Backend {
            addr: backend_addr(i),
            port: 8080,
            protocol: Protocol::Tcp,
        })
        .collect();
    let table = lb_agent::maglev::table(&backends, size);
    let hash = flow_hash(
        CLIENT.parse::<Ipv4Addr>().unwrap().octets(),
        VIP.parse::<Ipv4Addr>().unwrap().octets(),
        sport,
        80,
        PROTO_TCP,
    );
    backends[table[(hash % size) as usize] as usize].addr
}

#[test]
fn flows_follow_the_agents_table_the_same_on_every_node() {
    let endpoints: Vec<usize> = (0..10).collect();
    let mut a = harness(&DatapathSettings::default());
    a.program(&desired(&endpoints)).unwrap();
    // Node b got there another way (other endpoints first, so other backend ids): the same
    // Service state must still place every flow the same.
    let mut b = harness(&DatapathSettings::default());
    b.program(&desired(&[20, 21, 22, 3, 7])).unwrap();
    b.program(&desired(&endpoints)).unwrap();
    let ports = || 20_000..20_000 + FLOWS;
    let on_a = place(&mut a, ports());
    let on_b = place(&mut b, ports());
    assert_eq!(on_a, on_b, "two nodes place each flow alike");
    let size = lb_common::MAGLEV_TABLE_SIZE;
    for (&port, &backend) in &on_a {
        assert_eq!(backend, predicted(&endpoints, size, port), "port {port}");
    }
    // Spread: each of the 10 backends near a tenth.
    let mut counts: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for backend in on_a.values() {
        *counts.entry(*backend).or_default() += 1;
    }
    assert_eq!(counts.len(), 10);
    for (backend, n) in counts {
        assert!((300..=500).contains(&n), "{backend}: {n} of {FLOWS}");
    }
    // What operators see: each backend's share of the table.
    assert_eq!(table_entries(&a), size);
}

/// The entries of the (only) Service's table, summed over its backends as operators see them.
fn table_entries(h: &Harness) -> u32 {
    read_services(&h.pin_dir).unwrap()[0]
        .backends
        .iter()
        .filter_map(|b| b.maglev_entries)
        .sum()
}

/// Removes one of `n` backends and counts the flows of the other backends that moved.
fn disruption(settings: &DatapathSettings, n: usize) -> (usize, usize) {
    let endpoints: Vec<usize> = (0..n).collect();
    let mut h = harness(settings);
    h.program(&desired(&endpoints)).unwrap();
    let ports = || 30_000..30_000 + FLOWS;
    let before = place(&mut h, ports());
    let gone = backend_addr(n / 2);
    let fewer: Vec<usize> = endpoints.iter().copied().filter(|&i| i != n / 2).collect();
    h.program(&desired(&fewer)).unwrap();
    clear_conntrack(&h);
    let after = place(&mut h, ports());
    let mut others = 0;
    let mut moved = 0;
    for (port, old) in &before {
        let new = after[port];
        if *old == gone {
            assert_ne!(new, gone, "a removed backend gets no new flow");
            continue;
        }
        others += 1;
        if new != *old {
            moved += 1;
        }
    }
    eprintln!(
        "maglev packet test: M={} N={n}: {moved} of {others} other flows moved",
        lb_agent::maglev::table_size(settings.maglev_table_size, n).1
    );
    (moved, others)
}

#[test]
fn removing_a_backend_moves_only_its_own_flows() {
    // The default size: 10 backends share one table of 16381 entries, 100 get one four times
    // larger (65521, the agent's table measures 0.56% there): under 1% both.
    for n in [10, 100] {
        let (moved, others) = disruption(&DatapathSettings::default(), n);
        assert!(
            moved * 100 < others,
            "N={n}: {moved} of {others} moved (1% allowed)"
        );
    }
    // A larger configured size (the flag).
    let settings = DatapathSettings {
        maglev_table_size: 65_521,
        ..DatapathSettings::default()
    };
    let (moved, others) = disruption(&settings, 10);
    assert!(
        moved * 100 < others,
        "{moved} of {others} moved (1% allowed)"
    );
}

#[test]
fn a_service_with_many_backends_gets_a_larger_table_and_back() {
    let mut h = harness(&DatapathSettings::default());
    let unit = lb_common::MAGLEV_TABLE_SIZE;
    let few: Vec<usize> = (0..10).collect();
    h.program(&desired(&few)).unwrap();
    assert_eq!(table_entries(&h), unit);
    // 100 backends: 65521 entries over four tables, flows placed by the agent's table of
    // that size, through the program.
    let many: Vec<usize> = (0..100).collect();
    let (units, size) = lb_agent::maglev::table_size(unit, many.len());
    assert_eq!((units, size), (4, 65_521));
    let report = h.applier.sync(&desired(&many)).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(table_entries(&h), size);
    clear_conntrack(&h);
    for (port, backend) in place(&mut h, 60_000..60_400) {
        assert_eq!(backend, predicted(&many, size, port), "port {port}");
    }
    // A restarted agent adopts the larger table as it is.
    let mut restarted = lb_agent::maps::Applier::open(&h.pin_dir).unwrap();
    let report = restarted.sync(&desired(&many)).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");
    // Back to 10: one table again, and the four are free for others.
    let report = restarted.sync(&desired(&few)).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(table_entries(&h), unit);
    clear_conntrack(&h);
    for (port, backend) in place(&mut h, 60_000..60_400) {
        assert_eq!(backend, predicted(&few, unit, port), "port {port}");
    }
}

#[test]
fn a_larger_table_that_does_not_fit_is_reported_and_random_is_used() {
    // Room for three tables: 100 backends need four in a row.
    let mut settings = DatapathSettings::default();
    settings.capacity.maglev_services = 3;
    let mut h = harness(&settings);
    let many: Vec<usize> = (0..100).collect();
    let report = h.applier.sync(&desired(&many)).unwrap();
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].contains("no 4 free Maglev table(s) in a row"),
        "{report:?}"
    );
    // Served all the same, at random.
    let placed = place(&mut h, 61_000..61_100);
    assert!(placed
        .values()
        .all(|b| many.iter().any(|&i| backend_addr(i) == *b)));
    // With fewer backends it fits again.
    let report = h.applier.sync(&desired(&many[..20])).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
}

#[test]
fn affinity_keeps_precedence_over_maglev() {
    let mut h = harness(&DatapathSettings::default());
    let state = desired_from(&manifests("maglev", &[0, 1, 2, 3, 4], true));
    assert!(state.errors.is_empty(), "{:?}", state.errors);
    h.program(&state).unwrap();
    // Every connection of the client goes where its first one went, whatever its port.
    let placed = place(&mut h, 40_000..40_050);
    let first = placed[&40_000];
    assert!(placed.values().all(|b| *b == first), "{placed:?}");
    // Its backend leaves: the client is placed anew and sticks there.
    let left: Vec<usize> = (0..5).filter(|&i| backend_addr(i) != first).collect();
    h.program(&desired_from(&manifests("maglev", &left, true)))
        .unwrap();
    clear_conntrack(&h);
    let placed = place(&mut h, 41_000..41_020);
    let second = placed[&41_000];
    assert_ne!(second, first);
    assert!(placed.values().all(|b| *b == second), "{placed:?}");
}

#[test]
fn switching_the_algorithm_back_and_forth_frees_and_reuses_tables() {
    let endpoints: Vec<usize> = (0..4).collect();
    let mut h = harness(&DatapathSettings::default());
    h.program(&desired(&endpoints)).unwrap();
    let maglev = place(&mut h, 50_000..50_200);
    let random = desired_from(&manifests("random", &endpoints, false));
    assert!(random.services.values().all(|s| !s.maglev));
    h.program(&random).unwrap();
    clear_conntrack(&h);
    let spread = place(&mut h, 50_000..50_200);
    assert_ne!(maglev, spread, "random placement is not the table's");
    h.program(&desired(&endpoints)).unwrap();
    clear_conntrack(&h);
    assert_eq!(
        place(&mut h, 50_000..50_200),
        maglev,
        "the same table again"
    );
}

#[test]
fn an_unknown_algorithm_is_reported_and_random_is_used() {
    let state = desired_from(&manifests("ring-hash", &[0, 1], false));
    assert_eq!(state.errors.len(), 1, "{:?}", state.errors);
    let error = &state.errors[0];
    assert_eq!(
        error.field,
        format!("metadata.annotations[{ANNOTATION_ALGORITHM}]")
    );
    assert!(error.message.contains("ring-hash"), "{}", error.message);
    assert!(state.services.values().all(|s| !s.maglev));
}

#[test]
fn tables_are_written_by_difference_and_adopted_after_a_restart() {
    let endpoints: Vec<usize> = (0..10).collect();
    let mut h = harness(&DatapathSettings::default());
    let size = lb_common::MAGLEV_TABLE_SIZE as usize;
    let first = h.applier.sync(&desired(&endpoints)).unwrap();
    assert!(first.writes > size, "the whole table: {first:?}");
    // One backend leaves: its entries (about a tenth) and the few that Maglev shifts.
    let fewer: Vec<usize> = (1..10).collect();
    let report = h.applier.sync(&desired(&fewer)).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(
        report.writes < size / 10 + size / 50,
        "{} writes for one backend of 10",
        report.writes
    );
    // A restarted agent adopts the tables: the same state writes nothing.
    let mut restarted = lb_agent::maps::Applier::open(&h.pin_dir).unwrap();
    let report = restarted.sync(&desired(&fewer)).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");
}

#[test]
fn a_new_table_size_rebuilds_the_tables_instead_of_misreading_them() {
    let endpoints: Vec<usize> = (0..5).collect();
    let mut h = harness(&DatapathSettings::default());
    h.program(&desired(&endpoints)).unwrap();
    // An agent restarted with another size, on the same pins.
    let settings = DatapathSettings {
        maglev_table_size: 65_521,
        ..DatapathSettings::default()
    };
    let _restarted = lb_agent::loader::load(&h.pin_dir, &settings).unwrap();
    let mut applier = lb_agent::maps::Applier::open(&h.pin_dir).unwrap();
    let report = applier.sync(&desired(&endpoints)).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.writes >= 65_521, "the whole new table: {report:?}");
    assert_eq!(table_entries(&h), 65_521);
    // A size that is not prime is refused.
    let bad = DatapathSettings {
        maglev_table_size: 65_536,
        ..DatapathSettings::default()
    };
    assert!(lb_agent::loader::load(&h.pin_dir, &bad).is_err());
}
