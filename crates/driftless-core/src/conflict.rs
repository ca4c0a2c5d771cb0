//! Conflict records: what a merge discarded, and why, for the conflict ledger.

use crate::ids::{ColumnName, TableName};
use crate::key::PrimaryKey;
use crate::value::Value;
use crate::version::Version;
use std::fmt;

/// The rule that decided a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConflictRule {
    /// Later (HLC, node id) won.
    Lww,
    /// The write of an authoritative node won (table priority rule).
    Priority,
    /// The larger value won (`max` column).
    Max,
    /// The smaller value won (`min` column).
    Min,
    /// A delete discarded a concurrent update (or a concurrent update arrived after the delete).
    DeleteWins,
    /// A store's table held a value its merge state does not (written behind driftless's back,
    /// e.g. with capture disabled): the merge state's value was restored.
    Drift,
}

impl ConflictRule {
    /// Label used in metrics (`rule`) and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictRule::Lww => "lww",
            ConflictRule::Priority => "priority",
            ConflictRule::Max => "max",
            ConflictRule::Min => "min",
            ConflictRule::DeleteWins => "delete_wins",
            ConflictRule::Drift => "drift",
        }
    }

    /// The rule named by [`ConflictRule::as_str`], if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            ConflictRule::Lww,
            ConflictRule::Priority,
            ConflictRule::Max,
            ConflictRule::Min,
            ConflictRule::DeleteWins,
            ConflictRule::Drift,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

impl fmt::Display for ConflictRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One side of a conflict. `value` is `None` for a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictSide {
    pub version: Version,
    pub value: Option<Value>,
}

/// A value discarded by a merge between concurrent writes (writes whose authors had not seen
/// each other). Identity in the ledger: `(table, key, column, loser.version)`; the same conflict
/// may be reported again when the same changes are delivered twice, and the ledger stores it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictRecord {
    pub table: TableName,
    pub key: PrimaryKey,
    pub column: ColumnName,
    pub rule: ConflictRule,
    pub winner: ConflictSide,
    pub loser: ConflictSide,
}
