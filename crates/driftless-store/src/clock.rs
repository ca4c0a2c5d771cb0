//! The real wall clock and the OS random source, kept out of the pure core.

use driftless_core::{Clock, NodeId};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds added to every reading of [`SystemClock`] in this process. Zero in production;
/// fault-injection runs set it (see `set_clock_skew_ms`) to simulate a node whose wall clock is
/// wrong or jumps, without faking time for the whole machine.
static CLOCK_SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Skews this process's wall clock by `skew_ms` (negative = behind). For fault injection.
pub fn set_clock_skew_ms(skew_ms: i64) {
    CLOCK_SKEW_MS.store(skew_ms, Ordering::Relaxed);
}

/// The system's wall clock (milliseconds since the Unix epoch), plus the process's injected skew
/// (normally zero). It may jump; the HLC copes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            // A clock set before 1970 reads as 0; the HLC then ticks logically.
            .unwrap_or(0);
        now.saturating_add_signed(CLOCK_SKEW_MS.load(Ordering::Relaxed))
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
