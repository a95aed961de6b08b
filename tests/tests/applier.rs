//! The applier against real pinned maps: partial failures and conflicts leave every other
//! Service as it should be.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use lb_agent::{
    loader::{Capacity, DatapathSettings},
    manifest::{parse_into, Manifests},
    maps::read_services,
    model::{desired_state, DesiredState, Protocol, Settings},
};
use lb_tests::{cluster_ip_service, packet::Harness};

fn backends_of(pin_dir: &Path, name: &str) -> Vec<Ipv4Addr> {
    read_services(pin_dir)
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.backends.iter().map(|b| b.addr).collect())
        .unwrap_or_default()
}

#[test]
fn a_service_that_does_not_fit_keeps_what_it_had_and_others_are_programmed() {
    // Backend ids 1..=3 only.
    let mut h = Harness::with_settings(&DatapathSettings {
        capacity: Capacity {
            backends: 4,
            ..Capacity::default()
        },
        ..DatapathSettings::default()
    })
    .unwrap();
    let before = DesiredState {
        services: BTreeMap::from([(
            "ns/a:80/TCP".to_string(),
            cluster_ip_service(
                "10.96.0.1",
                80,
                8080,
                Protocol::Tcp,
                &["10.0.1.1", "10.0.1.2"],
            ),
        )]),
        ..Default::default()
    };
    h.program(&before).unwrap();

    let after = DesiredState {
        services: BTreeMap::from([
            (
                "ns/a:80/TCP".to_string(),
                cluster_ip_service(
                    "10.96.0.1",
                    80,
                    8080,
                    Protocol::Tcp,
                    &["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5"],
                ),
            ),
            (
                "ns/b:80/TCP".to_string(),
                cluster_ip_service("10.96.0.2", 80, 8080, Protocol::Tcp, &["10.0.0.1"]),
            ),
        ]),
        ..Default::default()
    };
    let report = h.applier.sync(&after).unwrap();
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.starts_with("service ns/a:80/TCP") && e.contains("--max-backends")),
        "{:?}",
        report.errors
    );
    assert!(
        !report.errors.iter().any(|e| e.contains("ns/b")),
        "{:?}",
        report.errors
    );
    let a = backends_of(&h.pin_dir, "ns/a:80/TCP");
    assert_eq!(
        a,
        vec![Ipv4Addr::new(10, 0, 1, 1), Ipv4Addr::new(10, 0, 1, 2)],
        "a unchanged"
    );
    assert_eq!(
        backends_of(&h.pin_dir, "ns/b:80/TCP"),
        vec![Ipv4Addr::new(10, 0, 0, 1)]
    );
    let frontends: Vec<String> = read_services(&h.pin_dir)
        .unwrap()
        .iter()
        .flat_map(|s| s.frontends.iter().map(|f| f.addr.to_string()))
        .collect();
    assert!(
        frontends.contains(&"10.96.0.1".to_string()),
        "a keeps its frontend: {frontends:?}"
    );

    // Once b goes, a fits: b's backend id is freed at the end of that sync (make before
    // break), so a is programmed in full by the retry the agent makes at its next poll.
    let later = DesiredState {
        services: BTreeMap::from([(
            "ns/a:80/TCP".to_string(),
            cluster_ip_service(
                "10.96.0.1",
                80,
                8080,
                Protocol::Tcp,
                &["10.0.1.1", "10.0.1.2", "10.0.1.3"],
            ),
        )]),
        ..Default::default()
    };
    let first = h.applier.sync(&later).unwrap();
    assert_eq!(
        backends_of(&h.pin_dir, "ns/a:80/TCP").len(),
        2,
        "{:?}",
        first.errors
    );
    let retry = h.applier.sync(&later).unwrap();
    assert!(retry.errors.is_empty(), "{:?}", retry.errors);
    assert_eq!(backends_of(&h.pin_dir, "ns/a:80/TCP").len(), 3);
    assert!(backends_of(&h.pin_dir, "ns/b:80/TCP").is_empty());
}

#[test]
fn a_frontend_claimed_twice_keeps_its_first_owners_source_ranges_only() {
    let yaml = "apiVersion: v1
kind: Service
metadata: {name: a}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{port: 443}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.4}]}}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.2
  loadBalancerSourceRanges: [0.0.0.0/0]
  ports: [{port: 443}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.4}]}}
