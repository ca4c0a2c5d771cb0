//! The hybrid logical clock (HLC): timestamps that follow wall time but never go backwards.
//!
//! A [`Timestamp`] packs 48 bits of wall-clock milliseconds since the Unix epoch (good until
//! the year 10889) above a 16-bit logical counter, so timestamps compare as plain `u64`s.
//! The wall clock is injected through [`Clock`]; this module never reads time itself, which lets
//! tests and simulators drive it through jumps, stalls and skew.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MAX: u64 = (1 << LOGICAL_BITS) - 1;

/// A hybrid-logical-clock reading: `(physical_ms << 16) | logical`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The largest physical part representable, in ms since the Unix epoch.
    pub const PHYSICAL_MS_MAX: u64 = (1 << (64 - LOGICAL_BITS)) - 1;
    pub const ZERO: Timestamp = Timestamp(0);

    /// Builds a timestamp; `physical_ms` above [`Self::PHYSICAL_MS_MAX`] is clamped and
    /// `logical` above 65535 is clamped.
    pub const fn new(physical_ms: u64, logical: u64) -> Self {
        let physical_ms = if physical_ms > Self::PHYSICAL_MS_MAX {
            Self::PHYSICAL_MS_MAX
        } else {
            physical_ms
        };
        let logical = if logical > LOGICAL_MAX {
            LOGICAL_MAX
        } else {
            logical
        };
        Timestamp((physical_ms << LOGICAL_BITS) | logical)
    }
    pub const fn from_u64(raw: u64) -> Self {
        Timestamp(raw)
    }
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    pub const fn logical(self) -> u64 {
        self.0 & LOGICAL_MAX
    }
    /// The smallest timestamp greater than `self`: the next logical tick, carrying into the
    /// physical part when the counter is full. `None` only at the end of time.
    pub const fn successor(self) -> Option<Timestamp> {
        if self.0 == u64::MAX {
            None
        } else {
            // (physical, LOGICAL_MAX) + 1 == (physical + 1, 0): the carry is the overflow rule.
            Some(Timestamp(self.0 + 1))
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A source of wall-clock time in milliseconds since the Unix epoch. It may jump backwards,
/// stall or run fast; the HLC copes with all of that.
pub trait Clock {
    fn now_ms(&self) -> u64;
}

/// Errors from the clock. Each one leaves the clock unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// A remote timestamp is further ahead of our wall clock than `max_clock_offset` allows.
    /// The caller holds the change and retries later instead of dragging our clock forward.
    #[error(
        "remote timestamp {remote} is {ahead_ms} ms ahead of the local wall clock ({wall_ms} ms); \
         the limit (max_clock_offset) is {max_offset_ms} ms"
    )]
    TooFarAhead {
        remote: Timestamp,
        wall_ms: u64,
        ahead_ms: u64,
        max_offset_ms: u64,
    },
    /// The 64-bit timestamp space is used up (the clock reached the year 10889).
    #[error("the hybrid logical clock has reached the end of its range")]
    Exhausted,
}

/// A hybrid logical clock over an injected wall clock.
///
/// Invariant: every timestamp returned by [`Hlc::now`] or [`Hlc::update`] is strictly greater
/// than every timestamp this clock returned or observed before.
#[derive(Debug)]
pub struct Hlc<C> {
    clock: C,
    last: Timestamp,
    max_offset_ms: u64,
}

