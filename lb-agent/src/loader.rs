//! Loading the kernel object, pinning its maps, attaching the tc program.

use std::{fs, net::Ipv4Addr, path::Path};

use anyhow::{bail, Context as _};
use aya::{
    programs::{tc::SchedClassifierLinkId, SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use lb_common::{capacity, globals, map_names};
use tracing::info;

/// The kernel programs, built by build.rs from the `lb-ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the tc program in the object.
pub const PROGRAM: &str = "lb_ingress";
/// A program that does nothing, for benchmarks (the floor).
pub const PASSTHROUGH: &str = "lb_passthrough";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Fails with a clear message unless `dir`'s parent is a bpffs mount.
fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.parent().unwrap_or(dir);
    let c_path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        .context("pin directory path contains a NUL byte")?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", probe.display()));
    }
    if stat.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` \
             (inside `ip netns exec`, /sys is remounted: run the agent with `nsenter --net=...` instead)",
            probe.display()
        );
    }
    Ok(())
}

/// Load-time behaviour of the kernel program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathSettings {
    /// New flows to a frontend without backends: drop silently instead of rejecting.
    pub no_backend_drop: bool,
    /// Source address for hairpin flows (a pod reaching itself through its Service).
    pub hairpin_addr: Ipv4Addr,
    /// Map sizes (entries). They apply when the maps are created; pinned maps keep theirs.
    pub capacity: Capacity,
}

/// Entries per map; see `lb_common::capacity` for the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub frontends: u32,
    /// Also bounds service ids, hence the size of the per-service counters.
    pub services: u32,
    pub slots: u32,
    pub backends: u32,
    pub source_ranges: u32,
    pub conntrack: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            frontends: capacity::FRONTENDS,
            services: capacity::SERVICES,
            slots: capacity::SLOTS,
            backends: capacity::BACKENDS,
            source_ranges: capacity::SOURCE_RANGES,
            conntrack: capacity::CONNTRACK,
        }
    }
}

impl Default for DatapathSettings {
    fn default() -> Self {
        Self {
            no_backend_drop: false,
            hairpin_addr: Ipv4Addr::new(169, 254, 42, 1),
            capacity: Capacity::default(),
        }
    }
}

/// Loads the object with every map pinned under `pin_dir`. Maps already pinned there are
/// reused, so a restarted agent keeps its services and conntrack.
pub fn load(pin_dir: &Path, settings: &DatapathSettings) -> anyhow::Result<Ebpf> {
    check_bpffs(pin_dir)?;
    fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    let no_backend_drop = u8::from(settings.no_backend_drop);
    let hairpin = settings.hairpin_addr.octets();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(globals::NO_BACKEND_DROP, &no_backend_drop, true)
        .override_global(globals::HAIRPIN_ADDR, &hairpin, true);
    let c = &settings.capacity;
    loader
        .map_max_entries(map_names::FRONTENDS, c.frontends)
        .map_max_entries(map_names::SERVICES, c.services)
        .map_max_entries(map_names::SERVICE_NAMES, c.services)
        .map_max_entries(map_names::SERVICE_STATS, c.services)
        .map_max_entries(map_names::SLOTS, c.slots)
        .map_max_entries(map_names::BACKENDS, c.backends)
        .map_max_entries(map_names::SOURCE_RANGES, c.source_ranges)
        .map_max_entries(map_names::CONNTRACK, c.conntrack);
    for name in map_names::ALL {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the kernel object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("program {PROGRAM} missing from the object"))?
        .try_into()
        .context("lb_ingress is not a tc program")?;
    program.load().context("the kernel rejected lb_ingress")?;
    Ok(ebpf)
}

/// The program's attachments; dropping it (or calling [`Attachments::detach`]) removes them.
pub struct Attachments {
    links: Vec<(String, SchedClassifierLinkId)>,
}

/// Attaches the program on ingress of each interface (TCX, so it coexists with other tc
/// programs and never replaces them).
pub fn attach(ebpf: &mut Ebpf, interfaces: &[String]) -> anyhow::Result<Attachments> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("program {PROGRAM} missing"))?
        .try_into()?;
    let mut links = Vec::new();
    for interface in interfaces {
        let link = program
            .attach(interface, TcAttachType::Ingress)
            .with_context(|| format!("attaching {PROGRAM} to ingress of {interface}"))?;
        info!(interface = %interface, "attached on ingress");
        links.push((interface.clone(), link));
    }
    Ok(Attachments { links })
}

impl Attachments {
    pub fn detach(self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("program {PROGRAM} missing"))?
            .try_into()?;
        for (interface, link) in self.links {
            program
                .detach(link)
                .with_context(|| format!("detaching from {interface}"))?;
            info!(interface = %interface, "detached");
        }
        Ok(())
    }
}
