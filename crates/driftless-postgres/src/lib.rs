//! The PostgreSQL store adapter: capture of every committed write by triggers, a durable change
//! log, exactly-once batched apply of remote changes, dead letters, conflicts, compaction and
//! snapshots, all inside the user's own PostgreSQL database (in a schema of driftless's own).
//! The design and its reasons are in docs/postgres.md; in short:
//!
//! - **Capture by triggers, not logical decoding**: a PL/pgSQL statement trigger records
//!   `(table id, op, key, changed-columns mask)` in `driftless.pending`, atomically with the
//!   client's write. No replication slot (nothing can fill the disk when driftless is down), no
//!   `wal_level = logical`, no superuser, and the same stamping as the SQLite adapter.
//! - **No race with apply**: every driftless write transaction runs at REPEATABLE READ and
//!   stamps every pending write in its snapshot first; a client write committed later is
//!   stamped later (with a larger version), and if the transaction writes a row such a write
//!   touched, PostgreSQL fails it with a serialization error and it runs again. Busy rows make
//!   it fall back to briefly locking the synced tables, so apply is never starved.
//! - **No echo**: driftless's transactions `SET LOCAL driftless.applying = 'on'`; the triggers'
//!   `WHEN` clause skips them. Exact, and free for driftless's own writes.
//! - **Types**: a fixed, documented mapping to driftless values (`types`); any other column
//!   type is refused at open time, and a value a column cannot hold exactly is dead-lettered.
//! - **Storage format 2**: one `driftless.rows` row per synced row holds its merge metadata
//!   (no copy of values the table holds) and the sequence number of its last change: the states
//!   are the change log (docs/postgres.md, "Tables").
//! - **Batched apply**: states of a whole batch are loaded with one query, merged in Rust and
//!   written back with multi-row statements over SQL arrays; a constraint failure falls back to
//!   one change per savepoint so only the offending changes become dead letters.
//! - **Least privilege**: no superuser; identifiers come only from catalog introspection of
//!   the configured tables and are always quoted; values are always bound parameters.
//!
//! Architecture invariant: every public operation is one PostgreSQL transaction; driftless's
//! write transactions on one database are serialized (session advisory lock), so log sequence
//! numbers commit in order and a reader never skips an entry.
//!
//! Synchronous API over the `postgres` crate (which runs its own small runtime per
//! connection); it may be used from `tokio::task::spawn_blocking` threads.

mod admin;
mod apply;
mod capture;
mod install;
mod log;
mod meta;
mod reconcile;
mod rowio;
mod schema;
mod states;
mod store;
mod tx;
pub mod types;
mod upgrade;

pub use schema::{quote_ident, quote_literal};
pub use store::{
    OpenError, PostgresOptions, PostgresStore, TX_ATTEMPTS_MAX, TX_OPTIMISTIC_ATTEMPTS,
};
