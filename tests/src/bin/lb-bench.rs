//! `cargo xtask bench`: per-packet cost of the tc program through BPF_PROG_TEST_RUN, with a
//! pass-through program measured in the same run as the floor.
//!
//! Every call passes a fresh copy of its packet with repeat = 1, and the kernel's own timing of
//! that one run is taken. (With repeat > 1 the kernel re-runs the program on the packet the
//! previous run rewrote, so after the first DNAT it would measure a miss, not a translation.)
//! Floor, established flow and new flow alternate in blocks so that noise from the shared
//! machine lands on all three alike.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use lb_agent::{
    loader::{Capacity, DatapathSettings, PASSTHROUGH, PROGRAM},
    model::{Backend, DesiredService, DesiredState, Frontend, FrontendKind, Protocol},
};
use lb_tests::packet::{Flow, Harness, TCP_ACK, TCP_SYN, TC_ACT_OK, TC_ACT_UNSPEC};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Parser)]
#[command(name = "lb-bench")]
struct Cli {
    /// Smoke run: fewer service counts and calls (what `cargo xtask test` runs).
    #[arg(long)]
    quick: bool,
    /// Markdown file whose datapath section is replaced with the results.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Only these service counts (for experiments); default 10, 1,000, 10,000, 100,000.
    #[arg(long, value_delimiter = ',')]
    services: Vec<u32>,
    /// (internal) Run one control-plane measurement in this fresh process, print it as a
    /// table row.
    #[arg(long, hide = true)]
    control_plane_child: Option<u32>,
}

const START: &str = "<!-- datapath-bench:start -->";
const END: &str = "<!-- datapath-bench:end -->";
const BACKEND_POOL: u32 = 1000;

struct Row {
    services: u32,
    program_time: Duration,
    floor: Stats,
    established: Stats,
    /// New flows to the same working set of Services the established flows use.
    new_flow: Stats,
    /// New flows to any of the N Services, measured in a phase of its own.
    new_flow_any: Stats,
}

#[derive(Clone, Copy)]
struct Stats {
    median: f64,
    p90: f64,
}

fn stats(mut samples: Vec<u64>) -> Stats {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize] as f64;
    Stats {
        median: at(0.5),
        p90: at(0.9),
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn desired(services: u32) -> DesiredState {
    let backend = |j: u32| Backend {
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + j),
        port: 8080,
        protocol: Protocol::Tcp,
    };
    let services = (0..services)
        .map(|i| {
            let service = DesiredService {
                frontends: [Frontend {
                    addr: vip(i),
                    port: 80,
                    protocol: Protocol::Tcp,
                    kind: FrontendKind::ClusterIP,
                }]
                .into(),
                backends: [backend(i % BACKEND_POOL), backend((i + 1) % BACKEND_POOL)].into(),
                ..DesiredService::default()
            };
            (format!("bench/svc-{i}:80/TCP"), service)
        })
        .collect::<BTreeMap<_, _>>();
    DesiredState {
        services,
        ..Default::default()
    }
}

fn client(n: u32) -> String {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + n).to_string()
}

/// The main phase's traffic goes to this many Services picked at random among the N, whatever
/// N is (10, the smallest N: every Service then), so that from one row to the next the only
/// thing that changes is how many Services are loaded. The second phase spreads new flows
/// over all N, which shows what a cache the maps outgrow costs.
const WORKING_SET: usize = 10;
/// Established flows of the main phase, spread over the working set.
const FLOWS: usize = 256;

