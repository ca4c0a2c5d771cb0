//! The SQLite store adapter: capture of every committed write by triggers, a durable change log,
//! exactly-once apply of remote changes, dead letters, conflicts, compaction and snapshots, all
//! inside the user's own SQLite file.
//!
//! Architecture invariant: every public operation is one SQLite transaction; the capture
//! records of driftless's own writes are deleted before that transaction commits, so applied
//! changes are never captured again (no echo).

mod admin;
mod apply;
mod capture;
mod log;
mod meta;
mod reconcile;
mod rowio;
mod schema;
mod store;
mod upgrade;

pub use schema::{quote_ident, quote_literal};
pub use store::{OpenError, SqliteOptions, SqliteStore};
