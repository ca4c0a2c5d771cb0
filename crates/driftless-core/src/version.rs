//! Versions (HLC timestamp + origin node) and causal lengths (row existence counters).

use crate::hlc::Timestamp;
use crate::ids::NodeId;
use std::fmt;

/// The version of a write: when (HLC) and where (origin node) it was made. Ordered by timestamp,
/// then node id, so two distinct writes never tie.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    pub timestamp: Timestamp,
    pub node: NodeId,
}

impl Version {
    pub const fn new(timestamp: Timestamp, node: NodeId) -> Self {
        Version { timestamp, node }
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:x}", self.timestamp, self.node.get())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.timestamp, self.node)
    }
}

/// A row's causal length: how many times its existence flipped. 0 = never seen, odd = the row
/// exists, even = deleted. An insert or delete makes it one larger than what the writer saw, so a
/// delete beats updates made without seeing it, and an insert made after seeing a delete beats
/// the delete (see docs/semantics.md).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct CausalLength(pub u64);

impl CausalLength {
    pub const ABSENT: CausalLength = CausalLength(0);

    pub const fn is_live(self) -> bool {
        self.0 % 2 == 1
    }
    /// The next length: used when an insert or delete flips existence.
    pub const fn next(self) -> CausalLength {
        CausalLength(self.0 + 1)
    }
}
