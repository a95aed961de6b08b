//! Loading the kernel object, pinning its maps, attaching the tc program.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::Array,
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        CgroupAttachMode, Program, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{capacity, globals, map_names, Meta, MAP_LAYOUT_VERSION};
use tracing::{info, warn};

/// The kernel programs, built by build.rs from the `lb-ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the tc program in the object.
pub const PROGRAM: &str = "lb_ingress";
/// A program that does nothing, for benchmarks (the floor).
pub const PASSTHROUGH: &str = "lb_passthrough";
/// The socket-level programs (`--socket-lb-cgroup`), with the name each link is pinned under.
/// The release hook first: attached (and pinned) before the connect hook, no socket that the
/// connect hook noted goes away unseen.
pub const SOCKET_PROGRAMS: [(&str, &str); 3] = [
    ("lb_sock_release", "sock-release"),
    ("lb_sock_connect4", "connect4"),
    ("lb_sock_getpeername4", "getpeername4"),
];

/// Loads a socket-level program (a cgroup sock_addr or sock program).
fn load_socket_program(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let loaded = match ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
    {
        Program::CgroupSockAddr(program) => program.load(),
        Program::CgroupSock(program) => program.load(),
        _ => bail!("{name} is not a cgroup socket program"),
    };
    loaded.with_context(|| format!("the kernel rejected {name}"))
}

/// Attaches a loaded socket-level program to `cgroup`, as a link not yet pinned.
fn attach_socket_program(ebpf: &mut Ebpf, name: &str, cgroup: &fs::File) -> anyhow::Result<FdLink> {
    // A link is always one of many on its cgroup; the kernel refuses the multi flag for
    // links (it is for the older attach call).
    let mode = CgroupAttachMode::Single;
    let link = match ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
    {
        Program::CgroupSockAddr(program) => {
            let id = program.attach(cgroup, mode)?;
            program.take_link(id)?.try_into()
        }
        Program::CgroupSock(program) => {
            let id = program.attach(cgroup, mode)?;
            program.take_link(id)?.try_into()
        }
        _ => bail!("{name} is not a cgroup socket program"),
    };
    link.context("a cgroup attachment is an fd link on this kernel")
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Fails with a clear message unless `dir` would be created on a bpffs mount.
fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    // The nearest existing ancestor (the pin directory may be created below it).
    let probe = dir.ancestors().skip(1).find(|p| p.exists()).unwrap_or(dir);
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
    /// This node's address for external traffic sent to endpoints on other nodes
    /// (externalTrafficPolicy Cluster); `None`: never source-NAT.
    pub snat_addr: Option<Ipv4Addr>,
    /// Entries per Maglev lookup table (M, prime): a flow's entry is its hash modulo M.
    pub maglev_table_size: u32,
    /// Map sizes (entries). They apply when the maps are created; pinned maps keep theirs
    /// (except `LB_MAGLEV`, rebuilt when its size or table size changes: the agent rewrites
    /// its content anyway).
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
    /// Services that may use Maglev at once (one table of `maglev_table_size` entries each,
    /// 4 bytes per entry, preallocated).
    pub maglev_services: u32,
    /// Open sockets balanced at `connect()` whose `getpeername` note fits in `LB_SOCK_REVNAT`.
    pub socket_notes: u32,
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
            maglev_services: capacity::MAGLEV_SERVICES,
            socket_notes: capacity::SOCK_REVNAT,
        }
    }
}

