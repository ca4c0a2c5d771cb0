//! The store contract: the [`Store`] trait every store adapter (SQLite, PostgreSQL) implements,
//! and the types that cross it (log pages, apply reports, dead letters, snapshots).
//!
//! Architecture invariant: this crate knows nothing about any particular database, the network
//! or async runtimes. It depends on `driftless-core` only (plus the OS random source for node ids).

pub mod capture;
mod clock;
pub mod digest;
pub mod fingerprint;
pub mod ledger;
pub mod rowmeta;
pub mod tail;
mod types;

pub use clock::{SystemClock, random_node_id, random_u64, set_clock_skew_ms};
pub use types::*;

use driftless_core::{Change, NodeId, PrimaryKey, TableName};

/// Most local writes stamped in one capture transaction. Bounds the transaction's memory and the
/// time the store's write lock is held; the caller loops while more are pending.
pub const CAPTURE_BATCH_ROWS_MAX: usize = 10_000;
/// Most bounded capture transactions a log read runs before it stamps the rest in its own
/// transaction (bounded by that transaction's snapshot): clients writing faster than stamping
/// must not keep a read from ever being served.
pub const BACKLOG_ROUNDS_MAX: usize = 1_000;
/// Most entries one log page may hold.
pub const LOG_PAGE_ENTRIES_MAX: usize = 10_000;
/// Most changes one applied batch may hold.
pub const APPLY_BATCH_CHANGES_MAX: usize = 10_000;
/// Most rows one snapshot chunk may hold.
pub const SNAPSHOT_CHUNK_ROWS_MAX: usize = 10_000;
/// Most records returned by one listing call (dead letters, conflicts).
pub const LISTING_ROWS_MAX: usize = 10_000;

/// A replica of the synced tables in one data store, with driftless's metadata beside them.
///
/// All methods are synchronous and each runs in its own local transaction: either everything it
/// does is committed, or nothing is. The node runs stores on blocking threads.
pub trait Store {
    /// The node id stored with the replica (created when driftless was first installed).
    fn node_id(&self) -> NodeId;

    /// The synced tables as introspected from the store.
    fn schemas(&self) -> &[TableSchema];

    /// Stamps up to `limit` local writes captured since the last call with the node's HLC, merges
    /// them into the row metadata and appends them to the change log. Returns the new changes.
    fn capture(&mut self, limit: usize) -> Result<CaptureReport, StoreError>;

    /// Number of captured local writes not yet stamped.
    fn pending_local_writes(&mut self) -> Result<u64, StoreError>;

    /// Up to `limit` log entries after `after`, in log order.
    fn read_log(&mut self, after: LogSeq, limit: usize) -> Result<LogPage, StoreError>;

    /// Like [`Store::read_log`] without the changes whose origin is `peer`: a peer never needs
    /// its own changes back. The page's `next` and `head` are those of the unfiltered page, so
    /// a page can hold no entries and still move the cursor (`next > after`). Adapters that can
    /// skip such changes before building them override this.
    fn read_log_for(
        &mut self,
        after: LogSeq,
        limit: usize,
        peer: NodeId,
    ) -> Result<LogPage, StoreError> {
        let mut page = self.read_log(after, limit)?;
        page.entries.retain(|e| e.change.origin() != peer);
        Ok(page)
    }

    /// The highest sequence number in the log (0 if empty).
    fn log_head(&mut self) -> Result<LogSeq, StoreError>;

    /// Applies changes received from `from`, whose log is at `cursor` after them: merges each,
    /// writes the winning values, records conflicts, dead-letters what cannot be applied, holds
    /// what is stamped too far ahead, appends what changed the replica to the local log (with
    /// the original origin and version) and stores `cursor` — all in one transaction.
    fn apply_batch(
        &mut self,
        from: NodeId,
        changes: &[Change],
        cursor: LogSeq,
    ) -> Result<ApplyReport, StoreError>;

    /// How far `from`'s log has been applied here (0 if never).
    fn cursor(&mut self, from: NodeId) -> Result<LogSeq, StoreError>;

