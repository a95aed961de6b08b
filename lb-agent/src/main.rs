use std::{
    io::{self, IsTerminal, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{loader, manifest, maps, model};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;

/// Kubernetes service load balancer with an eBPF datapath.
#[derive(Parser, Debug)]
#[command(name = "lb-agent", version, about)]
struct Cli {
    /// bpffs directory holding the agent's pinned maps.
    #[arg(long, global = true, default_value = maps::DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
    pin_dir: PathBuf,
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Tear the datapath down on purpose (like kube-proxy's --cleanup): detach the program
    /// from every interface and remove the pinned maps, then exit.
    #[arg(long)]
    cleanup: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Program the datapath from the Kubernetes API or a manifest directory, until
    /// SIGINT/SIGTERM (the datapath stays in place after that).
    Run(Box<RunArgs>),
    /// Show services with their frontends and backends, read from the pinned maps.
    Services {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the datapath counters, read from the pinned maps.
    Stats {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the desired state of a node for a manifest directory, without touching the kernel.
    Plan {
        #[arg(long)]
        manifests: PathBuf,
        /// The node to plan for (its Node manifest, if present, gives zone and addresses).
        #[arg(long)]
        node: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show live connection-tracking entries, read from the pinned maps.
    Conntrack {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Only flows of services whose name contains this (e.g. `default/demo-service`).
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Standalone mode: a directory of Service / EndpointSlice / Endpoints / Node manifests,
    /// re-read every --manifest-poll-interval. Without it the agent watches the Kubernetes API.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server. Default: in-cluster service account, `$KUBECONFIG`,
    /// or `~/.kube/config`.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// API requests per second the agent allows itself (sustained).
    #[arg(long, default_value_t = 5.0)]
    kube_api_qps: f32,
    /// API requests the agent may make at once above the sustained rate.
    #[arg(long, default_value_t = 10)]
    kube_api_burst: u32,
    /// Shortest time between two syncs: a burst of changes is applied together.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    min_sync_period: Duration,
    /// Everything is re-applied this often, repairing any drift in the maps.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    sync_period: Duration,
    /// Interfaces to attach to (ingress); repeat the flag or separate with commas.
    #[arg(
        long = "interface",
        short = 'i',
        value_delimiter = ',',
        required = true
    )]
    interfaces: Vec<String>,
    /// Socket-level load balancing for the processes of this cgroup v2 directory and those
    /// below it (the pods' cgroups, say `/sys/fs/cgroup`): their TCP connections to a
    /// ClusterIP go straight to a backend at `connect()`, so their packets need no
    /// translation. Off unless given.
    #[arg(long, value_name = "CGROUP_DIR")]
    socket_lb_cgroup: Option<PathBuf>,
    /// With --socket-lb-cgroup: open sockets sent to a backend whose note for `getpeername`
    /// is kept (an LRU map: beyond it, the least recently used notes go, and those sockets'
    /// `getpeername` shows the backend).
    #[arg(long, default_value_t = lb_common::capacity::SOCK_REVNAT,
          value_parser = clap::value_parser!(u32).range(1..))]
    socket_lb_notes_max: u32,
    /// This node's name (endpoints with this `nodeName` are local; a Node manifest of this
    /// name gives the zone and addresses).
    #[arg(long, env = "NODE_NAME", default_value_t = hostname())]
    node_name: String,
    /// Addresses NodePorts are served on. Default: the Node manifest's InternalIP/ExternalIP
    /// addresses, else every IPv4 address of the node's interfaces (except loopback).
    #[arg(long, value_delimiter = ',')]
    node_port_addresses: Vec<Ipv4Addr>,
    /// What a new flow to a frontend without usable backend gets: `reject` (TCP RST / ICMP
    /// port unreachable, like kube-proxy) or `drop` (silently).
    #[arg(long, value_enum, default_value_t = NoBackend::Reject)]
    no_backend: NoBackend,
    /// Source address given to hairpin flows (a pod reaching itself through its Service).
    #[arg(long, default_value = "169.254.42.1")]
    hairpin_snat_address: Ipv4Addr,
    /// This node's address for external traffic to endpoints on other nodes
    /// (externalTrafficPolicy Cluster), so that their replies return here. Default: the
    /// node's first address.
    #[arg(long)]
    snat_address: Option<Ipv4Addr>,
    /// The node's health endpoint (HTTP; 200 while the last sync succeeded), for probes.
    #[arg(long, default_value = "0.0.0.0:10256")]
    health_addr: std::net::SocketAddr,
    /// Prometheus metrics (`GET /metrics`), as kube-proxy's `--metrics-bind-address`.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: std::net::SocketAddr,
    /// How often the manifest directory is re-read (changes are applied when seen).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    manifest_poll_interval: Duration,
    /// How often expired conntrack entries are removed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    conntrack_gc_interval: Duration,
    /// Conntrack entries (two per flow); least recently used ones are evicted when full.
    #[arg(long, default_value_t = lb_common::capacity::CONNTRACK)]
    conntrack_max: u32,
    /// Service ports (one per port and protocol of every Service).
    #[arg(long, default_value_t = lb_common::capacity::SERVICES)]
    max_services: u32,
    /// Frontends (each ClusterIP, NodePort address, LoadBalancer IP and externalIP per port).
    #[arg(long, default_value_t = lb_common::capacity::FRONTENDS)]
    max_frontends: u32,
    /// Distinct backends (address, port, protocol), and backend slots four times that.
    #[arg(long, default_value_t = lb_common::capacity::BACKENDS)]
    max_backends: u32,
    /// Entries of each Maglev lookup table (prime). Larger tables move fewer flows when a
    /// backend changes; each costs 4 bytes per entry. A Service with more than 1 backend per
    /// 600 entries gets a table spanning 2, 4 or 8 of these.
    #[arg(long, default_value_t = lb_common::MAGLEV_TABLE_SIZE, value_parser = parse_prime)]
    maglev_table_size: u32,
    /// Maglev tables preallocated, one per Service port using Maglev (annotation
    /// `lb.example.dev/lb-algorithm: maglev`), 2, 4 or 8 for one with many backends.
    #[arg(long, default_value_t = lb_common::capacity::MAGLEV_SERVICES)]
    max_maglev_services: u32,
}

/// A prime number (the Maglev permutation needs one).
fn parse_prime(text: &str) -> Result<u32, String> {
    let n: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !lb_agent::maglev::is_prime(n) {
        return Err(format!("{n} is not prime (try 16381, 32749 or 65521)"));
    }
    Ok(n)
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NoBackend {
    Reject,
    Drop,
}

/// `250ms`, `10s`, `2m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: give a unit (ms, s or m)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    if number == 0 {
        return Err(format!("{text:?}: must be more than zero"));
    }
    if number > 1_000_000 {
        return Err(format!("{text:?}: too long"));
    }
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number.saturating_mul(60))),
        _ => Err(format!("{text:?}: unknown unit {unit:?} (ms, s or m)")),
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let command = match (cli.command, cli.cleanup) {
        (None, true) => return cleanup(&cli.pin_dir),
        (Some(_), true) => anyhow::bail!("--cleanup runs alone, without a subcommand"),
        (None, false) => {
            anyhow::bail!("nothing to do: give a subcommand (see --help) or --cleanup")
        }
        (Some(command), false) => command,
    };
    let result = match command {
        Command::Run(args) => run(&cli.pin_dir, *args),
        Command::Services { output } => show_services(&cli.pin_dir, output),
        Command::Stats { output } => show_stats(&cli.pin_dir, output),
        Command::Plan {
            manifests,
            node,
            output,
        } => show_plan(&manifests, &node, output),
        Command::Conntrack { output, service } => {
            show_conntrack(&cli.pin_dir, output, service.as_deref())
        }
    };
    match result {
        // `lb-agent services | head` is not an error.
        Err(err)
            if err.chain().any(|e| {
                e.downcast_ref::<io::Error>().map(io::Error::kind)
                    == Some(io::ErrorKind::BrokenPipe)
                    || e.downcast_ref::<serde_json::Error>()
                        .and_then(serde_json::Error::io_error_kind)
                        == Some(io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(pin_dir: &Path, args: RunArgs) -> anyhow::Result<()> {
    let node = NodeIdentity {
        name: args.node_name.clone(),
        node_port_addresses: args.node_port_addresses.clone(),
        discovered: node_addresses()?,
    };
    info!(node = %node.name, discovered = ?node.discovered, "starting");
    let datapath = loader::DatapathSettings {
        no_backend_drop: args.no_backend == NoBackend::Drop,
        hairpin_addr: args.hairpin_snat_address,
        snat_addr: args
            .snat_address
            .or_else(|| args.node_port_addresses.first().copied())
            .or_else(|| node.discovered.first().copied()),
        capacity: loader::Capacity {
            frontends: args.max_frontends,
            services: args.max_services,
            slots: args.max_backends.saturating_mul(4),
            backends: args.max_backends,
            conntrack: args.conntrack_max,
            maglev_services: args.max_maglev_services,
            // Preallocated: one entry when nothing writes it.
            socket_notes: if args.socket_lb_cgroup.is_some() {
                args.socket_lb_notes_max
            } else {
                1
            },
            ..loader::Capacity::default()
        },
        maglev_table_size: args.maglev_table_size,
    };

    let mut ebpf = loader::load(pin_dir, &datapath)?;
    loader::attach(&mut ebpf, &args.interfaces, pin_dir)?;
    loader::attach_socket_lb(&mut ebpf, args.socket_lb_cgroup.as_deref(), pin_dir)?;
    let applier = maps::Applier::open(pin_dir)?;
    let node_health: lb_agent::health::Answer = std::sync::Arc::new(std::sync::Mutex::new((
        503,
        r#"{"status":"starting"}"#.to_string(),
    )));
    let metrics = lb_agent::metrics::Metrics::new(pin_dir.to_path_buf());
    let mut programmer = Programmer {
        metrics: metrics.clone(),
        pin_dir: pin_dir.to_path_buf(),
        health_checks: Default::default(),
        node_health: node_health.clone(),
        node,
        applier,
        applier_fresh: true,
        last: None,
        last_problems: Vec::new(),
    };

    let _gc = ConntrackGc::start(pin_dir, args.conntrack_gc_interval, args.conntrack_max)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let _health = lb_agent::health::serve(args.health_addr, node_health)
            .with_context(|| format!("serving the node health endpoint on {}", args.health_addr))?;
        let _metrics = lb_agent::metrics::serve(args.metrics_addr, metrics)
            .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        };
        match &args.manifests {
            Some(dir) => run_standalone(dir, &args, &mut programmer, stop).await,
            None => run_kubernetes(&args, &mut programmer, stop).await,
        }
    })?;
    // The links and maps are pinned: the datapath keeps forwarding without us, and the next
    // agent adopts it. `lb-agent --cleanup` removes it on purpose.
    info!(pin_dir = %pin_dir.display(), "signalled: exiting, the datapath stays in place");
    drop(ebpf);
    Ok(())
}

/// Standalone mode: the manifest directory, re-read every poll and applied when the desired
/// state changed.
async fn run_standalone(
    dir: &Path,
    args: &RunArgs,
    programmer: &mut Programmer,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let mut poll = tokio::time::interval(args.manifest_poll_interval);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = poll.tick() => {
                let seen = std::time::Instant::now();
                match manifest::read_dir(dir) {
                    Ok(manifests) => programmer.apply(manifests, false, Some(seen)),
                    Err(err) => warn!("keeping the current datapath: {err:#}"),
                }
            }
        }
    }
}

