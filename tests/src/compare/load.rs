//! Traffic for the comparison: echo servers in the backends, a load generator in the client,
//! one bulk TCP stream. All of it runs on single-threaded tokio runtimes pinned to threads
//! that entered the lab's namespaces, so that the generator spends little CPU per connection
//! and the datapath's own cost shows.
//!
//! Protocol, one connection each: the client sends `hello\n`, the server answers one line, the
//! client closes (so the client side keeps TIME_WAIT, as an HTTP client would), the server
//! closes on EOF. A connection that starts with `BULK\n` is a sink instead: the server reads
//! until EOF and answers with the number of bytes it read.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{cgroup::ThreadCgroup, lab::Netns};

/// Where load comes from: the client namespace and the cgroup the generator's threads join
/// (their sockets are the ones a socket-level load balancer on that cgroup sees).
#[derive(Clone)]
pub struct Client {
    pub ns: Netns,
    pub cgroup: Arc<ThreadCgroup>,
}

impl Client {
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> thread::JoinHandle<anyhow::Result<T>> {
        let cgroup = self.cgroup.clone();
        self.ns.spawn(move || {
            cgroup.enter_current_thread()?;
            f()
        })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    }
}

/// `lb-compare --pin-cpus`: load generators on CPU 0, echo servers on CPU 1, so that which
/// side is the bottleneck (and what runs there) can be read per CPU in a profile.
static PIN_CPUS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn pin_cpus(enabled: bool) {
    PIN_CPUS.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Pins the calling thread to `cpu` when [`pin_cpus`] asked for it (best effort: a machine
/// with one CPU runs unpinned).
fn pin_to(cpu: usize) {
    if PIN_CPUS.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = only(cpu).and_then(|set| set_cpus(nix::unistd::Pid::from_raw(0), &set));
    }
}

/// Sets the CPUs thread `tid` (0: the calling thread) may run on.
fn set_cpus(tid: nix::unistd::Pid, cpus: &nix::sched::CpuSet) -> anyhow::Result<()> {
    nix::sched::sched_setaffinity(tid, cpus).with_context(|| format!("CPU affinity of {tid}"))
}

/// The set holding CPU `cpu` alone.
fn only(cpu: usize) -> anyhow::Result<nix::sched::CpuSet> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    Ok(set)
}

/// The CPUs the calling thread may run on, lowest first.
pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set =
        nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("CPU affinity")?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// Echo server on `0.0.0.0:port` of one namespace; stopped on drop.
pub struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    /// The thread serving every connection (a single-threaded runtime), and the CPUs it was
    /// started with, for [`Server::pin`].
    tid: nix::unistd::Pid,
    cpus: nix::sched::CpuSet,
}

impl Server {
    pub fn start(ns: &Netns, name: &str, port: u16) -> anyhow::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<anyhow::Result<(nix::unistd::Pid, nix::sched::CpuSet)>>();
        let ns = ns.clone();
        let reply: Arc<[u8]> = format!("{name}\n").into_bytes().into();
        let thread = thread::spawn(move || {
            let run = || -> anyhow::Result<_> {
                ns.enter_current_thread()?;
                pin_to(1);
                let me = nix::unistd::gettid();
                let cpus = nix::sched::sched_getaffinity(me).context("CPU affinity")?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok((runtime, me, cpus))
            };
            let (runtime, me, cpus) = match run() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
                let listener = match tokio::net::TcpListener::bind(any).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e).context("bind")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((me, cpus)));
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let reply = reply.clone();
                            tokio::spawn(async move {
                                let _ = serve(stream, &reply).await;
                            });
                        }
                    }
                }
            });
        });
        let (tid, cpus) = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("echo server did not start")??;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            tid,
            cpus,
        })
    }

    /// Keeps the server on CPU `cpu`, or with `None` back on the CPUs it started with.
    pub fn pin(&self, cpu: Option<usize>) -> anyhow::Result<()> {
        match cpu {
            Some(cpu) => set_cpus(self.tid, &only(cpu)?),
            None => set_cpus(self.tid, &self.cpus),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(mut stream: tokio::net::TcpStream, reply: &[u8]) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    // Small for the request and the wait for the client's close; a bulk sink gets a large one
    // below. Zeroing 64 KiB for every short connection was a cost of the benchmark's own, the
    // same for every mode, which made what a datapath adds a smaller share of the rate.
    let mut buf = [0u8; 1024];
    let mut head = Vec::new();
    // The first line says what this connection is.
    let rest = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.iter().position(|b| *b == b'\n') {
            break head.split_off(end + 1);
        }
        if head.len() > 1024 {
            return Ok(());
        }
    };
    if head == b"BULK\n" {
        let mut total = rest.len() as u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        stream.write_all(format!("{total}\n").as_bytes()).await?;
        return Ok(());
    }
    stream.write_all(reply).await?;
    // Wait for the client to close first.
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}

