use std::env;

// Rebuild the kernel object when bpf-linker changes (it is tied to the nightly's LLVM).
fn main() {
    let path = env::var_os("PATH").unwrap_or_default();
    for dir in env::split_paths(&path) {
        let candidate = dir.join("bpf-linker");
        if candidate.is_file() {
            println!("cargo:rerun-if-changed={}", candidate.display());
            break;
        }
    }
}
