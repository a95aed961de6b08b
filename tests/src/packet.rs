//! Crafting and checking packets, and running them through the real program with
//! BPF_PROG_TEST_RUN.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use lb_agent::{
    loader::{self, DatapathSettings},
    maps::Applier,
    model::DesiredState,
};

pub const ETH_HLEN: usize = 14;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// tc verdicts as the program returns them.
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// What goes into (or comes out of) an IPv4 TCP/UDP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ip_id: u16,
    /// Flags and fragment offset (`0x4000` = DF).
    pub frag: u16,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub payload: Vec<u8>,
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

impl Flow {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::new(src, sport, dst, dport, PROTO_TCP, flags)
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, sport, dst, dport, PROTO_UDP, 0)
    }

    fn new(src: &str, sport: u16, dst: &str, dport: u16, proto: u8, tcp_flags: u8) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            ip_id: 0x1234,
            frag: 0x4000,
            ttl: 64,
            ip_options: Vec::new(),
            sport,
            dport,
            proto,
            tcp_flags,
            seq: 1000,
            ack: if tcp_flags & TCP_ACK != 0 { 5000 } else { 0 },
            window: 64240,
            payload: b"payload!".to_vec(),
        }
    }

    /// The same flow with source and destination swapped (a reply).
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            ..self.clone()
        }
    }

    /// The IPv4 packet (no Ethernet header) with correct checksums.
    pub fn ip_packet(&self) -> Vec<u8> {
        let mut frame = self.build();
        frame.drain(..ETH_HLEN);
        frame
    }

    /// Ethernet + IPv4 + TCP/UDP with correct checksums.
    pub fn build(&self) -> Vec<u8> {
        let ihl = 20 + self.ip_options.len();
        let l4_len = if self.proto == PROTO_TCP { 20 } else { 8 } + self.payload.len();
        let total = ihl + l4_len;
        let mut p = Vec::with_capacity(ETH_HLEN + total);
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        p.push(0x40 | (ihl / 4) as u8);
        p.push(0);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&self.ip_id.to_be_bytes());
        p.extend_from_slice(&self.frag.to_be_bytes());
        p.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.ip_options);
        let ip_csum = checksum(&p[ETH_HLEN..ETH_HLEN + ihl], 0);
        p[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip_csum.to_be_bytes());
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            p.extend_from_slice(&self.seq.to_be_bytes());
            p.extend_from_slice(&self.ack.to_be_bytes());
            p.extend_from_slice(&[0x50, self.tcp_flags]);
            p.extend_from_slice(&self.window.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]); // csum, urgent
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(&self.payload);
        let l4_off = ETH_HLEN + ihl;
        let csum_off = l4_off + if self.proto == PROTO_TCP { 16 } else { 6 };
        let mut csum = l4_checksum(&p, l4_off);
        if self.proto == PROTO_UDP && csum == 0 {
            csum = 0xffff;
        }
        p[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
        p
    }
}

/// An ICMP error frame quoting `quote` (the start of the offending IPv4 packet).
#[allow(clippy::too_many_arguments)]
pub fn icmp_error_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ip_id: u16,
    icmp_type: u8,
    code: u8,
    quote: &[u8],
) -> Vec<u8> {
    let total = 20 + 8 + quote.len();
    let mut p = Vec::new();
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&ip_id.to_be_bytes());
    p.extend_from_slice(&0x4000u16.to_be_bytes());
    p.extend_from_slice(&[64, PROTO_ICMP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ip_csum = checksum(&p[ETH_HLEN..ETH_HLEN + 20], 0);
    p[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip_csum.to_be_bytes());
    let icmp_off = p.len();
    p.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0, 0, 0]);
    p.extend_from_slice(quote);
    let csum = checksum(&p[icmp_off..], 0);
    p[icmp_off + 2..icmp_off + 4].copy_from_slice(&csum.to_be_bytes());
    p
}

