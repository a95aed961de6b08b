//! One lab per datapath, built the same way for each: the single-node lab of [`NodeLab`] with
//! three backends, each backend namespace holding [`ADDRESSES_PER_BACKEND`] addresses (all of
//! them endpoints, served by one echo server on `0.0.0.0`), and the client given a pod address
//! (10.244.200.2, its source for everything) so that client-to-ClusterIP traffic is pod
//! traffic for kube-proxy's rules, as it is for ours.
//!
//! The datapath of a bed is programmed from empty, cleared, and changed by one endpoint, each
//! timed the way the datapath's own control plane would do it:
//!
//! - ours: the real `lb-agent` against the fake API server (Services and EndpointSlices),
//!   timed from its own log: "initial lists complete" to "datapath programmed" (model and
//!   maps, after the objects are in hand), and for a change the programming latency it logs
//!   (watch event seen to maps written, through its incremental path);
//! - iptables (legacy and nft back ends): the jump rules first (untimed, as kube-proxy's
//!   EnsureRule calls), then `iptables-{legacy,nft}-restore --noflush --counters` of the full
//!   rule set; for a change, the partial restore kube-proxy's default (minimized) sync runs;
//! - nftables: `nft -f -` of the full transaction; for a change, the partial transaction.
//!
//! A load that runs past [`Bed::load_limit`] is stopped and reported as not finished (a
//! lower bound). Two loads are quadratic in their size here: iptables-nft-restore's
//! `--noflush` handling in user space (Debian 12's 1.8.9: 1,000 Services take about 5 s,
//! 2,000 about 27 s, 4,000 about 4 minutes), and an nft transaction in the kernel, which binds
//! each anonymous verdict map by walking the whole pending transaction (10,000 Services take
//! about 2 minutes). At 10,000 Services those one-shot loads are stopped at the limit, and the
//! same rules are then loaded in chunks of [`CHUNK`] Services (same rules, same order in the
//! kernel) so that their datapaths can be measured all the same.
//!
//! The rule loads are timed as processes, as kube-proxy runs them (the tool's parsing and the
//! kernel's work); kube-proxy's own work to compute the rules, and the `iptables-save` /
//! `nft list` it also runs on some syncs, are not counted.

