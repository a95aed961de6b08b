//! `lb-compare`: this datapath side by side with kube-proxy's iptables (legacy and nft back
//! ends) and nftables modes, and with no load balancer at all, in the same lab topology and
//! for the same Services. See `tests/src/compare/` for what each mode loads and how it is
//! timed.
//!
//! For each Service count: one lab per mode, each programmed from empty (timed) and changed by
//! one endpoint (timed); then rounds in which every measurement runs once per mode in turn
//! (none, ours, iptables-legacy, iptables-nft, nftables, then again), so that drifts of the
//! shared machine land on all modes alike: new connections per second through a ClusterIP,
//! request latency with one connection at a time, one bulk TCP stream; then more rounds of
//! programming from empty and one endpoint change. Figures are medians over the rounds, ratios
//! the median of the per-round ratios.
//!
//! `--quick` (what `cargo xtask test` runs): 10 Services, one short round, all modes, nothing
//! written; fails if any connection fails. The default writes a section of
//! docs/benchmarks.md between its markers and SVG charts next to it.

// The comparison lives in tests/src/compare/ and is compiled into this binary. (`crate::lab`
// and friends below resolve to the library's modules through these imports.)
use lb_tests::{agent, cgroup, fake_api, lab};

#[allow(dead_code)]
#[path = "../compare/mod.rs"]
mod compare;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use compare::{
    bed::{self, Bed, Mode},
    chart::{self, Chart},
    load,
};

#[derive(Parser)]
#[command(name = "lb-compare")]
struct Cli {
    /// Smoke run: 10 Services, one short round of every measurement, nothing written.
    #[arg(long)]
    quick: bool,
    /// Service counts (default 10, 1,000, 10,000).
    #[arg(long, value_delimiter = ',')]
    services: Vec<usize>,
    /// Rounds of traffic measurements per Service count.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Fresh labs per Service count, the traffic rounds split among them: each lab places
    /// its echo servers and generator threads on the CPUs its own way, which moves a whole
    /// lab's connection rate by a few percent, so one lab per mode would be one sample of it.
    #[arg(long, default_value_t = 2)]
    labs: usize,
    /// Rounds of programming from empty per Service count.
    #[arg(long, default_value_t = 3)]
    program_rounds: usize,
    /// Counted seconds of each connection-rate measurement.
    #[arg(long, default_value_t = 2.4)]
    seconds: f64,
    /// Slices each round's connection-rate and latency measurements are cut into, the modes
    /// taking turns slice by slice
    #[arg(long, default_value_t = 8)]
    slices: u32,
    /// Connections in flight during the connection-rate measurement.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Load generator threads for the connection rate (default: one per CPU, so that no CPU
    /// idles and every cost a datapath adds shows in the rate).
    #[arg(long)]
    threads: Option<usize>,
    /// Directory of benchmarks.md and the charts.
    #[arg(long, default_value = "docs")]
    docs: PathBuf,
    /// Do not write anything (print only).
    #[arg(long)]
    no_write: bool,
    /// Only these modes (comma-separated slugs: direct, ours-socket, ours, iptables-legacy,
    /// iptables-nft, nftables), for experiments.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// The longest one rule load (iptables-restore, nft -f) may take before it is stopped and
    /// reported as not finished (seconds).
    #[arg(long, default_value_t = 30.0)]
    load_limit: f64,
    /// Pin the load generators to CPU 0 and the echo servers to CPU 1 (experiments: per-CPU
    /// profiles).
    #[arg(long)]
    pin_cpus: bool,
    /// Leave `kernel.bpf_stats_enabled` as it is (experiments reading `bpftool prog show`'s
    /// run times); otherwise it is off for the run, since it adds to every program run.
    #[arg(long)]
    keep_bpf_stats: bool,
    /// An extra argument for our agent (repeat for several), for experiments such as
    /// `--agent-arg=--conntrack-max=524288`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Print the rules kube-proxy would load for the first Service count (`iptables`: the
    /// iptables-restore input; `nftables`: the nft transaction) and exit.
    #[arg(long, value_parser = ["iptables", "nftables"])]
    print: Option<String>,
}

const START: &str = "<!-- compare-bench:start -->";
const END: &str = "<!-- compare-bench:end -->";

/// Samples of one mode at one Service count, one per round.
#[derive(Default, Clone, Debug)]
struct Samples {
    cps: Vec<f64>,
    /// Latency with the client and the echo servers on different CPUs ([`Placement`]).
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    /// ... and on one CPU.
    p50_one_cpu_us: Vec<f64>,
    p99_one_cpu_us: Vec<f64>,
    gbps: Vec<f64>,
    program_ms: Vec<f64>,
    program_wall_ms: Vec<f64>,
    change_ms: Vec<f64>,
    /// A load ran past the limit (its sample is the limit: a lower bound).
    program_censored: bool,
    change_censored: bool,
    failed: u64,
    connections: u64,
    errors: Vec<String>,
    size: String,
}

impl Samples {
    /// Counts a measurement's connections and keeps a few of its errors.
    fn tally(&mut self, r: &load::LoadReport) {
        self.failed += r.failed;
        self.connections += r.ok + r.failed;
        self.errors.extend(r.first_errors.iter().take(2).cloned());
    }
}

type Results = BTreeMap<usize, BTreeMap<Mode, Samples>>;

fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Median over rounds of `a[r] / b[r]`.
fn ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&r)
}

struct Plan {
    counts: Vec<usize>,
    rounds: usize,
    /// The traffic rounds of each fresh set of beds per count (1 to `rounds` sets, see
    /// [`lab_rounds`]).
    labs: Vec<std::ops::Range<usize>>,
    program_rounds: usize,
    cps: load::LoadConfig,
    latency: load::LoadConfig,
    /// The CPUs this process may run on, lowest first (latency placements use the first two).
    cpus: Vec<usize>,
    bulk: Duration,
    modes: Vec<Mode>,
    load_limit: Duration,
    agent_args: Vec<String>,
    /// Slices each traffic measurement of a round is cut into, modes alternating.
    slices: u32,
}

