//! Changes: the unit that is captured, logged, shipped and applied.

use crate::ids::{ColumnName, NodeId, TableName};
use crate::key::PrimaryKey;
use crate::value::Value;
use crate::version::{CausalLength, Version};
use std::fmt;

/// Fingerprint of a table's schema (column names, primary-key positions and merge kinds) as seen
/// by the writer. Lets a receiver notice a change made under a schema it does not have: a column
/// it lacks, a different key, or a column merged by another rule (which would diverge). Declared
/// types are left out on purpose: apply matches columns by name and converts values by the
/// documented mapping, so `bigint` on PostgreSQL and `INTEGER` on SQLite are the same schema.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SchemaFingerprint(pub u64);

impl SchemaFingerprint {
    /// FNV-1a over `table`, then each `(column, key position, kind)` in the given order. Not a
    /// security boundary: it detects mismatches, it does not authenticate.
    pub fn compute<'a>(
        table: &TableName,
        columns: impl IntoIterator<Item = (&'a str, Option<usize>, &'a str)>,
    ) -> Self {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        let mut feed = |bytes: &[u8]| {
            // length first so ("ab","c") and ("a","bc") differ
            for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        feed(table.as_str().as_bytes());
        for (name, key_position, kind) in columns {
            feed(name.as_bytes());
            match key_position {
                Some(p) => feed(format!("pk{p}").as_bytes()),
                None => feed(b""),
            }
            feed(kind.as_bytes());
        }
        SchemaFingerprint(hash)
    }
}

impl fmt::Debug for SchemaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for SchemaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One column written by an upsert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellWrite {
    pub column: ColumnName,
    /// For `lww`, `max` and `min` columns: the value written. For `counter` columns: the origin
    /// node's cumulative contribution to the counter in this row's current life (not a delta), so
    /// that applying it twice changes nothing.
    pub value: Value,
    /// The version of this cell the writer saw when it wrote (`None` if it saw none). Only used to
    /// tell a concurrent overwrite (a conflict) from a sequential one; never decides a winner.
    pub base: Option<Version>,
}

/// What a change does to its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeOp {
    /// Insert or update: sets the listed cells. An insert lists every column (a row's new life
    /// starts with all its cells); an update lists the columns it changed.
    Upsert(Vec<CellWrite>),
    /// Delete the row. `base` is the highest version of the row the deleter had seen, so updates
    /// it had not seen are reported as conflicts.
    Delete { base: Option<Version> },
}

/// A change to one row, made by one write at one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub table: TableName,
    pub key: PrimaryKey,
    /// When and where the write was made; shared by all its cells.
    pub version: Version,
    /// The row's causal length after the write: odd for an upsert, even for a delete.
    pub causal_length: CausalLength,
    pub op: ChangeOp,
    /// Schema of the table at the writer when it wrote.
    pub schema: SchemaFingerprint,
}

impl Change {
    /// The node where the write was made (kept unchanged when the change is relayed).
    pub fn origin(&self) -> NodeId {
        self.version.node
    }

    pub fn is_delete(&self) -> bool {
        matches!(self.op, ChangeOp::Delete { .. })
    }

    /// The cells written, empty for a delete.
    pub fn cells(&self) -> &[CellWrite] {
        match &self.op {
            ChangeOp::Upsert(cells) => cells,
            ChangeOp::Delete { .. } => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_fingerprint_sees_columns_keys_and_kinds_but_not_declared_types() {
        let t = TableName::new("items").unwrap();
        let base = [("id", Some(0), "lww"), ("n", None, "lww")];
        let fp = |cols: &[(&str, Option<usize>, &str)]| {
            SchemaFingerprint::compute(&t, cols.iter().copied())
        };
        let reference = fp(&base);
        assert_eq!(reference, fp(&base));
        // a column more, a different key, another merge rule, another table: all differ
        assert_ne!(reference, fp(&[base[0], base[1], ("m", None, "lww")]));
        assert_ne!(reference, fp(&[("id", None, "lww"), ("n", Some(0), "lww")]));
        assert_ne!(reference, fp(&[base[0], ("n", None, "counter")]));
        assert_ne!(
            reference,
            SchemaFingerprint::compute(&TableName::new("other").unwrap(), base)
        );
    }
}