/// Kubernetes mode: watchers fill stores, and each event marks the Service it touches in the
/// engine; changes are applied at most every `--min-sync-period` (bursts batched), only for the
/// Services marked, and everything is re-applied every `--sync-period` to repair drift.
async fn run_kubernetes(
    args: &RunArgs,
    programmer: &mut Programmer,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use lb_agent::kubernetes::{self, Signal};

    tokio::pin!(stop);
    let client = kubernetes::client(&kubernetes::ClientOptions {
        kubeconfig: args.kubeconfig.as_deref(),
        qps: args.kube_api_qps,
        burst: args.kube_api_burst,
    })
    .await?;
    let (stores, mut signals) = kubernetes::watch(client, &programmer.node.name);

    // Nothing is programmed until every watch has its first full list: a partial view would
    // delete what is merely not listed yet.
    {
        let ready = stores.wait_until_ready();
        tokio::pin!(ready);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                ready = &mut ready => { ready?; break; }
                signal = signals.next() => if signal.is_none() {
                    anyhow::bail!("the watch streams ended before the first list");
                },
            }
        }
    }
    info!("initial lists complete");
    let node_settings = |stores: &kubernetes::Stores, node: &NodeIdentity| {
        let nodes: Vec<_> = stores.nodes.state().iter().map(|n| (**n).clone()).collect();
        lb_agent::node::settings(
            &node.name,
            &nodes,
            &node.node_port_addresses,
            &node.discovered,
        )
    };
    let mut engine = lb_agent::engine::Engine::new(node_settings(&stores, &programmer.node));
    let relist = |engine: &mut lb_agent::engine::Engine| {
        engine.replace_all(stores.services.state(), stores.endpoint_slices.state());
    };
    relist(&mut engine);
    // The first program is a full one: the pinned maps may hold anything (a previous agent's
    // state, or nothing).
    engine.settle();
    programmer.program_engine_full(&engine, true, None);

    let mut resync = tokio::time::interval(args.sync_period);
    resync.reset(); // the first tick would fire at once
    let mut pending_since: Option<std::time::Instant> = None;
    // A delta that left something undone is followed by a full sync, which retries it.
    let mut needs_full = false;
    let mut last_sync = tokio::time::Instant::now();
    loop {
        let next_allowed = last_sync + args.min_sync_period;
        tokio::select! {
            _ = &mut stop => return Ok(()),
            signal = signals.next() => {
                match signal {
                    Some(Signal::Service(key)) => match stores.service(&key) {
                        Some(service) => engine.apply_service(service),
                        None => engine.delete_service(&key),
                    },
                    Some(Signal::Slice(key)) => match stores.slice(&key) {
                        Some(slice) => engine.apply_slice(slice),
                        None => engine.delete_slice(&key),
                    },
                    Some(Signal::Node) => {
                        engine.set_settings(node_settings(&stores, &programmer.node));
                    }
                    Some(Signal::Relisted(resource)) => {
                        debug!(resource, "relisted");
                        relist(&mut engine);
                        engine.set_settings(node_settings(&stores, &programmer.node));
                    }
                    Some(Signal::Restarted(resource)) => {
                        programmer
                            .metrics
                            .watch_restarts
                            .get_or_create(&lb_agent::metrics::ResourceLabel { resource })
                            .inc();
                    }
                    None => anyhow::bail!("the watch streams ended"),
                }
                if engine.pending() > 0 {
                    pending_since.get_or_insert_with(std::time::Instant::now);
                }
            }
            _ = tokio::time::sleep_until(next_allowed), if pending_since.is_some() || needs_full => {
                let seen = pending_since.take();
                if needs_full {
                    // Once: what still fails after it (a conflict, a full map) waits for the
                    // next change or --sync-period, rather than costing a full sync per tick.
                    engine.settle();
                    programmer.program_engine_full(&engine, false, seen);
                    needs_full = false;
                } else {
                    needs_full = !programmer.program_delta(&mut engine, seen);
                }
                last_sync = tokio::time::Instant::now();
            }
            _ = resync.tick() => {
                engine.settle();
                programmer.program_engine_full(&engine, true, pending_since.take());
                needs_full = false;
                last_sync = tokio::time::Instant::now();
            }
        }
    }
}