/// Latencies in microseconds, log-linear buckets (32 per power of two: under 3% error).
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 5;
const LINEAR: u64 = 2 << SUB_BITS; // values below this have their own bucket
/// Up to the largest u64.
const BUCKETS: usize = LINEAR as usize + (64 - SUB_BITS as usize - 1) * (1 << SUB_BITS);

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
        let sub = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        LINEAR as usize + ((exp - SUB_BITS - 1) as usize) * (1 << SUB_BITS) + sub as usize
    }

    /// The smallest value of bucket `i`.
    fn lower(i: usize) -> u64 {
        if (i as u64) < LINEAR {
            return i as u64;
        }
        let j = i - LINEAR as usize;
        let exp = (j >> SUB_BITS) as u32 + SUB_BITS + 1;
        let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
        (1u64 << exp) | (sub << (exp - SUB_BITS))
    }

    pub fn record(&mut self, micros: u64) {
        let i = Self::index(micros).min(self.counts.len() - 1);
        self.counts[i] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile in microseconds (the middle of its bucket).
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = Self::lower(i) as f64;
                let hi = if i + 1 < BUCKETS {
                    Self::lower(i + 1) as f64
                } else {
                    lo
                };
                return (lo + hi) / 2.0;
            }
        }
        Self::lower(self.counts.len() - 1) as f64
    }
}

/// Where each Service's traffic may go: one list of addresses per Service (its VIP, or its
/// endpoints when there is no load balancer); the generator picks a Service at random, then
/// an address of it at random.
pub type Targets = Arc<Vec<Vec<SocketAddr>>>;

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Counted time, after `warmup`.
    pub duration: Duration,
    pub warmup: Duration,
    /// Connections in flight at once, over all threads.
    pub concurrency: usize,
    pub threads: usize,
    pub timeout: Duration,
    /// The CPU every generator thread is kept on (`None`: wherever the scheduler puts it).
    pub client_cpu: Option<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub seconds: f64,
    pub latency: Histogram,
    pub first_errors: Vec<String>,
}

impl LoadReport {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// Adds another part of the same measurement (a task, a thread, a slice): its counts,
    /// latencies and first errors (five kept in all). The time counted is the caller's to set.
    pub fn absorb(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.latency.merge(&other.latency);
        self.first_errors.extend(other.first_errors);
        self.first_errors.truncate(5);
    }
}

/// xorshift64*: cheap per-task randomness.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as usize) % n
    }
}

async fn one_request(to: SocketAddr) -> std::io::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    stream.write_all(b"hello\n").await?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    loop {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the reply",
            ));
        }
        got += n;
        if buf[..got].contains(&b'\n') {
            return Ok(());
        }
        if got == buf.len() {
            return Err(std::io::Error::other("reply too long"));
        }
    }
}

