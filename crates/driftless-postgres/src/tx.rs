//! The transactions every operation goes through: write transactions (advisory lock, REPEATABLE
//! READ, stamping first, retried on serialization failures, falling back to locking the synced
//! tables) and read snapshots (metadata and user rows from one snapshot).

use crate::schema::APPLYING_SETTING;
use crate::store::{Error, PostgresStore, TX_ATTEMPTS_MAX, TX_OPTIMISTIC_ATTEMPTS, TxState};
use driftless_core::Clock;
use driftless_store::StoreError;
use std::time::Duration;

impl<C: Clock> PostgresStore<C> {
    /// Runs `body` in one write transaction: REPEATABLE READ, with driftless's own writes
    /// marked (`SET LOCAL driftless.applying`) so the capture triggers skip them, serialized
    /// against other driftless sessions on this database by a session advisory lock, and with
    /// the buffered states and log entries flushed before COMMIT. Picks up DDL on the synced
    /// tables first.
    ///
    /// A concurrent client write to a row this transaction also writes makes PostgreSQL fail it
    /// with a serialization error; it then runs again from the start (stamping that client
    /// write first). After [`TX_OPTIMISTIC_ATTEMPTS`] such failures, attempts lock the synced
    /// tables against client writes first (bounded by `lock_timeout`), so an apply cannot be
    /// starved by busy clients. See docs/postgres.md.
    pub(crate) fn write_tx<T>(
        &mut self,
        mut body: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<T, StoreError> {
        self.ensure_connected()?;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let lock_tables = attempt > TX_OPTIMISTIC_ATTEMPTS;
            match self.run_tx_once(&mut body, lock_tables) {
                Ok(value) => return Ok(value),
                Err(e) if e.is_retryable() && attempt < TX_ATTEMPTS_MAX => {
                    self.tx_retries += 1;
                    // brief, growing pause: lets the conflicting client transaction finish
                    std::thread::sleep(Duration::from_millis(u64::from(attempt.min(20))));
                }
                Err(e) => {
                    if self.client.is_closed() {
                        let _ = self.ensure_connected();
                    }
                    return Err(e.into_store());
                }
            }
        }
    }

    fn run_tx_once<T>(
        &mut self,
        body: &mut impl FnMut(&mut Self) -> Result<T, Error>,
        lock_tables: bool,
    ) -> Result<T, Error> {
        self.tx = TxState::default();
        // Two round trips: the lock must be held before the transaction's snapshot is taken.
        self.client.batch_execute(&format!(
            "SELECT pg_catalog.pg_advisory_lock({})",
            self.lock_key
        ))?;
        if let Err(e) = self.client.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL {APPLYING_SETTING} = 'on';"
        )) {
            self.abort_tx();
            return Err(e.into());
        }
        let result = (|| {
            if !self.install_locks.is_empty() {
                // first statement after BEGIN: the snapshot is taken after the locks
                self.client.batch_execute(&format!(
                    "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                    self.install_locks.join(", ")
                ))?;
            }
            if lock_tables {
                let tables: Vec<String> = self.synced.iter().map(|s| s.qualified.clone()).collect();
                self.client.batch_execute(&format!(
                    "SET LOCAL lock_timeout = {}; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE; \
                     RESET lock_timeout;",
                    self.lock_timeout.as_millis().max(1),
                    tables.join(", ")
                ))?;
            }
            if !self.installed {
                let value = body(self)?;
                self.flush()?;
                return Ok(value);
            }
            let (signature, dead_letters_present, nodes) =
                self.read_catalog_signature_and_dead_letters()?;
            self.dead_letters_present = dead_letters_present;
            if nodes != self.nodes.len() as i64 {
                // another process (an admin command, a second node) interned nodes
                self.load_nodes()?;
            }
            if signature != self.catalog_signature {
                self.refresh_schemas_in_tx(false)?;
            }
            let value = body(self)?;
            self.flush()?;
            Ok(value)
        })();
        match result {
            Ok(value) => {
                let commit = self.client.batch_execute(&format!(
                    "COMMIT; SELECT pg_catalog.pg_advisory_unlock({});",
                    self.lock_key
                ));
                match commit {
                    Ok(()) => {
                        self.committed_fingerprints();
                        let chunks = std::mem::take(&mut self.tx.tail);
                        if self.tx.drained {
                            self.tail.committed(chunks);
                        }
                        Ok(value)
                    }
                    Err(e) => {
                        self.abort_tx();
                        Err(e.into())
                    }
                }
            }
            Err(e) => {
                self.abort_tx();
                Err(e)
            }
        }
    }

    /// Runs `body` in one read-only REPEATABLE READ snapshot, so the row metadata and the user
    /// rows it reads values from agree. If local writes are waiting to be stamped (the table
    /// holds values newer than their metadata), stamps them (a backlog in bounded transactions)
    /// and runs `body` in a write transaction that stamps what is left first (and flushes, so
    /// `body` reads what stamping wrote).
    pub(crate) fn read_snapshot<T>(
        &mut self,
        mut body: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<T, StoreError> {
        self.ensure_connected()?;
        let quiet = (|| -> Result<bool, Error> {
            self.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {}.pending)", self.ds);
            let stmt = self.stmt(&sql)?;
            Ok(self.client.query_one(&stmt, &[])?.get(0))
        })();
        match quiet {
            Ok(true) => {
                let result = body(self);
                let end = self.client.batch_execute("COMMIT");
                let value = result.map_err(Error::into_store)?;
                end.map_err(|e| Error::from(e).into_store())?;
                Ok(value)
            }
            other => {
                let _ = self.client.batch_execute("ROLLBACK");
                other.map_err(Error::into_store)?;
                // A backlog is stamped in bounded transactions first (memory stays bounded, and
                // each commits as it goes); what arrives meanwhile is stamped with the read.
                for _ in 0..driftless_store::BACKLOG_ROUNDS_MAX {
                    let stamped = self.write_tx(|store| {
                        let mut captured = driftless_store::CaptureReport::default();
                        store.capture_in_tx(driftless_store::CAPTURE_BATCH_ROWS_MAX, &mut captured)
                    })?;
                    if stamped < driftless_store::CAPTURE_BATCH_ROWS_MAX {
                        break;
                    }
                }
                self.write_tx(|store| {
                    let mut captured = driftless_store::CaptureReport::default();
                    store.capture_all_in_tx(&mut captured)?;
                    store.flush()?;
                    body(store)
                })
            }
        }
    }

    /// Best effort: the transaction may already be gone, the connection too.
    fn abort_tx(&mut self) {
        self.tx = TxState::default();
        self.nodes.roll_back();
        let _ = self.client.batch_execute("ROLLBACK");
        let _ = self.client.batch_execute(&format!(
            "SELECT pg_catalog.pg_advisory_unlock({})",
            self.lock_key
        ));
    }
}
