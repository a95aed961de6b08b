//! Endpoint churn under load, shortened (the full length runs in `cargo xtask bench`): no
//! request fails, nothing leaks. See `lb_tests::soak`.

use std::time::Duration;

use lb_tests::soak::{run, Config};

#[test]
fn connections_survive_endpoint_churn_and_nothing_leaks() {
    let report = run(&Config {
        duration: Duration::from_secs(10),
        changes_per_second: 200,
        addresses_per_backend: 15,
        grace: Duration::from_millis(300),
        clients: 2,
    })
    .expect("soak");
    eprintln!("{report:?}");
    // Hundreds of changes per second (the generator is a debug build on a shared machine,
    // slower when other tests run beside it; the full rate runs in the bench).
    assert!(
        report.changes as f64 >= 0.5 * 200.0 * report.seconds,
        "the churn kept its rate: {report:?}"
    );
    assert!(
        report.most_backends_programmed > 6,
        "the churned endpoints were programmed, not only the base ones: {report:?}"
    );
    assert!(report.requests > 500, "the clients kept going: {report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.first_failures);
    // A request slower than the grace period can outlive its backend (reset by design); on a
    // shared machine a few may, but not a noticeable share.
    assert!(report.outlived_grace * 100 <= report.requests, "{report:?}");
    assert_eq!(
        report.backend_entries_after, report.endpoints_after,
        "no backend entry leaked"
    );
    assert_eq!(report.conntrack_after, 0, "no conntrack entry leaked");
    assert!(report.syncs > 10.0, "the agent followed: {report:?}");
}
