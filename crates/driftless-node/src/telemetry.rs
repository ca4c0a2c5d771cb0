//! The node's metrics: one registry per node (several nodes can share a process in tests and in
//! the quickstart), every SLI of the product brief, rendered in the OpenMetrics text format that
//! Prometheus scrapes from `/metrics`.
//!
//! Labels are low-cardinality by construction: peer names (from configuration or an
//! authenticated hello), table names (from configuration) and fixed reason/rule words. Keys and
//! values never become labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerTableLabel {
    pub peer: String,
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableReasonLabel {
    pub table: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableRuleLabel {
    pub table: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    pub trigger: String,
}

/// Every metric a node exports. Names follow `driftless_<name>_<unit>[_total]`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// M1: origin commit to apply here, per change.
    pub lag: Family<PeerLabel, Histogram>,
    /// M2: share of compared ranges in agreement at the last check.
    pub convergence: Family<PeerTableLabel, Gauge<f64, AtomicU64>>,
    /// M3.
    pub apply_errors: Family<TableReasonLabel, Counter>,
    /// M3, M8.
    pub changes_applied: Family<PeerLabel, Counter>,
    /// M8.
    pub changes_captured: Family<TableLabel, Counter>,
    /// M5.
    pub duplicates: Family<PeerLabel, Counter>,
    /// M4.
    pub reconciliation_runs: Family<TriggerLabel, Counter>,
    /// M6.
    pub drift_incidents: Family<TableLabel, Counter>,
    /// M7.
    pub backlog: Family<PeerLabel, Gauge>,
    /// M9.
    pub retries: Family<ReasonLabel, Counter>,
    /// M10.
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub protocol_errors: Family<ReasonLabel, Counter>,
    pub conflicts: Family<TableRuleLabel, Counter>,
    pub dead_letters: Family<TableLabel, Gauge>,
    pub clock_holds: Counter,
    pub peer_connected: Family<PeerLabel, Gauge>,
}

fn lag_histogram() -> Histogram {
    // Boundaries at the figures people set objectives on (10 ms, 1 s, 5 s ...): the lag SLO
    // alerts select the 5 s bucket.
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("driftless");
        let lag = Family::<PeerLabel, Histogram>::new_with_constructor(
            lag_histogram as fn() -> Histogram,
        );
        let m = Metrics {
            lag,
            convergence: Family::default(),
            apply_errors: Family::default(),
            changes_applied: Family::default(),
            changes_captured: Family::default(),
            duplicates: Family::default(),
            reconciliation_runs: Family::default(),
            drift_incidents: Family::default(),
            backlog: Family::default(),
            retries: Family::default(),
            auth_failures: Family::default(),
            protocol_errors: Family::default(),
            conflicts: Family::default(),
            dead_letters: Family::default(),
            clock_holds: Counter::default(),
            peer_connected: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "replication_lag_seconds",
            "Time from a change's commit at its origin (HLC physical time) to its apply here",
            m.lag.clone(),
        );
        registry.register(
            "convergence_ratio",
            "Share of compared ranges in agreement with the peer at the last check",
            m.convergence.clone(),
        );
        registry.register(
            "apply_errors",
            "Changes that could not be applied (dead-lettered), by reason",
            m.apply_errors.clone(),
        );
        registry.register(
            "changes_applied",
            "Changes from a peer that changed this replica",
            m.changes_applied.clone(),
        );
        registry.register(
            "changes_captured",
            "Local writes captured into the change log",
            m.changes_captured.clone(),
        );
        registry.register(
            "duplicate_changes",
            "Changes received that were already present (no effect)",
            m.duplicates.clone(),
        );
        registry.register(
            "reconciliation_runs",
            "Replica comparisons run, by trigger",
            m.reconciliation_runs.clone(),
        );
        registry.register(
            "drift_incidents",
            "Comparisons that found replicas differing while in sync",
            m.drift_incidents.clone(),
        );
        registry.register(
            "backlog_changes",
            "Entries of our log the peer has not acknowledged",
            m.backlog.clone(),
        );
        registry.register("retries", "Retries, by reason", m.retries.clone());
        registry.register(
            "auth_failures",
            "Peer links refused for authentication, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "protocol_errors",
            "Peer links closed for protocol violations, by reason",
            m.protocol_errors.clone(),
        );
        registry.register(
            "conflicts",
            "Conflicts resolved, by table and rule",
            m.conflicts.clone(),
        );
        registry.register(
            "dead_letters",
            "Changes waiting in the dead-letter table",
            m.dead_letters.clone(),
        );
        registry.register(
            "clock_holds",
            "Changes held because they were stamped too far ahead",
            m.clock_holds.clone(),
        );
        registry.register(
            "peer_connected",
            "1 while a link to the peer is up",
            m.peer_connected.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Creates the zero-valued series a node can know in advance (its tables, the peers it
    /// dials, every reason and trigger), so dashboards and `rate()` see a 0 instead of nothing
    /// before the first event.
    pub fn initialize<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a str>,
        peers: impl IntoIterator<Item = &'a str>,
    ) {
        for table in tables {
            let t = TableLabel {
                table: table.to_owned(),
            };
            let _ = self.changes_captured.get_or_create(&t);
            let _ = self.drift_incidents.get_or_create(&t);
            let _ = self.dead_letters.get_or_create(&t);
            for reason in [
                "unknown_table",
                "unknown_column",
                "constraint",
                "invalid",
                "clock",
            ] {
                let _ = self.apply_errors.get_or_create(&TableReasonLabel {
                    table: table.to_owned(),
                    reason: reason.to_owned(),
                });
            }
            for rule in ["lww", "priority", "max", "min", "delete_wins", "drift"] {
                let _ = self.conflicts.get_or_create(&TableRuleLabel {
                    table: table.to_owned(),
                    rule: rule.to_owned(),
                });
            }
        }
        for peer in peers {
            let p = self.peer(peer);
            let _ = self.lag.get_or_create(&p);
            let _ = self.changes_applied.get_or_create(&p);
            let _ = self.duplicates.get_or_create(&p);
            let _ = self.backlog.get_or_create(&p);
            let _ = self.peer_connected.get_or_create(&p);
        }
        for reason in ["reconnect", "dead_letter_retry"] {
            let _ = self.retries.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        for reason in ["tls", "token", "identity"] {
            let _ = self.auth_failures.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        for reason in ["oversized", "malformed", "unexpected"] {
            let _ = self.protocol_errors.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        for trigger in ["scheduled", "manual", "event"] {
            let _ = self.reconciliation_runs.get_or_create(&TriggerLabel {
                trigger: trigger.into(),
            });
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }

    pub fn peer(&self, peer: &str) -> PeerLabel {
        PeerLabel {
            peer: peer.to_owned(),
        }
    }
}