/// The traffic rounds lab `lab` of `labs` runs out of `rounds`: an even share, in order.
fn lab_rounds(rounds: usize, labs: usize, lab: usize) -> std::ops::Range<usize> {
    lab * rounds / labs..(lab + 1) * rounds / labs
}

/// Extra programming rounds only for datapaths whose first load took less than this (one
/// sample of a load that long is enough, and the run stays bounded).
const REPEAT_LOADS_UNDER_MS: f64 = 10_000.0;

fn measure_count(plan: &Plan, services: usize, results: &mut Results) -> anyhow::Result<()> {
    let pool = bed::pool();
    let list = compare::services(services, &pool);
    let entry = results.entry(services).or_default();
    for (lab, rounds) in plan.labs.iter().enumerate() {
        if plan.labs.len() > 1 {
            eprintln!(
                "compare: {services} Services, lab {} of {}",
                lab + 1,
                plan.labs.len()
            );
        }
        let beds = ready_beds(plan, services, &list, entry)?;
        traffic_rounds(plan, services, &beds, rounds.clone(), entry)?;
        if lab + 1 == plan.labs.len() {
            programming_rounds(plan, services, beds, entry)?;
        }
    }
    Ok(())
}

/// A bed per mode serving `list`: programmed (the time it took recorded in `entry`), one
/// endpoint changed (recorded too), and checked.
fn ready_beds(
    plan: &Plan,
    services: usize,
    list: &[compare::Service],
    entry: &mut BTreeMap<Mode, Samples>,
) -> anyhow::Result<Vec<Bed>> {
    let mut beds = Vec::new();
    for &mode in &plan.modes {
        let started = Instant::now();
        let mut b = Bed::new(mode, list.to_vec()).with_context(|| format!("{mode}: lab"))?;
        b.load_limit = plan.load_limit;
        b.agent_args = plan.agent_args.clone();
        let timing = b
            .program()
            .with_context(|| format!("{mode}: programming"))?;
        b.verify()?;
        let change = b
            .change_one_endpoint()
            .with_context(|| format!("{mode}: change"))?;
        b.verify()?;
        let samples = entry.entry(mode).or_default();
        if mode != Mode::Direct {
            record(samples, &timing, &change);
        }
        samples.size = b.size();
        eprintln!(
            "compare: {services} Services, {mode}: ready in {:.1} s (programmed in {}{:.1} ms, \
             one endpoint change {}{:.2} ms) {}",
            started.elapsed().as_secs_f64(),
            if timing.finished { "" } else { "over " },
            timing.took.as_secs_f64() * 1e3,
            if change.finished { "" } else { "over " },
            change.took.as_secs_f64() * 1e3,
            samples.size
        );
        beds.push(b);
    }
    Ok(beds)
}

/// Traffic rounds `rounds` on `beds`: connection rate, latency in each placement, bulk.
fn traffic_rounds(
    plan: &Plan,
    services: usize,
    beds: &[Bed],
    rounds: std::ops::Range<usize>,
    entry: &mut BTreeMap<Mode, Samples>,
) -> anyhow::Result<()> {
    for round in rounds {
        eprintln!("compare: {services} Services, traffic round {}", round + 1);
        let order: Vec<&Bed> = round_order(beds.len(), round)
            .into_iter()
            .map(|i| &beds[i])
            .collect();
        let cps = interleaved(&order, &plan.cps, plan.slices)?;
        for (b, r) in order.iter().zip(&cps) {
            let s = entry.entry(b.mode).or_default();
            s.cps.push(r.per_second());
            s.tally(r);
            eprintln!(
                "  {:<18} {:>9.0} connections/s ({} failed)",
                b.mode.label(),
                r.per_second(),
                r.failed
            );
        }
        for placement in [Placement::AcrossCpus, Placement::OneCpu] {
            let Some(cpus) = placement.cpus(&plan.cpus) else {
                continue;
            };
            let latency = pinned(beds, cpus, &plan.latency, |config| {
                interleaved(&order, config, plan.slices)
            })?;
            for (b, r) in order.iter().zip(&latency) {
                let s = entry.entry(b.mode).or_default();
                let (p50, p99) = match placement {
                    Placement::AcrossCpus => (&mut s.p50_us, &mut s.p99_us),
                    Placement::OneCpu => (&mut s.p50_one_cpu_us, &mut s.p99_one_cpu_us),
                };
                let (median, tail) = (r.latency.quantile(0.5), r.latency.quantile(0.99));
                p50.push(median);
                p99.push(tail);
                s.tally(r);
                eprintln!(
                    "  {:<18} latency p50 {median:>6.1} us, p99 {tail:>6.1} us ({})",
                    b.mode.label(),
                    placement.label()
                );
            }
        }
        for b in order.iter().copied() {
            let bps = load::bulk(&b.client(), b.bulk_target(), plan.bulk)
                .with_context(|| format!("{}: bulk stream", b.mode))?;
            entry.entry(b.mode).or_default().gbps.push(bps / 1e9);
            eprintln!("  {:<18} bulk {:>6.2} Gbit/s", b.mode.label(), bps / 1e9);
        }
    }
    Ok(())
}

