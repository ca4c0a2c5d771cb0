//! Shared access to the node's store from async tasks: one store, one lock, blocking calls on
//! tokio's blocking pool so they never stall the network tasks.
//!
//! The lock is tokio's, which is first come, first served. With `std::sync::Mutex` the capture
//! poller, re-locking right after each round, kept winning against the links waiting to read
//! the log or apply a batch, so a capture backlog and its shipping took turns instead of
//! overlapping (measured on PostgreSQL: half of a 1M-row sync's wall time).

use driftless_store::{Store, StoreError};
use std::sync::Arc;
use tokio::sync::Mutex;

/// The node's store, whatever its kind.
pub type DynStore = Box<dyn Store + Send>;

/// A cheaply cloneable handle to the node's store.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<Mutex<DynStore>>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreHandle")
    }
}

impl StoreHandle {
    pub fn new(store: DynStore) -> Self {
        StoreHandle {
            inner: Arc::new(Mutex::new(store)),
        }
    }

    /// Runs `f` with exclusive access to the store on a blocking thread. Each store call is one
    /// transaction, so a task cancelled while waiting here leaves nothing half-done: the closure
    /// still runs to completion (or never starts).
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        // waiting for the lock here, not on a blocking thread: waiters queue in order and hold
        // no thread of the blocking pool
        let mut store = self.inner.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || f(store.as_mut()))
            .await
            .map_err(|e| StoreError::Database(format!("store task failed: {e}")))?
    }

    /// Same, from a plain thread (never from inside the async runtime: it would block it).
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut store = self.inner.blocking_lock();
        f(store.as_mut())
    }
}
