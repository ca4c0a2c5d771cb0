//! Live status of a running node (peers, log, tables), shared by the node's tasks and served as
//! JSON by the admin API for `driftless status`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One peer link as seen from this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub node_id: String,
    /// `outbound` (we dial it) or `inbound` (it dialed us).
    pub direction: String,
    pub connected: bool,
    pub last_error: Option<String>,
    /// Entries of our log the peer has not acknowledged yet.
    pub backlog_out: u64,
    /// Entries of the peer's log we have not applied yet (from its last heartbeat or batch).
    pub backlog_in: u64,
    /// Commit-to-apply lag of the newest change applied from this peer, in ms.
    pub lag_ms_last: Option<u64>,
    pub changes_applied: u64,
    pub batches_received: u64,
    pub batches_sent: u64,
    pub reconnects: u64,
    /// Times this node re-bootstrapped the peer from a snapshot.
    pub snapshots_sent: u64,
}

/// One synced table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TableStatus {
    pub table: String,
    pub rows: u64,
    pub conflicts: u64,
    pub dead_letters: u64,
}

/// The whole status document (`GET /status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    pub node_id: String,
    pub store: String,
    pub log_head: u64,
    pub pending_local_writes: u64,
    pub held_changes: u64,
    /// Links refused for a bad certificate, token or identity since the node started.
    pub auth_failures: u64,
    /// Links closed for a malformed, oversized or unexpected message since the node started.
    pub protocol_errors: u64,
    pub changes_captured: u64,
    pub changes_applied: u64,
    pub peers: Vec<PeerStatus>,
    pub tables: Vec<TableStatus>,
}

/// Peer statuses, keyed by peer name, updated by the link tasks.
#[derive(Debug, Clone, Default)]
pub struct PeerRegistry {
    inner: Arc<Mutex<BTreeMap<String, PeerStatus>>>,
}

impl PeerRegistry {
    pub fn update(&self, name: &str, f: impl FnOnce(&mut PeerStatus)) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(name.to_owned()).or_insert_with(|| PeerStatus {
            name: name.to_owned(),
            ..PeerStatus::default()
        });
        f(entry);
    }

    pub fn snapshot(&self) -> Vec<PeerStatus> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<PeerStatus> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned()
    }
}
