//! Shared access to the node's store from async tasks: one store, one lock, blocking calls on
//! tokio's blocking pool so they never stall the network tasks.

use driftless_store::{Store, StoreError};
use std::sync::{Arc, Mutex};

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
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = inner
                .lock()
                .map_err(|_| StoreError::Database("store lock poisoned by a panic".into()))?;
            f(store.as_mut())
        })
        .await
        .map_err(|e| StoreError::Database(format!("store task failed: {e}")))?
    }

    /// Same, from a plain thread.
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut store = self
            .inner
            .lock()
            .map_err(|_| StoreError::Database("store lock poisoned by a panic".into()))?;
        f(store.as_mut())
    }
}
