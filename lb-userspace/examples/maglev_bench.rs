//! Maglev table build time against the figures in the Maglev paper (NSDI 2016, §5.3).
//!
//! Run with `cargo xtask bench maglev [--json]`. Prints the median of several builds for
//! each (backends, table size) case; `--json` prints one JSON object per line instead.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use lb_userspace::maglev::{self, WeightedBackend};

/// (backends, table size, the paper's figure in ms if it gives one).
const CASES: [(u32, u32, Option<f64>); 4] = [
    (10, 65_537, None),
    (100, 65_537, Some(1.8)),
    (1_000, 65_537, Some(1.8)),
    (1_000, 655_373, Some(22.9)),
];
const RUNS: usize = 15;

fn backends(n: u32) -> Vec<WeightedBackend> {
    (1..=n)
        .map(|i| WeightedBackend {
            // 10.0.0.0/8 documentation-style addresses, one per backend.
            address: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            weight: 1,
            id: i,
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let json = std::env::args().skip(1).any(|a| a == "--json");
    if !json {
        println!(
            "{:>8} {:>10} {:>12} {:>12}   (median of {RUNS} builds)",
            "backends", "table_size", "xlb ms", "paper ms"
        );
    }
    for (n, size, paper) in CASES {
        let input = backends(n);
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let start = Instant::now();
            let built = maglev::build("bench", size, &input)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(built);
        }
        times.sort_by(f64::total_cmp);
        let median = times[RUNS / 2];
        if json {
            // Written by hand to keep the documented key order.
            println!("{{\"backends\": {n}, \"table_size\": {size}, \"ms\": {median:.4}}}");
        } else {
            let paper = paper.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}"));
            println!("{n:>8} {size:>10} {median:>12.3} {paper:>12}");
        }
    }
    if !json {
        println!(
            "paper: Eisenbud et al., NSDI 2016, §5.3 — 1.8 ms at M = 65537 and 22.9 ms at \
             M = 655373 (the backend count behind those figures is not given with them)"
        );
    }
    Ok(())
}
