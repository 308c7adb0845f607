//! CRC32C of a concatenation from the CRCs of its parts, in a few hundred operations whatever
//! the length: `CRC(A ‖ B) = CRC(A)·x^(8|B|) mod P ⊕ CRC(B)`, with `x^(8|B|)` assembled from a
//! table of `x^(2^k)` (zlib's `crc32_combine` since 1.2.12, for the Castagnoli polynomial).
//! `crc32c::crc32c_combine` squares 32×32 matrices per bit of the length instead, tens of
//! microseconds for a 1 MiB payload: frames derive CRCs this way several times per write
//! ([`crate::frame`]), so that cost showed in profiles of sequential writes.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// a(x)·b(x) mod P(x), bit-reflected (x^0 is the top bit).
const fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// `X2N[k]` = x^(2^k) mod P.
const X2N: [u32; 32] = {
    let mut t = [0u32; 32];
    let mut p: u32 = 1 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        t[k] = p;
        p = mult_mod_p(p, p);
        k += 1;
    }
    t
};

/// x^(n·2^k) mod P.
fn x2n_mod_p(mut n: u64, mut k: usize) -> u32 {
    let mut p: u32 = 1 << 31; // x^0
    while n != 0 {
        if n & 1 != 0 {
            p = mult_mod_p(X2N[k & 31], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// CRC32C(A ‖ B) from `crc_a` = CRC32C(A), `crc_b` = CRC32C(B) and `len_b` = |B|: the same
/// value as `crc32c::crc32c_combine`.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    mult_mod_p(x2n_mod_p(len_b as u64, 3), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_a_direct_pass_over_the_concatenation() {
        let a = b"header bytes of a frame";
        let b: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut whole = a.to_vec();
        whole.extend_from_slice(&b);
        assert_eq!(
            combine(crc32c::crc32c(a), crc32c::crc32c(&b), b.len()),
            crc32c::crc32c(&whole)
        );
        assert_eq!(
            combine(crc32c::crc32c(a), 0, 0),
            crc32c::crc32c(a),
            "empty B"
        );
    }

    proptest! {
        #[test]
        fn matches_the_crates_combine(a: u32, b: u32, len in 0usize..(64 << 20)) {
            prop_assert_eq!(combine(a, b, len), crc32c::crc32c_combine(a, b, len));
        }
    }
}
