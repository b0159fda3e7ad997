//! `cargo xtask bench maglev`: Maglev table build time (`lb-userspace/examples/maglev_bench.rs`)
//! in release mode, printed beside the Maglev paper's figures.

use anyhow::Result;

use crate::util;

pub fn run(json: bool) -> Result<()> {
    let mut args = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        "lb-userspace",
        "--example",
        "maglev_bench",
        "--",
    ];
    if json {
        args.push("--json");
    }
    util::cargo(&args)
}
