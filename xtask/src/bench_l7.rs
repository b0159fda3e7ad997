//! `cargo xtask bench l7` — not written yet (issue 5).

use anyhow::{Result, bail};

pub fn run(_json: bool, _seconds: u32, _rounds: u32) -> Result<()> {
    bail!("bench l7 is not implemented yet (issue 5)")
}
