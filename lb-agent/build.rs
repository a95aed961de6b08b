use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

// Builds the kernel programs with the nightly toolchain and bpf-linker; the agent embeds the
// resulting object (see `include_bytes_aligned!` in src/datapath.rs).
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata_root()?;
    let root_dir = format!("{metadata}/lb-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the kernel programs (lb-ebpf); run `cargo xtask setup` first")
}

fn cargo_metadata_root() -> anyhow::Result<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let parent = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("lb-agent has no parent directory"))?;
    Ok(parent.display().to_string())
}