/// The conntrack garbage collector, on a thread of its own so that a long pass over a big
/// table never delays a sync. Passes follow the churn: after one that freed more than an
/// eighth of the table, the next comes after a quarter of the interval (at least 1 s), so a
/// node opening connections fast keeps its table from filling (a full LRU table makes the
/// datapath evict on the packet path); otherwise one pass per interval.
struct ConntrackGc {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConntrackGc {
    fn start(pin_dir: &Path, interval: Duration, capacity: u32) -> anyhow::Result<Self> {
        let mut conntrack = maps::open_conntrack(pin_dir)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                let mut next = interval;
                // Anything but a timeout (a stop, or the agent going away) ends the loop.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(next)
                {
                    let started = std::time::Instant::now();
                    // A pass that panicked must not end garbage collection for good.
                    let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        maps::collect_conntrack_garbage(&mut conntrack, usize::MAX)
                    }));
                    let Ok((examined, deleted)) = pass else {
                        error!("a conntrack garbage collection pass failed; next one as usual");
                        next = interval;
                        continue;
                    };
                    next = maps::next_gc_pass(deleted, capacity, interval);
                    if deleted > 0 {
                        debug!(
                            examined,
                            deleted,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            next_s = next.as_secs_f64(),
                            "conntrack garbage collected"
                        );
                    }
                }
            })
            .context("starting the conntrack garbage collector")?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ConntrackGc {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Who this node is; its zone and addresses may come from its Node object.
struct NodeIdentity {
    name: String,
    node_port_addresses: Vec<Ipv4Addr>,
    discovered: Vec<Ipv4Addr>,
}

/// Objects in, maps out: the model, then the applier, with change detection and logging.
struct Programmer {
    metrics: std::sync::Arc<lb_agent::metrics::Metrics>,
    pin_dir: PathBuf,
    health_checks: lb_agent::health::HealthCheckServers,
    node_health: lb_agent::health::Answer,
    node: NodeIdentity,
    applier: maps::Applier,
    /// The applier has read the maps and nothing has written them since (the start, up to the
    /// first sync): a full sync need not read them again.
    applier_fresh: bool,
    last: Option<model::DesiredState>,
    last_problems: Vec<String>,
}

impl Programmer {
    /// Applies the objects. Unless `force`, nothing happens when the desired state is what was
    /// last applied in full. `seen` is when the oldest unapplied change arrived.
    fn apply(
        &mut self,
        manifests: manifest::Manifests,
        force: bool,
        seen: Option<std::time::Instant>,
    ) {
        let node = &self.node;
        let settings = lb_agent::node::settings(
            &node.name,
            &manifests.nodes,
            &node.node_port_addresses,
            &node.discovered,
        );
        let desired = lb_agent::desired_from_manifests(&manifests, &settings);
        if !force && self.last.as_ref() == Some(&desired) {
            return;
        }
        let problems: Vec<String> = manifests
            .errors
            .iter()
            .map(ToString::to_string)
            .chain(desired.errors.iter().map(ToString::to_string))
            .collect();
        self.metrics.set_invalid_objects(
            manifests
                .errors
                .iter()
                .map(|e| e.object.as_deref())
                .chain(desired.errors.iter().map(|e| Some(e.object.as_str()))),
        );
        self.report_problems(problems, &desired.skipped, &settings);
        self.program_full(desired, force, seen);
    }

    /// Logs skipped objects when the set changes, not on every poll or resync.
    fn report_problems<'a>(
        &mut self,
        problems: Vec<String>,
        skipped: impl IntoIterator<Item = &'a (String, String)>,
        settings: &model::Settings,
    ) {
        if problems != self.last_problems {
            for problem in &problems {
                warn!("skipped: {problem}");
            }
            for (object, reason) in skipped {
                info!(%object, "left out: {reason}");
            }
            info!(zone = ?settings.node_zone, node_port_addresses = ?settings.node_addresses, "node");
            self.last_problems = problems;
        }
    }

    /// Kubernetes mode, full: every Service the engine holds.
    fn program_engine_full(
        &mut self,
        engine: &lb_agent::engine::Engine,
        force: bool,
        seen: Option<std::time::Instant>,
    ) {
        self.metrics
            .set_invalid_objects(engine.errors().map(|e| Some(e.object.as_str())));
        // Sorted: the parts come in no particular order, and an unchanged set logs nothing.
        let mut problems: Vec<String> = engine.errors().map(ToString::to_string).collect();
        problems.sort();
        let mut skipped: Vec<&(String, String)> = engine.skipped().collect();
        skipped.sort();
        self.report_problems(problems, skipped, engine.settings());
        if force {
            self.reopen_maps();
        }
        let started = std::time::Instant::now();
        // Read from the engine's parts as they are: no merged copy is made, or kept.
        let result = self.applier.sync_input(&engine.sync_input());
        if self.record(result, started, seen).is_some() {
            self.health_checks.sync(&engine.all_health_checks());
        }
        self.last = None;
    }

    /// Kubernetes mode, incremental: only the Services changed since the last sync. Returns
    /// whether everything was programmed.
    fn program_delta(
        &mut self,
        engine: &mut lb_agent::engine::Engine,
        seen: Option<std::time::Instant>,
    ) -> bool {
        let started = std::time::Instant::now();
        let delta = engine.take_delta();
        if delta.is_empty() {
            return true;
        }
        for error in &delta.errors {
            warn!("skipped: {error}");
        }
        for (object, reason) in &delta.skipped {
            info!(%object, "left out: {reason}");
        }
        self.metrics
            .set_invalid_objects(engine.errors().map(|e| Some(e.object.as_str())));
        let result = self.applier.apply_delta(&delta, &engine.node_addresses());
        let done = match self.record(result, started, seen) {
            Some(report) => {
                debug!(services = ?delta.services, "recomputed");
                report.errors.is_empty()
            }
            None => false,
        };
        self.health_checks.sync(engine.health_checks());
        // The last full state no longer describes the maps.
        self.last = None;
        done
    }

    /// A full resync diffs against what the maps really hold, repairing any drift.
    /// Not when the applier read them moments ago: the read is sized by the maps' capacity,
    /// not by the Services (about 30 ms, most of a first sync of a few Services).
    fn reopen_maps(&mut self) {
        if self.applier_fresh {
            return;
        }
        match maps::Applier::open(&self.pin_dir) {
            Ok(applier) => self.applier = applier,
            Err(err) => warn!("re-reading the maps failed, diffing from memory: {err:#}"),
        }
    }

    /// Writes `desired` whole (diffed against what the maps hold when `force`).
    fn program_full(
        &mut self,
        desired: model::DesiredState,
        force: bool,
        seen: Option<std::time::Instant>,
    ) {
        if force {
            self.reopen_maps();
        }
        let started = std::time::Instant::now();
        let result = self.applier.sync(&desired);
        let Some(report) = self.record(result, started, seen) else {
            self.last = None;
            return;
        };
        self.health_checks.sync(&desired.health_checks);
        // Anything left undone is tried again at the next change, poll or resync.
        self.last = report.errors.is_empty().then_some(desired);
    }

    /// Metrics, log and node health for one sync; the report if it ran.
    fn record(
        &mut self,
        result: anyhow::Result<maps::SyncReport>,
        started: std::time::Instant,
        seen: Option<std::time::Instant>,
    ) -> Option<maps::SyncReport> {
        // Written (or half written, when it failed): the next full sync reads the maps again.
        self.applier_fresh = false;
        let result_label = |result| lb_agent::metrics::ResultLabel { result };
        let report = match result {
            Ok(report) => report,
            Err(err) => {
                warn!("sync failed, keeping the current datapath: {err:#}");
                self.metrics
                    .syncs
                    .get_or_create(&result_label("failed"))
                    .inc();
                self.set_node_health(503, r#"{"status":"sync failed"}"#.to_string());
                return None;
            }
        };
        let metrics = &self.metrics;
        metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(seen) = seen {
            metrics
                .programming_latency
                .observe(seen.elapsed().as_secs_f64());
        }
        let operation = |operation| lb_agent::metrics::OperationLabel { operation };
        metrics
            .map_operations
            .get_or_create(&operation("update"))
            .inc_by(report.writes as u64);
        metrics
            .map_operations
            .get_or_create(&operation("delete"))
            .inc_by(report.deletes as u64);
        metrics.programming_errors.set(report.errors.len() as i64);
        metrics
            .syncs
            .get_or_create(&result_label(if report.errors.is_empty() {
                "ok"
            } else {
                "partial"
            }))
            .inc();
        for error in &report.errors {
            warn!("{error}");
        }
        info!(
            services = report.services,
            frontends = report.frontends,
            backends = report.backends,
            writes = report.writes,
            deletes = report.deletes,
            elapsed_us = started.elapsed().as_micros() as u64,
            latency_us = seen.map(|s| s.elapsed().as_micros() as u64),
            "datapath programmed"
        );
        let status = if report.errors.is_empty() {
            "ok"
        } else {
            // A Service refused (say, a full map) is reported but leaves the node serving
            // every other one: still 200, or the probes would restart an agent doing its job.
            "degraded"
        };
        self.set_node_health(
            200,
            format!(
                r#"{{"status":"{status}","services":{},"errors":{}}}"#,
                report.services,
                report.errors.len()
            ),
        );
        Some(report)
    }
}

impl Programmer {
    fn set_node_health(&self, status: u16, body: String) {
        if let Ok(mut node) = self.node_health.lock() {
            *node = (status, body);
        }
    }
}

/// Every IPv4 address of this network namespace's interfaces, loopback excluded.
fn node_addresses() -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut addresses: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .context("listing the node's addresses")?
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| a.as_sockaddr_in().map(|s| s.ip()))
        .filter(|ip| !ip.is_loopback())
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

