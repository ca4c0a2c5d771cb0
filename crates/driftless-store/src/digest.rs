//! Content digests of tables: a canonical hash of the rows users see, the same whatever store
//! holds them (rows in primary-key byte order, each row's cells sorted by column name), so two
//! replicas, even in different stores, have equal digests exactly when they hold equal rows.

use driftless_core::PrimaryKey;
use driftless_core::Value;
use driftless_core::codec::Encoder;

/// Accumulates rows into a digest. Feed rows in primary-key order.
#[derive(Debug)]
pub struct ContentDigest {
    hasher: blake3::Hasher,
    rows: u64,
}

impl Default for ContentDigest {
    fn default() -> Self {
        ContentDigest::new()
    }
}

impl ContentDigest {
    pub fn new() -> Self {
        ContentDigest {
            hasher: blake3::Hasher::new(),
            rows: 0,
        }
    }

    /// Adds one row: its key and its non-key cells (any order; sorted here by column name).
    pub fn add_row(&mut self, key: &PrimaryKey, cells: &[(&str, Value)]) {
        let mut sorted: Vec<&(&str, Value)> = cells.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut e = Encoder::new();
        e.bytes(key.as_bytes());
        e.u32(sorted.len());
        for (column, value) in sorted {
            e.bytes(column.as_bytes());
            e.value(value);
        }
        let bytes = e.finish();
        self.hasher.update(&(bytes.len() as u64).to_be_bytes());
        self.hasher.update(&bytes);
        self.rows += 1;
    }

    /// `(rows, first 16 bytes of the BLAKE3 digest)`.
    pub fn finish(self) -> (u64, [u8; 16]) {
        let digest: [u8; 16] = self.hasher.finalize().as_bytes()[..16]
            .try_into()
            .expect("16 of 32 bytes");
        (self.rows, digest)
    }
}
