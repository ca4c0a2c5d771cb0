//! Deterministic simulation kit: a seeded random source, a workload over a sample schema, an
//! in-memory replica, and the reference model (oracle) that any replica (in memory, SQLite,
//! PostgreSQL, whole node processes) is checked against.
//!
//! Architecture invariant: everything here is a pure function of the seed. No IO, no wall
//! clock, no threads, so a failing history replays exactly from its seed.

pub mod oracle;
pub mod replica;
pub mod rng;
pub mod workload;

pub use oracle::{Oracle, Written};
pub use replica::MemReplica;
pub use rng::Rng;
pub use workload::{LocalOp, Workload};
