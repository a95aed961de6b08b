//! Test harness of the service load balancer: labs of network namespaces ([`lab`]), echo
//! servers and clients ([`echo`]), the real agent run as a process ([`agent`]), and packets
//! through the real program with BPF_PROG_TEST_RUN ([`packet`]).
//!
//! Everything here needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN).

pub mod agent;
pub mod echo;
pub mod fake_api;
pub mod lab;
pub mod packet;
