//! Types that cross the store contract.

use driftless_core::{
    Change, ColumnKind, ColumnName, ConflictRecord, NodeId, PrimaryKey, SchemaFingerprint,
    TableName, TableRules, Version,
};
use std::fmt;

/// A position in a node's change log. Entry sequence numbers start at 1 and only grow;
/// `LogSeq(0)` means "before the first entry".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct LogSeq(pub u64);

impl fmt::Display for LogSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub seq: LogSeq,
    pub change: Change,
}

/// A page of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    pub entries: Vec<LogEntry>,
    /// The cursor after this page: the last entry's sequence, or `after` if the page is empty.
    pub next: LogSeq,
    /// The log's highest sequence when read.
    pub head: LogSeq,
}

/// One column of a synced table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSchema {
    pub name: ColumnName,
    /// The type as declared in the store (`INTEGER`, `text`, ...), empty if none.
    pub declared_type: String,
    pub kind: ColumnKind,
    /// Position in the primary key (0-based), `None` for other columns.
    pub primary_key: Option<usize>,
    pub not_null: bool,
}

/// A synced table as introspected from the store, with its merge rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub name: TableName,
    /// In declaration order.
    pub columns: Vec<ColumnSchema>,
    pub rules: TableRules,
    pub fingerprint: SchemaFingerprint,
}

impl TableSchema {
    /// Primary-key columns in key order.
    pub fn key_columns(&self) -> Vec<&ColumnSchema> {
        let mut key: Vec<_> = self
            .columns
            .iter()
            .filter(|c| c.primary_key.is_some())
            .collect();
        key.sort_by_key(|c| c.primary_key);
        key
    }

    /// Non-key columns in declaration order.
    pub fn value_columns(&self) -> impl Iterator<Item = &ColumnSchema> {
        self.columns.iter().filter(|c| c.primary_key.is_none())
    }

    pub fn column(&self, name: &ColumnName) -> Option<&ColumnSchema> {
        self.columns.iter().find(|c| &c.name == name)
    }
}

/// Configuration of one synced table: its name and merge rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableConfig {
    pub name: TableName,
    /// Columns with a kind other than `lww`.
    pub column_kinds: Vec<(ColumnName, ColumnKind)>,
    /// Nodes whose writes win on `lww` columns.
    pub priority: Vec<NodeId>,
}

impl TableConfig {
    pub fn new(name: TableName) -> Self {
        TableConfig {
            name,
            column_kinds: Vec::new(),
            priority: Vec::new(),
        }
    }
}

/// Local writes stamped by one capture call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureReport {
    /// Trigger records consumed. Several writes to a row become one change, so this can exceed
    /// `changes.len()`: loop on this (not on the changes) to drain a backlog.
    pub records: usize,
    /// The new changes, in the order they were written and logged.
    pub changes: Vec<Change>,
    /// Local writes that could not become changes (e.g. a NULL or REAL primary key); each is
    /// in the dead-letter table with its reason.
    pub refused: usize,
    /// Local writes that lost the merge at once (priority, max, min) and were set back to
    /// the winning value in the store.
    pub reverted: usize,
}

/// What one apply call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Changes that changed the replica.
    pub applied: usize,
    /// Changes already fully present (duplicate delivery).
    pub duplicates: usize,
    /// Changes that lost entirely to newer state.
    pub superseded: usize,
    /// Conflicts resolved (new ledger entries).
    pub conflicts: usize,
    /// Changes put in the dead-letter table.
    pub dead_lettered: usize,
    /// Changes held because they are stamped too far ahead of the local clock.
    pub held: usize,
    /// Local writes stamped first, in the same transaction ...
    pub captured: usize,
    /// ... and their tables, one entry per change (for metrics).
    pub captured_tables: Vec<TableName>,
    /// Dead letters retried automatically because another change to their row applied.
    pub retried: usize,
    /// One entry per new conflict: its table and rule (for metrics).
    pub conflict_rules: Vec<(TableName, driftless_core::ConflictRule)>,
    /// One entry per change dead-lettered: its table (as the change names it) and why.
    pub dead_letter_reasons: Vec<(String, DeadLetterReason)>,
}

