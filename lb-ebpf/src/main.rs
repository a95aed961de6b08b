//! Kernel side of the service load balancer.
//!
//! One tc program, `lb_ingress`, attached on ingress of every interface the agent manages.
//! `datapath` holds the packet path top to bottom; `maps` the state it reads; `headers` the
//! parsing and rewriting; `reject` the TCP resets and ICMP errors it answers with; `icmp` the
//! translation of ICMP errors about translated flows; `select` the choice of a new flow's
//! backend. `sock` holds the socket-level programs (cgroup connect4 / getpeername4 / sock_release) that send
//! a pod's TCP connections to a ClusterIP straight to a backend.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod datapath;
#[cfg(target_arch = "bpf")]
mod headers;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod sock;

// The kernel object is only built for bpfel-unknown-none; a host build is an empty binary so
// that workspace-wide commands do not trip over it.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