fn measure(services: u32, calls: u32) -> anyhow::Result<Row> {
    let settings = DatapathSettings {
        capacity: Capacity {
            frontends: services.max(1024),
            services: services + 1024,
            slots: 2 * services + 1024,
            // Two entries per new flow, two phases of new flows, and room to spare so that
            // the LRU never evicts while timing.
            conntrack: 8 * calls + 4096,
            ..Capacity::default()
        },
        ..DatapathSettings::default()
    };
    let mut h = Harness::with_settings(&settings)?;
    let started = Instant::now();
    h.program(&desired(services))?;
    let program_time = started.elapsed();
    let mut rng = StdRng::seed_from_u64(u64::from(services));

    // The working set: distinct Services picked at random among the N.
    let mut working_set: Vec<u32> = Vec::new();
    while working_set.len() < WORKING_SET.min(services as usize) {
        let service = rng.random_range(0..services);
        if !working_set.contains(&service) {
            working_set.push(service);
        }
    }
    // Established flows over the working set, each sent once beforehand so that conntrack
    // knows it.
    let established: Vec<Vec<u8>> = (0..FLOWS)
        .map(|n| {
            let service = working_set[n % working_set.len()];
            Flow::tcp(
                &client(n as u32),
                40000,
                &vip(service).to_string(),
                80,
                TCP_ACK,
            )
            .build()
        })
        .collect();
    for frame in &established {
        let (verdict, _) = h.run_program(PROGRAM, frame)?;
        anyhow::ensure!(verdict.action == TC_ACT_OK, "warm-up packet not translated");
    }

    let mut next_flow = 0u32;
    let mut new_flow = |h: &mut Harness, service: u32| -> anyhow::Result<u64> {
        let n = next_flow;
        next_flow += 1;
        let syn = Flow::tcp(
            &client(1000 + n),
            10000 + (n % 50000) as u16,
            &vip(service).to_string(),
            80,
            TCP_SYN,
        );
        let (verdict, took) = h.run_program(PROGRAM, &syn.build())?;
        anyhow::ensure!(verdict.action == TC_ACT_OK, "new flow not translated");
        Ok(took.as_nanos() as u64)
    };
    let mut floor = Vec::new();
    let mut hit = Vec::new();
    let mut fresh = Vec::new();
    // Blocks of BLOCK calls of each kind, alternated (floor, established, new, floor, ...):
    // machine noise lands on all three alike, yet one kind's cache footprint does not bleed
    // into every single call of the others.
    const BLOCK: u32 = 250;
    for block in 0..calls.div_ceil(BLOCK) {
        for i in 0..BLOCK {
            let frame = &established[((block * BLOCK + i) as usize) % established.len()];
            let (verdict, took) = h.run_program(PASSTHROUGH, frame)?;
            anyhow::ensure!(verdict.action == TC_ACT_UNSPEC);
            floor.push(took.as_nanos() as u64);
        }
        for i in 0..BLOCK {
            let frame = &established[((block * BLOCK + i) as usize) % established.len()];
            let (verdict, took) = h.run_program(PROGRAM, frame)?;
            anyhow::ensure!(
                verdict.action == TC_ACT_OK,
                "established packet not translated"
            );
            hit.push(took.as_nanos() as u64);
        }
        for _ in 0..BLOCK {
            let service = working_set[rng.random_range(0..working_set.len())];
            fresh.push(new_flow(&mut h, service)?);
        }
    }
    // Second phase, after the first so that its walk over every map does not evict the first
    // phase's working set: new flows to any of the N Services. This one shows what a cache
    // that the maps outgrow costs.
    let mut any = Vec::new();
    for _ in 0..calls {
        let service = rng.random_range(0..services);
        any.push(new_flow(&mut h, service)?);
    }
    Ok(Row {
        services,
        program_time,
        floor: stats(floor),
        established: stats(hit),
        new_flow: stats(fresh),
        new_flow_any: stats(any),
    })
}