";
    let mut m = Manifests::default();
    parse_into(Path::new("t.yaml"), yaml, &mut m);
    let state = desired_state(&m.services, &m.endpoint_slices, &Settings::default());
    let mut h = Harness::new().unwrap();
    let report = h.applier.sync(&state).unwrap();
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("already used by default/a")),
        "{:?}",
        report.errors
    );
    let services = read_services(&h.pin_dir).unwrap();
    let a = services
        .iter()
        .find(|s| s.name == "default/a:443/TCP")
        .unwrap();
    assert_eq!(
        a.source_ranges,
        vec!["10.0.0.0/8".to_string()],
        "b's 0.0.0.0/0 did not leak"
    );
    assert!(a
        .frontends
        .iter()
        .any(|f| f.addr.to_string() == "203.0.113.4"));
}

#[test]
fn one_endpoint_change_in_a_thousand_endpoint_service_costs_a_handful_of_map_operations() {
    let mut h = Harness::with_settings(&DatapathSettings {
        capacity: Capacity {
            backends: 4096,
            slots: 8192,
            ..Capacity::default()
        },
        ..DatapathSettings::default()
    })
    .unwrap();
    let addrs: Vec<String> = (0..1000u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i).to_string())
        .collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let state = |backends: &[&str]| DesiredState {
        services: BTreeMap::from([(
            "ns/big:80/TCP".to_string(),
            cluster_ip_service("10.96.0.9", 80, 8080, Protocol::Tcp, backends),
        )]),
        ..Default::default()
    };
    let report = h.applier.sync(&state(&refs)).unwrap();
    assert_eq!(
        report.writes,
        1000 + 1000 + 1 + 1,
        "backends, slots, service, frontend"
    );

    // A pod rescheduled: one address out, another in.
    let mut changed = refs.clone();
    changed[500] = "10.200.0.1";
    let report = h.applier.sync(&state(&changed)).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // New backend, its slot, the old backend's removal: nothing else.
    assert_eq!((report.writes, report.deletes), (2, 1), "{report:?}");

    // Scale down by one: the tail moves into the hole, the count drops, the tail slot and the
    // backend go.
    let report = h.applier.sync(&state(&changed[..999])).unwrap();
    assert!(report.writes + report.deletes <= 4, "{report:?}");
    assert_eq!(backends_of(&h.pin_dir, "ns/big:80/TCP").len(), 999);
}

fn small_harness(services: u32, slots: u32) -> Harness {
    Harness::with_settings(&DatapathSettings {
        capacity: Capacity {
            services,
            slots,
            ..Capacity::default()
        },
        ..DatapathSettings::default()
    })
    .unwrap()
}

fn one(name: &str, vip: &str, backends: &[&str]) -> (String, lb_agent::model::DesiredService) {
    (
        name.to_string(),
        cluster_ip_service(vip, 80, 8080, Protocol::Tcp, backends),
    )
}

#[test]
fn a_new_service_that_fails_leaks_no_id_and_leaves_no_slots() {
    // Service ids 1..=2 only; three slots in all.
    let mut h = small_harness(3, 3);
    let a = one("ns/a:80/TCP", "10.96.0.1", &["10.0.1.1", "10.0.1.2"]);
    let b = one("ns/b:80/TCP", "10.96.0.2", &["10.0.2.1", "10.0.2.2"]);
    let both = DesiredState {
        services: BTreeMap::from([a.clone(), b.clone()]),
        ..Default::default()
    };
    for _ in 0..3 {
        let report = h.applier.sync(&both).unwrap();
        assert_eq!(
            report.errors.len(),
            1,
            "b does not fit: {:?}",
            report.errors
        );
        assert!(report.errors[0].contains("ns/b"), "{:?}", report.errors);
    }
    // a shrinks: now b fits, and still finds a free id after its failed attempts.
    let shrunk = DesiredState {
        services: BTreeMap::from([one("ns/a:80/TCP", "10.96.0.1", &["10.0.1.1"]), b]),
        ..Default::default()
    };
    let first = h.applier.sync(&shrunk).unwrap();
    let report = if first.errors.is_empty() {
        first
    } else {
        h.applier.sync(&shrunk).unwrap()
    };
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(backends_of(&h.pin_dir, "ns/b:80/TCP").len(), 2);
}

