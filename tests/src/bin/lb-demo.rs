//! The demo behind `cargo xtask demo`: a lab of network namespaces, the real agent on the
//! example manifests, real traffic, and a dump of what happened.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use lb_agent::maps::read_services;
use lb_tests::{
    agent::{cli, Agent},
    echo::{tcp_request, udp_request, EchoServer, Reply},
    lab::{backend_addr, sweep, NodeLab, CLIENT_ADDR},
};

const PREFIX: &str = "lbdemo";
/// Processes a `--keep` run left behind, stopped by the next run.
const STATE_FILE: &str = "/run/lb-demo.pids";
const VIP: &str = "10.96.0.10:80";
const BACKEND_PORT: u16 = 8080;

#[derive(Parser)]
#[command(
    name = "lb-demo",
    about = "Service load balancer demo in a lab of namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// The lb-agent binary.
    #[arg(long, default_value = "target/debug/lb-agent")]
    agent: PathBuf,
    /// Directory of Service / EndpointSlice manifests.
    #[arg(long, default_value = "examples")]
    manifests: PathBuf,
    /// Requests per protocol.
    #[arg(long, default_value_t = 60)]
    requests: usize,
    /// Leave the lab, the agent and the echo servers running; print how to explore them.
    #[arg(long)]
    keep: bool,
}

#[derive(Subcommand)]
enum Sub {
    /// (internal) Run an echo server in the current network namespace until killed.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::Serve { name, port }) = cli.command {
        let _server = EchoServer::start_here(&name, port)?;
        loop {
            std::thread::park();
        }
    }
    demo(&cli)
}

fn demo(cli: &Cli) -> anyhow::Result<()> {
    stop_previous_run();
    sweep(PREFIX);
    let agent_binary = fs::canonicalize(&cli.agent)
        .with_context(|| format!("agent binary {}", cli.agent.display()))?;
    std::env::set_var("LB_AGENT_BIN", &agent_binary);
    let manifests = fs::canonicalize(&cli.manifests)
        .with_context(|| format!("manifest directory {}", cli.manifests.display()))?;

    let mut lab = NodeLab::new(PREFIX, 3)?;
    let names: Vec<String> = lab
        .lab
        .namespaces()
        .iter()
        .map(|n| n.name.clone())
        .collect();
    println!("lab {}: namespaces {}", lab.lab.id, names.join(", "));
    println!(
        "  client {CLIENT_ADDR} -> node -> {}",
        (1..=3)
            .map(|i| format!("backend-{i} {}:{BACKEND_PORT}", backend_addr(i)))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let me = std::env::current_exe()?;
    let mut servers = Vec::new();
    for (i, ns) in lab.backends.iter().enumerate() {
        let child = ns
            .command(&me)
            .args(["serve", "--name", &format!("backend-{}", i + 1)])
            .args(["--port", &BACKEND_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting an echo server")?;
        servers.push(KillOnDrop(Some(child)));
    }

    let pin_dir = lab.lab.pin_dir();
    let log = std::env::temp_dir().join(format!("{}-agent.log", lab.lab.id));
    let interfaces = lab.node_interfaces();
    let mut agent = Agent::start(&lab.node, &pin_dir, &manifests, &interfaces, &log)?;
    println!(
        "agent: lb-agent --pin-dir {} run --manifests {} --interface {} (log {})",
        pin_dir.display(),
        manifests.display(),
        interfaces.join(","),
        log.display()
    );
    agent.wait_until(Duration::from_secs(20), || {
        read_services(&pin_dir).is_ok_and(|s| s.iter().any(|s| !s.backends.is_empty()))
    })?;

    let vip: SocketAddr = VIP.parse()?;
    let requests = cli.requests;
    let (tcp, udp) = lab.client.run(move || {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for _ in 0..requests {
            tcp.push(tcp_request(vip, Duration::from_secs(2)));
            udp.push(udp_request(vip, Duration::from_secs(2)));
        }
        Ok((tcp, udp))
    })?;

    println!("\ntraffic from the client to demo-service {VIP}:");
    let tcp_ok = report("TCP connections", &tcp);
    let udp_ok = report("UDP datagrams", &udp);

    println!("\n$ lb-agent services");
    print!("{}", cli_or_error(&pin_dir, &["services"]));
    println!("\n$ lb-agent stats");
    print!("{}", cli_or_error(&pin_dir, &["stats"]));
    println!(
        "\nraw maps, fields by name: bpftool map dump pinned {}",
        pin_dir.join("LB_FRONTENDS").display()
    );

    if cli.keep {
        let mut pids: Vec<u32> = servers.iter_mut().filter_map(|s| s.forget()).collect();
        pids.extend(agent.pid());
        fs::write(
            STATE_FILE,
            pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
        )
        .context("recording the kept processes")?;
        std::mem::forget(agent);
        lab.lab.keep();
        println!("\nthe lab stays up (the next `cargo xtask demo` removes it). Explore it:");
        println!(
            "  nsenter --net=/run/netns/{} -- bash -c 'exec 3<>/dev/tcp/10.96.0.10/80; echo hi >&3; head -1 <&3'",
            lab.client.name
        );
        println!(
            "  {} --pin-dir {} services",
            agent_binary.display(),
            pin_dir.display()
        );
        println!(
            "  bpftool map dump pinned {}",
            pin_dir.join("LB_BACKENDS").display()
        );
        println!(
            "tear down: kill {} && for n in {}; do ip netns del $n; done && rm -r {}",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            names.join(" "),
            pin_dir.display()
        );
    } else {
        let status = agent.stop()?;
        if !status.success() {
            bail!("agent exited with {status}; log in {}", log.display());
        }
    }
    if !(tcp_ok && udp_ok) {
        bail!("some requests failed or a backend got no traffic");
    }
    Ok(())
}

/// Prints per-backend counts; true when every request was answered and every backend served.
fn report(what: &str, results: &[anyhow::Result<Reply>]) -> bool {
    let mut counts: BTreeMap<String, usize> =
        (1..=3).map(|i| (format!("backend-{i}"), 0)).collect();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(reply) => *counts.entry(reply.server.clone()).or_default() += 1,
            Err(err) => failures.push(format!("{err:#}")),
        }
    }
    let answered = results.len() - failures.len();
    println!(
        "  {what:<16} {answered}/{} answered: {}",
        results.len(),
        counts
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(first) = failures.first() {
        println!("    first failure: {first}");
    }
    failures.is_empty() && counts.values().all(|&n| n > 0)
}

fn cli_or_error(pin_dir: &Path, args: &[&str]) -> String {
    cli(pin_dir, args).unwrap_or_else(|e| format!("error: {e:#}\n"))
}

/// Stops the processes a previous `--keep` run left behind.
fn stop_previous_run() {
    let Ok(pids) = fs::read_to_string(STATE_FILE) else {
        return;
    };
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = fs::remove_file(STATE_FILE);
    std::thread::sleep(Duration::from_millis(300));
}

struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn forget(&mut self) -> Option<u32> {
        self.0.take().map(|c| c.id())
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
