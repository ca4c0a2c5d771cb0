//! driftless's own tables inside the user's SQLite file: their DDL and small accessors.
//!
//! Everything driftless stores lives in tables prefixed `_driftless_`, in the same file as the
//! user's tables, so one SQLite transaction covers a user row, its metadata, the log entry and
//! the peer cursor together.

use rusqlite::{Connection, OptionalExtension, params};

/// Number of key columns the capture table can hold (the core's composite-key limit).
pub const KEY_COLUMNS_MAX: usize = driftless_core::key::KEY_PARTS_MAX;

/// The storage format this code writes (`format` in `_driftless_meta`). Format 1 (before
/// 0.2) kept a full copy of every row's state and a separate log; `upgrade.rs` converts it.
pub const FORMAT: i64 = 2;

/// Creates the metadata tables if missing. Idempotent.
pub fn install(conn: &Connection) -> rusqlite::Result<()> {
    let key_columns: String = (0..KEY_COLUMNS_MAX)
        .map(|i| format!(", k{i} ANY"))
        .collect();
    conn.execute_batch(&format!(
        r#"
        CREATE TABLE IF NOT EXISTS _driftless_meta (
            key TEXT PRIMARY KEY,
            value ANY
        ) WITHOUT ROWID;

        -- Synced tables get a small integer id, so a captured write records 8 bytes, not a name.
        CREATE TABLE IF NOT EXISTS _driftless_tables (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE
        );

        -- Writes recorded by the triggers (table id, operation 1 insert / 2 update / 3 delete,
        -- for an update the mask of the columns it changed, key values), not yet stamped. The
        -- triggers record every writer, driftless included; driftless deletes the records of
        -- its own writes before its transaction commits.
        CREATE TABLE IF NOT EXISTS _driftless_pending (
            seq INTEGER PRIMARY KEY,
            tbl INTEGER NOT NULL,
            op INTEGER NOT NULL,
            cols INTEGER
            {key_columns}
        );

        -- Storage format 2: the merge state of every row ever seen (tombstones included), and
        -- the change log at once. `seq` is the local sequence number of the row's last change
        -- (a new one each time the state changes), so "the log after cursor C" is the rows with
        -- seq > C in seq order, and a superseded change leaves nothing behind. `meta` is the
        -- state without the values the user's table holds (driftless_store::rowmeta), `bucket`
        -- the row's reconciliation fine bucket (from its key), `h` its item hash. Rows are
        -- appended in seq order, so this table's pages stay full.
        CREATE TABLE IF NOT EXISTS _driftless_rows (
            seq INTEGER PRIMARY KEY,
            tbl INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            pk BLOB NOT NULL,
            h INTEGER NOT NULL,
            meta BLOB NOT NULL
        );
        -- Finds a row by key (the bucket is computed from the key) and, covering the item hash,
        -- serves range fingerprints and bucket listings from the index alone.
        CREATE INDEX IF NOT EXISTS _driftless_rows_key ON _driftless_rows (tbl, bucket, pk, h);

        -- Node ids interned to small integers: metadata stores the integer.
        CREATE TABLE IF NOT EXISTS _driftless_nodes (
            id INTEGER PRIMARY KEY,
            node BLOB NOT NULL UNIQUE
        );

        -- Stable small ids of the synced tables' value columns (never reused, so dropping a
        -- column does not shift the others): metadata and capture masks name columns by id.
        CREATE TABLE IF NOT EXISTS _driftless_columns (
            tbl INTEGER NOT NULL,
            id INTEGER NOT NULL,
            name TEXT NOT NULL,
            PRIMARY KEY (tbl, id),
            UNIQUE (tbl, name)
        ) WITHOUT ROWID;

        -- Per table and top bucket: the XOR of its rows' item hashes, folded in once per write
        -- transaction, so range fingerprints cost 4,096 reads instead of a table scan.
        CREATE TABLE IF NOT EXISTS _driftless_fingerprints (
            tbl TEXT NOT NULL,
            bucket INTEGER NOT NULL,
            fp INTEGER NOT NULL,
            PRIMARY KEY (tbl, bucket)
        ) WITHOUT ROWID;

        -- How far each sender's log has been applied here.
        CREATE TABLE IF NOT EXISTS _driftless_cursors (
            peer BLOB PRIMARY KEY,
            seq INTEGER NOT NULL
        ) WITHOUT ROWID;

        -- How far each peer has applied our log.
        CREATE TABLE IF NOT EXISTS _driftless_peers (
            peer BLOB PRIMARY KEY,
            acked INTEGER NOT NULL,
            needs_bootstrap INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID;

        CREATE TABLE IF NOT EXISTS _driftless_conflicts (
            id INTEGER PRIMARY KEY,
            tbl TEXT NOT NULL,
            pk BLOB NOT NULL,
            col TEXT NOT NULL,
            rule TEXT NOT NULL,
            winner_version BLOB NOT NULL,
            winner_value BLOB,
            loser_version BLOB NOT NULL,
            loser_value BLOB,
            at_ms INTEGER NOT NULL,
            UNIQUE (tbl, pk, col, loser_version)
        );

        CREATE TABLE IF NOT EXISTS _driftless_dead_letters (
            id INTEGER PRIMARY KEY,
            tbl TEXT NOT NULL,
            pk BLOB,
            version BLOB,
            from_peer BLOB,
            change BLOB,
            reason TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 1,
            at_ms INTEGER NOT NULL
        );
        CREATE INDEX IF NOT EXISTS _driftless_dead_letters_row ON _driftless_dead_letters (tbl, pk);

        -- Changes stamped too far ahead of our clock, waiting for it to catch up.
        CREATE TABLE IF NOT EXISTS _driftless_held (
            id INTEGER PRIMARY KEY,
            from_peer BLOB NOT NULL,
            change BLOB NOT NULL,
            reason TEXT NOT NULL,
            at_ms INTEGER NOT NULL
        );
        "#
    ))
}

pub fn get_i64(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT value FROM _driftless_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

pub fn get_blob(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT value FROM _driftless_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

pub fn set<V: rusqlite::ToSql>(conn: &Connection, key: &str, value: V) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO _driftless_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}
