//! Embeds the eBPF object built by `cargo xtask build-ebpf`, and refuses to build without it.

use std::path::PathBuf;

fn main() {
    let object = match std::env::var_os("XLB_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=XLB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\nxlb's eBPF object is missing: {}\nBuild it first with `cargo xtask build-ebpf` \
             (or set XLB_EBPF_OBJECT to an object built elsewhere).\n",
            object.display()
        );
    }
    let object = object
        .canonicalize()
        .expect("canonical path of the eBPF object");
    println!("cargo:rustc-env=XLB_EBPF_OBJECT_PATH={}", object.display());
}
