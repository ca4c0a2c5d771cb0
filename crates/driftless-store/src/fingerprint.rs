//! Reconciliation fingerprints: each row falls in a fine bucket (by a hash of its key) and has an
//! item hash (of its key and merge state); a bucket's fingerprint is the XOR of its item hashes.
//!
//! Buckets are hash ranges of the key space, so two replicas agree on every boundary without
//! exchanging keys. `TOP_BUCKETS` top buckets each cover `FINE_PER_TOP` fine buckets. With 10M
//! rows a top bucket holds ~2,400 rows and a fine bucket ~38, which lets a 10M-row table with 100
//! differing rows be reconciled in three round trips and well under 256 KB (see the protocol in
//! `driftless-node`'s `reconcile` module). Every store adapter computes them the same way, so a
//! SQLite replica and a PostgreSQL replica can be compared.

use driftless_core::PrimaryKey;

/// Bits of the key hash that pick a fine bucket.
pub const FINE_BITS: u32 = 18;
/// Bits that pick a top bucket.
pub const TOP_BITS: u32 = 12;
pub const TOP_BUCKETS: usize = 1 << TOP_BITS;
pub const FINE_PER_TOP: usize = 1 << (FINE_BITS - TOP_BITS);

/// The fine bucket of a key: the top `FINE_BITS` bits of BLAKE3(key).
pub fn fine_bucket(key: &PrimaryKey) -> i64 {
    let hash = blake3::hash(key.as_bytes());
    let top = u32::from_be_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes"));
    i64::from(top >> (32 - FINE_BITS))
}

/// The top bucket a fine bucket belongs to.
pub fn top_of(fine: i64) -> usize {
    (fine >> (FINE_BITS - TOP_BITS)) as usize
}

/// The item hash of a row: 64 bits of BLAKE3(key length, key, state). Never 0 in practice, so
/// an empty bucket's fingerprint (0) differs from any non-empty one.
pub fn item_hash(key: &PrimaryKey, state: &[u8]) -> i64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(key.as_bytes().len() as u32).to_be_bytes());
    hasher.update(key.as_bytes());
    hasher.update(state);
    i64::from_be_bytes(
        hasher.finalize().as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    )
}