#[test]
fn a_half_written_service_is_recorded_as_written_and_repaired_later() {
    let mut h = small_harness(16, 3);
    let abc = DesiredState {
        services: BTreeMap::from([one(
            "ns/a:80/TCP",
            "10.96.0.1",
            &["10.0.1.1", "10.0.1.2", "10.0.1.3"],
        )]),
        ..Default::default()
    };
    h.applier.sync(&abc).unwrap();
    // 10.0.1.2 replaced by 10.0.1.4 and 10.0.1.5 added: four slots do not fit in the map. The
    // service keeps serving, with what its slots really hold.
    let grown = DesiredState {
        services: BTreeMap::from([one(
            "ns/a:80/TCP",
            "10.96.0.1",
            &["10.0.1.1", "10.0.1.3", "10.0.1.4", "10.0.1.5"],
        )]),
        ..Default::default()
    };
    let report = h.applier.sync(&grown).unwrap();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let visible = backends_of(&h.pin_dir, "ns/a:80/TCP");
    assert_eq!(visible.len(), 3, "the count never rose: {visible:?}");
    // Back to the first set: nothing was half written, so it is served as before.
    let report = h.applier.sync(&abc).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let mut visible = backends_of(&h.pin_dir, "ns/a:80/TCP");
    visible.sort();
    assert_eq!(
        visible,
        ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
            .map(|a| a.parse::<Ipv4Addr>().unwrap())
            .to_vec()
    );
}

#[test]
fn a_service_too_big_for_the_backend_map_is_refused_whole_and_starves_no_other() {
    // Backend ids 1..=3 only.
    let mut h = Harness::with_settings(&DatapathSettings {
        capacity: Capacity {
            backends: 4,
            ..Capacity::default()
        },
        ..DatapathSettings::default()
    })
    .unwrap();
    // The big one's addresses sort first: handing out ids address by address would give it
    // the three ids and leave both Services without a complete set.
    let state = DesiredState {
        services: BTreeMap::from([
            one(
                "ns/a-big:80/TCP",
                "10.96.0.1",
                &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"],
            ),
            one("ns/b-small:80/TCP", "10.96.0.2", &["10.9.0.1"]),
        ]),
        ..Default::default()
    };
    let report = h.applier.sync(&state).unwrap();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(
        report.errors[0].contains("ns/a-big") && report.errors[0].contains("--max-backends"),
        "{:?}",
        report.errors
    );
    assert_eq!(
        backends_of(&h.pin_dir, "ns/b-small:80/TCP"),
        [Ipv4Addr::new(10, 9, 0, 1)]
    );
    assert!(
        backends_of(&h.pin_dir, "ns/a-big:80/TCP").is_empty(),
        "never half programmed"
    );
    assert!(
        !read_services(&h.pin_dir)
            .unwrap()
            .iter()
            .any(|s| s.name == "ns/a-big:80/TCP"),
        "no entry, no frontend"
    );
    // No id is held for the refused one: the map has the small one's backend only.
    assert_eq!(report.backends, 1);
}

/// `LB_SLOTS` as the kernel holds it: (backend id, owning service id) by index.
fn slot_entries(pin_dir: &Path) -> Vec<(u32, u32)> {
    let map = lb_tests::packet::pinned_array::<lb_common::SlotValue>(
        pin_dir,
        lb_common::map_names::SLOTS,
    );
    map.iter()
        .map(|entry| entry.map(|e| (e.backend_id, e.service_id)).unwrap())
        .collect()
}

fn addresses(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}.{i}")).collect()
}

fn refs(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

fn two(a: &[String], b: &[String]) -> DesiredState {
    services(&[
        ("ns/a:80/TCP", "10.96.0.1", a),
        ("ns/b:80/TCP", "10.96.0.2", b),
    ])
}

#[test]
fn a_service_outgrowing_its_run_moves_whole_and_its_old_run_is_cleared_one_sync_later() {
    let mut h = small_harness(16, 64);
    let (a2, a5, b2) = (
        addresses("10.0.1", 2),
        addresses("10.0.1", 5),
        addresses("10.0.2", 2),
    );
    h.applier.sync(&two(&a2, &b2)).unwrap();
    let before = slot_entries(&h.pin_dir);
    let a_id = before[0].1;
    assert!(a_id != 0 && before[2].1 != a_id, "a, then b: {before:?}");

    // b's run follows a's: a cannot grow in place, so all five slots go to a new run.
    let report = h.applier.sync(&two(&a5, &b2)).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(backends_of(&h.pin_dir, "ns/a:80/TCP").len(), 5);
    let after = slot_entries(&h.pin_dir);
    let a_slots = after.iter().filter(|e| e.1 == a_id).count();
    assert_eq!(
        a_slots,
        2 + 5,
        "the old run still holds a's slots: {after:?}"
    );
    assert_eq!(after[2..4], before[2..4], "b untouched");

    // The next sync (nothing changed) clears the old run, and only that.
    let report = h.applier.sync(&two(&a5, &b2)).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 2), "{report:?}");
    let settled = slot_entries(&h.pin_dir);
    assert_eq!(settled[..2], [(0, 0), (0, 0)]);
    assert_eq!(settled.iter().filter(|e| e.1 == a_id).count(), 5);

    // b grows too (a's new run follows its own, so it moves), then a new service c takes the
    // hole the two left at the start of the map (best fit).
    let report = h.applier.sync(&two(&a5, &addresses("10.0.2", 3))).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let mut c = two(&a5, &addresses("10.0.2", 3));
    c.services
        .extend([one("ns/c:80/TCP", "10.96.0.3", &["10.0.3.1", "10.0.3.2"])]);
    h.applier.sync(&c).unwrap();
    let c_entries = slot_entries(&h.pin_dir);
    let c_id = c_entries[0].1;
    assert!(
        c_id != 0 && c_id != a_id,
        "c in the hole a left: {c_entries:?}"
    );
    assert_eq!(backends_of(&h.pin_dir, "ns/c:80/TCP").len(), 2);
    assert_eq!(backends_of(&h.pin_dir, "ns/b:80/TCP").len(), 3);
}