impl<C: Clock> Hlc<C> {
    pub fn new(clock: C, max_clock_offset: Duration) -> Self {
        Hlc {
            clock,
            last: Timestamp::ZERO,
            max_offset_ms: u64::try_from(max_clock_offset.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    pub fn clock_mut(&mut self) -> &mut C {
        &mut self.clock
    }

    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// Raises the clock to at least `persisted`, e.g. the highest version found in the store
    /// after a restart, so a node whose wall clock went back while it was down never reissues a
    /// timestamp. Never lowers the clock.
    pub fn observe_persisted(&mut self, persisted: Timestamp) {
        self.last = self.last.max(persisted);
    }

    fn wall(&self) -> Timestamp {
        Timestamp::new(self.clock.now_ms(), 0)
    }

    /// A new timestamp for a local event.
    pub fn now(&mut self) -> Result<Timestamp, ClockError> {
        let wall = self.wall();
        let next = if wall > self.last {
            wall
        } else {
            self.last.successor().ok_or(ClockError::Exhausted)?
        };
        self.last = next;
        Ok(next)
    }

    /// Merges a timestamp received from a peer and returns a new timestamp greater than both
    /// it and everything issued before. Refuses (without changing the clock) a remote timestamp
    /// more than `max_clock_offset` ahead of the local wall clock.
    pub fn update(&mut self, remote: Timestamp) -> Result<Timestamp, ClockError> {
        let wall_ms = self.clock.now_ms();
        let ahead_ms = remote.physical_ms().saturating_sub(wall_ms);
        if ahead_ms > self.max_offset_ms {
            return Err(ClockError::TooFarAhead {
                remote,
                wall_ms,
                ahead_ms,
                max_offset_ms: self.max_offset_ms,
            });
        }
        let floor = self.last.max(remote);
        let wall = self.wall();
        let next = if wall > floor {
            wall
        } else {
            floor.successor().ok_or(ClockError::Exhausted)?
        };
        self.last = next;
        Ok(next)
    }
}

/// A wall clock set by hand, for tests and simulations.
/// Clones share one reading, so a test can keep a handle while the HLC owns another.
#[derive(Debug, Default, Clone)]
pub struct ManualClock {
    now_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ManualClock {
    pub fn new(now_ms: u64) -> Self {
        let clock = ManualClock::default();
        clock.set(now_ms);
        clock
    }
    pub fn set(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }
    pub fn advance(&self, by_ms: u64) {
        let _ = self
            .now_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |ms| {
                Some(ms.saturating_add(by_ms))
            });
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OFFSET: Duration = Duration::from_millis(500);

    #[derive(Debug, Clone)]
    enum Step {
        Wall(u64),
        Now,
        Receive(u64, u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            // jumps anywhere, including far back and to the end of the 48-bit range
            prop_oneof![
                0u64..2_000,
                Just(Timestamp::PHYSICAL_MS_MAX),
                Just(u64::MAX)
            ]
            .prop_map(Step::Wall),
            Just(Step::Now),
            (0u64..3_000, any::<u16>()).prop_map(|(p, l)| Step::Receive(p, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn strictly_increases_whatever_the_wall_clock_does(steps in proptest::collection::vec(step(), 1..60)) {
            let clock = ManualClock::new(1_000);
            let mut hlc = Hlc::new(clock.clone(), OFFSET);
            let mut previous = Timestamp::ZERO;
            for step in steps {
                match step {
                    Step::Wall(ms) => clock.set(ms),
                    Step::Now => match hlc.now() {
                        Ok(ts) => {
                            prop_assert!(ts > previous, "{ts:?} after {previous:?}");
                            previous = ts;
                        }
                        Err(e) => prop_assert_eq!(e, ClockError::Exhausted),
                    },
                    Step::Receive(p, l) => {
                        let remote = Timestamp::new(p, l as u64);
                        let before = hlc.last();
                        match hlc.update(remote) {
                            Ok(ts) => {
                                prop_assert!(ts > previous && ts > remote);
                                previous = ts;
                            }
                            Err(_) => prop_assert_eq!(hlc.last(), before),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn follows_the_wall_clock_when_it_moves_forward() {
        let clock = ManualClock::new(1_000);
        let mut hlc = Hlc::new(clock.clone(), OFFSET);
        assert_eq!(hlc.now().unwrap(), Timestamp::new(1_000, 0));
        assert_eq!(hlc.now().unwrap(), Timestamp::new(1_000, 1));
        clock.set(1_005);
        assert_eq!(hlc.now().unwrap(), Timestamp::new(1_005, 0));
        // wall clock jumps back: logical ticks on the last physical value
        clock.set(10);
        assert_eq!(hlc.now().unwrap(), Timestamp::new(1_005, 1));
    }

    #[test]
    fn logical_overflow_carries_into_physical() {
        let clock = ManualClock::new(7);
        let mut hlc = Hlc::new(clock, OFFSET);
        hlc.observe_persisted(Timestamp::new(7, LOGICAL_MAX));
        assert_eq!(hlc.now().unwrap(), Timestamp::new(8, 0));
    }

    #[test]
    fn update_takes_the_max_and_ticks() {
        let clock = ManualClock::new(1_000);
        let mut hlc = Hlc::new(clock, OFFSET);
        hlc.now().unwrap();
        assert_eq!(
            hlc.update(Timestamp::new(1_200, 4)).unwrap(),
            Timestamp::new(1_200, 5)
        );
        assert_eq!(hlc.now().unwrap(), Timestamp::new(1_200, 6));
    }

    #[test]
    fn refuses_remote_beyond_max_offset() {
        let clock = ManualClock::new(1_000);
        let mut hlc = Hlc::new(clock.clone(), OFFSET);
        let err = hlc.update(Timestamp::new(1_501, 0)).unwrap_err();
        assert_eq!(
            err,
            ClockError::TooFarAhead {
                remote: Timestamp::new(1_501, 0),
                wall_ms: 1_000,
                ahead_ms: 501,
                max_offset_ms: 500
            }
        );
        assert_eq!(
            hlc.last(),
            Timestamp::ZERO,
            "a refused update changes nothing"
        );
        // exactly at the limit is accepted; once our wall clock catches up the held one is too
        assert!(hlc.update(Timestamp::new(1_500, 0)).is_ok());
        clock.set(1_100);
        assert!(hlc.update(Timestamp::new(1_501, 0)).is_ok());
    }

    #[test]
    fn exhaustion_is_an_error_not_a_wrap() {
        let clock = ManualClock::new(0);
        let mut hlc = Hlc::new(clock, OFFSET);
        hlc.observe_persisted(Timestamp::from_u64(u64::MAX));
        assert_eq!(hlc.now(), Err(ClockError::Exhausted));
        assert_eq!(hlc.last(), Timestamp::from_u64(u64::MAX));
    }
}