fn table(rows: &[Row], calls: u32) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Per-packet cost of `lb_ingress` (BPF_PROG_TEST_RUN, repeat 1, kernel-timed, {calls} calls \
         per cell, median / p90 in ns). *Floor* is `lb_passthrough`, an empty tc program run the \
         same way; *over floor* is the median minus the floor's median. Established ({FLOWS} flows) \
         and new flows go to the same {WORKING_SET} Services picked at random among the N, so \
         that only the number of Services loaded changes from row to row; *new flow, any \
         Service* picks among all N for every packet (a phase of its own, after the others).\n\n"
    ));
    out.push_str("| services | floor | established flow | over floor | new flow | over floor | new flow, any Service | over floor | programming all services |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} ms |\n",
            r.services,
            r.floor.median,
            r.floor.p90,
            r.established.median,
            r.established.p90,
            r.established.median - r.floor.median,
            r.new_flow.median,
            r.new_flow.p90,
            r.new_flow.median - r.floor.median,
            r.new_flow_any.median,
            r.new_flow_any.p90,
            r.new_flow_any.median - r.floor.median,
            r.program_time.as_secs_f64() * 1000.0,
        ));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let growth = |a: f64, b: f64| (b / a - 1.0) * 100.0;
        out.push_str(&format!(
            "\nFrom {} to {} services (median): established flow {:+.1}%, new flow {:+.1}%, \
             new flow to any Service {:+.1}%.\n",
            first.services,
            last.services,
            growth(first.established.median, last.established.median),
            growth(first.new_flow.median, last.new_flow.median),
            growth(first.new_flow_any.median, last.new_flow_any.median),
        ));
    }
    out
}

/// The agent's conntrack garbage collector reads the whole table every pass: key by key (two
/// system calls per entry, as before) against batched reads, alternated, on a table of
/// `entries` (with an eighth to spare, so that the LRU map never evicts while it is filled).
fn conntrack_walk(entries: u32) -> anyhow::Result<String> {
    let settings = DatapathSettings {
        capacity: Capacity {
            conntrack: entries + entries / 8,
            ..Capacity::default()
        },
        ..DatapathSettings::default()
    };
    let h = Harness::with_settings(&settings)?;
    // Half expired, so the walk has something to find.
    h.fill_conntrack(entries, 2)?;
    let ct = h.conntrack();
    let (mut key_by_key, mut batched) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let started = Instant::now();
        let a = lb_agent::maps::count_expired_key_by_key(&ct);
        key_by_key.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let b = lb_agent::maps::count_expired_batched(&ct)?;
        batched.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(a == b, "both walks see the same table: {a:?} vs {b:?}");
        // Only a walk over all of it counts: LRU eviction must not have shrunk the table.
        anyhow::ensure!(a.0 == entries as usize, "{a:?}");
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(key_by_key), median(batched));
    Ok(format!(
        "\nConntrack garbage collector: one walk over a table of {entries} entries (what every \
         pass reads; median of 5, alternated).\n\n\
         | entries | key by key (2 system calls per entry) | batched (4,096 per call) | ratio |\n\
         |---:|---:|---:|---:|\n\
         | {entries} | {a:.1} ms | {b:.1} ms | {:.1}x |\n",
        a / b
    ))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.control_plane_child {
        let r = control_plane::measure(n)?;
        println!("{}", r.to_line());
        return Ok(());
    }
    let _stats = lb_tests::BpfStatsOff::new()?;
    let (mut counts, calls): (&[u32], u32) = if cli.quick {
        (&[10, 1000], 500)
    } else {
        (&[10, 1_000, 10_000, 100_000], 20_000)
    };
    if !cli.services.is_empty() {
        counts = &cli.services;
    }
    // Warm the CPU and the allocator up first; the first measurement otherwise pays for it.
    measure(counts[0], calls / 4).context("warm-up")?;
    let mut rows = Vec::new();
    for &services in counts {
        eprintln!("bench: {services} services ...");
        rows.push(measure(services, calls).with_context(|| format!("{services} services"))?);
    }
    let mut text = table(&rows, calls);
    eprintln!("bench: conntrack walk ...");
    text.push_str(&conntrack_walk(if cli.quick { 4096 } else { 262_144 })?);
    let sizes: &[u32] = if cli.quick { &[100] } else { &[1_000, 10_000] };
    let control_plane_runs = if cli.quick { 1 } else { 5 };
    text.push_str(
        &"\nControl plane: N Services x 10 endpoints from Service and EndpointSlice objects, model \
         and applier, from empty; then one endpoint of one Service replaced, 21 times, each in \
         another Service (median / slowest). *Ops* are map \
         writes plus deletes; RSS is this process holding the objects, the desired state and \
         the applier's view (what the agent holds). Each figure is the median of RUNS runs, \
         each in a fresh process (program all: median and range); *per Service* is program all \
         over N.\n\n\
         | services | program all | per Service | of which model | ops | one endpoint change | of which model | ops | RSS |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            .replace("RUNS", &control_plane_runs.to_string()),
    );
    for &n in sizes {
        eprintln!("bench: control plane, {n} services, {control_plane_runs} runs ...");
        let mut runs = Vec::new();
        for _ in 0..control_plane_runs {
            // A fresh process per run, so its resident memory is that state's alone.
            let output = std::process::Command::new(std::env::current_exe()?)
                .args(["--control-plane-child", &n.to_string()])
                .output()
                .context("running the control-plane measurement")?;
            anyhow::ensure!(
                output.status.success(),
                "control plane, {n} services: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            runs.push(control_plane::Result::from_line(&String::from_utf8_lossy(
                &output.stdout,
            ))?);
        }
        text.push_str(&control_plane::row(&runs));
    }
    if !cli.quick {
        // The churn soak at full length (the tests run 10 s of it).
        let config = lb_tests::soak::Config {
            duration: Duration::from_secs(60),
            changes_per_second: 500,
            addresses_per_backend: 20,
            grace: Duration::from_millis(300),
            clients: 2,
        };
        eprintln!("bench: churn soak, {:?} ...", config.duration);
        let r = lb_tests::soak::run(&config).context("churn soak")?;
        text.push_str(&format!(
            "\nChurn soak: one Service, endpoints added, made terminating and (after {} ms) \
             removed through the fake API at {}/s for {} s while {} clients connect, request, \
             close; the agent follows with --min-sync-period 20ms.\n\n\
             | changes | per second | requests | failed | outlived the grace period | syncs | mean programming latency | most backends | backend entries after / endpoints | conntrack after |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | {} | {:.0} | {} | {} | {} | {:.0} | {:.1} ms | {} | {} / {} | {} |\n",
            config.grace.as_millis(),
            config.changes_per_second,
            config.duration.as_secs(),
            config.clients,
            r.changes,
            r.changes as f64 / r.seconds,
            r.requests,
            r.failed,
            r.outlived_grace,
            r.syncs,
            r.mean_programming_ms,
            r.most_backends_programmed,
            r.backend_entries_after,
            r.endpoints_after,
            r.conntrack_after,
        ));
        for failure in &r.first_failures {
            eprintln!("bench: soak failure: {failure}");
        }
    }
    println!("{text}");
    if let Some(path) = cli.output {
        let old = fs::read_to_string(&path).unwrap_or_default();
        let section = format!("{START}\n{text}{END}");
        let new = match (old.find(START), old.find(END)) {
            (Some(a), Some(b)) if a < b => {
                format!("{}{section}{}", &old[..a], &old[b + END.len()..])
            }
            _ => format!("{old}\n{section}\n"),
        };
        fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: results written to {}", path.display());
    }
    Ok(())
}

