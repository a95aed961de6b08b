//! Empty on purpose: the kernel programs are the `lb-ebpf` binary target. This library target
//! exists so that `lb-agent` can list the crate as a build dependency (cargo then rebuilds the
//! agent, which embeds the object, whenever the kernel code changes).
#![no_std]
