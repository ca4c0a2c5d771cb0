//! The tail of the log in memory, for every adapter on storage format 2: the rows this process
//! committed last, as the changes a peer is sent, so a peer streaming close behind the head is
//! served without reading the stored rows and the user rows again (and without waiting for a
//! backlog of local writes to be stamped first).
//!
//! Invariant: for every sequence number `s` in `[lo, hi]`, if this process committed a row at
//! `s`, that row's changes are in `rows` unless the row has since moved to a higher number (a
//! later commit of this process removes the old entry; another process's commit may leave it).
//! A left-over entry is a state the row really had, so serving it is like a peer having read
//! that page before the row moved: the merge is a join, the row's newer state follows at its
//! new place. Numbers in `[lo, hi]` never belong to another process's rows: writers are
//! serialized and number their rows above the head (PostgreSQL from a sequence, so a rolled-back
//! transaction leaves a gap; SQLite from the highest stored number, so the next transaction
//! takes those numbers again), and when a commit's numbers do not start at `hi + 1` (someone
//! else wrote, or a gap) the tail restarts.
//! Updated only after COMMIT succeeds, and only by a transaction that stamped every local
//! write visible to it (otherwise a state rebuilt from the user's row may show a waiting
//! write's value under an older version); bounded by [`TAIL_ROWS_MAX`].

use crate::{LogEntry, LogPage, LogSeq};
use driftless_core::{Change, NodeId};
use std::collections::BTreeMap;

/// Most rows kept (each holds its row's changes, about the row's size plus its versions).
pub const TAIL_ROWS_MAX: usize = 20_000;

/// What one flushed chunk adds to the tail: its numbers `first..=last`, its rows' changes and
/// the numbers the rows had before.
#[derive(Debug, Default)]
pub struct TailChunk {
    pub first: u64,
    pub last: u64,
    pub rows: Vec<(u64, Vec<Change>)>,
    pub moved_from: Vec<u64>,
}