/// Control plane: N Services x 10 endpoints from objects (model + applier) from empty, then one
/// endpoint changed, with map operations and the resident memory of this process (which then
/// holds what the agent holds: the objects, the desired state and the applier's view).
pub mod control_plane {
    use std::{collections::BTreeMap, time::Instant};

    use k8s_openapi::{
        api::{
            core::v1::{Service, ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    };
    use lb_agent::{
        engine::Engine,
        loader::{Capacity, DatapathSettings},
        model::Settings,
    };
    use lb_tests::packet::Harness;

    pub struct Result {
        pub services: u32,
        pub full_ms: f64,
        pub full_model_ms: f64,
        pub full_ops: usize,
        pub change_ms: f64,
        pub change_worst_ms: f64,
        pub change_model_ms: f64,
        pub change_ops: usize,
        pub rss_mb: f64,
    }

    impl Result {
        /// What a child process prints for its parent: the fields, space-separated.
        pub fn to_line(&self) -> String {
            format!(
                "control-plane {} {} {} {} {} {} {} {} {}",
                self.services,
                self.full_ms,
                self.full_model_ms,
                self.full_ops,
                self.change_ms,
                self.change_worst_ms,
                self.change_model_ms,
                self.change_ops,
                self.rss_mb
            )
        }

        pub fn from_line(text: &str) -> anyhow::Result<Self> {
            let fields: Vec<&str> = text
                .lines()
                .find_map(|l| l.strip_prefix("control-plane "))
                .ok_or_else(|| anyhow::anyhow!("no result in {text:?}"))?
                .split_whitespace()
                .collect();
            anyhow::ensure!(fields.len() == 9, "9 fields expected in {text:?}");
            let f = |i: usize| -> anyhow::Result<f64> { Ok(fields[i].parse()?) };
            Ok(Self {
                services: fields[0].parse()?,
                full_ms: f(1)?,
                full_model_ms: f(2)?,
                full_ops: fields[3].parse()?,
                change_ms: f(4)?,
                change_worst_ms: f(5)?,
                change_model_ms: f(6)?,
                change_ops: fields[7].parse()?,
                rss_mb: f(8)?,
            })
        }
    }

    /// One table row from several runs of one size: the median of each figure (and the
    /// range of the full programming time).
    pub fn row(runs: &[Result]) -> String {
        let median = |f: &dyn Fn(&Result) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let full = median(&|r| r.full_ms);
        let (low, high) = runs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| {
            (lo.min(r.full_ms), hi.max(r.full_ms))
        });
        let services = runs.first().map_or(0, |r| r.services);
        let range = if runs.len() > 1 {
            format!(" ({low:.0}–{high:.0})")
        } else {
            String::new()
        };
        format!(
            "| {services} | {full:.1} ms{range} | {:.1} µs | {:.1} ms | {:.0} | {:.3} ms / {:.2} ms | {:.3} ms | {:.0} | {:.0} MB |\n",
            full * 1000.0 / f64::from(services.max(1)),
            median(&|r| r.full_model_ms),
            median(&|r| r.full_ops as f64),
            median(&|r| r.change_ms),
            median(&|r| r.change_worst_ms),
            median(&|r| r.change_model_ms),
            median(&|r| r.change_ops as f64),
            median(&|r| r.rss_mb),
        )
    }

    fn objects(n: u32) -> (Vec<Service>, Vec<EndpointSlice>) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for i in 0..n {
            let name = format!("svc-{i}");
            let meta = |name: &str| ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some("bench".into()),
                ..ObjectMeta::default()
            };
            services.push(Service {
                metadata: meta(&name),
                spec: Some(ServiceSpec {
                    cluster_ip: Some(super::vip(i).to_string()),
                    ports: Some(vec![ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: Some(IntOrString::Int(8080)),
                        ..ServicePort::default()
                    }]),
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            });
            let mut slice_meta = meta(&format!("{name}-1"));
            slice_meta.labels = Some(BTreeMap::from([(
                lb_agent::model::LABEL_SERVICE_NAME.to_string(),
                name.clone(),
            )]));
            slices.push(EndpointSlice {
                metadata: slice_meta,
                address_type: "IPv4".into(),
                endpoints: (0..10)
                    .map(|j| Endpoint {
                        addresses: vec![std::net::Ipv4Addr::from(
                            u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + i * 10 + j,
                        )
                        .to_string()],
                        ..Endpoint::default()
                    })
                    .collect(),
                ports: Some(vec![EndpointPort {
                    name: Some("http".into()),
                    port: Some(8080),
                    ..EndpointPort::default()
                }]),
            });
        }
        (services, slices)
    }