/// Checks an ICMP frame's IPv4 and ICMP checksums; returns (type, code, quote).
pub fn parse_icmp_checked(p: &[u8]) -> anyhow::Result<(u8, u8, Vec<u8>)> {
    if p.len() < ETH_HLEN + 28 || p[ETH_HLEN + 9] != PROTO_ICMP {
        bail!("not an ICMP frame");
    }
    let ip = &p[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if checksum(&ip[..ihl], 0) != 0 {
        bail!("bad IPv4 header checksum");
    }
    let icmp = &ip[ihl..];
    if checksum(icmp, 0) != 0 {
        bail!("bad ICMP checksum");
    }
    if checksum(&icmp[8..28], 0) != 0 {
        bail!("bad checksum in the quoted IPv4 header");
    }
    Ok((icmp[0], icmp[1], icmp[8..].to_vec()))
}

pub const PROTO_ICMP: u8 = 1;

/// Internet checksum (RFC 1071) of `data`, starting from a partial sum.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP/UDP checksum over the pseudo header and the segment starting at `l4_off`.
fn l4_checksum(p: &[u8], l4_off: usize) -> u16 {
    let ip = &p[ETH_HLEN..];
    let l4 = &p[l4_off..];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let partial = !checksum(&pseudo, 0) as u32;
    checksum(l4, partial)
}

/// Parses an IPv4 TCP/UDP packet and verifies both checksums; fails on any inconsistency.
pub fn parse_checked(p: &[u8]) -> anyhow::Result<Flow> {
    if p.len() < ETH_HLEN + 20 || u16::from_be_bytes([p[12], p[13]]) != 0x0800 {
        bail!("not an IPv4 frame ({} bytes)", p.len());
    }
    let ip = &p[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip.len() < total || total < ihl {
        bail!(
            "IPv4 total length {total} does not fit the {} bytes",
            ip.len()
        );
    }
    if checksum(&ip[..ihl], 0) != 0 {
        bail!("bad IPv4 header checksum");
    }
    let proto = ip[9];
    if ihl < 20 {
        bail!("IPv4 header length {ihl}");
    }
    let l4_off = ETH_HLEN + ihl;
    let frame = &p[..ETH_HLEN + total];
    let l4 = &frame[l4_off..];
    let (sport, dport) = (
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    );
    let (tcp_flags, payload_off) = match proto {
        PROTO_TCP => (l4[13], usize::from(l4[12] >> 4) * 4),
        PROTO_UDP => (0, 8),
        other => bail!("unexpected protocol {other}"),
    };
    let zero_udp_csum = proto == PROTO_UDP && l4[6] == 0 && l4[7] == 0;
    if !zero_udp_csum && l4_checksum(frame, l4_off) != 0 {
        bail!(
            "bad {} checksum",
            if proto == PROTO_TCP { "TCP" } else { "UDP" }
        );
    }
    let (seq, ack, window) = if proto == PROTO_TCP {
        (
            u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
            u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
            u16::from_be_bytes([l4[14], l4[15]]),
        )
    } else {
        (1000, 0, 64240)
    };
    Ok(Flow {
        dst_mac: p[..6].try_into().expect("6 bytes"),
        src_mac: p[6..12].try_into().expect("6 bytes"),
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ip_id: u16::from_be_bytes([ip[4], ip[5]]),
        frag: u16::from_be_bytes([ip[6], ip[7]]),
        ttl: ip[8],
        ip_options: ip[20..ihl].to_vec(),
        sport,
        dport,
        proto,
        tcp_flags,
        seq,
        ack,
        window,
        payload: l4[payload_off..].to_vec(),
    })
}

static HARNESS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The real program, loaded with its maps pinned in a private bpffs directory (removed on
/// drop), programmed through the agent's own applier, run with BPF_PROG_TEST_RUN.
pub struct Harness {
    ebpf: Ebpf,
    pub applier: Applier,
    pub pin_dir: PathBuf,
}

/// What one run returned.
#[derive(Debug)]
pub struct Verdict {
    pub action: i32,
    pub packet: Vec<u8>,
}

impl Harness {
    pub fn new() -> anyhow::Result<Self> {
        Self::with_settings(&DatapathSettings::default())
    }

    pub fn with_settings(settings: &DatapathSettings) -> anyhow::Result<Self> {
        crate::lab::sweep(crate::lab::TEST_PREFIX);
        let n = HARNESS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let pin_dir = Path::new("/sys/fs/bpf").join(format!(
            "{}-{}-pkt{n}",
            crate::lab::TEST_PREFIX,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let ebpf = loader::load(&pin_dir, settings)?;
        let applier = Applier::open(&pin_dir)?;
        Ok(Self {
            ebpf,
            applier,
            pin_dir,
        })
    }

    /// Programs the maps with `desired` through the agent's applier.
    pub fn program(&mut self, desired: &DesiredState) -> anyhow::Result<()> {
        let report = self.applier.sync(desired)?;
        if let Some(first) = report.errors.first() {
            bail!("{} applier errors, the first: {first}", report.errors.len());
        }
        Ok(())
    }

    /// Runs one frame through `lb_ingress`.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<Verdict> {
        self.run_program(loader::PROGRAM, frame)
            .map(|(verdict, _)| verdict)
    }

    /// Runs one frame through the named program (loading it on first use); also returns the
    /// run's duration as the kernel measured it.
    pub fn run_program(
        &mut self,
        name: &str,
        frame: &[u8],
    ) -> anyhow::Result<(Verdict, std::time::Duration)> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load().with_context(|| format!("loading {name}"))?;
        }
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((
            Verdict {
                action: result.return_value as i32,
                packet: out,
            },
            result.duration,
        ))
    }
}

/// BPF_PROG_TEST_RUN flag (uapi; aya's bindings predate it): the skb starts in CHECKSUM_COMPLETE
/// state and the run fails with EBADMSG if the program left `skb->csum` out of step with the
/// packet.
pub const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// `union bpf_attr` as BPF_PROG_TEST_RUN reads it.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel refuses non-zero bytes past the fields it knows.
    _pad: u32,
}

impl Harness {
    /// Runs one frame through `lb_ingress` with test-run `flags`, calling bpf(2) directly since
    /// aya only passes XDP flags. The error is the raw errno, so a caller can tell an input
    /// the kernel refuses (EINVAL) from a failed checksum check (EBADMSG).
    pub fn run_with_flags(&mut self, frame: &[u8], flags: u32) -> std::io::Result<Verdict> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(loader::PROGRAM)
            .expect("lb_ingress in the object")
            .try_into()
            .expect("a tc program");
        let fd = program.fd().map_err(std::io::Error::other)?;
        // Room for a reject answer, which may be longer than a short input.
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: fd.as_fd().as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            flags,
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` is a properly laid out bpf_attr prefix whose pointers stay valid (and
        // `out` writable for `data_size_out` bytes) for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                libc::c_long::from(BPF_PROG_TEST_RUN),
                &mut attr as *mut TestRunAttr,
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.truncate(attr.data_size_out as usize);
        Ok(Verdict {
            action: attr.retval as i32,
            packet: out,
        })
    }
}

const BPF_PROG_TEST_RUN: i32 = 10;

impl Harness {
    /// Datapath counter `name` (as `lb-agent stats` names it).
    pub fn counter(&self, name: &str) -> u64 {
        crate::counter(&self.pin_dir, name)
    }

    /// The pinned array `name` (`lb_common::map_names`), for reading or writing it directly.
    pub fn array<V: aya::Pod>(&self, name: &str) -> aya::maps::Array<aya::maps::MapData, V> {
        pinned_array(&self.pin_dir, name)
    }

    pub fn conntrack(&self) -> lb_agent::maps::ConntrackMap {
        lb_agent::maps::open_conntrack(&self.pin_dir).expect("open conntrack")
    }

    /// Fills the conntrack map with `total` TCP entries of clients the datapath never saw
    /// (each with no other half), every `expired_every`-th one already expired, the others
    /// an hour from expiry; for the garbage collector's tests and benchmark.
    pub fn fill_conntrack(&self, total: u32, expired_every: u32) -> anyhow::Result<()> {
        let mut ct = self.conntrack();
        let now = lb_agent::maps::monotonic_ns();
        for n in 0..total {
            let key = lb_common::CtKey {
                src_addr: std::net::Ipv4Addr::from(0x0a63_0000 + n).octets(),
                dst_addr: [10, 96, 0, 10],
                src_port: 40000,
                dst_port: 80,
                proto: 6,
                _pad: [0; 3],
            };
            let value = lb_common::CtValue {
                nat_addr: [10, 244, 1, 2],
                nat_port: 8080,
                expires_ns: if n % expired_every.max(1) == 0 {
                    now - 1
                } else {
                    now + 3_600_000_000_000
                },
                created_ns: now,
                ..Default::default()
            };
            ct.insert(key, value, 0)?;
        }
        Ok(())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The array `name` pinned under `pin_dir`, typed by its value.
pub fn pinned_array<V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> aya::maps::Array<aya::maps::MapData, V> {
    let data = aya::maps::MapData::from_pin(pin_dir.join(name))
        .unwrap_or_else(|e| panic!("open pinned {name}: {e}"));
    let map = aya::maps::Map::from_map_data(data).expect("map");
    aya::maps::Array::try_from(map).unwrap_or_else(|e| panic!("{name} as an array: {e}"))
}