impl Default for DatapathSettings {
    fn default() -> Self {
        Self {
            no_backend_drop: false,
            hairpin_addr: Ipv4Addr::new(169, 254, 42, 1),
            snat_addr: None,
            maglev_table_size: lb_common::MAGLEV_TABLE_SIZE,
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
    check_layout(pin_dir)?;
    let maglev_size = settings.maglev_table_size;
    if !crate::maglev::is_prime(maglev_size) {
        bail!("the Maglev table size {maglev_size} is not a prime number");
    }
    let maglev_entries = settings
        .capacity
        .maglev_services
        .checked_mul(maglev_size)
        .and_then(|n| n.checked_add(1))
        .context("Maglev services times the table size is too large")?;
    check_maglev(pin_dir, maglev_entries, maglev_size)?;
    check_socket_notes(pin_dir, settings.capacity.socket_notes)?;
    let no_backend_drop = u8::from(settings.no_backend_drop);
    let hairpin = settings.hairpin_addr.octets();
    let snat = settings.snat_addr.map_or([0; 4], |a| a.octets());
    let mut loader = EbpfLoader::new();
    loader
        .override_global(globals::NO_BACKEND_DROP, &no_backend_drop, true)
        .override_global(globals::HAIRPIN_ADDR, &hairpin, true)
        .override_global(globals::SNAT_ADDR, &snat, true)
        .override_global(globals::MAGLEV_TABLE_SIZE, &maglev_size, true);
    let c = &settings.capacity;
    loader
        .map_max_entries(map_names::FRONTENDS, c.frontends)
        .map_max_entries(map_names::SERVICES, c.services)
        .map_max_entries(map_names::SERVICE_NAMES, c.services)
        .map_max_entries(map_names::SERVICE_STATS, c.services)
        .map_max_entries(map_names::SLOTS, c.slots)
        .map_max_entries(map_names::BACKENDS, c.backends)
        .map_max_entries(map_names::SOURCE_RANGES, c.source_ranges)
        .map_max_entries(map_names::CONNTRACK, c.conntrack)
        .map_max_entries(map_names::SOCK_REVNAT, c.socket_notes)
        .map_max_entries(map_names::MAGLEV, maglev_entries);
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
    for (name, _) in SOCKET_PROGRAMS {
        load_socket_program(&mut ebpf, name)?;
    }
    let mut meta: Array<_, Meta> = Array::try_from(
        ebpf.map_mut(map_names::META)
            .context("map LB_META missing from the object")?,
    )?;
    meta.set(
        0,
        Meta {
            layout_version: MAP_LAYOUT_VERSION,
        },
        0,
    )
    .context("stamping the layout version")?;
    // Entry 0 of LB_MAGLEV says how its tables are laid out, for the applier and readers.
    let mut maglev: Array<_, u32> = Array::try_from(
        ebpf.map_mut(map_names::MAGLEV)
            .context("map LB_MAGLEV missing from the object")?,
    )?;
    maglev
        .set(0, maglev_size, 0)
        .context("stamping the Maglev table size")?;
    Ok(ebpf)
}

/// A pinned `LB_MAGLEV` of another size or table size is removed (and rebuilt empty by the
/// load): its tables would be read with the wrong stride. Nothing is lost: the agent rewrites
/// every table at its first sync, and until then a Maglev service's empty entries make the
/// datapath fall back to a random backend.
fn check_maglev(pin_dir: &Path, entries: u32, size: u32) -> anyhow::Result<()> {
    remove_pin_unless(pin_dir, map_names::MAGLEV, "Maglev tables", |data| {
        data.info().map(|i| i.max_entries()).ok() == Some(entries)
            && Array::<_, u32>::try_from(aya::maps::Map::Array(data))
                .ok()
                .and_then(|a| a.get(&0, 0).ok())
                == Some(size)
    })
}

/// A pinned `LB_SOCK_REVNAT` of another size would be reused as it is (its size is set when it
/// is created): it is removed and created anew, at the cost of the open sockets' notes (their
/// `getpeername` shows the backend).
fn check_socket_notes(pin_dir: &Path, entries: u32) -> anyhow::Result<()> {
    remove_pin_unless(pin_dir, map_names::SOCK_REVNAT, "socket notes", |data| {
        data.info().map(|i| i.max_entries()).ok() == Some(entries)
    })
}

/// Removes the pinned map `name` (so that the load creates it anew) unless `fits` says it has
/// the shape this agent asks for.
fn remove_pin_unless(
    pin_dir: &Path,
    name: &str,
    what: &str,
    fits: impl FnOnce(aya::maps::MapData) -> bool,
) -> anyhow::Result<()> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(());
    }
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if !fits(data) {
        warn!(
            path = %path.display(),
            "the pinned {what} have another size or layout: creating them anew"
        );
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Pinned maps of another layout are never reused: they are removed (and rebuilt by the load),
/// with a log line saying so. Conntrack starts empty then, so established flows are balanced
/// again; the links stay, so the interfaces are never left without a program.
fn check_layout(pin_dir: &Path) -> anyhow::Result<()> {
    let pinned: Vec<PathBuf> = map_names::ALL
        .iter()
        .map(|n| pin_dir.join(n))
        .filter(|p| p.exists())
        .collect();
    if pinned.is_empty() {
        return Ok(());
    }
    // No stamp at all: maps from before stamps existed. A stamp that cannot be read is an
    // error (permissions, say), never a reason to delete the maps.
    let meta_path = pin_dir.join(map_names::META);
    let found = if meta_path.exists() {
        let data = aya::maps::MapData::from_pin(&meta_path)
            .with_context(|| format!("opening {}", meta_path.display()))?;
        let meta = Array::<_, Meta>::try_from(aya::maps::Map::Array(data))
            .with_context(|| format!("{} is not the layout stamp", meta_path.display()))?;
        Some(
            meta.get(&0, 0)
                .context("reading the layout stamp")?
                .layout_version,
        )
    } else {
        None
    };
    if found == Some(MAP_LAYOUT_VERSION) {
        return Ok(());
    }
    warn!(
        pin_dir = %pin_dir.display(),
        found = ?found,
        expected = MAP_LAYOUT_VERSION,
        "pinned maps have another layout version: rebuilding them (conntrack starts empty)"
    );
    for path in pinned {
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Where the attachment of `interface` is pinned, under the agent's pin directory.
pub fn link_pin(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(LINKS_DIR).join(format!("{interface}-ingress"))
}

const LINKS_DIR: &str = "links";

/// How an interface got its program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new TCX link, now pinned.
    New,
    /// The pinned link of an earlier agent, its program replaced atomically: no packet sees
    /// the interface without a program.
    Adopted,
}

/// Attaches the program on ingress of each interface through TCX links pinned under
/// `pin_dir/links`, so they outlive this process: stopping the agent (even `kill -9`) leaves
/// the datapath forwarding, and the next agent adopts the links by swapping its program in.
/// TCX coexists with other tc programs and never replaces them.
pub fn attach(
    ebpf: &mut Ebpf,
    interfaces: &[String],
    pin_dir: &Path,
) -> anyhow::Result<Vec<(String, Attached)>> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("program {PROGRAM} missing"))?
        .try_into()?;
    fs::create_dir_all(pin_dir.join(LINKS_DIR))
        .with_context(|| format!("creating {}", pin_dir.join(LINKS_DIR).display()))?;
    let mut done = Vec::new();
    for interface in interfaces {
        let path = link_pin(pin_dir, interface);
        let how = match live_pinned_link(&path, interface)? {
            Some(link) => {
                let link = SchedClassifierLink::try_from(link)
                    .with_context(|| format!("pinned link {} is not a tc link", path.display()))?;
                let id = program
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the program on {interface}"))?;
                // The pin keeps the link; this process need not.
                program.take_link(id)?;
                Attached::Adopted
            }
            None => {
                let id = program
                    .attach(interface, TcAttachType::Ingress)
                    .with_context(|| format!("attaching {PROGRAM} to ingress of {interface}"))?;
                let link: FdLink = program
                    .take_link(id)?
                    .try_into()
                    .context("a TCX attachment is an fd link")?;
                link.pin(&path)
                    .with_context(|| format!("pinning the link at {}", path.display()))?;
                Attached::New
            }
        };
        info!(interface = %interface, how = ?how, "attached on ingress");
        done.push((interface.clone(), how));
    }
    // Interfaces no longer listed: unpinning their links detaches the old program from them.
    let wanted: Vec<PathBuf> = interfaces.iter().map(|i| link_pin(pin_dir, i)).collect();
    for entry in fs::read_dir(pin_dir.join(LINKS_DIR))?.flatten() {
        let path = entry.path();
        if !wanted.contains(&path) {
            warn!(path = %path.display(), "detaching from an interface no longer listed");
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(done)
}

const SOCKET_LINKS_DIR: &str = "socket-links";

/// Attaches the socket-level programs to the cgroup v2 directory `cgroup` (and so to every
/// cgroup below it), or with `None` detaches those of an earlier agent. The flag is explicit,
/// so a failure to attach is an error, not a silent fall back to tc alone. The links are pinned
/// under `pin_dir/socket-links`, so they outlive this process like the tc links. A restarted
/// agent attaches its own programs before it unpins the old ones: for that moment both run,
/// and the second finds a backend address, which is no frontend, and leaves it alone.
pub fn attach_socket_lb(
    ebpf: &mut Ebpf,
    cgroup: Option<&Path>,
    pin_dir: &Path,
) -> anyhow::Result<()> {
    let dir = pin_dir.join(SOCKET_LINKS_DIR);
    let Some(cgroup) = cgroup else {
        if dir.exists() {
            warn!("socket-level load balancing is off: detaching the programs of an earlier agent");
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        return Ok(());
    };
    let file = fs::File::open(cgroup).with_context(|| {
        format!(
            "opening the cgroup {} for socket-level load balancing",
            cgroup.display()
        )
    })?;
    // Every program is attached before anything is pinned: a failure leaves the old set (or
    // none) in place, never some old and some new. Unpinned links detach when dropped.
    let mut links = Vec::new();
    for (name, pin) in SOCKET_PROGRAMS {
        let link = attach_socket_program(ebpf, name, &file).with_context(|| {
            format!(
                "attaching {name} to the cgroup {} (a cgroup v2 directory?)",
                cgroup.display()
            )
        })?;
        links.push((pin, link));
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // bpffs refuses names with a dot.
    let fresh = |pin: &str| dir.join(format!("{pin}-new"));
    for (pin, link) in links {
        let _ = fs::remove_file(fresh(pin));
        if let Err(err) = link.pin(fresh(pin)) {
            for (_, pin) in SOCKET_PROGRAMS {
                let _ = fs::remove_file(fresh(pin));
            }
            return Err(err).with_context(|| format!("pinning the link {pin}"));
        }
    }
    // Replacing an old pin drops the old link, which detaches the old program.
    for (_, pin) in SOCKET_PROGRAMS {
        let path = dir.join(pin);
        fs::rename(fresh(pin), &path).with_context(|| format!("pinning {}", path.display()))?;
    }
    info!(cgroup = %cgroup.display(), "socket-level load balancing attached");
    Ok(())
}

/// The link pinned at `path`, if it still carries one of the programs attached to
/// `interface` (an interface deleted and re-created leaves a dead link behind: unpinned here).
fn live_pinned_link(path: &Path, interface: &str) -> anyhow::Result<Option<FdLink>> {
    let pinned = match PinnedLink::from_pin(path) {
        Ok(pinned) => pinned,
        Err(_) if !path.exists() => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("opening {}", path.display())),
    };
    let link: FdLink = pinned.into();
    let program_id = link.info().context("reading the pinned link")?.program_id();
    let (_, attached) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress)
        .with_context(|| format!("listing the programs on {interface}"))?;
    if attached.iter().any(|p| p.id() == program_id) {
        return Ok(Some(link));
    }
    warn!(interface, path = %path.display(), "dropping a pinned link that no longer serves the interface");
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(None)
}

/// Tears the datapath down on purpose (`lb-agent --cleanup`): unpins every link (detaching the
/// program from its interface) and every map. Returns what it removed.
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let socket_links = pin_dir.join(SOCKET_LINKS_DIR);
    if socket_links.exists() {
        fs::remove_dir_all(&socket_links)
            .with_context(|| format!("removing {}", socket_links.display()))?;
        removed.push(socket_links);
    }
    let links = pin_dir.join(LINKS_DIR);
    if let Ok(entries) = fs::read_dir(&links) {
        for entry in entries.flatten() {
            let path = entry.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for name in map_names::ALL {
        let path = pin_dir.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
    }
    if pin_dir.exists() {
        fs::remove_dir(pin_dir).with_context(|| {
            format!(
                "removing {} (something else is pinned there?)",
                pin_dir.display()
            )
        })?;
    }
    Ok(removed)
}