#[test]
fn a_shrunken_service_gives_back_its_room_and_a_restarted_applier_adopts_the_runs() {
    let mut h = small_harness(16, 32);
    let (a20, a2, b4) = (
        addresses("10.0.1", 20),
        addresses("10.0.1", 2),
        addresses("10.0.2", 4),
    );
    h.applier.sync(&two(&a20, &b4)).unwrap();
    // 20 backends hold 25 entries, b 5: 30 of 32. a drops to 2 and keeps 2 entries.
    h.applier.sync(&two(&a2, &b4)).unwrap();
    h.applier.sync(&two(&a2, &b4)).unwrap();
    let grown = addresses("10.0.2", 20);
    let report = h.applier.sync(&two(&a2, &grown)).unwrap();
    assert!(
        report.errors.is_empty(),
        "b finds 20 entries in a row only because a gave its room back: {:?}",
        report.errors
    );

    // A new applier on the same maps adopts every run: the same state costs no write, and a
    // change still writes only what changed.
    let mut again = lb_agent::maps::Applier::open(&h.pin_dir).unwrap();
    let report = again.sync(&two(&a2, &grown)).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");
    let report = again.sync(&two(&addresses("10.0.1", 3), &grown)).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(backends_of(&h.pin_dir, "ns/a:80/TCP").len(), 3);
    assert_eq!(backends_of(&h.pin_dir, "ns/b:80/TCP").len(), 20);
}