    fn rss_mb() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

    pub fn measure(n: u32) -> anyhow::Result<Result> {
        let settings = DatapathSettings {
            capacity: Capacity {
                frontends: n + 1024,
                services: n + 1024,
                slots: 16 * n + 1024,
                backends: 10 * n + 1024,
                ..Capacity::default()
            },
            ..DatapathSettings::default()
        };
        let mut h = Harness::with_settings(&settings)?;
        let (services, slices) = objects(n);
        let node = Settings::default();

        // As the agent starts: every object into the engine, then one full sync.
        // The agent's engine shares the objects with its watch stores, which hand them out as
        // `Arc`s (decoded as they arrived); so does this.
        let services: Vec<std::sync::Arc<Service>> =
            services.into_iter().map(std::sync::Arc::new).collect();
        let slices: Vec<std::sync::Arc<EndpointSlice>> =
            slices.into_iter().map(std::sync::Arc::new).collect();
        let started = Instant::now();
        let mut engine = Engine::new(node);
        engine.replace_all(services.clone(), slices.clone());
        engine.settle();
        let desired = engine.sync_input();
        let full_model_ms = started.elapsed().as_secs_f64() * 1000.0;
        let report = h.applier.sync_input(&desired)?;
        let full_ms = started.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(report.errors.is_empty(), "{:?}", report.errors.first());
        let full_ops = report.writes + report.deletes;
        drop(desired);

        // One endpoint of one Service replaced (a pod rescheduled): from the watch event's
        // object to the maps written, as the agent does it. CHANGES of them, each to another
        // Service, timed one by one; the median is reported and the slowest next to it (the
        // first pays for the allocator tidying up after the full sync's garbage).
        const CHANGES: usize = 21;
        let mut timings = Vec::new();
        let mut change_ops = 0;
        for k in 0..CHANGES {
            let target = (n as usize / CHANGES) * k + (n as usize / CHANGES / 2);
            let address = std::net::Ipv4Addr::new(10, 255, 255, k as u8 + 1);
            let mut changed = (*slices[target]).clone();
            changed.endpoints[3].addresses = vec![address.to_string()];
            let started = Instant::now();
            engine.apply_slice(changed);
            let delta = engine.take_delta();
            let model_ms = started.elapsed().as_secs_f64() * 1000.0;
            let report = h.applier.apply_delta(&delta, &engine.node_addresses())?;
            let total_ms = started.elapsed().as_secs_f64() * 1000.0;
            anyhow::ensure!(report.errors.is_empty(), "{:?}", report.errors.first());
            change_ops = change_ops.max(report.writes + report.deletes);
            timings.push((total_ms, model_ms));
            // The change is really in the engine's state (the bench measures the real thing).
            anyhow::ensure!(
                engine
                    .desired_service(&format!("bench/svc-{target}"))
                    .is_some_and(|part| part
                        .services
                        .values()
                        .flat_map(|s| &s.backends)
                        .any(|b| b.addr == address)),
                "change {k} is in the desired state"
            );
        }
        timings.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (change_ms, change_model_ms) = timings[CHANGES / 2];
        let change_worst_ms = timings[CHANGES - 1].0;
        Ok(Result {
            services: n,
            full_ms,
            full_model_ms,
            full_ops,
            change_ms,
            change_model_ms,
            change_worst_ms,
            change_ops,
            rss_mb: rss_mb(),
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn run(full_ms: f64, rss_mb: f64) -> Result {
            Result {
                services: 10_000,
                full_ms,
                full_model_ms: full_ms / 2.0,
                full_ops: 220_000,
                change_ms: 0.02,
                change_worst_ms: 0.1,
                change_model_ms: 0.01,
                change_ops: 3,
                rss_mb,
            }
        }

        #[test]
        fn runs_come_back_from_the_child_and_make_a_row_of_medians() {
            let runs: Vec<Result> = [(150.0, 130.0), (120.0, 140.0), (135.0, 120.0)]
                .into_iter()
                .map(|(ms, mb)| Result::from_line(&run(ms, mb).to_line()).unwrap())
                .collect();
            assert_eq!(runs[1].full_ms, 120.0);
            let row = row(&runs);
            assert!(
                row.starts_with("| 10000 | 135.0 ms (120–150) | 13.5 µs | 67.5 ms | 220000 |"),
                "{row}"
            );
            assert!(row.ends_with("| 3 | 130 MB |\n"), "{row}");
            assert!(Result::from_line("nothing here").is_err());
        }
    }
}
