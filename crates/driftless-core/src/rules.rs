//! Per-table merge configuration: column kinds and the optional priority rule.

use crate::ids::{ColumnName, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// How concurrent writes to one column combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ColumnKind {
    /// Last writer wins by (HLC, node id). The default.
    #[default]
    Lww,
    /// Integer counter: every node's increments add up; the visible value is the total.
    Counter,
    /// High-water mark: the largest value ever written wins.
    Max,
    /// Low-water mark: the smallest value ever written wins.
    Min,
}

impl ColumnKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnKind::Lww => "lww",
            ColumnKind::Counter => "counter",
            ColumnKind::Max => "max",
            ColumnKind::Min => "min",
        }
    }
}

impl fmt::Display for ColumnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown column kind in configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown column kind {0:?}; expected one of: lww, counter, max, min")]
pub struct UnknownColumnKind(pub String);

impl FromStr for ColumnKind {
    type Err = UnknownColumnKind;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "lww" => Ok(ColumnKind::Lww),
            "counter" => Ok(ColumnKind::Counter),
            "max" => Ok(ColumnKind::Max),
            "min" => Ok(ColumnKind::Min),
            other => Err(UnknownColumnKind(other.to_owned())),
        }
    }
}

/// Merge rules of one table. Every replica of a table must use the same rules; the node checks
/// this at handshake through the schema fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    columns: BTreeMap<ColumnName, ColumnKind>,
    priority: BTreeSet<NodeId>,
}

impl TableRules {
    pub fn new() -> Self {
        TableRules::default()
    }

    /// Sets the kind of one column (columns not named are `lww`).
    pub fn with_column(mut self, column: ColumnName, kind: ColumnKind) -> Self {
        self.columns.insert(column, kind);
        self
    }

    /// Makes writes from `nodes` win over writes from other nodes on `lww` columns.
    pub fn with_priority(mut self, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        self.priority.extend(nodes);
        self
    }

    pub fn kind(&self, column: &ColumnName) -> ColumnKind {
        self.columns.get(column).copied().unwrap_or_default()
    }

    /// Columns with a kind other than the default.
    pub fn column_kinds(&self) -> impl Iterator<Item = (&ColumnName, ColumnKind)> {
        self.columns.iter().map(|(c, k)| (c, *k))
    }

    pub fn priority_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.priority.iter().copied()
    }

    pub fn has_priority(&self) -> bool {
        !self.priority.is_empty()
    }

    /// 1 for an authoritative node, 0 otherwise: compared before the version.
    pub(crate) fn rank(&self, node: NodeId) -> u8 {
        u8::from(self.priority.contains(&node))
    }
}