fn services(list: &[(&str, &str, &[String])]) -> DesiredState {
    DesiredState {
        services: list
            .iter()
            .map(|(name, vip, backends)| one(name, vip, &refs(backends)))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn a_reopened_applier_clears_released_slots_and_gives_runs_their_room_back() {
    // A periodic resync reopens the maps: what the previous applier had released must not stay
    // tagged with an id a new service may get, and adopted runs must still grow in place.
    let mut h = small_harness(16, 64);
    let (a8, a9, b2, c2, d2) = (
        addresses("10.0.1", 8),
        addresses("10.0.1", 9),
        addresses("10.0.2", 2),
        addresses("10.0.3", 2),
        addresses("10.0.4", 2),
    );
    let a = ("ns/a:80/TCP", "10.96.0.1");
    let b = ("ns/b:80/TCP", "10.96.0.2");
    let c = ("ns/c:80/TCP", "10.96.0.3");
    let d = ("ns/d:80/TCP", "10.96.0.4");
    // a holds 10 entries (8 and room), b 2, d 2, in that order.
    h.applier
        .sync(&services(&[
            (a.0, a.1, &a8),
            (b.0, b.1, &b2),
            (d.0, d.1, &d2),
        ]))
        .unwrap();
    let d_id = slot_entries(&h.pin_dir)[12].1;
    assert_ne!(d_id, 0);
    // d leaves: its run is released, still tagged until the next sync clears it.
    h.applier
        .sync(&services(&[(a.0, a.1, &a8), (b.0, b.1, &b2)]))
        .unwrap();
    assert_eq!(slot_entries(&h.pin_dir)[12].1, d_id);

    let mut again = lb_agent::maps::Applier::open(&h.pin_dir).unwrap();
    assert_eq!(
        slot_entries(&h.pin_dir)[12..14],
        [(0, 0), (0, 0)],
        "cleared when the maps are reopened"
    );
    // c (2 entries) would fit exactly in the 2 entries after a's 8 if a had lost its room.
    let with_c =
        |a_list: &[String]| services(&[(a.0, a.1, a_list), (b.0, b.1, &b2), (c.0, c.1, &c2)]);
    let report = again.sync(&with_c(&a8)).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let report = again.sync(&with_c(&a9)).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        report.writes, 3,
        "a grows in place (new backend, its slot, the entry): {report:?}"
    );
    assert_eq!(backends_of(&h.pin_dir, "ns/a:80/TCP").len(), 9);
}

#[test]
fn new_services_written_together_are_undone_one_by_one_when_a_map_fills_midway() {
    // Service ids 1..=4 and twelve slots: just enough for the four below, so an id or a run
    // the failed attempt kept would make the second one fail. LB_SERVICE_NAMES holds five,
    // three of which a stranger holds: the batch of new services' names stops after two.
    let mut h = small_harness(5, 12);
    let mut maps = lb_agent::maps::Maps::open(&h.pin_dir).unwrap();
    let strangers: Vec<u32> = (1_000_000..1_000_003).collect();
    for &key in &strangers {
        maps.service_names
            .insert(key, lb_common::ServiceName::default(), 0)
            .unwrap();
    }
    let desired = services(&[
        ("ns/a:80/TCP", "10.96.0.1", &addresses("10.0.1", 3)),
        ("ns/b:80/TCP", "10.96.0.2", &addresses("10.0.2", 2)),
        ("ns/c:80/TCP", "10.96.0.3", &addresses("10.0.3", 4)),
        ("ns/d:80/TCP", "10.96.0.4", &addresses("10.0.4", 1)),
    ]);
    let report = h.applier.sync(&desired).unwrap();
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    for (error, name) in report.errors.iter().zip(["ns/c", "ns/d"]) {
        assert!(
            error.starts_with(&format!("service {name}:")) && error.contains("service name"),
            "{error}"
        );
    }
    assert_eq!(report.frontends, 2, "the refused ones have no frontend");
    for key in &strangers {
        maps.service_names.remove(key).unwrap();
    }
    let shown: Vec<String> = read_services(&h.pin_dir)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(shown, ["ns/a:80/TCP", "ns/b:80/TCP"], "nothing of c or d");

    // Room again: the refused ones are programmed on the next sync, on ids and runs the
    // first attempt gave back, each with exactly its own backends.
    let report = h.applier.sync(&desired).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for (name, prefix, n) in [
        ("ns/a:80/TCP", "10.0.1", 3),
        ("ns/b:80/TCP", "10.0.2", 2),
        ("ns/c:80/TCP", "10.0.3", 4),
        ("ns/d:80/TCP", "10.0.4", 1),
    ] {
        let mut got = backends_of(&h.pin_dir, name);
        got.sort();
        let want: Vec<Ipv4Addr> = addresses(prefix, n)
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn a_slot_naming_a_backend_id_outside_the_map_is_rewritten_on_open_not_trusted() {
    // Another writer (or a corrupt map) left a slot naming a backend id LB_BACKENDS cannot
    // hold: the reopened applier must neither size its tables by it nor serve it.
    let mut h = small_harness(16, 64);
    let desired = services(&[("ns/a:80/TCP", "10.96.0.1", &addresses("10.0.1", 3))]);
    h.applier.sync(&desired).unwrap();
    let (index, service_id) = slot_entries(&h.pin_dir)
        .iter()
        .enumerate()
        .find(|(_, (_, service))| *service != 0)
        .map(|(i, &(_, service))| (i as u32, service))
        .unwrap();
    let mut slots = lb_tests::packet::pinned_array::<lb_common::SlotValue>(
        &h.pin_dir,
        lb_common::map_names::SLOTS,
    );
    slots
        .set(
            index,
            lb_common::SlotValue {
                backend_id: u32::MAX,
                service_id,
            },
            0,
        )
        .unwrap();

    let mut again = lb_agent::maps::Applier::open(&h.pin_dir).unwrap();
    // The run is not adopted: like any entry outside a run, its slots are cleared at once.
    assert_eq!(slot_entries(&h.pin_dir)[index as usize], (0, 0));
    let report = again.sync(&desired).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let mut got = backends_of(&h.pin_dir, "ns/a:80/TCP");
    got.sort();
    let want: Vec<Ipv4Addr> = addresses("10.0.1", 3)
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(got, want);
}
