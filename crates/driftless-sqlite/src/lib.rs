//! The SQLite store adapter: capture of every committed write by triggers, a durable change log,
//! exactly-once apply of remote changes, dead letters, conflicts, compaction and snapshots, all
//! inside the user's own SQLite file.
//!
//! Architecture invariant: every public operation is one SQLite transaction; driftless's own
//! writes to user tables happen only inside transactions that set `_driftless_state.applying`,
//! so the capture triggers never record them (no echo).

mod admin;
mod apply;
mod capture;
mod log;
mod meta;
mod rowio;
mod schema;
mod store;

pub use schema::{quote_ident, quote_literal};
pub use store::{OpenError, SqliteOptions, SqliteStore};
