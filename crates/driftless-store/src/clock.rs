//! The real wall clock and the OS random source, kept out of the pure core.

use driftless_core::{Clock, NodeId};
use std::time::{SystemTime, UNIX_EPOCH};

/// The system's wall clock (milliseconds since the Unix epoch). It may jump; the HLC copes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            // A clock set before 1970 reads as 0; the HLC then ticks logically.
            .unwrap_or(0)
    }
}

/// A fresh random node id from the OS random source.
pub fn random_node_id() -> Result<NodeId, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(NodeId::from_bytes(bytes))
}

/// A random `u64` from the OS random source (for jitter and ids).
pub fn random_u64() -> Result<u64, getrandom::Error> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}
