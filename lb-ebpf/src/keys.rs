//! Map keys and values built on the stack as whole 8-byte words.
//!
//! The kernel hashes a key with 4-byte loads (jhash) and compares it with 8-byte loads
//! (memcmp) right after the program stored it. Built field by field, a key is a mix of
//! 1-, 2- and 4-byte stores (LLVM even splits a `u32` copied from the packet into bytes),
//! and a load that spans several pending stores cannot be forwarded from the store buffer:
//! the CPU stalls until they reach the cache, on every lookup and insert. Stored as aligned
//! `u64` words, every kernel load is contained in one store and forwards.

use lb_common::{FlowKey, FlowKeyV4, FlowState, VipAddrKey, VipKey};

/// `T` overlaid on `N` words; `align(8)` puts it on an 8-byte stack slot.
#[repr(C, align(8))]
pub union Words<T: Copy, const N: usize> {
    words: [u64; N],
    value: T,
}

impl<T: Copy, const N: usize> Words<T, N> {
    #[inline(always)]
    pub fn get(&self) -> &T {
        // SAFETY: every constructor below fills all words, and `T` is plain data no larger
        // than them (checked at compile time), so any bit pattern is a valid `T`.
        unsafe { &self.value }
    }
}

// The words below put each field at these offsets (little-endian: the low half of a word
// comes first). If a layout in lb-common changes, these fail instead of the keys.
const _: () = {
    use core::mem::offset_of;
    assert!(size_of::<FlowKey>() == 5 * 8);
    assert!(offset_of!(FlowKey, src_be) == 0 && offset_of!(FlowKey, dst_be) == 16);
    assert!(offset_of!(FlowKey, sport_be) == 32 && offset_of!(FlowKey, dport_be) == 34);
    assert!(offset_of!(FlowKey, proto) == 36 && offset_of!(FlowKey, family) == 37);
    assert!(size_of::<FlowKeyV4>() == 2 * 8);
    assert!(offset_of!(FlowKeyV4, src_be) == 0 && offset_of!(FlowKeyV4, dst_be) == 4);
    assert!(offset_of!(FlowKeyV4, sport_be) == 8 && offset_of!(FlowKeyV4, dport_be) == 10);
    assert!(offset_of!(FlowKeyV4, proto) == 12);
    assert!(size_of::<VipKey>() == 20 && offset_of!(VipKey, port_be) == 16);
    assert!(offset_of!(VipKey, proto) == 18 && offset_of!(VipKey, family) == 19);
    assert!(size_of::<FlowState>() == 2 * 8);
    assert!(offset_of!(FlowState, vip_id) == 4 && offset_of!(FlowState, last_seen_ns) == 8);
    assert!(size_of::<VipAddrKey>() == 20 && offset_of!(VipAddrKey, family) == 16);
};

#[inline(always)]
const fn pair(lo: u32, hi: u32) -> u64 {
    lo as u64 | (hi as u64) << 32
}

/// The ports word as it sits in every key: source port first, both in wire order.
#[inline(always)]
pub const fn ports(sport_be: u16, dport_be: u16) -> u32 {
    sport_be as u32 | (dport_be as u32) << 16
}

/// A connection as the datapath sees it, before it becomes a map key: addresses as four
/// wire-order words (IPv4 in word 0), both ports in one word ([`ports`]).
#[derive(Clone, Copy)]
pub struct Flow {
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    pub ports: u32,
    pub proto: u8,
    pub family: u8,
}

impl Flow {
    #[inline(always)]
    pub const fn sport_be(&self) -> u16 {
        self.ports as u16
    }

    #[inline(always)]
    pub const fn dport_be(&self) -> u16 {
        (self.ports >> 16) as u16
    }
}

/// The [`FlowKey`] of a flow (`family` and `_pad` in the last word).
#[inline(always)]
pub fn flow_key(f: &Flow) -> Words<FlowKey, 5> {
    Words {
        words: [
            pair(f.src_be[0], f.src_be[1]),
            pair(f.src_be[2], f.src_be[3]),
            pair(f.dst_be[0], f.dst_be[1]),
            pair(f.dst_be[2], f.dst_be[3]),
            pair(f.ports, f.proto as u32 | (f.family as u32) << 8),
        ],
    }
}

/// The [`FlowKeyV4`] of an IPv4 flow.
#[inline(always)]
pub fn flow_key_v4(f: &Flow) -> Words<FlowKeyV4, 2> {
    Words {
        words: [
            pair(f.src_be[0], f.dst_be[0]),
            pair(f.ports, f.proto as u32),
        ],
    }
}

/// A [`VipKey`] (the last 4 bytes of the third word are not part of the key).
#[inline(always)]
pub fn vip_key(addr_be: &[u32; 4], port_be: u16, proto: u8, family: u8) -> Words<VipKey, 3> {
    Words {
        words: [
            pair(addr_be[0], addr_be[1]),
            pair(addr_be[2], addr_be[3]),
            (port_be as u64) | (proto as u64) << 16 | (family as u64) << 24,
        ],
    }
}

/// A [`VipAddrKey`] (padding zero; the last 4 bytes of the third word are not part of it).
#[inline(always)]
pub fn addr_key(addr_be: &[u32; 4], family: u8) -> Words<VipAddrKey, 3> {
    Words {
        words: [
            pair(addr_be[0], addr_be[1]),
            pair(addr_be[2], addr_be[3]),
            family as u64,
        ],
    }
}

/// A [`FlowState`].
#[inline(always)]
pub fn flow_state(backend_id: u32, vip_id: u32, last_seen_ns: u64) -> Words<FlowState, 2> {
    Words {
        words: [pair(backend_id, vip_id), last_seen_ns],
    }
}