/// The extra programming rounds: each bed cleared and programmed from empty again.
fn programming_rounds(
    plan: &Plan,
    services: usize,
    mut beds: Vec<Bed>,
    entry: &mut BTreeMap<Mode, Samples>,
) -> anyhow::Result<()> {
    for round in 1..plan.program_rounds {
        eprintln!(
            "compare: {services} Services, programming round {}",
            round + 1
        );
        for b in &mut beds {
            let s = entry.entry(b.mode).or_default();
            let slow = s.program_censored
                || s.program_ms
                    .first()
                    .is_some_and(|ms| *ms > REPEAT_LOADS_UNDER_MS);
            if b.mode == Mode::Direct || slow {
                continue;
            }
            b.clear()?;
            let timing = b.program()?;
            let change = b.change_one_endpoint()?;
            b.verify()?;
            record(s, &timing, &change);
            eprintln!(
                "  {:<18} programmed in {:.1} ms, change {:.2} ms",
                b.mode.label(),
                timing.took.as_secs_f64() * 1e3,
                change.took.as_secs_f64() * 1e3
            );
        }
    }
    // Still serving after all that.
    for b in &beds {
        b.verify()?;
    }
    Ok(())
}

/// The order the modes take turns in during `round`. A slice runs right after the previous
/// mode's, whose connections leave work behind in the kernel (timers, TIME_WAIT sockets,
/// conntrack entries); a fixed cycle would give each mode the same predecessor in every round,
/// a bias that would not average out. Rounds therefore step through the modes by 1, 2, ...
/// (steps coprime with their number, so each is one cycle): over a set of rounds every mode
/// follows every other one (an experiment at 1,000 Services found no predecessor effect above
/// the noise, but nothing rules it out elsewhere). Each round also starts one further on, so
/// that every mode also runs first.
fn round_order(modes: usize, round: usize) -> Vec<usize> {
    if modes < 2 {
        return (0..modes).collect();
    }
    let steps: Vec<usize> = (1..modes).filter(|&k| gcd(k, modes) == 1).collect();
    let step = steps[round % steps.len()];
    let start = round % modes;
    (0..modes).map(|i| (start + i * step) % modes).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Where the latency measurement keeps its client and the echo servers. One connection at a
/// time, unpinned, the scheduler puts them on one CPU or on two from run to run, and a wakeup
/// across CPUs costs about 30 µs on this VM (an IPI, a VM exit): p50 then told which placement
/// a mode happened to get (40 or 70 µs, for no load balancer as for ours), not what the
/// datapath costs. Pinned, both placements are measured, each the same for every mode.
#[derive(Clone, Copy)]
enum Placement {
    /// Client on CPU 0, servers on CPU 1: two pods on two CPUs.
    AcrossCpus,
    /// Everything on CPU 0: every cost on the path adds up, nothing overlaps.
    OneCpu,
}

impl Placement {
    /// (client CPU, server CPU) among the CPUs this process may use; `None` when it has too
    /// few for this placement.
    fn cpus(self, allowed: &[usize]) -> Option<(usize, usize)> {
        let client = *allowed.first()?;
        match self {
            Placement::AcrossCpus => allowed.get(1).map(|&server| (client, server)),
            Placement::OneCpu => Some((client, client)),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Placement::AcrossCpus => "two CPUs",
            Placement::OneCpu => "one CPU",
        }
    }
}

/// Runs `measure` with the generator on CPU `client` and every bed's echo servers on CPU
/// `server`, and puts the servers back whatever happened.
fn pinned<T>(
    beds: &[Bed],
    (client, server): (usize, usize),
    config: &load::LoadConfig,
    measure: impl FnOnce(&load::LoadConfig) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let config = load::LoadConfig {
        client_cpu: Some(client),
        ..config.clone()
    };
    let result = beds
        .iter()
        .try_for_each(|b| b.pin_servers(Some(server)))
        .and_then(|()| measure(&config));
    let unpinned = beds.iter().try_for_each(|b| b.pin_servers(None));
    let value = result?;
    unpinned?;
    Ok(value)
}

/// One load measurement of every mode, cut into `slices` short slices visited in turn (A B C
/// A B C ...), each mode's slices merged into one report: the shared VM's drift over the
/// seconds a round takes lands on every mode alike instead of on whichever ran at the time.
fn interleaved(
    order: &[&Bed],
    config: &load::LoadConfig,
    slices: u32,
) -> anyhow::Result<Vec<load::LoadReport>> {
    let slices = slices.max(1);
    let slice = load::LoadConfig {
        duration: config.duration / slices,
        ..config.clone()
    };
    let mut merged = vec![load::LoadReport::default(); order.len()];
    for _ in 0..slices {
        for (b, total) in order.iter().zip(&mut merged) {
            let r = load::run(&b.client(), &b.targets(), &slice)
                .with_context(|| format!("{}: load", b.mode))?;
            total.seconds += r.seconds;
            total.absorb(r);
        }
    }
    Ok(merged)
}

fn record(s: &mut Samples, timing: &bed::Timing, change: &bed::Timing) {
    s.program_ms.push(timing.took.as_secs_f64() * 1e3);
    s.program_wall_ms.push(timing.wall.as_secs_f64() * 1e3);
    s.change_ms.push(change.took.as_secs_f64() * 1e3);
    s.program_censored |= !timing.finished;
    s.change_censored |= !change.finished;
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("–".into(), f)
}

fn x(v: Option<f64>) -> String {
    fmt_opt(v, |v| format!("{v:.2}x"))
}

/// A ratio with three decimals (the targets are judged on the exact figure).
fn x3(v: Option<f64>) -> String {
    fmt_opt(v, |v| format!("{v:.3}x"))
}

struct Report<'a> {
    results: &'a Results,
    modes: &'a [Mode],
    /// The rounds each lab ran ([`Plan::labs`]).
    labs: &'a [std::ops::Range<usize>],
}