/// Why a change was dead-lettered, in one word (the `reason` label of metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    UnknownTable,
    UnknownColumn,
    /// NOT NULL, UNIQUE, CHECK or FOREIGN KEY failed when writing the row.
    Constraint,
    /// The change itself is malformed.
    Invalid,
    /// The clock cannot stamp it (exhausted).
    Clock,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::UnknownTable => "unknown_table",
            DeadLetterReason::UnknownColumn => "unknown_column",
            DeadLetterReason::Constraint => "constraint",
            DeadLetterReason::Invalid => "invalid",
            DeadLetterReason::Clock => "clock",
        }
    }
}

impl ApplyReport {
    pub fn add(&mut self, other: &ApplyReport) {
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.superseded += other.superseded;
        self.conflicts += other.conflicts;
        self.dead_lettered += other.dead_lettered;
        self.held += other.held;
        self.captured += other.captured;
        self.captured_tables
            .extend(other.captured_tables.iter().cloned());
        self.retried += other.retried;
        self.conflict_rules
            .extend(other.conflict_rules.iter().cloned());
        self.dead_letter_reasons
            .extend(other.dead_letter_reasons.iter().cloned());
    }
}

/// What a peer must do to follow this node's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLogState {
    /// Stream from the peer's cursor.
    Stream,
    /// Entries the peer has not applied were compacted away: it must be re-bootstrapped from a
    /// snapshot (then stream from `resume_after`).
    NeedsBootstrap { resume_after: LogSeq },
}

/// When to drop log entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Entries referenced by current state are kept at least this many entries behind the head,
    /// even if all known peers have them, so brief newcomers can catch up without a snapshot.
    pub retain_entries_min: u64,
    /// The log may hold at most this many entries; beyond that the oldest are dropped and peers
    /// that had not applied them are marked for re-bootstrap (the disk never fills up because a
    /// peer went away).
    pub retain_entries_max: u64,
    /// Most entries examined for supersession per call (bounds the transaction).
    pub scan_entries_max: usize,
    /// Most entries retired (dropped below the floor) per call (bounds the transaction; a log
    /// far over its limit shrinks over several calls).
    pub retire_entries_max: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            retain_entries_min: 10_000,
            retain_entries_max: 10_000_000,
            scan_entries_max: 20_000,
            retire_entries_max: 50_000,
        }
    }
}

impl CompactionPolicy {
    /// How far retirement may move the log's floor (entries up to and including the result are
    /// dropped), before the per-call bound of `retire_entries_max`. Every adapter uses this, so
    /// they all keep the same entries:
    /// - entries some known peer has not acknowledged stay (peers already below the floor are
    ///   waiting for a snapshot and hold nothing back);
    /// - the newest `retain_entries_min` entries stay;
    /// - unless the log holds more than `retain_entries_max` entries: `retention_cut`, the
    ///   sequence number that many entries below the newest, is dropped regardless (and the
    ///   peers left behind re-bootstrap);
    /// - the newest entry always stays, so the head never moves back (a peer's cursor beyond
    ///   our head then means a restored backup).
    pub fn retire_through(
        &self,
        head: LogSeq,
        floor: LogSeq,
        acked: impl IntoIterator<Item = LogSeq>,
        retention_cut: Option<LogSeq>,
    ) -> LogSeq {
        let min_acked = acked
            .into_iter()
            .filter(|a| *a >= floor)
            .min()
            .unwrap_or(head);
        let kept = min_acked
            .0
            .min(head.0.saturating_sub(self.retain_entries_min));
        let forced = retention_cut.map_or(kept, |cut| kept.max(cut.0));
        LogSeq(forced.min(head.0.saturating_sub(1)))
    }
}

/// Whether a peer that had acknowledged `acked` must be re-bootstrapped after the floor moved
/// from `floor_before` to `floor_after` (entries it had not applied were dropped).
pub fn left_behind(acked: LogSeq, floor_before: LogSeq, floor_after: LogSeq) -> bool {
    acked < floor_after && acked >= floor_before
}

/// What one compaction call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Entries dropped because later entries supersede them.
    pub superseded_dropped: usize,
    /// Entries dropped because every peer had them (or by the size limit).
    pub retired_dropped: usize,
    /// Peers newly marked for re-bootstrap.
    pub peers_marked_for_bootstrap: Vec<NodeId>,
    /// Everything at or below this sequence is gone (entries above may also be gone if superseded).
    pub floor: LogSeq,
}