/// Connect, request, reply, close, as fast as `concurrency` connections in flight allow, from
/// from `client`, to random Services of `targets`.
pub fn run(client: &Client, targets: &Targets, config: &LoadConfig) -> anyhow::Result<LoadReport> {
    if targets.is_empty() || targets.iter().any(Vec::is_empty) {
        bail!("no targets");
    }
    let threads = config.threads.max(1);
    // The clock starts once every thread is in its namespace and cgroup: moving a thread into
    // a cgroup waits for an RCU grace period, tens of milliseconds that must not be counted.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let start_line = Arc::new((
        std::sync::Mutex::new(None::<Instant>),
        std::sync::Condvar::new(),
    ));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let targets = targets.clone();
            let config = config.clone();
            let tasks =
                config.concurrency / threads + usize::from(t < config.concurrency % threads);
            let ready = ready_tx.clone();
            let start_line = start_line.clone();
            client.spawn(move || {
                pin_to(0);
                if let Some(cpu) = config.client_cpu {
                    set_cpus(nix::unistd::Pid::from_raw(0), &only(cpu)?)?;
                }
                let _ = ready.send(());
                // Gone, so that a thread that failed before this point does not keep the
                // others' wait open.
                drop(ready);
                let (lock, set) = &*start_line;
                let mut at = lock
                    .lock()
                    .map_err(|_| anyhow::anyhow!("start line poisoned"))?;
                let start = loop {
                    match *at {
                        Some(start) => break start,
                        None => {
                            at = set
                                .wait(at)
                                .map_err(|_| anyhow::anyhow!("start line poisoned"))?
                        }
                    }
                };
                drop(at);
                let counted_from = start + config.warmup;
                let deadline = counted_from + config.duration;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..tasks {
                        let targets = targets.clone();
                        let timeout = config.timeout;
                        let seed = rand::random::<u64>() | 1;
                        set.spawn(async move {
                            let mut rng = Rng(seed);
                            let mut report = LoadReport::default();
                            tokio::time::sleep_until(start.into()).await;
                            loop {
                                let now = Instant::now();
                                if now >= deadline {
                                    break;
                                }
                                let service = &targets[rng.below(targets.len())];
                                let to = service[rng.below(service.len())];
                                let result = tokio::time::timeout(timeout, one_request(to)).await;
                                let counted = now >= counted_from && Instant::now() <= deadline;
                                match result {
                                    Ok(Ok(())) => {
                                        if counted {
                                            report.ok += 1;
                                            report.latency.record(now.elapsed().as_micros() as u64);
                                        }
                                    }
                                    Ok(Err(e)) => {
                                        if counted {
                                            report.failed += 1;
                                            if report.first_errors.len() < 3 {
                                                report.first_errors.push(format!("{to}: {e}"));
                                            }
                                        }
                                    }
                                    Err(_) => {
                                        if counted {
                                            report.failed += 1;
                                            if report.first_errors.len() < 3 {
                                                report.first_errors.push(format!(
                                                    "{to}: timed out after {timeout:?}"
                                                ));
                                            }
                                        }
                                    }
                                }
                            }
                            report
                        });
                    }
                    let mut total = LoadReport::default();
                    while let Some(report) = set.join_next().await {
                        let report = report?;
                        total.absorb(report);
                    }
                    anyhow::Ok(total)
                })
            })
        })
        .collect();
    drop(ready_tx);
    for _ in 0..threads {
        // A thread that failed to start never reports: its error comes with the join below.
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            break;
        }
    }
    {
        let (lock, set) = &*start_line;
        if let Ok(mut at) = lock.lock() {
            *at = Some(Instant::now() + Duration::from_millis(50));
        }
        set.notify_all();
    }
    let mut total = LoadReport {
        seconds: config.duration.as_secs_f64(),
        ..LoadReport::default()
    };
    // Every thread is joined before an error is returned: none may go on loading the next
    // measurement.
    let results: Vec<anyhow::Result<LoadReport>> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))?
        })
        .collect();
    for report in results {
        total.absorb(report?);
    }
    Ok(total)
}

/// One TCP stream of bulk data to `to` for `duration`, from inside `ns`: bits per second
/// received by the server (counted by it, up to its answer after the client's FIN).
pub fn bulk(client: &Client, to: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    client.run(move || {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .with_context(|| format!("connecting to {to}"))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"BULK\n")?;
        let chunk = vec![0x5au8; 256 * 1024];
        let mut sent = 0u64;
        let started = Instant::now();
        while started.elapsed() < duration {
            stream.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .context("reading the byte count")?;
        let seconds = started.elapsed().as_secs_f64();
        let received: u64 = line.trim().parse().context("byte count")?;
        if received != sent {
            bail!("sent {sent} bytes, the server counted {received}");
        }
        Ok(received as f64 * 8.0 / seconds)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_a_few_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.01, 1_000.0)] {
            let got = h.quantile(q);
            assert!(
                (got - want).abs() / want < 0.03,
                "q{q}: got {got}, want {want}"
            );
        }
        let mut small = Histogram::default();
        small.record(3);
        assert_eq!(small.quantile(0.5), 3.5);
        assert_eq!(small.count(), 1);
        let mut huge = Histogram::default();
        huge.record(u64::MAX);
        assert!(huge.quantile(1.0) > 9e18);
    }

    #[test]
    fn histogram_buckets_are_ordered() {
        let mut last = 0;
        for i in 1..BUCKETS {
            let lo = Histogram::lower(i);
            assert!(lo > last, "bucket {i}");
            assert_eq!(Histogram::index(lo), i);
            last = lo;
        }
    }
}