impl TailChunk {
    /// Adds a row (numbers in increasing order). A chunk keeps at most [`TAIL_ROWS_MAX`] rows:
    /// past that its older half goes and its range starts after them, so folding it in restarts
    /// the tail there (a transaction that wrote that much leaves only its newest rows behind).
    pub fn push(&mut self, seq: u64, changes: Vec<Change>) {
        self.rows.push((seq, changes));
        if self.rows.len() > TAIL_ROWS_MAX {
            let dropped: Vec<_> = self.rows.drain(..TAIL_ROWS_MAX / 2).collect();
            if let Some((last, _)) = dropped.last() {
                self.first = last + 1;
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Tail {
    /// `(lo, hi)`, `None` until this process commits rows.
    range: Option<(u64, u64)>,
    rows: BTreeMap<u64, Vec<Change>>,
}

impl Tail {
    /// Forgets everything (schema change, or anything that may have made entries wrong).
    pub fn clear(&mut self) {
        *self = Tail::default();
    }

    /// Folds a committed transaction's chunks in, in order.
    pub fn committed(&mut self, chunks: Vec<TailChunk>) {
        for chunk in chunks {
            if chunk.last < chunk.first {
                continue;
            }
            let lo = match self.range {
                Some((lo, hi)) if chunk.first == hi + 1 => lo,
                _ => {
                    self.rows.clear();
                    chunk.first
                }
            };
            self.range = Some((lo, chunk.last));
            for seq in chunk.moved_from {
                self.rows.remove(&seq);
            }
            self.rows.extend(chunk.rows);
        }
        while self.rows.len() > TAIL_ROWS_MAX {
            if let (Some((seq, _)), Some((_, hi))) = (self.rows.pop_first(), self.range) {
                self.range = Some((seq + 1, hi));
            }
        }
    }

    /// Whether [`Self::page`] may serve `after` (before the caller reads the head for it).
    pub fn covers(&self, after: LogSeq) -> bool {
        self.range
            .is_some_and(|(lo, hi)| after.0 + 1 >= lo && after.0 < hi)
    }

    /// The page after `after` from the tail, if the tail covers it: whole rows in sequence
    /// order up to `limit` changes (a row with more fills a page alone), without `skip`'s own
    /// changes. `head` is the log's head as read by the caller.
    pub fn page(
        &self,
        after: LogSeq,
        limit: usize,
        skip: Option<NodeId>,
        head: LogSeq,
    ) -> Option<LogPage> {
        let after = after.0;
        let (lo, hi) = self.range?;
        if after + 1 < lo || after >= hi || head.0 < hi {
            return None;
        }
        let mut entries = Vec::new();
        let mut next = after;
        let mut complete = true;
        for (seq, changes) in self.rows.range(after + 1..=hi) {
            let kept: Vec<&Change> = changes
                .iter()
                .filter(|c| skip.is_none_or(|peer| c.origin() != peer))
                .collect();
            if !entries.is_empty() && entries.len() + kept.len() > limit {
                complete = false;
                break;
            }
            entries.extend(kept.into_iter().map(|change| LogEntry {
                seq: LogSeq(*seq),
                change: change.clone(),
            }));
            next = *seq;
        }
        if complete {
            // every number up to `hi` is covered (the ones missing are rows that moved on)
            next = hi;
        }
        Some(LogPage {
            entries,
            next: LogSeq(next),
            head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftless_core::{CausalLength, ChangeOp, PrimaryKey, TableName, Timestamp, Version};

    fn change(key: i64, node: u128) -> Change {
        Change {
            table: TableName::new("t").unwrap(),
            key: PrimaryKey::integer(key),
            version: Version::new(Timestamp::new(1_000 + key as u64, 0), NodeId::new(node)),
            causal_length: CausalLength(1),
            op: ChangeOp::Upsert(Vec::new()),
            schema: Default::default(),
        }
    }

    fn chunk(first: u64, rows: &[(u64, i64)], moved_from: &[u64]) -> TailChunk {
        TailChunk {
            first,
            last: first + rows.len() as u64 - 1,
            rows: rows
                .iter()
                .map(|(s, k)| (*s, vec![change(*k, 1)]))
                .collect(),
            moved_from: moved_from.to_vec(),
        }
    }

    fn keys(page: &LogPage) -> Vec<(u64, i64)> {
        page.entries
            .iter()
            .map(|e| {
                let driftless_core::KeyPart::Integer(k) = e.change.key.parts()[0] else {
                    unreachable!()
                };
                (e.seq.0, k)
            })
            .collect()
    }

    #[test]
    fn the_tail_serves_what_it_covers_and_nothing_else() {
        let mut tail = Tail::default();
        assert!(tail.page(LogSeq(0), 10, None, LogSeq(0)).is_none());
        tail.committed(vec![chunk(1, &[(1, 1), (2, 2), (3, 3)], &[])]);
        let page = tail.page(LogSeq(0), 10, None, LogSeq(3)).unwrap();
        assert_eq!(keys(&page), vec![(1, 1), (2, 2), (3, 3)]);
        assert_eq!(page.next, LogSeq(3));
        // row 1 moves to 4: its old place is gone
        tail.committed(vec![chunk(4, &[(4, 1)], &[1])]);
        let page = tail.page(LogSeq(0), 2, None, LogSeq(4)).unwrap();
        assert_eq!(keys(&page), vec![(2, 2), (3, 3)]);
        assert_eq!(page.next, LogSeq(3));
        // the head beyond the tail (another process wrote): only up to the tail's end
        let page = tail.page(LogSeq(3), 10, None, LogSeq(9)).unwrap();
        assert_eq!(keys(&page), vec![(4, 1)]);
        assert!(tail.page(LogSeq(4), 10, None, LogSeq(9)).is_none());
        // a commit that does not start right after the tail: the tail restarts there
        tail.committed(vec![chunk(10, &[(10, 5)], &[])]);
        assert!(tail.page(LogSeq(3), 10, None, LogSeq(10)).is_none());
        assert_eq!(
            keys(&tail.page(LogSeq(9), 10, None, LogSeq(10)).unwrap()),
            vec![(10, 5)]
        );
        // a head below the tail's end (cannot happen; never trusted)
        assert!(tail.page(LogSeq(9), 10, None, LogSeq(5)).is_none());
        // a peer's own changes are left out; the page still moves its cursor
        let page = tail
            .page(LogSeq(9), 10, Some(NodeId::new(1)), LogSeq(10))
            .unwrap();
        assert!(page.entries.is_empty());
        assert_eq!(page.next, LogSeq(10));
    }

    #[test]
    fn a_transaction_larger_than_the_tail_leaves_its_newest_rows_and_restarts_it() {
        let mut tail = Tail::default();
        tail.committed(vec![chunk(1, &[(1, 1)], &[])]);
        let mut big = TailChunk {
            first: 2,
            ..TailChunk::default()
        };
        for seq in 2..(TAIL_ROWS_MAX as u64 + 10) {
            big.push(seq, vec![change(seq as i64, 1)]);
        }
        assert!(big.rows.len() <= TAIL_ROWS_MAX);
        big.last = TAIL_ROWS_MAX as u64 + 9;
        let first = big.first;
        assert!(first > 2);
        tail.committed(vec![big]);
        // what was before the big transaction, and its dropped rows, come from the stored rows
        assert!(!tail.covers(LogSeq(0)));
        assert!(!tail.covers(LogSeq(first - 2)));
        assert!(tail.covers(LogSeq(first - 1)));
    }

    #[test]
    fn the_tail_is_bounded_and_forgets_from_the_low_end() {
        let mut tail = Tail::default();
        let rows: Vec<(u64, i64)> = (1..=(TAIL_ROWS_MAX as u64 + 5))
            .map(|s| (s, s as i64))
            .collect();
        tail.committed(vec![chunk(1, &rows, &[])]);
        assert_eq!(tail.rows.len(), TAIL_ROWS_MAX);
        assert_eq!(tail.range, Some((6, rows.len() as u64)));
        assert!(
            tail.page(LogSeq(4), 10, None, LogSeq(rows.len() as u64))
                .is_none()
        );
        assert_eq!(
            tail.page(LogSeq(5), 1, None, LogSeq(rows.len() as u64))
                .unwrap()
                .entries[0]
                .seq,
            LogSeq(6)
        );
    }
}
