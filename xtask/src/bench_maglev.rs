//! `cargo xtask bench maglev` — not written yet (issue 3).

use anyhow::{Result, bail};

pub fn run(_json: bool) -> Result<()> {
    bail!("bench maglev is not implemented yet (issue 3)")
}
