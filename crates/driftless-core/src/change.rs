//! Changes: the unit that is captured, logged, shipped and applied.

use crate::ids::{ColumnName, NodeId, TableName};
use crate::key::PrimaryKey;
use crate::value::Value;
use crate::version::{CausalLength, Version};
use std::fmt;

/// Fingerprint of a table's schema (column names, declared types and merge kinds) as seen by the
/// writer. Lets a receiver notice a change made under a schema it does not have.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SchemaFingerprint(pub u64);

impl SchemaFingerprint {
    /// FNV-1a over `table`, then each `(column, declared type, kind)` in the given order. Not a
    /// security boundary: it detects mismatches, it does not authenticate.
    pub fn compute<'a>(
        table: &TableName,
        columns: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
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
        for (name, declared_type, kind) in columns {
            feed(name.as_bytes());
            feed(declared_type.as_bytes());
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
