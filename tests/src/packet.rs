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
use lb_agent::{loader, maps::Applier, model::DesiredState};

pub const ETH_HLEN: usize = 14;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// tc verdicts as the program returns them.
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

/// What goes into (or comes out of) an IPv4 TCP/UDP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

impl Flow {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::new(src, sport, dst, dport, PROTO_TCP, flags)
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, sport, dst, dport, PROTO_UDP, 0)
    }

    fn new(src: &str, sport: u16, dst: &str, dport: u16, proto: u8, tcp_flags: u8) -> Self {
        Self {
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            sport,
            dport,
            proto,
            tcp_flags,
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
            ..self.clone()
        }
    }

    /// Ethernet + IPv4 (no options) + TCP/UDP with correct checksums.
    pub fn build(&self) -> Vec<u8> {
        let l4_len = if self.proto == PROTO_TCP { 20 } else { 8 } + self.payload.len();
        let total = 20 + l4_len;
        let mut p = Vec::with_capacity(ETH_HLEN + total);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
        p.extend_from_slice(&[64, self.proto, 0, 0]); // ttl, proto, csum
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        let ip_csum = checksum(&p[ETH_HLEN..ETH_HLEN + 20], 0);
        p[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip_csum.to_be_bytes());
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            p.extend_from_slice(&1000u32.to_be_bytes()); // seq
            p.extend_from_slice(&0u32.to_be_bytes()); // ack
            p.extend_from_slice(&[0x50, self.tcp_flags]);
            p.extend_from_slice(&64240u16.to_be_bytes()); // window
            p.extend_from_slice(&[0, 0, 0, 0]); // csum, urgent
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(&self.payload);
        let l4_off = ETH_HLEN + 20;
        let csum_off = l4_off + if self.proto == PROTO_TCP { 16 } else { 6 };
        let mut csum = l4_checksum(&p, l4_off);
        if self.proto == PROTO_UDP && csum == 0 {
            csum = 0xffff;
        }
        p[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
        p
    }
}

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
    Ok(Flow {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport,
        dport,
        proto,
        tcp_flags,
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
        crate::lab::sweep(crate::lab::TEST_PREFIX);
        let n = HARNESS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let pin_dir = Path::new("/sys/fs/bpf").join(format!(
            "{}-{}-pkt{n}",
            crate::lab::TEST_PREFIX,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let ebpf = loader::load(&pin_dir)?;
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
        if !report.errors.is_empty() {
            bail!("applier errors: {:?}", report.errors);
        }
        Ok(())
    }

    /// Runs one frame through `lb_ingress`.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<Verdict> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(loader::PROGRAM)
            .context("program missing")?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok(Verdict {
            action: result.return_value as i32,
            packet: out,
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
