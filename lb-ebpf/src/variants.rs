//! Profiling builds only (`--features profile`): the balancer stopped after each step, and
//! with steps removed or replaced, as separate programs sharing the real maps. See
//! [`crate::probe`] and `tests/examples/bench_datapath.rs --variants`.

use aya_ebpf::{macros::xdp, programs::XdpContext};

use crate::balancer::run_variant;
use crate::probe::{off, stop};

macro_rules! variant {
    ($name:ident, $stop:expr, $off:expr) => {
        #[xdp]
        #[inline(always)]
        pub fn $name(ctx: XdpContext) -> u32 {
            run_variant::<{ $stop }, { $off }>(&ctx)
        }
    };
}

// Prefixes, in path order (established: 1 2 3 4 5 6 7 21 22 8; new flow: 1 2 11 12 13 14
// 15 5 6 7 21 22 8), and the whole program loaded again as a control.
variant!(xlb_s1_parsed, stop::PARSED, 0);
variant!(xlb_s2_config, stop::CONFIG, 0);
variant!(xlb_s3_ct_lookup, stop::CT_LOOKUP, 0);
variant!(xlb_s4_backend, stop::BACKEND, 0);
variant!(xlb_s11_vip, stop::VIP, 0);
variant!(xlb_s12_hash, stop::HASH, 0);
variant!(xlb_s13_pick, stop::PICK, 0);
variant!(xlb_s14_backend, stop::NEW_BACKEND, 0);
variant!(xlb_s15_insert, stop::INSERT, 0);
variant!(xlb_s5_clock, stop::CLOCK, 0);
variant!(xlb_s6_next_hop, stop::NEXT_HOP, 0);
variant!(xlb_s7_adjust, stop::ADJUST_HEAD, 0);
variant!(xlb_s21_macs, stop::MACS, 0);
variant!(xlb_s22_ethertype, stop::ETHERTYPE, 0);
variant!(xlb_s8_encap, stop::ENCAP, 0);
variant!(xlb_full, 0, 0);

// Steps removed or replaced.
variant!(xlb_no_clock, 0, off::CLOCK);
variant!(xlb_no_stats, 0, off::STATS);
variant!(xlb_no_nexthop, 0, off::NEXT_HOP);
variant!(xlb_ct_common, 0, off::CT_COMMON);