/// A chunk of a table snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The rows as changes that rebuild their full merge state.
    pub changes: Vec<Change>,
    /// Resume after this key; `None` when the table is finished.
    pub next: Option<PrimaryKey>,
    /// The log head when the chunk was read: after the snapshot, stream from the head taken
    /// when the first chunk was read.
    pub log_head: LogSeq,
}

/// Id of a dead letter.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct DeadLetterId(pub i64);

impl fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A change that could not be applied, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: DeadLetterId,
    /// Table name as carried by the change (may be unknown here).
    pub table: String,
    pub key: Option<PrimaryKey>,
    pub version: Option<Version>,
    /// The node the change came from (`None` for a local write that could not be captured).
    pub from: Option<NodeId>,
    pub reason: String,
    pub attempts: u32,
    pub at_ms: u64,
}

/// A conflict from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConflict {
    pub id: i64,
    pub record: ConflictRecord,
    pub at_ms: u64,
}

/// Per-table counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStats {
    pub table: TableName,
    pub rows: u64,
    pub conflicts: u64,
    pub dead_letters: u64,
}

/// Errors of store operations. The store is unchanged when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    /// The database could not be reached or the connection was lost (a server restart, a
    /// failover); the operation may succeed if tried again.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("table {table}: {reason}")]
    Schema { table: String, reason: String },
    #[error("unknown table {0}")]
    UnknownTable(String),
    #[error("batch of {len} items exceeds the limit of {max}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("driftless metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("clock: {0}")]
    Clock(#[from] driftless_core::ClockError),
    #[error("the store was installed for node {found}, not {expected}")]
    WrongNode { expected: NodeId, found: NodeId },
}

/// What one local verification chunk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Rows compared.
    pub checked: usize,
    /// Rows whose table content differed from their merge state (restored from the state).
    pub restored: usize,
    /// Rows present in the table with no merge state at all (adopted as local inserts).
    pub adopted: usize,
    /// Resume after this key; `None` when the table is done.
    pub next: Option<PrimaryKey>,
}

#[cfg(test)]
mod compaction_tests {
    use super::*;

    fn policy(min: u64, max: u64) -> CompactionPolicy {
        CompactionPolicy {
            retain_entries_min: min,
            retain_entries_max: max,
            ..CompactionPolicy::default()
        }
    }

    #[test]
    fn retirement_keeps_what_peers_lack_the_recent_entries_and_always_the_newest() {
        let (head, floor) = (LogSeq(100), LogSeq(10));
        // the slowest peer above the floor decides; one already below the floor does not
        let acked = [LogSeq(60), LogSeq(80), LogSeq(5)];
        assert_eq!(
            policy(0, 1_000).retire_through(head, floor, acked, None),
            LogSeq(60)
        );
        // the newest 30 entries stay even when everyone has them
        assert_eq!(
            policy(30, 1_000).retire_through(head, floor, [LogSeq(100)], None),
            LogSeq(70)
        );
        // no peers at all: only the retention minimum holds entries back
        assert_eq!(
            policy(30, 1_000).retire_through(head, floor, [], None),
            LogSeq(70)
        );
        // over the limit: the cut is dropped even though a peer lacks it
        assert_eq!(
            policy(0, 20).retire_through(head, floor, acked, Some(LogSeq(80))),
            LogSeq(80)
        );
        // the newest entry stays whatever the policy says
        assert_eq!(
            policy(0, 0).retire_through(head, floor, [LogSeq(100)], Some(LogSeq(100))),
            LogSeq(99)
        );
        assert_eq!(
            policy(0, 0).retire_through(LogSeq(0), LogSeq(0), [], None),
            LogSeq(0)
        );
    }

    #[test]
    fn only_peers_between_the_old_and_new_floor_are_left_behind() {
        let (before, after) = (LogSeq(10), LogSeq(50));
        assert!(left_behind(LogSeq(10), before, after));
        assert!(left_behind(LogSeq(49), before, after));
        assert!(!left_behind(LogSeq(50), before, after));
        // already below the old floor: marked by an earlier call
        assert!(!left_behind(LogSeq(9), before, after));
    }
}