fn show_services(pin_dir: &Path, output: Output) -> anyhow::Result<()> {
    let services = maps::read_services(pin_dir)?;
    emit(output, &services, |out| {
        let mut rows: Vec<[String; 8]> = Vec::new();
        for s in &services {
            let active = s.backends.iter().filter(|b| b.state == "active").count();
            let backends = if s.backends.is_empty() {
                "<none>".to_string()
            } else {
                s.backends
                    .iter()
                    .map(|b| {
                        let mut text = format!("{}:{}", b.addr, b.port);
                        if b.state != "active" {
                            text.push_str(&format!("({})", b.state));
                        }
                        // Maglev: the backend's share of the lookup table.
                        if let Some(entries) = b.maglev_entries {
                            text.push_str(&format!("[maglev {entries}]"));
                        }
                        text
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            for f in &s.frontends {
                rows.push([
                    s.name.clone(),
                    f.kind.to_string(),
                    format!("{}:{}", f.addr, f.port),
                    active.to_string(),
                    (s.backends.len() - active).to_string(),
                    backends.clone(),
                    s.stats.packets.to_string(),
                    s.stats.bytes.to_string(),
                ]);
            }
        }
        write_table(
            out,
            [
                "SERVICE",
                "KIND",
                "FRONTEND",
                "ACTIVE",
                "TERMINATING",
                "BACKENDS",
                "PACKETS",
                "BYTES",
            ],
            &rows,
        )
    })
}

fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    let removed = lb_agent::loader::cleanup(pin_dir)?;
    info!(pin_dir = %pin_dir.display(), removed = removed.len(), "datapath removed");
    Ok(())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

fn show_plan(dir: &Path, node: &str, output: Output) -> anyhow::Result<()> {
    let manifests = manifest::read_dir(dir)?;
    for error in &manifests.errors {
        warn!("skipped: {error}");
    }
    let settings = lb_agent::node::settings(
        node,
        &manifests.nodes,
        &[],
        &lb_agent::plan::ANY_NODE_ADDRESS,
    );
    let desired = lb_agent::desired_from_manifests(&manifests, &settings);
    for error in &desired.errors {
        warn!("skipped: {error}");
    }
    let plan = lb_agent::plan::plan(node, &desired);
    emit(output, &plan, |out| {
        let rows: Vec<[String; 6]> = plan
            .frontends
            .iter()
            .map(|f| {
                let backends = f
                    .backends
                    .iter()
                    .map(|b| {
                        let t = if b.terminating { " (terminating)" } else { "" };
                        format!("{}:{}{t}", b.address, b.port)
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                [
                    format!("{}:{}", f.service, f.port_name.as_deref().unwrap_or("")),
                    f.kind.to_string(),
                    format!("{}:{}/{}", f.address, f.port, f.protocol),
                    if backends.is_empty() {
                        "<none>".into()
                    } else {
                        backends
                    },
                    format!("{:?}", f.when_empty).to_lowercase(),
                    f.affinity_timeout_seconds
                        .map_or_else(|| "-".to_string(), |t| format!("{t}s")),
                ]
            })
            .collect();
        write_table(
            out,
            [
                "SERVICE",
                "KIND",
                "FRONTEND",
                "BACKENDS",
                "WHEN-EMPTY",
                "AFFINITY",
            ],
            &rows,
        )
    })
}

/// A connection with its Service's name, for the `conntrack` command.
#[derive(serde::Serialize)]
struct Connection {
    service: String,
    #[serde(flatten)]
    flow: maps::FlowView,
}

fn show_conntrack(pin_dir: &Path, output: Output, service: Option<&str>) -> anyhow::Result<()> {
    let names: std::collections::HashMap<u32, String> = maps::read_services(pin_dir)?
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    let mut connections: Vec<Connection> = maps::read_conntrack(pin_dir)?
        .into_iter()
        .map(|flow| Connection {
            service: names
                .get(&flow.service_id)
                .cloned()
                .unwrap_or_else(|| format!("#{}", flow.service_id)),
            flow,
        })
        .collect();
    if let Some(filter) = service {
        connections.retain(|c| c.service.contains(filter));
    }
    emit(output, &connections, |out| {
        let rows: Vec<[String; 9]> = connections
            .iter()
            .map(|c| {
                let f = &c.flow;
                [
                    c.service.clone(),
                    f.protocol.clone(),
                    f.client.clone(),
                    f.frontend.clone(),
                    f.backend.clone(),
                    f.source_nat.clone().unwrap_or_else(|| "-".into()),
                    f.state.to_string(),
                    format!("{}s", f.age_seconds),
                    format!("{}s", f.expires_in_seconds),
                ]
            })
            .collect();
        write_table(
            out,
            [
                "SERVICE",
                "PROTO",
                "CLIENT",
                "FRONTEND",
                "BACKEND",
                "SOURCE-NAT",
                "STATE",
                "AGE",
                "EXPIRES",
            ],
            &rows,
        )
    })
}

/// The `stats` command's view: datapath counters, drops by reason, map fill levels.
#[derive(serde::Serialize)]
struct Stats {
    counters: std::collections::BTreeMap<&'static str, u64>,
    drops: std::collections::BTreeMap<&'static str, u64>,
    maps: Vec<MapFillView>,
}

#[derive(serde::Serialize)]
struct MapFillView {
    map: &'static str,
    entries: u64,
    capacity: u64,
    fill_ratio: f64,
}

fn show_stats(pin_dir: &Path, output: Output) -> anyhow::Result<()> {
    let counters = maps::read_counters(pin_dir)?;
    let stats = Stats {
        counters: counters.iter().map(|(c, v)| (c.name(), *v)).collect(),
        drops: counters
            .iter()
            .filter_map(|(c, v)| Some((c.drop_reason()?, *v)))
            .collect(),
        maps: maps::fill_levels(pin_dir)?
            .into_iter()
            .map(|l| MapFillView {
                map: l.map,
                entries: l.entries,
                capacity: l.capacity,
                // Two decimals of a percent are plenty, and keep the JSON readable.
                fill_ratio: (l.ratio() * 10_000.0).round() / 10_000.0,
            })
            .collect(),
    };
    emit(output, &stats, |out| {
        let rows: Vec<[String; 2]> = counters
            .iter()
            .map(|(c, v)| [c.name().to_string(), v.to_string()])
            .collect();
        write_table(out, ["COUNTER", "PACKETS"], &rows)?;
        writeln!(out)?;
        let rows: Vec<[String; 2]> = stats
            .drops
            .iter()
            .map(|(reason, v)| [reason.to_string(), v.to_string()])
            .collect();
        write_table(out, ["DROP-REASON", "PACKETS"], &rows)?;
        writeln!(out)?;
        let rows: Vec<[String; 4]> = stats
            .maps
            .iter()
            .map(|m| {
                [
                    m.map.to_string(),
                    m.entries.to_string(),
                    m.capacity.to_string(),
                    format!("{:.1}%", m.fill_ratio * 100.0),
                ]
            })
            .collect();
        write_table(out, ["MAP", "ENTRIES", "CAPACITY", "FILL"], &rows)
    })
}

/// Prints `value` as JSON, or as the table `table` writes.
fn emit<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&mut io::StdoutLock<'static>) -> io::Result<()>,
) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, value)?;
            writeln!(out)?;
        }
        Output::Yaml => serde_yaml::to_writer(&mut out, value)?,
        Output::Table => table(&mut out)?,
    }
    Ok(())
}

/// kubectl-style table: upper-case headers, columns padded to the widest cell.
fn write_table<const N: usize>(
    out: &mut impl Write,
    headers: [&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(headers.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
