//! What the two CI fault-injection suites (`chaos.rs`, SQLite replicas; `chaos_postgres.rs`,
//! mixed) share: how a history is configured, which seeds run, and the one-line summary.

use driftless_chaos::{HistoryOptions, HistoryResult};
use std::path::PathBuf;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_driftless");

/// The shape of one suite: its test target (for replay commands) and its histories.
pub struct Suite {
    pub test: &'static str,
    pub nodes: usize,
    pub postgres_nodes: usize,
    /// Faults and client writes last this long per history (debug build, 2 shared cores).
    pub duration: Duration,
}

impl Suite {
    pub fn options(
        &self,
        seed: u64,
        node_env: Vec<(String, String)>,
        faults: bool,
    ) -> HistoryOptions {
        HistoryOptions {
            seed,
            nodes: self.nodes,
            postgres_nodes: self.postgres_nodes,
            duration: self.duration,
            driftless: PathBuf::from(BIN),
            node_env,
            faults,
            keep_failures_in: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/chaos-failures"),
            quiesce_timeout: Duration::from_secs(120),
            ready_timeout: Duration::from_secs(60),
            replay: format!(
                "DRIFTLESS_SEED={seed} cargo test -p driftless --test {} -- --nocapture suite",
                self.test
            ),
            keep_always: false,
        }
    }
}

/// The suite's seeds, or the one in `DRIFTLESS_SEED` (replaying a failure).
pub fn seeds(suite: &[u64]) -> Vec<u64> {
    match std::env::var("DRIFTLESS_SEED") {
        Ok(text) => vec![
            text.parse()
                .unwrap_or_else(|_| panic!("DRIFTLESS_SEED={text:?} is not a u64")),
        ],
        Err(_) => suite.to_vec(),
    }
}

/// One history in one line.
pub fn line(result: &HistoryResult, took: Duration) -> String {
    let postgres = if result.postgres_nodes.is_empty() {
        String::new()
    } else {
        format!(" postgres={:?}", result.postgres_nodes)
    };
    format!(
        "seed {} {}{postgres}: faults {:?}, {} ok / {} failed / {} unknown client writes, converged {} after the heal, {} ({took:.1?})",
        result.seed,
        result.topology,
        result
            .faults
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>(),
        result.ops_ok,
        result.ops_failed,
        result.ops_unknown,
        result
            .converge_ms
            .map_or("never".to_owned(), |ms| format!("{ms} ms")),
        if result.failed() { "FAILED" } else { "ok" },
    )
}
