//! Internet checksums (RFC 1071).

use aya_ebpf::helpers::generated::bpf_csum_diff;

/// Folds a 64-bit one's-complement accumulator to the final 16-bit checksum (complemented).
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sum of the ten 16-bit words of an IPv4 header (with its checksum field zero), as read
/// from memory. Summing native-order words yields the byte-swapped checksum, which stored
/// back natively is the correct big-endian value (RFC 1071 §2(B)).
#[inline(always)]
pub fn ipv4_header_sum(hdr: *const u16) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 10 {
        sum += unsafe { *hdr.add(i) } as u64;
        i += 1;
    }
    sum
}

/// One's-complement sum (unfolded) of the 16-bit halves of 32-bit words held in registers,
/// e.g. a header about to be stored as those words. Words are in memory order (wire bytes
/// read as native little-endian), which yields the byte-swapped sum that, stored back
/// natively, is the correct big-endian checksum (RFC 1071 §2(B)).
#[inline(always)]
pub fn sum_words<const N: usize>(words: &[u32; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += (words[i] & 0xffff) as u64 + (words[i] >> 16) as u64;
        i += 1;
    }
    sum
}

/// One's-complement sum (unfolded) of `len` bytes at `ptr` via `bpf_csum_diff`, which
/// accepts at most 512 bytes per call; `len` must be a multiple of 4, at most 512.
///
/// # Safety
/// `ptr .. ptr + len` must have been bounds-checked against the packet end.
#[inline(always)]
pub unsafe fn sum_bytes(ptr: *const u8, len: u32, seed: u32) -> u64 {
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, ptr as *mut u32, len, seed) };
    // A negative return is an error; callers only pass verified, aligned sizes.
    (r as u64) & 0xffff_ffff
}