impl Report<'_> {
    fn get(&self, n: usize, mode: Mode) -> Option<&Samples> {
        self.results.get(&n)?.get(&mode)
    }

    fn med(&self, n: usize, mode: Mode, f: impl Fn(&Samples) -> &Vec<f64>) -> Option<f64> {
        median(f(self.get(n, mode)?))
    }

    fn ratio(
        &self,
        n: usize,
        a: Mode,
        b: Mode,
        f: impl Fn(&Samples) -> &Vec<f64> + Copy,
    ) -> Option<f64> {
        ratio(f(self.get(n, a)?), f(self.get(n, b)?))
    }

    /// Per lab, the median of `a`'s per-round ratios to `b` in that lab's rounds.
    fn ratio_per_lab(
        &self,
        n: usize,
        a: Mode,
        b: Mode,
        f: impl Fn(&Samples) -> &Vec<f64> + Copy,
    ) -> Vec<Option<f64>> {
        let (Some(a), Some(b)) = (self.get(n, a), self.get(n, b)) else {
            return Vec::new();
        };
        self.labs
            .iter()
            .map(|r| ratio(f(a).get(r.clone())?, f(b).get(r.clone())?))
            .collect()
    }

    /// One line per Service count: each of ours' connection rate against no load balancer,
    /// lab by lab (empty with one lab, or without that floor).
    fn cps_per_lab(&self) -> String {
        if self.labs.len() < 2 || !self.has(Mode::Direct) {
            return String::new();
        }
        let mut out = String::new();
        for &n in self.results.keys() {
            let parts: Vec<String> = self
                .ours_modes()
                .into_iter()
                .map(|m| {
                    let per_lab: Vec<String> = self
                        .ratio_per_lab(n, m, Mode::Direct, |s| &s.cps)
                        .into_iter()
                        .map(x)
                        .collect();
                    format!("{} {}", m.label(), per_lab.join(", "))
                })
                .collect();
            out.push_str(&format!("- {n} Services: {}\n", parts.join("; ")));
        }
        out
    }

    fn has(&self, mode: Mode) -> bool {
        self.modes.contains(&mode)
    }

    fn lb_modes(&self) -> Vec<Mode> {
        self.modes
            .iter()
            .copied()
            .filter(|m| *m != Mode::Direct)
            .collect()
    }

    fn others(&self) -> Vec<Mode> {
        self.modes
            .iter()
            .copied()
            .filter(|m| *m != Mode::Direct && !m.is_ours())
            .collect()
    }

    /// Ours as the chart deploys it by default (tc only, when measured): the mode every
    /// other is compared with.
    fn ours(&self) -> Mode {
        if self.has(Mode::Ours) {
            Mode::Ours
        } else {
            Mode::OursSocket
        }
    }

    fn ours_modes(&self) -> Vec<Mode> {
        self.modes.iter().copied().filter(|m| m.is_ours()).collect()
    }

    fn header(&self, first: &str, modes: &[Mode], extra: &[String]) -> String {
        let mut h = format!("| {first} |");
        let mut sep = "|---:|".to_string();
        for m in modes {
            h.push_str(&format!(" {} |", m.label()));
            sep.push_str("---:|");
        }
        for e in extra {
            h.push_str(&format!(" {e} |"));
            sep.push_str("---:|");
        }
        format!("{h}\n{sep}\n")
    }

    fn cps_table(&self) -> String {
        let ours = self.ours();
        let mut extra = Vec::new();
        if self.has(Mode::Direct) {
            for m in self.ours_modes() {
                extra.push(format!("{} / none", m.label()));
            }
        }
        for m in self.others() {
            extra.push(format!("{} / {}", ours.label(), m.label()));
        }
        let mut out = self.header("Services", self.modes, &extra);
        for &n in self.results.keys() {
            out.push_str(&format!("| {n} |"));
            for &m in self.modes {
                out.push_str(&format!(
                    " {} |",
                    fmt_opt(self.med(n, m, |s| &s.cps), |v| format!("{v:.0}"))
                ));
            }
            if self.has(Mode::Direct) {
                for m in self.ours_modes() {
                    out.push_str(&format!(
                        " {} |",
                        x(self.ratio(n, m, Mode::Direct, |s| &s.cps))
                    ));
                }
            }
            for m in self.others() {
                out.push_str(&format!(" {} |", x(self.ratio(n, ours, m, |s| &s.cps))));
            }
            out.push('\n');
        }
        out
    }

    /// Latency with the placement `p50` and `p99` pick the samples of.
    fn latency_table(
        &self,
        p50: impl Fn(&Samples) -> &Vec<f64> + Copy,
        p99: impl Fn(&Samples) -> &Vec<f64> + Copy,
    ) -> String {
        let ours = self.ours();
        let extra: Vec<String> = self
            .others()
            .iter()
            .map(|m| format!("p99 {} / {}", m.label(), ours.label()))
            .collect();
        let mut out = self.header("Services", self.modes, &extra);
        for &n in self.results.keys() {
            out.push_str(&format!("| {n} |"));
            for &m in self.modes {
                let p50 = self.med(n, m, p50);
                let p99 = self.med(n, m, p99);
                out.push_str(&format!(
                    " {} / {} |",
                    fmt_opt(p50, |v| format!("{v:.0}")),
                    fmt_opt(p99, |v| format!("{v:.0}"))
                ));
            }
            for m in self.others() {
                out.push_str(&format!(" {} |", x(self.ratio(n, m, ours, p99))));
            }
            out.push('\n');
        }
        out
    }

    fn bulk_table(&self) -> String {
        let extra: Vec<String> = self
            .lb_modes()
            .iter()
            .filter(|_| self.has(Mode::Direct))
            .map(|m| format!("{} / none", m.label()))
            .collect();
        let mut out = self.header("Services", self.modes, &extra);
        for &n in self.results.keys() {
            out.push_str(&format!("| {n} |"));
            for &m in self.modes {
                out.push_str(&format!(
                    " {} |",
                    fmt_opt(self.med(n, m, |s| &s.gbps), |v| format!("{v:.2}"))
                ));
            }
            if self.has(Mode::Direct) {
                for m in self.lb_modes() {
                    out.push_str(&format!(
                        " {} |",
                        x(self.ratio(n, m, Mode::Direct, |s| &s.gbps))
                    ));
                }
            }
            out.push('\n');
        }
        out
    }

    fn programming_table(&self) -> String {
        self.timing_table(|s| &s.program_ms, |s| s.program_censored)
    }

    fn change_table(&self) -> String {
        self.timing_table(|s| &s.change_ms, |s| s.change_censored)
    }

    /// A time per load-balancing mode, then every other mode's as a ratio to ours; loads that
    /// were stopped at the limit are marked `> `.
    fn timing_table(
        &self,
        values: impl Fn(&Samples) -> &Vec<f64> + Copy,
        censored: impl Fn(&Samples) -> bool + Copy,
    ) -> String {
        let modes = self.lb_modes();
        let ours = self.ours();
        let extra: Vec<String> = self
            .others()
            .iter()
            .map(|m| format!("{} / {}", m.label(), ours.label()))
            .collect();
        let mut out = self.header("Services", &modes, &extra);
        let over = |n: usize, m: Mode| {
            if self.get(n, m).is_some_and(censored) {
                "> "
            } else {
                ""
            }
        };
        for &n in self.results.keys() {
            out.push_str(&format!("| {n} |"));
            for &m in &modes {
                out.push_str(&format!(
                    " {}{} |",
                    over(n, m),
                    fmt_opt(self.med(n, m, values), ms)
                ));
            }
            for m in self.others() {
                out.push_str(&format!(
                    " {}{} |",
                    over(n, m),
                    x(self.ratio(n, m, ours, values))
                ));
            }
            out.push('\n');
        }
        out
    }

    fn sizes(&self) -> String {
        let mut out = String::new();
        for (&n, modes) in self.results {
            let sizes: Vec<String> = modes
                .iter()
                .filter(|(_, s)| !s.size.is_empty())
                .map(|(m, s)| format!("{}: {}", m.label(), s.size))
                .collect();
            if !sizes.is_empty() {
                out.push_str(&format!("- {n} Services: {}.\n", sizes.join("; ")));
            }
        }
        out
    }

    /// The targets, each met or missed, with the figure, for each of our modes.
    fn targets(&self) -> String {
        self.ours_modes()
            .into_iter()
            .map(|m| self.targets_of(m))
            .collect()
    }

    fn targets_of(&self, ours: Mode) -> String {
        let mut out = String::new();
        let mut line = |ok: Option<bool>, text: String| {
            let verdict = match ok {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            out.push_str(&format!("- {}: {text}: {verdict}.\n", ours.label()));
        };
        let counts: Vec<usize> = self.results.keys().copied().collect();
        for &n in &counts {
            let r = self.ratio(n, ours, Mode::Direct, |s| &s.cps);
            line(
                r.map(|r| r >= 0.95),
                format!(
                    "Connections/s at {n} Services at least 0.95x no load balancer ({})",
                    x3(r)
                ),
            );
        }
        if let Some(&small) = counts.first() {
            for m in [Mode::IptablesLegacy, Mode::IptablesNft] {
                let c = self.ratio(small, ours, m, |s| &s.cps);
                let p = self.ratio(small, m, ours, |s| &s.p99_us);
                let p_one = self.ratio(small, m, ours, |s| &s.p99_one_cpu_us);
                line(
                    c.zip(p)
                        .zip(p_one)
                        .map(|((c, p), p_one)| c >= 1.0 && p >= 1.0 && p_one >= 1.0),
                    format!(
                        "At {small} Services at least as fast as {} on connections/s ({}) and p99 \
                         (theirs / ours {} on two CPUs, {} on one)",
                        m.label(),
                        x3(c),
                        x3(p),
                        x3(p_one)
                    ),
                );
            }
        }
        if let Some(&large) = counts.last().filter(|_| counts.len() > 1) {
            let c = self.ratio(large, ours, Mode::IptablesNft, |s| &s.cps);
            line(
                c.map(|c| c >= 3.0),
                format!(
                    "At {large} Services at least 3x iptables (nft back end) on connections/s ({})",
                    x3(c)
                ),
            );
            let c = self.ratio(large, ours, Mode::Nftables, |s| &s.cps);
            line(
                c.map(|c| c > 1.0),
                format!(
                    "At {large} Services ahead of nftables on connections/s ({})",
                    x3(c)
                ),
            );
            for m in [Mode::IptablesLegacy, Mode::IptablesNft] {
                let p = self.ratio(large, m, ours, |s| &s.program_ms);
                let over = self.get(large, m).is_some_and(|s| s.program_censored);
                line(
                    p.map(|p| p >= 10.0),
                    format!(
                        "Programming {large} Services at least 10x faster than {}-restore \
                         (theirs / ours {}{})",
                        m.slug(),
                        if over { "> " } else { "" },
                        x3(p)
                    ),
                );
            }
        }
        for &n in &counts {
            let t = self.ratio(n, ours, Mode::Direct, |s| &s.gbps);
            line(
                t.map(|t| t >= 0.95),
                format!(
                    "Throughput at {n} Services within 5% of no load balancer ({})",
                    x3(t)
                ),
            );
        }
        out
    }

    fn failures(&self) -> String {
        let mut out = String::new();
        for (&n, modes) in self.results {
            for (m, s) in modes {
                if s.failed > 0 {
                    out.push_str(&format!(
                        "- {n} Services, {}: {} of {} connections failed (e.g. {:?}).\n",
                        m.label(),
                        s.failed,
                        s.connections,
                        s.errors.first()
                    ));
                }
            }
        }
        out
    }

    fn chart(
        &self,
        title: &str,
        y: &str,
        log: bool,
        modes: &[Mode],
        f: impl Fn(&Samples) -> &Vec<f64> + Copy,
        lower_bound: impl Fn(&Samples) -> bool + Copy,
    ) -> String {
        chart::render(&Chart {
            title: title.into(),
            y_label: y.into(),
            groups: self
                .results
                .keys()
                .map(|n| format!("{n} Services"))
                .collect(),
            series: modes
                .iter()
                .map(|&m| chart::Series {
                    name: m.label().to_string(),
                    color: m.color().to_string(),
                    values: self.results.keys().map(|&n| self.med(n, m, f)).collect(),
                    lower_bound: self
                        .results
                        .keys()
                        .map(|&n| self.get(n, m).is_some_and(lower_bound))
                        .collect(),
                })
                .collect(),
            log_scale: log,
        })
    }
}

fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut modes: Vec<Mode> = Mode::ALL.to_vec();
    if !cli.modes.is_empty() {
        modes.retain(|m| cli.modes.iter().any(|s| s == m.slug()));
        anyhow::ensure!(!modes.is_empty(), "no known mode in {:?}", cli.modes);
    }
    let quick = cli.quick;
    load::pin_cpus(cli.pin_cpus);
    let counts = if !cli.services.is_empty() {
        cli.services.clone()
    } else if quick {
        vec![10]
    } else {
        vec![10, 1_000, 10_000]
    };
    if let Some(what) = &cli.print {
        let services = compare::services(counts[0], &bed::pool());
        let config = compare::ProxyConfig::default();
        let text = match what.as_str() {
            "iptables" => compare::iptables::restore_full(&services, &config),
            _ => compare::nftables::transaction_full(&services, &config, true),
        };
        print!("{text}");
        return Ok(());
    }
    // Every CPU busy: a generator that leaves one idle hides what a datapath costs there.
    let cps_threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let rounds = if quick { 1 } else { cli.rounds.max(1) };
    let labs = if quick { 1 } else { cli.labs.clamp(1, rounds) };
    let plan = Plan {
        counts,
        rounds,
        labs: (0..labs).map(|l| lab_rounds(rounds, labs, l)).collect(),
        program_rounds: if quick { 1 } else { cli.program_rounds.max(1) },
        cps: load::LoadConfig {
            duration: Duration::from_secs_f64(if quick { 0.5 } else { cli.seconds }),
            warmup: Duration::from_millis(if quick { 100 } else { 200 }),
            concurrency: cli.concurrency,
            threads: cps_threads,
            timeout: Duration::from_secs(3),
            client_cpu: None,
        },
        latency: load::LoadConfig {
            duration: Duration::from_secs_f64(if quick { 0.3 } else { 2.0 }),
            warmup: Duration::from_millis(if quick { 50 } else { 200 }),
            concurrency: 1,
            threads: 1,
            timeout: Duration::from_secs(3),
            // Set per placement.
            client_cpu: None,
        },
        bulk: Duration::from_secs_f64(if quick { 0.3 } else { 1.5 }),
        modes,
        cpus: load::allowed_cpus()?,
        load_limit: Duration::from_secs_f64(cli.load_limit),
        agent_args: cli.agent_args.clone(),
        slices: if quick { 1 } else { cli.slices.max(1) },
    };
    let _stats = if cli.keep_bpf_stats {
        None
    } else {
        Some(lb_tests::BpfStatsOff::new()?)
    };
    let started = Instant::now();
    let mut results = Results::new();
    for &n in &plan.counts {
        eprintln!("compare: {n} Services ...");
        measure_count(&plan, n, &mut results).with_context(|| format!("{n} Services"))?;
    }
    let elapsed = started.elapsed();
    let report = Report {
        results: &results,
        modes: &plan.modes,
        labs: &plan.labs,
    };
    let text = section(&report, &plan, elapsed, &cli);
    println!("{text}");
    let failures = report.failures();
    if !(quick || cli.no_write) {
        write_docs(&cli.docs, &report, &text)?;
    }
    // The smoke run proves every datapath serves: one failed connection fails it. A full run
    // reports failures in the tables instead (at tens of thousands of new connections a
    // second a rare timeout is a finding, not a reason to lose the run).
    if quick {
        anyhow::ensure!(failures.is_empty(), "connections failed:\n{failures}");
    } else if !failures.is_empty() {
        eprintln!("compare: some connections failed:\n{failures}");
    }
    Ok(())
}

