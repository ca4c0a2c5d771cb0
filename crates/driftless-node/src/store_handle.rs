//! Shared access to the node's store from async tasks: one store, one lock, blocking calls on
//! tokio's blocking pool so they never stall the network tasks.

use driftless_sqlite::SqliteStore;
use driftless_store::StoreError;
use std::sync::{Arc, Mutex};

/// A cheaply cloneable handle to the node's store.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    inner: Arc<Mutex<SqliteStore>>,
}

impl StoreHandle {
    pub fn new(store: SqliteStore) -> Self {
        StoreHandle {
            inner: Arc::new(Mutex::new(store)),
        }
    }

    /// Runs `f` with exclusive access to the store on a blocking thread. Each store call is one
    /// transaction, so a task cancelled while waiting here leaves nothing half-done: the closure
    /// still runs to completion (or never starts).
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqliteStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = inner
                .lock()
                .map_err(|_| StoreError::Database("store lock poisoned by a panic".into()))?;
            f(&mut store)
        })
        .await
        .map_err(|e| StoreError::Database(format!("store task failed: {e}")))?
    }

    /// Same, from a plain thread.
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut SqliteStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut store = self
            .inner
            .lock()
            .map_err(|_| StoreError::Database("store lock poisoned by a panic".into()))?;
        f(&mut store)
    }
}
