//! Kernel side of the service load balancer.
//!
//! One tc program, `lb_ingress`, attached on ingress of every interface the agent manages. For
//! each IPv4 TCP/UDP packet it reads top to bottom: parse, conntrack lookup (reply: reverse NAT;
//! known flow: NAT to its backend), frontend lookup, backend selection, conntrack record, NAT.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod datapath;

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