fn section(report: &Report, plan: &Plan, elapsed: Duration, cli: &Cli) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "Reproduce with `cargo xtask bench` (it runs `lb-compare` after `lb-bench`), or alone: \
         `cargo build --release -p lb-agent && cargo run --release -p lb-tests --bin lb-compare`. \
         This run: Services {:?} x 10 endpoints, {} traffic round(s) in {} lab(s) and {} \
         programming round(s) per count, {:.0} s in all. Figures are medians over the rounds; a ratio is the \
         median of the per-round ratios of two modes measured back to back.\n\n",
        plan.counts,
        plan.rounds,
        plan.labs.len(),
        plan.program_rounds,
        elapsed.as_secs_f64()
    ));
    t.push_str(&format!(
        "How it is measured (code: `tests/src/compare/`):\n\n\
         - **Same lab for every mode**, a fresh one per mode{}: the single-node lab (client \
         namespace, node namespace, three backend namespaces), each backend holding 20 \
         addresses that are all endpoints (60 in all; each Service has 10 of them, endpoints \
         repeat across Services), one echo server per backend. The client has a pod address \
         (10.244.200.2, cluster CIDR 10.244.0.0/16), so client-to-ClusterIP traffic is pod \
         traffic: kube-proxy's rules do not masquerade it, and ours does not either. Only one \
         datapath is loaded in a node namespace, and its rules go away with the namespace.\n\
         - **Modes**: *no load balancer* (the client connects to the endpoints directly: the \
         floor); *ours*: the real `lb-agent` (Kubernetes mode, against the fake API server \
         holding the Services and EndpointSlices; defaults except `--min-sync-period 10ms` and \
         no periodic resync during the run), in two beds: *ours (socket LB)*, the chart's \
         opt-in `agent.socketLB.enabled`, with `--socket-lb-cgroup` on the cgroup the load \
         generator's threads join \
         (a TCP `connect()` to a ClusterIP goes straight to a backend, so no packet of it is \
         translated; the tc program still sees every packet), and *ours (tc + maps)*, the same \
         agent without it (every packet translated by the tc program, as for clients outside \
         that cgroup, UDP, and external traffic). Every mode's load generator joins a cgroup \
         of its own bed, so that being in one is no difference between modes; *iptables*: the rules kube-proxy's iptables mode \
         writes (`KUBE-SERVICES` dispatch, `KUBE-SVC-*` chains picking endpoints with \
         `statistic --mode random --probability 1/(n-i)`, `KUBE-SEP-*` DNAT chains, \
         `KUBE-MARK-MASQ` / `KUBE-POSTROUTING`, large cluster mode above 1,000 endpoints), \
         loaded with `iptables-legacy-restore` or `iptables-nft-restore`; *nftables*: the \
         transaction kube-proxy's nftables mode runs (table `ip kube-proxy`, the `service-ips` \
         verdict map, per-Service chains with `numgen random mod N vmap`, per-endpoint DNAT \
         chains), loaded with `nft -f`. Both generated from the same Service list.\n\
         - **Rounds**: every measurement runs once per mode per round, and the connection-rate \
         and latency measurements are cut into {} slices that the modes take in turn (A B C D E \
         A B C D E ...), each mode's slices summed, so that the drifts of this shared 2-core VM \
         (its rates wander by a fifth within seconds) land on every mode alike; each round \
         starts with the next mode and steps through the modes by another stride (A C E B D \
         ...), so every mode runs in every position and after every other mode. Ratios are \
         taken within a round.\n\
         - **Loads that do not finish**: a single rule load is stopped after {:.0} s and shown \
         as `> limit`. On this machine two are quadratic in their size: iptables-nft-restore's \
         `--noflush` handling (Debian 12's 1.8.9, in user space) and one nft transaction (the \
         kernel walks the whole pending transaction to bind each anonymous verdict map). Their \
         datapath is then loaded with the same rules in chunks of 250 Services, so that it can \
         still be measured.\n\
         - The node namespace's conntrack keeps TIME_WAIT entries 20 s instead of 120 s, so \
         that the benchmark's connection rates do not fill kube-proxy's conntrack table.\n\n",
        if plan.labs.len() > 1 {
            ", and a fresh set of them for each share of the rounds (see *Labs* below)"
        } else {
            ""
        },
        plan.slices,
        plan.load_limit.as_secs_f64()
    ));
    t.push_str(&format!(
        "### New connections per second through a ClusterIP\n\n{} connections in flight from {} \
         load-generator thread(s) in the client namespace (one per CPU: with one thread on this \
         2-core VM the generator's CPU was the bottleneck while the other idled a quarter of the \
         time, so what a datapath costs on that CPU did not show), each: connect, `hello`, \
         one-line reply, close; {:.1} s counted per round; Services picked at random (no load \
         balancer: one of the Service's endpoints at random).\n\n![connections per \
         second](compare-cps.svg)\n\n{}\n",
        plan.cps.concurrency,
        plan.cps.threads,
        plan.cps.duration.as_secs_f64(),
        report.cps_table()
    ));
    let per_lab = report.cps_per_lab();
    if !per_lab.is_empty() {
        t.push_str(&format!(
            "**Labs.** Each lab places its single-threaded echo servers (one per backend) and \
             {} generator threads on the CPUs its own way, and keeps them there: in separate \
             runs of the same code a whole lab's ratio moved by up to 0.05 while its rounds \
             agreed within 0.01-0.02. So every count ran in {} fresh sets of labs, the rounds \
             split among them, and the ratios above are medians over all rounds. Lab by lab, \
             against no load balancer:\n\n{per_lab}\n",
            plan.cps.threads,
            plan.labs.len()
        ));
    }
    t.push_str(&format!(
        "### Request latency, one connection at a time (p50 / p99, microseconds)\n\nConnect to \
         reply, {:.1} s per round in each of two placements, the same for every mode. One \
         connection at a time, the scheduler would otherwise put the client and the echo server \
         on one CPU for some runs and on two for others, and on this VM a wakeup across CPUs \
         costs about 30 µs (an IPI, a VM exit): unpinned, p50 told which placement a mode \
         happened to get (about 40 or 70 µs, with or without a load balancer), not what the \
         datapath costs.\n\n**Client and echo servers on two CPUs** (as two pods are; \
         plotted):\n\n![p99 latency](compare-latency.svg)\n\n{}\n**All on one CPU** \
         (every cost on the path adds up, nothing overlaps):\n\n{}\n",
        plan.latency.duration.as_secs_f64(),
        report.latency_table(|s| &s.p50_us, |s| &s.p99_us),
        report.latency_table(|s| &s.p50_one_cpu_us, |s| &s.p99_one_cpu_us)
    ));
    t.push_str(&format!(
        "### Bulk throughput of one TCP stream (Gbit/s)\n\n{:.1} s of data to Service 0's \
         ClusterIP (no load balancer: to its first endpoint), counted by the receiver.\n\n\
         ![throughput](compare-throughput.svg)\n\n{}\n",
        plan.bulk.as_secs_f64(),
        report.bulk_table()
    ));
    t.push_str(&format!(
        "### Programming every Service from empty\n\nOurs: the agent's own log, from \"initial \
         lists complete\" (every object in hand) to \"datapath programmed\" (model and maps). \
         iptables: one `iptables-restore --noflush --counters` of the full rule set, as a \
         process (the jump rules from the built-in chains are added before, untimed). nftables: \
         one `nft -f` of the full transaction. kube-proxy's own rule generation is not counted; \
         ours includes the model. Reading what is already loaded is not counted for either: \
         the agent reads its pinned maps once at start, while its watches list (about 35 ms for \
         the default map sizes, more with Services already in them), and kube-proxy's `iptables-save` \
         is not run here.\n\n![programming](compare-programming.svg)\n\n{}\n{}\n",
        report.programming_table(),
        report.sizes()
    ));
    t.push_str(&format!(
        "### One endpoint change\n\nOne endpoint of the middle Service moves to another \
         address. Ours: the agent's logged programming latency, from the EndpointSlice watch \
         event to the maps written (its incremental path). iptables: the partial \
         `iptables-restore` kube-proxy's default minimized sync (v1.28+) runs: the whole filter \
         table and every `KUBE-SERVICES` rule, but only the changed Service's `KUBE-SVC-*`/`KUBE-SEP-*` \
         chains (the MinimizeIPTablesRestore partial sync, on by default since v1.27; the \
         full rewrite of older releases is not measured; in large cluster mode the stale \
         endpoint chain is left for a later cleanup). nftables: the partial transaction (the \
         changed Service's chains, the stale endpoint chain flushed). Not counted for them: the \
         `iptables-save` / `nft list` kube-proxy also runs on some syncs.\n\n\
         ![one endpoint change](compare-change.svg)\n\n{}\n",
        report.change_table()
    ));
    t.push_str(&format!("### Targets\n\n{}", report.targets()));
    let failures = report.failures();
    if !failures.is_empty() {
        t.push_str(&format!("\nFailed connections:\n\n{failures}"));
    }
    let _ = cli;
    t
}

