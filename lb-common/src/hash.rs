//! The flow hash, defined once for the kernel and userspace.
//!
//! MurmurHash3 (x86, 32-bit) over six little-endian words: the four words of the source
//! address, the two ports, and the protocol. Words are taken exactly as they sit in memory,
//! i.e. the wire bytes read as native (little-endian) `u32`s — the eBPF target is `bpfel`, and
//! userspace builds its words with `u32::from_ne_bytes` on the same byte order.
//!
//! Murmur3 was chosen over jhash because it is a handful of multiplies and rotates with no
//! data-dependent branches: cheap in BPF, and trivially identical on both sides.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Seed shared by every node so that all LB nodes pick the same backend for a flow.
pub const FLOW_HASH_SEED: u32 = 0x5851_f42d;

#[inline(always)]
const fn mix_word(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let h = (h ^ k).rotate_left(13);
    h.wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len_bytes: u32) -> u32 {
    let mut h = h ^ len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow as the Maglev lookup uses it.
///
/// * `src_be`: source address words (IPv4 in word 0, the rest zero).
/// * `sport_be`, `dport_be`: ports as read from the packet (network byte order).
/// * `src_only`: session affinity — hash the source address alone, so every connection
///   from one client lands on the same backend.
#[inline(always)]
pub const fn flow_hash(
    src_be: &[u32; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    src_only: bool,
) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = mix_word(h, src_be[0]);
    h = mix_word(h, src_be[1]);
    h = mix_word(h, src_be[2]);
    h = mix_word(h, src_be[3]);
    if src_only {
        finish(h, 16)
    } else {
        h = mix_word(h, (sport_be as u32) | ((dport_be as u32) << 16));
        h = mix_word(h, proto as u32);
        finish(h, 24)
    }
}

/// Slot of a flow hash in a Maglev table of `table_size` entries.
#[inline(always)]
pub const fn maglev_slot(hash: u32, table_size: u32) -> u32 {
    if table_size == 0 {
        0
    } else {
        hash % table_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference MurmurHash3_x86_32 over a byte string, written independently of the
    /// word-wise version above, to pin the function to the published algorithm.
    fn murmur3_bytes(data: &[u8], seed: u32) -> u32 {
        let mut h = seed;
        // Every input here is a whole number of words (the tail step is not needed).
        for chunk in data.as_chunks::<4>().0 {
            h = mix_word(h, u32::from_le_bytes(*chunk));
        }
        finish(h, data.len() as u32)
    }

    #[test]
    fn matches_murmur3_reference_vectors() {
        // Published MurmurHash3_x86_32 vectors.
        assert_eq!(murmur3_bytes(b"", 0), 0);
        assert_eq!(murmur3_bytes(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_bytes(b"test", 0), 0xba6b_d213);
        assert_eq!(murmur3_bytes(&[0xff, 0xff, 0xff, 0xff], 0), 0x7629_3b50);
    }

    #[test]
    fn flow_hash_equals_bytewise_murmur3() {
        let src = [u32::from_ne_bytes([192, 0, 2, 7]), 0, 0, 0];
        let (sport, dport) = (0x3930u16, 0x5000u16);
        let mut bytes = [0u8; 24];
        for (i, w) in src.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        bytes[16..20].copy_from_slice(&((sport as u32) | ((dport as u32) << 16)).to_le_bytes());
        bytes[20..24].copy_from_slice(&6u32.to_le_bytes());
        assert_eq!(
            flow_hash(&src, sport, dport, 6, false),
            murmur3_bytes(&bytes, FLOW_HASH_SEED)
        );
        assert_eq!(
            flow_hash(&src, sport, dport, 6, true),
            murmur3_bytes(&bytes[..16], FLOW_HASH_SEED)
        );
    }

    #[test]
    fn source_only_ignores_ports_and_protocol() {
        let src = [0x0a0b_0c0d, 1, 2, 3];
        assert_eq!(
            flow_hash(&src, 1, 2, 6, true),
            flow_hash(&src, 9, 8, 17, true)
        );
        assert_ne!(
            flow_hash(&src, 1, 2, 6, false),
            flow_hash(&src, 9, 8, 17, false)
        );
    }

    #[test]
    fn slot_is_within_table() {
        for h in [0u32, 1, 65_536, 65_537, u32::MAX] {
            assert!(maglev_slot(h, 65_537) < 65_537);
        }
        assert_eq!(maglev_slot(5, 0), 0);
    }
}