    /// Records that `peer` has durably applied this node's log up to `acked`. Returns what the
    /// peer must do next (stream on, or re-bootstrap because the log was compacted past it).
    fn record_ack(&mut self, peer: NodeId, acked: LogSeq) -> Result<PeerLogState, StoreError>;

    /// What `peer` must do to follow this node's log from `from`.
    fn peer_state(&mut self, peer: NodeId, from: LogSeq) -> Result<PeerLogState, StoreError>;

    /// Drops log entries no peer needs (superseded ones always; ones older than the retention
    /// only when every known peer has them, or by marking the laggards for re-bootstrap).
    fn compact(&mut self, policy: &CompactionPolicy) -> Result<CompactionReport, StoreError>;

    /// Rows of `table` with keys after `after`, as changes, for bootstrapping a replica.
    fn snapshot_chunk(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
    ) -> Result<SnapshotChunk, StoreError>;

    /// Retries held changes whose timestamp is now within the clock offset.
    fn release_held(&mut self) -> Result<ApplyReport, StoreError>;

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;

    /// Retries dead letters (all when `ids` is `None`): each either applies and leaves the table
    /// or stays with its new reason.
    fn retry_dead_letters(
        &mut self,
        ids: Option<&[DeadLetterId]>,
    ) -> Result<ApplyReport, StoreError>;

    /// Deletes dead letters for good. Returns how many were dropped.
    fn drop_dead_letters(&mut self, ids: Option<&[DeadLetterId]>) -> Result<usize, StoreError>;

    fn conflicts(&mut self, limit: usize) -> Result<Vec<StoredConflict>, StoreError>;

    /// Per-table counts for status displays.
    fn table_stats(&mut self) -> Result<Vec<TableStats>, StoreError>;

    /// A value that changes whenever another connection may have committed writes to the store
    /// (SQLite: `PRAGMA data_version`). The node polls it to stamp and ship foreign writes fast.
    fn commit_token(&mut self) -> Result<u64, StoreError>;

    /// Dead letters per synced table (cheap: no scan of the user tables, unlike `table_stats`).
    fn dead_letter_counts(&mut self) -> Result<Vec<(TableName, u64)>, StoreError>;

    /// Number of changes held because they were stamped too far ahead.
    fn held_count(&mut self) -> Result<u64, StoreError>;

    /// Content digest of every synced table ([`digest::ContentDigest`]): equal across replicas,
    /// in any store, exactly when the tables hold equal rows.
    fn content_digests(&mut self) -> Result<Vec<(TableName, u64, [u8; 16])>, StoreError>;

    /// Reconciliation: the fingerprint of each top bucket of `table`
    /// ([`fingerprint::TOP_BUCKETS`] entries, 0 for an empty bucket).
    fn top_fingerprints(&mut self, table: &TableName) -> Result<Vec<i64>, StoreError>;

    /// The fingerprints of the fine buckets under each of `tops`
    /// ([`fingerprint::FINE_PER_TOP`] per top bucket, in order).
    fn fine_fingerprints(
        &mut self,
        table: &TableName,
        tops: &[u32],
    ) -> Result<Vec<(u32, Vec<i64>)>, StoreError>;

    /// The rows in the given fine buckets: `(fine bucket, key, item hash)`.
    fn bucket_items(
        &mut self,
        table: &TableName,
        fine: &[u32],
    ) -> Result<Vec<(u32, PrimaryKey, i64)>, StoreError>;

    /// The full merge states of the given rows, as changes (rows never seen are skipped).
    fn row_changes(
        &mut self,
        table: &TableName,
        keys: &[PrimaryKey],
    ) -> Result<Vec<Change>, StoreError>;

    /// Merges changes sent by `from` to repair differences; cursors do not move.
    fn apply_repair(&mut self, from: NodeId, changes: &[Change])
    -> Result<ApplyReport, StoreError>;

    /// Checks up to `limit` rows of `table` after `after` against their merge state: content
    /// written behind driftless's back (see docs/reconciliation.md). With `repair`, fixes it;
    /// without, only counts what it would fix.
    fn verify_chunk(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
        repair: bool,
    ) -> Result<VerifyReport, StoreError>;
}
