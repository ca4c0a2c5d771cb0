//! The pure core of driftless: identifiers, keys, values, the hybrid logical clock and the merge rules.
//!
//! Architecture invariant: this crate does no IO, spawns no threads, reads no clock (time arrives
//! through [`hlc::Clock`]) and depends on no async runtime. Everything here is deterministic, so
//! store adapters, the wire protocol, reconciliation and the simulators can all share it unchanged.

pub mod change;
pub mod codec;
pub mod conflict;
pub mod hlc;
pub mod ids;
pub mod key;
pub mod merge;
pub mod rules;
pub mod value;
pub mod version;

pub use change::{CellWrite, Change, ChangeOp, SchemaFingerprint};
pub use conflict::{ConflictRecord, ConflictRule, ConflictSide};
pub use hlc::{Clock, ClockError, Hlc, ManualClock, Timestamp};
pub use ids::{ColumnName, NameError, NodeId, TableName};
pub use key::{KeyError, KeyPart, PrimaryKey};
pub use merge::{
    ApplyOutcome, CellState, CounterPart, Effect, LocalWriteError, MergeError, RowState,
};
pub use rules::{ColumnKind, TableRules};
pub use value::Value;
pub use version::{CausalLength, Version};
