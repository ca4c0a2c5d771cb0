//! The driftless node: configuration, the peer links that stream change logs between nodes,
//! the capture poller, the admin API, and the quickstart demo. [`run`] is the whole daemon.
//!
//! Architecture invariant: this is the only crate with sockets and tasks. Stores are reached
//! through the `Store` trait on blocking threads; the merge happens in the store, never here.

pub mod admin;
pub mod config;
pub mod digest;
pub mod node;
pub mod ops;
pub mod quickstart;
pub mod reconcile;
pub mod session;
pub mod status;
pub mod store_handle;
pub mod telemetry;

pub use config::{Config, ConfigError, ResolvedConfig, node_id_from_name};
pub use node::{Listeners, NodeError, open_store, run};
pub use status::NodeStatus;
