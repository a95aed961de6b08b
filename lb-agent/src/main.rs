use std::{
    io::{self, IsTerminal, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{loader, manifest, maps, model};
use tracing::{info, warn};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Program the datapath from manifests and keep it attached until SIGINT/SIGTERM.
    Run(RunArgs),
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
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Standalone mode: directory of Service / EndpointSlice manifests.
    #[arg(long)]
    manifests: PathBuf,
    /// Interfaces to attach to (ingress); repeat the flag or separate with commas.
    #[arg(
        long = "interface",
        short = 'i',
        value_delimiter = ',',
        required = true
    )]
    interfaces: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Output {
    Table,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(&cli.pin_dir, args),
        Command::Services { output } => show_services(&cli.pin_dir, output),
        Command::Stats { output } => show_stats(&cli.pin_dir, output),
    };
    match result {
        // `lb-agent services | head` is not an error.
        Err(err)
            if err
                .downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
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
    let manifests = manifest::read_dir(&args.manifests)?;
    for error in &manifests.errors {
        warn!(%error, "manifest skipped");
    }
    for object in &manifests.ignored {
        info!(%object, "ignoring object of a kind the agent does not use");
    }
    let desired = model::desired_state(&manifests.services, &manifests.endpoint_slices);
    for error in &desired.errors {
        warn!(object = %error.object, field = %error.field, "{}", error.message);
    }
    for (object, reason) in &desired.skipped {
        info!(%object, "no frontend: {reason}");
    }

    let mut ebpf = loader::load(pin_dir)?;
    let attachments = loader::attach(&mut ebpf, &args.interfaces)?;
    let mut applier = maps::Applier::open(pin_dir)?;
    let report = applier.sync(&desired)?;
    for error in &report.errors {
        warn!("{error}");
    }
    info!(
        services = report.services,
        frontends = report.frontends,
        backends = report.backends,
        writes = report.writes,
        deletes = report.deletes,
        pin_dir = %pin_dir.display(),
        "datapath programmed"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(wait_for_signal())?;
    info!("signalled: detaching");
    attachments.detach(&mut ebpf)?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

fn show_services(pin_dir: &Path, output: Output) -> anyhow::Result<()> {
    let services = maps::read_services(pin_dir)?;
    let mut out = io::stdout().lock();
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, &services)?;
            writeln!(out)?;
        }
        Output::Table => {
            let rows: Vec<[String; 4]> = services
                .iter()
                .map(|s| {
                    let frontends = s
                        .frontends
                        .iter()
                        .map(|f| format!("{}:{}", f.addr, f.port))
                        .collect::<Vec<_>>()
                        .join(",");
                    let backends = if s.backends.is_empty() {
                        "<none>".to_string()
                    } else {
                        s.backends
                            .iter()
                            .map(|b| format!("{}:{}", b.addr, b.port))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    [
                        s.name.clone(),
                        frontends,
                        s.backends.len().to_string(),
                        backends,
                    ]
                })
                .collect();
            write_table(
                &mut out,
                ["SERVICE", "FRONTENDS", "READY", "BACKENDS"],
                &rows,
            )?;
        }
    }
    Ok(())
}

fn show_stats(pin_dir: &Path, output: Output) -> anyhow::Result<()> {
    let counters = maps::read_counters(pin_dir)?;
    let mut out = io::stdout().lock();
    match output {
        Output::Json => {
            let map: serde_json::Map<String, serde_json::Value> = counters
                .iter()
                .map(|(c, v)| (c.name().to_string(), (*v).into()))
                .collect();
            serde_json::to_writer_pretty(&mut out, &map)?;
            writeln!(out)?;
        }
        Output::Table => {
            let rows: Vec<[String; 2]> = counters
                .iter()
                .map(|(c, v)| [c.name().to_string(), v.to_string()])
                .collect();
            write_table(&mut out, ["COUNTER", "PACKETS"], &rows)?;
        }
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