fn write_docs(dir: &Path, report: &Report, text: &str) -> anyhow::Result<()> {
    let charts = [
        (
            "compare-cps.svg",
            report.chart(
                "New connections per second through a ClusterIP",
                "connections/s",
                false,
                report.modes,
                |s| &s.cps,
                |_| false,
            ),
        ),
        (
            "compare-latency.svg",
            report.chart(
                "Request latency p99 (one connection at a time, client and servers on two CPUs)",
                "microseconds",
                false,
                report.modes,
                |s| &s.p99_us,
                |_| false,
            ),
        ),
        (
            "compare-throughput.svg",
            report.chart(
                "Bulk throughput, one TCP stream",
                "Gbit/s",
                false,
                report.modes,
                |s| &s.gbps,
                |_| false,
            ),
        ),
        (
            "compare-programming.svg",
            report.chart(
                "Programming every Service from empty",
                "milliseconds",
                true,
                &report.lb_modes(),
                |s| &s.program_ms,
                |s| s.program_censored,
            ),
        ),
        (
            "compare-change.svg",
            report.chart(
                "One endpoint change",
                "milliseconds",
                true,
                &report.lb_modes(),
                |s| &s.change_ms,
                |s| s.change_censored,
            ),
        ),
    ];
    for (name, svg) in charts {
        let path = dir.join(name);
        fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    let path = dir.join("benchmarks.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    let section = format!("{START}\n{text}{END}");
    let new = match (old.find(START), old.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{section}{}", &old[..a], &old[b + END.len()..]),
        _ => format!(
            "{old}\n## Side by side: ours, kube-proxy iptables and nftables, no load balancer\n\n{section}\n"
        ),
    };
    fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("compare: results written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(ratio(&[2.0, 4.0, 9.0], &[1.0, 1.0, 3.0]), Some(3.0));
    }

    #[test]
    fn labs_share_the_rounds_in_order_each_at_least_one() {
        for rounds in 1..=9 {
            for labs in 1..=rounds {
                let shares: Vec<_> = (0..labs).map(|l| lab_rounds(rounds, labs, l)).collect();
                let all: Vec<usize> = shares.iter().cloned().flatten().collect();
                assert_eq!(all, (0..rounds).collect::<Vec<_>>(), "{rounds} in {labs}");
                assert!(shares.iter().all(|r| !r.is_empty()), "{shares:?}");
                let (short, long) = (
                    shares.iter().map(|r| r.len()).min(),
                    shares.iter().map(|r| r.len()).max(),
                );
                assert!(
                    long.zip(short).is_some_and(|(l, s)| l - s <= 1),
                    "{shares:?}"
                );
            }
        }
    }

    #[test]
    fn over_the_rounds_every_mode_follows_every_other_and_runs_first() {
        for modes in 1..=5 {
            let mut follows = BTreeSet::new();
            let mut first = BTreeSet::new();
            for round in 0..8 {
                let order = round_order(modes, round);
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..modes).collect::<Vec<_>>(), "{order:?}");
                first.insert(order[0]);
                // Slices go round the order again and again: the last precedes the first.
                for i in 0..modes {
                    follows.insert((order[i], order[(i + 1) % modes]));
                }
            }
            assert_eq!(first.len(), modes, "{modes} modes");
            let pairs = if modes == 4 {
                4 * 2
            } else {
                modes * (modes - 1)
            };
            let others = follows.iter().filter(|(a, b)| a != b).count();
            assert_eq!(others, pairs, "{modes} modes: {follows:?}");
        }
    }
}