use std::{
    collections::BTreeSet,
    fmt,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use super::{
    change_one_endpoint, iptables,
    load::{self, Server, Targets},
    nftables, ProxyConfig, Service, SERVICE_PORT, TARGET_PORT,
};
use crate::{
    agent::{agent_binary, Agent},
    cgroup::ThreadCgroup,
    fake_api::FakeApi,
    lab::{run, NodeLab, NODE_CLIENT_SIDE_ADDR},
};

pub const BACKENDS: usize = 3;
pub const ADDRESSES_PER_BACKEND: usize = 20;
/// The client's pod address.
pub const CLIENT_POD_ADDR: &str = "10.244.200.2";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// No load balancer: the client connects to endpoints directly.
    Direct,
    /// Ours with every packet through the tc program (clients outside the socket-LB cgroup).
    Ours,
    /// Ours with socket-level load balancing for the client (`--socket-lb-cgroup`).
    OursSocket,
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Direct,
        Mode::Ours,
        Mode::OursSocket,
        Mode::IptablesLegacy,
        Mode::IptablesNft,
        Mode::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "no load balancer",
            Mode::Ours => "ours (tc + maps)",
            Mode::OursSocket => "ours (socket LB)",
            Mode::IptablesLegacy => "iptables (legacy)",
            Mode::IptablesNft => "iptables (nft)",
            Mode::Nftables => "nftables",
        }
    }

    /// Its colour in the charts.
    pub fn color(self) -> &'static str {
        match self {
            Mode::Direct => "#9e9e9e",
            Mode::Ours => "#1b9e77",
            Mode::OursSocket => "#66a61e",
            Mode::IptablesLegacy => "#d95f02",
            Mode::IptablesNft => "#7570b3",
            Mode::Nftables => "#e7298a",
        }
    }

    /// A short name for files and logs.
    pub fn slug(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ours => "ours",
            Mode::OursSocket => "ours-socket",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesNft => "iptables-nft",
            Mode::Nftables => "nftables",
        }
    }

    /// Our agent, either way.
    pub fn is_ours(self) -> bool {
        matches!(self, Mode::Ours | Mode::OursSocket)
    }

    fn iptables(self) -> Option<&'static str> {
        match self {
            Mode::IptablesLegacy => Some("iptables-legacy"),
            Mode::IptablesNft => Some("iptables-nft"),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The endpoint address pool of a bed, interleaved across the backends (so that consecutive
/// picks land on different backends): 10.244.i.2, then 10.244.i.10 onwards, i = 1..=3.
pub fn pool() -> Vec<Ipv4Addr> {
    let mut pool = Vec::new();
    for j in 0..ADDRESSES_PER_BACKEND {
        for i in 1..=BACKENDS as u8 {
            let last = if j == 0 { 2 } else { 9 + j as u8 };
            pool.push(Ipv4Addr::new(10, 244, i, last));
        }
    }
    pool
}

/// A timed programming step.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The figure compared: see the module documentation. The load limit when not finished.
    pub took: Duration,
    /// Wall time as seen from outside (for ours: agent start to maps written, including the
    /// program load and the API lists).
    pub wall: Duration,
    /// False when the load ran past the limit and was stopped (then the datapath was loaded
    /// another way, see [`Bed::program`], or for a change left as it was).
    pub finished: bool,
}

impl Timing {
    fn done(took: Duration) -> Self {
        Self {
            took,
            wall: took,
            finished: true,
        }
    }

    fn from(took: Option<Duration>, limit: Duration) -> Self {
        match took {
            Some(took) => Self::done(took),
            None => Self {
                took: limit,
                wall: limit,
                finished: false,
            },
        }
    }
}

/// Services per chunk when a one-shot iptables-restore does not finish.
const CHUNK: usize = 250;

pub struct Bed {
    pub mode: Mode,
    pub lab: NodeLab,
    pub services: Vec<Service>,
    pool: Vec<Ipv4Addr>,
    config: ProxyConfig,
    servers: Vec<Server>,
    api: Option<FakeApi>,
    agent: Option<Agent>,
    tmp: tempfile::TempDir,
    /// Agent log lines already consumed.
    log_seen: usize,
    programmed: bool,
    /// The longest a single rule load may take before it is stopped.
    pub load_limit: Duration,
    /// Extra arguments for our agent (experiments: `lb-compare --agent-arg`).
    pub agent_args: Vec<String>,
    /// The cgroup the client's load threads join; the agent's socket programs are attached to
    /// it in [`Mode::OursSocket`].
    cgroup: Arc<ThreadCgroup>,
}

fn ip_batch(ns: &str, commands: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(commands.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "ip -n {ns} -batch failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs `command` with `input` on its stdin: its duration from spawn to exit, or `None` if it
/// ran past `limit` and was killed (rule loads are transactions: a killed one changes nothing).
fn timed_with_input(
    command: &mut Command,
    input: &str,
    limit: Duration,
) -> anyhow::Result<Option<Duration>> {
    use std::io::Read as _;
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let input = input.to_string();
    // Write and read from threads: the child may answer before it has read everything.
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let took = started.elapsed();
    let _ = writer.join();
    let errors = reader.join().unwrap_or_default();
    match status {
        None => Ok(None),
        Some(status) if status.success() => Ok(Some(took)),
        Some(status) => bail!("{command:?} failed ({status}): {}", errors.trim()),
    }
}

fn service_object(service: &Service) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service.name, "namespace": service.namespace},
        "spec": {
            "clusterIP": service.cluster_ip.to_string(),
            "ports": [{
                "name": service.port_name,
                "port": service.port,
                "targetPort": TARGET_PORT,
                "protocol": "TCP",
            }],
        },
    })
}

