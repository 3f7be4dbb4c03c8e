//! Ones'-complement checksum arithmetic (RFC 1071, incremental per RFC 1624).
//!
//! All values are 16-bit words as they sit in memory (wire order read
//! natively); the ones'-complement sum does not depend on byte order as long
//! as every word is read the same way.

/// Folds a 32-bit sum of 16-bit words into 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum `check` after a 32-bit field changed from `from` to `to`:
/// `HC' = ~(~HC + ~m + m')` (RFC 1624, eqn. 3).
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let not_from = !from;
    let sum = (!check as u32) + (not_from & 0xffff) + (not_from >> 16) + (to & 0xffff) + (to >> 16);
    !fold(sum)
}

/// The checksum `check` after a 16-bit field changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check as u32) + (!from as u32) + (to as u32);
    !fold(sum)
}
