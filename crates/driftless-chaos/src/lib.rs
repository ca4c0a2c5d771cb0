//! A fault-injection harness for driftless: starts real `driftless run` processes on loopback,
//! links them through a frame-aware fault-injecting proxy, writes to their replicas (SQLite files,
//! or PostgreSQL databases for `postgres_nodes` of them) as an application would while killing,
//! pausing, partitioning, skewing clocks, filling disks (SQLite) and terminating database
//! connections (PostgreSQL), then heals everything and checks the replicas (identical, no lost
//! acknowledged write, no phantom value, counters exact, no duplicate effect). See
//! docs/reliability.md.
//!
//! Architecture invariant: everything a history does is chosen by its seed ([`plan`] and the
//! [`workload`] are pure functions of it), so a failing history replays from its seed; only the
//! timing of real processes varies between replays. The checker reads the SQLite files and
//! PostgreSQL databases directly and never asks driftless what it holds.

pub mod checker;
pub mod disk;
pub mod history;
pub mod inspect;
pub mod node;
pub mod pg;
pub mod plan;
pub mod proxy;
pub mod report;
pub mod schema;
pub mod workload;

pub use checker::Verdict;
pub use history::{HistoryOptions, HistoryResult, run_history};
pub use plan::{FaultKind, Plan};
pub use report::Summary;
