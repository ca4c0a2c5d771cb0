//! The `SqliteStore` type: opening a database, installing capture, and the transaction helper
//! every operation goes through.

use crate::meta;
use crate::schema::{Synced, bootstrap_sql, db, install_triggers, introspect};
use driftless_core::{Clock, Hlc, NodeId, TableName, Timestamp};
use driftless_store::{StoreError, SystemClock, TableConfig, TableSchema, random_node_id};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Settings of a SQLite replica.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The tables to sync, with their merge rules.
    pub tables: Vec<TableConfig>,
    /// A remote change stamped further ahead of our wall clock than this is held, not applied.
    pub max_clock_offset: Duration,
    /// Node id to use when installing into a database for the first time (random if `None`).
    /// If the database already has one, it must match.
    pub node_id: Option<NodeId>,
    /// How long to wait for another connection's write lock before failing.
    pub busy_timeout: Duration,
}

impl SqliteOptions {
    pub fn new(tables: Vec<TableConfig>) -> Self {
        SqliteOptions {
            tables,
            max_clock_offset: Duration::from_secs(60),
            node_id: None,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors from opening a store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open SQLite database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot install driftless into {path}: {source}")]
    Install { path: PathBuf, source: StoreError },
    #[error("no tables configured: list at least one table to sync")]
    NoTables,
    #[error("table {0} is configured twice")]
    DuplicateTable(TableName),
}

/// A SQLite replica: the user's database file with driftless's capture and metadata installed.
#[derive(Debug)]
pub struct SqliteStore<C: Clock = SystemClock> {
    pub(crate) conn: Connection,
    pub(crate) node: NodeId,
    pub(crate) hlc: Hlc<C>,
    pub(crate) configs: Vec<TableConfig>,
    pub(crate) schemas: Vec<TableSchema>,
    /// The same tables with their ids and prepared SQL text, shared cheaply by operations.
    pub(crate) synced: Vec<Arc<Synced>>,
    /// Inside a write transaction: the highest capture record that existed when it began
    /// (records above it are driftless's own writes) ...
    pub(crate) pending_mark: i64,
    /// ... and the highest record stamped so far.
    pub(crate) pending_done: i64,
    /// Node ids interned to the small integers metadata stores.
    pub(crate) nodes: driftless_store::rowmeta::NodeInterner,
    /// Inside a write transaction: the sequence number the next changed row state takes.
    pub(crate) next_seq: i64,
    /// Inside a write transaction: what its saved rows add to the tail once it commits.
    pub(crate) tail_staged: driftless_store::tail::TailChunk,
    /// The rows this process committed last, as served (`driftless_store::tail`).
    pub(crate) tail: driftless_store::tail::Tail,
    /// Inside a write transaction: whether every capture record it may stamp was stamped; only
    /// then are its rows added to the tail (a state rebuilt from the row as it is now may show
    /// a waiting write's value with an older version, which must never be served).
    pub(crate) tail_drained: bool,
    /// Capture records up to this one may carry a changed-columns mask made by triggers over
    /// an older column list (a schema change reinstalled them): stamping also counts columns
    /// the row has no cell for yet (see `capture::Recorded::new_columns`). 0 when every
    /// record's mask covers every column.
    pub(crate) masks_untrusted_through: i64,
    /// Fingerprint deltas per (table, top bucket) of the current write transaction, folded in
    /// just before it commits.
    pub(crate) fingerprint_deltas: std::collections::HashMap<(String, usize), i64>,
    /// Whether retryable dead letters may exist (checked once per transaction, so applying a
    /// change does not look the dead-letter table up when it is empty, the usual case).
    pub(crate) dead_letters_present: bool,
    /// `PRAGMA schema_version` when the schemas were last read; a change means DDL happened.
    pub(crate) schema_version: i64,
    /// The HLC reading last stored in `_driftless_meta` (a transaction that did not move the
    /// clock writes nothing there).
    pub(crate) hlc_stored: i64,
    pub(crate) path: PathBuf,
}

impl SqliteStore<SystemClock> {
    /// Opens (and on first use installs into) the database at `path` with the system clock.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, OpenError> {
        Self::open_with_clock(path, options, SystemClock)
    }
}

impl<C: Clock> SqliteStore<C> {
    /// Opens with an injected wall clock (tests and simulations).
    pub fn open_with_clock(
        path: impl AsRef<Path>,
        options: SqliteOptions,
        clock: C,
    ) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        if options.tables.is_empty() {
            return Err(OpenError::NoTables);
        }
        for (i, t) in options.tables.iter().enumerate() {
            if options.tables[..i].iter().any(|o| o.name == t.name) {
                return Err(OpenError::DuplicateTable(t.name.clone()));
            }
        }
        let conn = Connection::open(&path).map_err(|source| OpenError::Open {
            path: path.clone(),
            source,
        })?;
        let install_error = |source| OpenError::Install {
            path: path.clone(),
            source,
        };
        conn.busy_timeout(options.busy_timeout)
            .map_err(|e| install_error(db(e)))?;
        // WAL: readers never block the writer. synchronous=NORMAL in WAL mode survives process
        // crashes (SIGKILL) with no loss; on power loss the last commits may roll back, but data
        // and cursors always roll back together.
        //
        // Switching to WAL needs the file to itself and, unlike other statements, fails at once
        // with SQLITE_BUSY instead of waiting for the busy timeout. An application writing
        // while the node starts (in rollback-journal mode, before any node ever switched the
        // file) would make the node fail to start, so the switch is retried for as long as the
        // busy timeout allows.
        let started = std::time::Instant::now();
        loop {
            match conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            ) {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && started.elapsed() < options.busy_timeout =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(install_error(db(e))),
            }
        }
        let mut store = SqliteStore {
            conn,
            node: NodeId::default(),
            hlc: Hlc::new(clock, options.max_clock_offset),
            configs: options.tables,
            schemas: Vec::new(),
            synced: Vec::new(),
            pending_mark: 0,
            pending_done: 0,
            nodes: Default::default(),
            next_seq: 1,
            tail_staged: Default::default(),
            tail: Default::default(),
            tail_drained: false,
            masks_untrusted_through: 0,
            dead_letters_present: true,
            fingerprint_deltas: std::collections::HashMap::new(),
            schema_version: -1,
            hlc_stored: -1,
            path: path.clone(),
        };
        store.install(options.node_id).map_err(install_error)?;
        Ok(store)
    }

    fn install(&mut self, wanted: Option<NodeId>) -> Result<(), StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
        let result = self.install_in_tx(wanted);
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        self.conn.execute_batch(end).map_err(db)?;
        result
    }

    fn install_in_tx(&mut self, wanted: Option<NodeId>) -> Result<(), StoreError> {
        let legacy = crate::upgrade::prepare(&self.conn)?;
        meta::install(&self.conn).map_err(db)?;
        self.node = match meta::get_blob(&self.conn, "node_id").map_err(db)? {
            Some(bytes) => {
                let bytes: [u8; 16] = bytes
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("node_id is not 16 bytes".into()))?;
                let found = NodeId::from_bytes(bytes);
                if let Some(expected) = wanted.filter(|w| *w != found) {
                    return Err(StoreError::WrongNode { expected, found });
                }
                found
            }
            None => {
                let id = match wanted {
                    Some(id) => id,
                    None => random_node_id()
                        .map_err(|e| StoreError::Database(format!("OS random source: {e}")))?,
                };
                meta::set(&self.conn, "node_id", id.to_bytes().to_vec()).map_err(db)?;
                id
            }
        };
        if let Some(last) = meta::get_i64(&self.conn, "hlc").map_err(db)? {
            self.hlc.observe_persisted(Timestamp::from_u64(last as u64));
        }
        self.masks_untrusted_through = meta::get_i64(&self.conn, "masks_untrusted_through")
            .map_err(db)?
            .unwrap_or(0);
        self.load_nodes()?;
        self.refresh_schemas_in_tx(true)?;
        if let Some(legacy) = legacy {
            self.next_seq = self.head_seq()? + 1;
            crate::upgrade::convert(self, legacy)?;
            self.flush_nodes()?;
        }
        meta::set(&self.conn, "format", meta::FORMAT).map_err(db)?;
        Ok(())
    }

    /// Reloads the node interner from its table (at open, and after a rolled-back transaction
    /// that may have interned nodes it never stored).
    pub(crate) fn load_nodes(&mut self) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, node FROM _driftless_nodes")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .map_err(db)?;
        let mut stored = Vec::new();
        for row in rows {
            let (id, bytes) = row.map_err(db)?;
            let bytes: [u8; 16] = bytes
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("node {id} is not 16 bytes")))?;
            let id = u32::try_from(id)
                .map_err(|_| StoreError::Corrupt(format!("node index {id} out of range")))?;
            stored.push((id, NodeId::from_bytes(bytes)));
        }
        self.nodes = driftless_store::rowmeta::NodeInterner::from_stored(stored)
            .map_err(StoreError::Corrupt)?;
        Ok(())
    }

    /// Stores the nodes interned in the current transaction.
    pub(crate) fn flush_nodes(&mut self) -> Result<(), StoreError> {
        for (id, node) in self.nodes.take_fresh() {
            self.conn
                .prepare_cached("INSERT INTO _driftless_nodes (id, node) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(rusqlite::params![id, node.to_bytes().to_vec()]))
                .map_err(db)?;
        }
        Ok(())
    }

    /// The highest row sequence number (the log's head; 0 when empty).
    pub(crate) fn head_seq(&self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM _driftless_rows")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(db)
    }

    /// Re-reads the synced tables' schemas and reinstalls the triggers. With `bootstrap`,
    /// tables seen for the first time get their existing rows queued as local inserts.
    pub(crate) fn refresh_schemas_in_tx(&mut self, bootstrap: bool) -> Result<(), StoreError> {
        let mut schemas = Vec::with_capacity(self.configs.len());
        let mut synced = Vec::with_capacity(self.configs.len());
        for config in &self.configs {
            let schema = introspect(&self.conn, config)?;
            self.conn
                .execute(
                    "INSERT OR IGNORE INTO _driftless_tables (name) VALUES (?1)",
                    [schema.name.as_str()],
                )
                .map_err(db)?;
            let id: i64 = self
                .conn
                .query_row(
                    "SELECT id FROM _driftless_tables WHERE name = ?1",
                    [schema.name.as_str()],
                    |r| r.get(0),
                )
                .map_err(db)?;
            let column_ids = crate::schema::column_ids(&self.conn, &schema, id)?;
            if install_triggers(&self.conn, &schema, id, &column_ids)? {
                let newest: i64 = self
                    .conn
                    .query_row(
                        "SELECT coalesce(max(seq), 0) FROM _driftless_pending",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                if newest > self.masks_untrusted_through {
                    self.masks_untrusted_through = newest;
                    meta::set(&self.conn, "masks_untrusted_through", newest).map_err(db)?;
                }
            }
            let installed_key = format!("installed:{}", schema.name);
            if bootstrap
                && meta::get_i64(&self.conn, &installed_key)
                    .map_err(db)?
                    .is_none()
            {
                self.conn
                    .execute_batch(&bootstrap_sql(&schema, id))
                    .map_err(db)?;
                meta::set(&self.conn, &installed_key, 1).map_err(db)?;
            }
            synced.push(Arc::new(Synced::new(id, schema.clone(), column_ids)));
            schemas.push(schema);
        }
        self.schemas = schemas;
        // (the served changes carry the schema they were made under)
        self.tail.clear();
        self.synced = synced;
        self.schema_version = self.read_schema_version()?;
        Ok(())
    }

    fn read_schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(db)
    }

    /// Runs `body` in one write transaction. Picks up schema changes (e.g. an added column)
    /// first. Before committing, deletes the capture records of the writes stamped in it and of
    /// driftless's own writes (records above the mark: no other connection can write while we
    /// hold the write lock), so applied changes are never captured again. Rolls back on error.
    pub(crate) fn write_tx<T>(
        &mut self,
        body: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
        let result = (|| {
            self.pending_mark = self
                .conn
                .prepare_cached("SELECT coalesce(max(seq), 0) FROM _driftless_pending")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db)?;
            self.pending_done = 0;
            self.next_seq = self.head_seq()? + 1;
            self.tail_staged = driftless_store::tail::TailChunk {
                first: self.next_seq as u64,
                ..Default::default()
            };
            self.tail_drained = false;
            self.fingerprint_deltas.clear();
            self.dead_letters_present = self
                .conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM _driftless_dead_letters WHERE change IS NOT NULL)",
                )
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db)?;
            if self.read_schema_version()? != self.schema_version {
                self.refresh_schemas_in_tx(false)?;
            }
            let value = body(self)?;
            self.flush_nodes()?;
            crate::rowio::flush_fingerprints(&self.conn, &self.fingerprint_deltas)?;
            self.fingerprint_deltas.clear();
            self.conn
                .prepare_cached("DELETE FROM _driftless_pending WHERE seq <= ?1 OR seq > ?2")
                .and_then(|mut s| s.execute([self.pending_done, self.pending_mark]))
                .map_err(db)?;
            if self.masks_untrusted_through > 0 && self.pending_done >= self.masks_untrusted_through
            {
                self.masks_untrusted_through = 0;
                meta::set(&self.conn, "masks_untrusted_through", 0).map_err(db)?;
            }
            let hlc = self.hlc.last().as_u64() as i64;
            if hlc != self.hlc_stored {
                meta::set(&self.conn, "hlc", hlc).map_err(db)?;
            }
            self.conn.execute_batch("COMMIT").map_err(db)?;
            self.hlc_stored = hlc;
            let mut staged = std::mem::take(&mut self.tail_staged);
            if self.tail_drained && !staged.rows.is_empty() {
                staged.last = self.next_seq as u64 - 1;
                self.tail.committed(vec![staged]);
            }
            Ok(value)
        })();
        if result.is_err() {
            // Best effort: the transaction may already be gone if COMMIT itself failed.
            let _ = self.conn.execute_batch("ROLLBACK");
            self.nodes.roll_back();
            self.tail_staged = Default::default();
            self.masks_untrusted_through = meta::get_i64(&self.conn, "masks_untrusted_through")
                .ok()
                .flatten()
                .unwrap_or(0);
        }
        result
    }

    /// Runs `body` on a consistent snapshot in which the table rows match their states: a read
    /// transaction when no local write waits to be stamped (the usual case), else a write
    /// transaction that stamps them first. Reading a row's `lww` values from the table while a
    /// local write to it is unstamped would pair the new value with the old version.
    pub(crate) fn read_tx<T>(
        &mut self,
        body: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn.execute_batch("BEGIN").map_err(db)?;
        let quiet = self
            .conn
            .prepare_cached("SELECT NOT EXISTS (SELECT 1 FROM _driftless_pending)")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, bool>(0)))
            .map_err(db);
        match quiet {
            Ok(true) => {
                let result = body(self);
                let _ = self.conn.execute_batch("COMMIT");
                result
            }
            other => {
                let _ = self.conn.execute_batch("COMMIT");
                other?;
                // A backlog is stamped in bounded transactions first (each commits as it goes,
                // so a peer's apply overlaps the rest); what arrives meanwhile is stamped with
                // the read.
                for _ in 0..driftless_store::BACKLOG_ROUNDS_MAX {
                    let stamped = self.write_tx(|store| {
                        let mut captured = driftless_store::CaptureReport::default();
                        store.capture_in_tx(driftless_store::CAPTURE_BATCH_ROWS_MAX, &mut captured)
                    })?;
                    if stamped < driftless_store::CAPTURE_BATCH_ROWS_MAX {
                        break;
                    }
                }
                self.write_tx(|store| {
                    let mut captured = driftless_store::CaptureReport::default();
                    store.capture_all_in_tx(&mut captured)?;
                    body(store)
                })
            }
        }
    }

    /// Saves a row's merge state under a new sequence number (it moves to the log's head) and
    /// remembers its fingerprint delta for the commit. `loaded` is what the row held before.
    pub(crate) fn save_row_state(
        &mut self,
        synced: &Synced,
        key: &driftless_core::PrimaryKey,
        loaded: &crate::rowio::Loaded,
        state: &driftless_core::RowState,
    ) -> Result<(), StoreError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (top, delta) =
            crate::rowio::save_state(&self.conn, synced, key, loaded, state, seq, &mut self.nodes)?;
        self.tail_staged.push(
            seq as u64,
            state.to_changes(&synced.schema.name, key, synced.schema.fingerprint),
        );
        if let Some((old_seq, _)) = loaded.stored {
            self.tail_staged.moved_from.push(old_seq as u64);
        }
        *self
            .fingerprint_deltas
            .entry((synced.schema.name.to_string(), top))
            .or_default() ^= delta;
        Ok(())
    }

    /// A synced table by name.
    pub(crate) fn synced(&self, table: &TableName) -> Option<Arc<Synced>> {
        self.synced
            .iter()
            .find(|s| &s.schema.name == table)
            .cloned()
    }

    /// Milliseconds since the epoch for ledger timestamps.
    pub(crate) fn now_ms(&self) -> u64 {
        self.hlc.clock().now_ms()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The HLC (tests and the node read it; the store owns it).
    pub fn hlc(&self) -> &Hlc<C> {
        &self.hlc
    }

    pub fn hlc_mut(&mut self) -> &mut Hlc<C> {
        &mut self.hlc
    }

    /// SQLite's `PRAGMA data_version`: changes whenever another connection commits to the file.
    /// Polling it is how a node notices writes made by other processes.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(db)
    }

    /// The underlying connection, for read-only inspection in tests and tools.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}