fn slice_object(service: &Service) -> Value {
    let endpoints: Vec<Value> = service
        .endpoints
        .iter()
        .map(|e| json!({"addresses": [e.ip().to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-1", service.name),
            "namespace": service.namespace,
            "labels": {"kubernetes.io/service-name": service.name},
        },
        "addressType": "IPv4",
        "ports": [{"name": service.port_name, "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Seconds since midnight of an RFC 3339 timestamp (`...T01:18:49.123456Z`).
fn time_of_day(timestamp: &str) -> Option<f64> {
    let time = timestamp.split('T').nth(1)?;
    let time = time.trim_end_matches('Z');
    let time = time.split(['+', '-']).next()?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn seconds_between(from: &str, to: &str) -> Option<f64> {
    let (a, b) = (time_of_day(from)?, time_of_day(to)?);
    Some(if b >= a { b - a } else { b + 86_400.0 - a })
}

impl Bed {
    /// A lab for `mode` serving `services` (nothing programmed yet).
    pub fn new(mode: Mode, services: Vec<Service>) -> anyhow::Result<Self> {
        let lab = NodeLab::new(crate::lab::TEST_PREFIX, BACKENDS)
            .with_context(|| format!("lab for {mode}"))?;
        // Every pool address on its backend.
        let pool = pool();
        for (i, ns) in lab.backends.iter().enumerate() {
            let commands: String = pool
                .iter()
                .filter(|a| a.octets()[2] == (i + 1) as u8 && a.octets()[3] != 2)
                .map(|a| format!("addr add {a}/24 dev eth0\n"))
                .collect();
            ip_batch(&ns.name, &commands)?;
        }
        // The client is a pod: its source address is in the cluster CIDR.
        lab.client
            .ip(&format!("addr add {CLIENT_POD_ADDR}/32 dev eth0"))?;
        lab.client.ip(&format!(
            "route replace default via {NODE_CLIENT_SIDE_ADDR} src {CLIENT_POD_ADDR}"
        ))?;
        lab.node.ip(&format!(
            "route add {CLIENT_POD_ADDR}/32 via {} dev lb-c0",
            crate::lab::CLIENT_ADDR
        ))?;
        // A load generator opens tens of thousands of connections a second; it may reuse
        // TIME_WAIT ports, and has the whole port range.
        lab.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        lab.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        // ... and keeps no TIME_WAIT sockets at all (the closing handshake on the wire is the
        // same). Otherwise each connect() searches for a free port among its own TIME_WAIT
        // sockets to the same destination, a cost of the generator that grows with the
        // connection rate per destination address: no load balancer spreads over 60 endpoint
        // addresses, the load balancers over 10 to 10,000 Service addresses, so the floor's
        // cost depended on the Service count and on how often its own slices ran.
        lab.client.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
        // Conntrack (kube-proxy's modes) keeps closed connections in TIME_WAIT for 120 s: at
        // the benchmark's rates that would fill the 262,144-entry table within rounds, which no
        // node sustains for minutes. 20 s keeps it well below (and, if anything, shortens
        // their hash chains).
        lab.node
            .sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "20")?;
        let servers = lab
            .backends
            .iter()
            .enumerate()
            .map(|(i, ns)| Server::start(ns, &format!("backend-{}", i + 1), TARGET_PORT))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tmp = tempfile::tempdir()?;
        let api = if mode.is_ours() {
            let api = FakeApi::start(&lab.node)?;
            api.apply(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "node-a"},
                "status": {"addresses": [{"type": "InternalIP", "address": NODE_CLIENT_SIDE_ADDR}]},
            }));
            for service in &services {
                api.apply(service_object(service));
                api.apply(slice_object(service));
            }
            std::fs::write(tmp.path().join("kubeconfig"), api.kubeconfig())?;
            Some(api)
        } else {
            None
        };
        // Every bed's load generator joins a cgroup of its own, so that being in one is no
        // difference between modes; only ours (socket LB) has programs on it.
        let cgroup = Arc::new(ThreadCgroup::new(&format!("{}-client", lab.lab.id))?);
        Ok(Self {
            mode,
            lab,
            services,
            pool,
            config: ProxyConfig::default(),
            servers,
            api,
            agent: None,
            tmp,
            log_seen: 0,
            programmed: false,
            load_limit: Duration::from_secs(60),
            agent_args: Vec::new(),
            cgroup,
        })
    }

    /// Keeps the echo servers on CPU `cpu` (`None`: back where they started).
    pub fn pin_servers(&self, cpu: Option<usize>) -> anyhow::Result<()> {
        self.servers.iter().try_for_each(|s| s.pin(cpu))
    }

    /// Where this bed's load comes from.
    pub fn client(&self) -> load::Client {
        load::Client {
            ns: self.lab.client.clone(),
            cgroup: self.cgroup.clone(),
        }
    }

    fn node_command(&self, program: &str) -> Command {
        self.lab.node.command(program)
    }

    /// `iptables-restore` as kube-proxy runs it (`RestoreAll`: no flush, counters, lock wait).
    fn restore_command(&self, bin: &str) -> Command {
        let mut command = self.node_command(&format!("{bin}-restore"));
        command.args(["-w", "5", "-W", "100000", "--noflush", "--counters"]);
        command
    }

    /// Where each Service's connections go: its ClusterIP, or with no load balancer its
    /// endpoints.
    pub fn targets(&self) -> Targets {
        Arc::new(
            self.services
                .iter()
                .map(|s| {
                    if self.mode == Mode::Direct {
                        s.endpoints.iter().map(|e| SocketAddr::V4(*e)).collect()
                    } else {
                        vec![SocketAddr::V4(SocketAddrV4::new(s.cluster_ip, s.port))]
                    }
                })
                .collect(),
        )
    }

    /// The address a bulk stream goes to (Service 0's ClusterIP, or its first endpoint).
    pub fn bulk_target(&self) -> SocketAddr {
        let s = &self.services[0];
        if self.mode == Mode::Direct {
            SocketAddr::V4(s.endpoints[0])
        } else {
            SocketAddr::V4(SocketAddrV4::new(s.cluster_ip, SERVICE_PORT))
        }
    }

    /// Programs every Service from empty.
    pub fn program(&mut self) -> anyhow::Result<Timing> {
        anyhow::ensure!(!self.programmed, "{}: already programmed", self.mode);
        let limit = self.load_limit;
        let timing = match self.mode {
            Mode::Direct => Timing::done(Duration::ZERO),
            Mode::Ours | Mode::OursSocket => self.start_agent()?,
            Mode::IptablesLegacy | Mode::IptablesNft => {
                let bin = self.mode.iptables().unwrap_or_default();
                for jump in iptables::jump_commands() {
                    // EnsureChain, then EnsureRule(Prepend).
                    let _ = run(self
                        .node_command(bin)
                        .args(["-w", "5", "-t", jump.table, "-N", jump.to]));
                    run(self
                        .node_command(bin)
                        .args(["-w", "5", "-t", jump.table, "-I", jump.from, "1"])
                        .args(&jump.args))?;
                }
                let text = iptables::restore_full(&self.services, &self.config);
                let took = timed_with_input(&mut self.restore_command(bin), &text, limit)?;
                let mut timing = Timing::from(took, limit);
                if !timing.finished {
                    // Not in reasonable time: load the same rules in chunks, so that the
                    // datapath can be measured all the same.
                    let started = Instant::now();
                    for chunk in iptables::restore_chunks(&self.services, &self.config, CHUNK) {
                        timed_with_input(&mut self.restore_command(bin), &chunk, limit)?
                            .with_context(|| {
                                format!("{bin}-restore of {CHUNK} Services took over {limit:?}")
                            })?;
                    }
                    timing.wall = started.elapsed();
                }
                timing
            }
            Mode::Nftables => {
                let tx = nftables::transaction_full(&self.services, &self.config, true);
                let took =
                    timed_with_input(self.node_command("nft").args(["-f", "-"]), &tx, limit)?;
                let mut timing = Timing::from(took, limit);
                if !timing.finished {
                    // As for iptables-nft: the same ruleset in chunks.
                    let started = Instant::now();
                    for chunk in nftables::transaction_chunks(&self.services, &self.config, CHUNK) {
                        timed_with_input(
                            self.node_command("nft").args(["-f", "-"]),
                            &chunk,
                            limit,
                        )?
                        .with_context(|| {
                            format!("nft -f of {CHUNK} Services took over {limit:?}")
                        })?;
                    }
                    timing.wall = started.elapsed();
                }
                timing
            }
        };
        self.programmed = true;
        Ok(timing)
    }

    /// Removes the datapath (kube-proxy `--cleanup`, `lb-agent --cleanup`), back to empty.
    pub fn clear(&mut self) -> anyhow::Result<()> {
        match self.mode {
            Mode::Direct => {}
            Mode::Ours | Mode::OursSocket => {
                if let Some(mut agent) = self.agent.take() {
                    agent.stop()?;
                }
                run(self
                    .lab
                    .node
                    .command(agent_binary()?)
                    .arg("--pin-dir")
                    .arg(self.lab.lab.pin_dir())
                    .arg("--cleanup"))?;
            }
            Mode::IptablesLegacy => {
                for table in ["nat", "filter"] {
                    for op in ["-F", "-X"] {
                        run(self
                            .node_command("iptables-legacy")
                            .args(["-w", "5", "-t", table, op]))?;
                    }
                }
            }
            Mode::IptablesNft => {
                run(self.node_command("nft").args(["flush", "ruleset"]))?;
            }
            Mode::Nftables => {
                run(self
                    .node_command("nft")
                    .args(["delete", "table", "ip", "kube-proxy"]))?;
            }
        }
        self.programmed = false;
        Ok(())
    }

    /// Moves one endpoint of the middle Service to another address, through the datapath's
    /// own update path. (Nothing to do without a load balancer.)
    pub fn change_one_endpoint(&mut self) -> anyhow::Result<Timing> {
        let index = self.services.len() / 2;
        let after = change_one_endpoint(&self.services, index, &self.pool);
        let changed: BTreeSet<usize> = [index].into();
        let limit = self.load_limit;
        let timing = match self.mode {
            Mode::Direct => Timing::done(Duration::ZERO),
            Mode::Ours | Mode::OursSocket => {
                let api = self.api.as_ref().context("no API server")?;
                let started = Instant::now();
                api.apply(slice_object(&after[index]));
                let line = self.wait_for_programmed(Duration::from_secs(60), 1)?;
                let latency = line["fields"]["latency_us"]
                    .as_u64()
                    .context("no latency_us in the agent's log line")?;
                Timing {
                    took: Duration::from_micros(latency),
                    wall: started.elapsed(),
                    finished: true,
                }
            }
            Mode::IptablesLegacy | Mode::IptablesNft => {
                let bin = self.mode.iptables().unwrap_or_default();
                let text =
                    iptables::restore_partial(&self.services, &after, &changed, &self.config);
                let took = timed_with_input(&mut self.restore_command(bin), &text, limit)?;
                Timing::from(took, limit)
            }
            Mode::Nftables => {
                let tx =
                    nftables::transaction_partial(&self.services, &after, &changed, &self.config);
                let took =
                    timed_with_input(self.node_command("nft").args(["-f", "-"]), &tx, limit)?;
                Timing::from(took, limit)
            }
        };
        if timing.finished {
            self.services = after;
        }
        Ok(timing)
    }

    fn start_agent(&mut self) -> anyhow::Result<Timing> {
        let log = self.tmp.path().join(format!("agent-{}.log", self.log_seen));
        let kubeconfig = self.tmp.path().join("kubeconfig");
        let kubeconfig = kubeconfig.to_string_lossy().to_string();
        let started = Instant::now();
        let mut args = vec![
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            "node-a",
            "--log-format",
            "json",
            // No periodic full resync inside a measurement.
            "--sync-period",
            "60m",
            // A change is applied when seen, not up to 1 s later: the work is timed, not
            // the rate limit (kube-proxy's --min-sync-period plays no part in theirs).
            "--min-sync-period",
            "10ms",
        ];
        let cgroup = self.cgroup.path().to_string_lossy().to_string();
        if self.mode == Mode::OursSocket {
            args.extend(["--socket-lb-cgroup", cgroup.as_str()]);
        }
        args.extend(self.agent_args.iter().map(String::as_str));
        let agent = Agent::start_run(
            &self.lab.node,
            &self.lab.lab.pin_dir(),
            &self.lab.node_interfaces(),
            &log,
            &args,
        )?;
        self.agent = Some(agent);
        self.log_seen = 0;
        let line = self.wait_for_programmed(Duration::from_secs(180), self.services.len())?;
        let wall = started.elapsed();
        let lists_done = self
            .log_lines()
            .into_iter()
            .find(|l| l["fields"]["message"] == "initial lists complete")
            .context("no \"initial lists complete\" in the agent's log")?;
        let took = seconds_between(
            lists_done["timestamp"].as_str().unwrap_or_default(),
            line["timestamp"].as_str().unwrap_or_default(),
        )
        .context("unreadable timestamps in the agent's log")?;
        Ok(Timing {
            took: Duration::from_secs_f64(took),
            wall,
            finished: true,
        })
    }

    fn log_path(&self) -> Option<PathBuf> {
        self.agent.as_ref().map(|a| a.log.clone())
    }

    fn log_lines(&self) -> Vec<Value> {
        let Some(path) = self.log_path() else {
            return Vec::new();
        };
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the next "datapath programmed" line (after those already seen) that covers
    /// at least `services` Services.
    fn wait_for_programmed(&mut self, timeout: Duration, services: usize) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines();
            for (i, line) in lines.iter().enumerate().skip(self.log_seen) {
                let fields = &line["fields"];
                if fields["message"] == "datapath programmed" {
                    self.log_seen = i + 1;
                    let errors = line["level"] == "WARN";
                    anyhow::ensure!(!errors, "agent: {line}");
                    if fields["services"].as_u64().unwrap_or(0) as usize >= services {
                        return Ok(line.clone());
                    }
                }
            }
            if let Some(agent) = self.agent.as_mut() {
                // Waits a little; fails with the log if the agent exited.
                if let Err(err) = agent.wait_until(Duration::from_millis(20), || false) {
                    if err.to_string().contains("exited") {
                        return Err(err.context(format!("{}: agent", self.mode)));
                    }
                }
            }
            if Instant::now() > deadline {
                let log = self.agent.as_ref().map(Agent::log_text).unwrap_or_default();
                let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                bail!(
                    "{}: agent did not program within {timeout:?}; log tail:\n{tail}",
                    self.mode
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// A few hundred connections to every kind of target must all succeed.
    pub fn verify(&self) -> anyhow::Result<()> {
        let report = load::run(
            &self.client(),
            &self.targets(),
            &load::LoadConfig {
                duration: Duration::from_millis(300),
                warmup: Duration::ZERO,
                concurrency: 4,
                threads: 1,
                timeout: Duration::from_secs(2),
                client_cpu: None,
            },
        )?;
        if report.failed > 0 || report.ok == 0 {
            bail!(
                "{}: {} of {} connections failed: {:?}",
                self.mode,
                report.failed,
                report.failed + report.ok,
                report.first_errors
            );
        }
        Ok(())
    }

    /// What the datapath holds for these Services (for the report), counted on the generated
    /// rules (listing 100,000 chains back from the kernel takes longer than loading them).
    pub fn size(&self) -> String {
        match self.mode {
            Mode::Direct => String::new(),
            Mode::Ours | Mode::OursSocket => {
                format!("{} Services in the maps", self.services.len())
            }
            Mode::IptablesLegacy | Mode::IptablesNft => {
                let text = iptables::restore_full(&self.services, &self.config);
                let nat = text.split("*nat\n").nth(1).unwrap_or_default();
                let rules = nat.lines().filter(|l| l.starts_with("-A ")).count();
                let chains = nat.lines().filter(|l| l.starts_with(':')).count();
                format!("{rules} nat rules in {chains} chains")
            }
            Mode::Nftables => {
                let tx = nftables::transaction_full(&self.services, &self.config, false);
                let chains = tx.lines().filter(|l| l.starts_with("add chain ")).count();
                let rules = tx.lines().filter(|l| l.starts_with("add rule ")).count();
                format!("{rules} rules in {chains} chains")
            }
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // The agent first (its pins go with the lab's pin directory), then the lab.
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_interleaved_and_distinct() {
        let pool = pool();
        assert_eq!(pool.len(), BACKENDS * ADDRESSES_PER_BACKEND);
        assert_eq!(pool[0], Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(pool[1], Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(pool[3], Ipv4Addr::new(10, 244, 1, 10));
        let mut sorted = pool.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), pool.len());
    }

    #[test]
    fn log_timestamps() {
        let d =
            seconds_between("2026-11-24T01:18:49.123456Z", "2026-11-24T01:18:50.000456Z").unwrap();
        assert!((d - 0.877).abs() < 1e-9, "{d}");
        let wrap = seconds_between("2026-11-24T23:59:59.5Z", "2026-11-25T00:00:00.25Z").unwrap();
        assert!((wrap - 0.75).abs() < 1e-9, "{wrap}");
    }
}
