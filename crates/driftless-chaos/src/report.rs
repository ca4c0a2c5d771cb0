//! The figures of a run of many histories: faults injected by kind, what the checker found, and
//! the time from the last heal to convergence (p50/p99).

use crate::history::HistoryResult;
use crate::plan::FaultKind;
use crate::proxy::ProxyCounts;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Totals over histories.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub histories: u64,
    /// Replicas checked, by kind.
    pub sqlite_replicas: u64,
    pub postgres_replicas: u64,
    pub failed: Vec<(u64, String)>,
    pub faults: BTreeMap<FaultKind, u64>,
    pub skipped: BTreeMap<String, u64>,
    pub proxy: ProxyCounts,
    pub divergent_replicas: u64,
    pub lost_acked_writes: u64,
    pub phantom_values: u64,
    pub duplicate_effects: u64,
    pub counter_mismatches: u64,
    pub model_mismatches: u64,
    pub dead_letters: u64,
    pub corrupt_replicas: u64,
    pub not_quiet: u64,
    pub unexpected_exits: u64,
    pub unclean_shutdowns: u64,
    pub harness_errors: u64,
    pub ops_ok: u64,
    pub ops_no_effect: u64,
    pub ops_failed: u64,
    pub ops_unknown: u64,
    pub ops_disk_full: u64,
    pub disk_full_logged: u64,
    pub disk_full_silent: u64,
    pub converge_ms: Vec<u64>,
    pub node_metrics: BTreeMap<String, f64>,
}

/// Skip reasons are grouped by their first words (they carry node names and paths).
fn skip_key(reason: &str) -> String {
    let first_line = reason.lines().next().unwrap_or_default();
    let cut = first_line
        .find(": ")
        .map(|i| &first_line[..i])
        .unwrap_or(first_line);
    cut.chars().take(80).collect()
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Summary {
    pub fn add(&mut self, r: &HistoryResult) {
        self.histories += 1;
        self.postgres_replicas += r.postgres_nodes.len() as u64;
        self.sqlite_replicas += r.nodes.saturating_sub(r.postgres_nodes.len()) as u64;
        if r.failed() {
            self.failed.push((r.seed, r.replay.clone()));
        }
        for (kind, n) in &r.faults {
            *self.faults.entry(*kind).or_default() += n;
        }
        for s in &r.skipped {
            *self.skipped.entry(skip_key(s)).or_default() += 1;
        }
        self.proxy.add(&r.proxy);
        let v = &r.verdict;
        self.divergent_replicas += v.divergent_replicas;
        self.lost_acked_writes += v.lost_acked_writes;
        self.phantom_values += v.phantom_values;
        self.duplicate_effects += v.duplicate_effects;
        self.counter_mismatches += v.counter_mismatches;
        self.model_mismatches += v.model_mismatches;
        self.dead_letters += v.dead_letters;
        self.corrupt_replicas += v.corrupt_replicas;
        self.not_quiet += u64::from(r.not_quiet.is_some());
        self.unexpected_exits += r.unexpected_exits.len() as u64;
        self.unclean_shutdowns += r.unclean_shutdowns.len() as u64;
        self.harness_errors += u64::from(r.harness_error.is_some());
        self.ops_ok += r.ops_ok;
        self.ops_no_effect += r.ops_no_effect;
        self.ops_failed += r.ops_failed;
        self.ops_unknown += r.ops_unknown;
        self.ops_disk_full += r.ops_disk_full;
        match r.disk_full_logged {
            Some(true) => self.disk_full_logged += 1,
            Some(false) => self.disk_full_silent += 1,
            None => {}
        }
        if let Some(ms) = r.converge_ms {
            self.converge_ms.push(ms);
        }
        for (name, value) in &r.node_metrics {
            *self.node_metrics.entry(name.clone()).or_default() += value;
        }
    }

    /// The final report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut sorted = self.converge_ms.clone();
        sorted.sort_unstable();
        let ms = |p: f64| percentile(&sorted, p).map_or("-".to_owned(), |v| format!("{v} ms"));
        let _ = writeln!(out, "histories:                 {}", self.histories);
        let _ = writeln!(out, "failed histories:          {}", self.failed.len());
        let _ = writeln!(
            out,
            "replicas:                  {} SQLite, {} PostgreSQL",
            self.sqlite_replicas, self.postgres_replicas
        );
        let _ = writeln!(
            out,
            "faults injected:           {}",
            self.faults.values().sum::<u64>()
        );
        for kind in FaultKind::ALL {
            let _ = writeln!(
                out,
                "  {:<32} {}",
                kind.name(),
                self.faults.get(&kind).copied().unwrap_or(0)
            );
        }
        let p = &self.proxy;
        let _ = writeln!(
            out,
            "proxy: {} connections, {} refused, {} closed by partitions, {} frames; {} dropped (one-way), {} delayed, {} duplicated, {} reordered, {} truncated",
            p.connections,
            p.refused,
            p.closed_by_partition,
            p.frames,
            p.dropped,
            p.delayed,
            p.duplicated,
            p.reordered,
            p.truncated
        );
        let _ = writeln!(
            out,
            "client writes: {} ok, {} no effect, {} failed ({} disk full), {} unknown",
            self.ops_ok, self.ops_no_effect, self.ops_failed, self.ops_disk_full, self.ops_unknown
        );
        let _ = writeln!(
            out,
            "disk-full windows: {} with a disk-full error in the node's log, {} without",
            self.disk_full_logged, self.disk_full_silent
        );
        let _ = writeln!(
            out,
            "divergent replicas:        {}",
            self.divergent_replicas
        );
        let _ = writeln!(out, "lost acknowledged writes:  {}", self.lost_acked_writes);
        let _ = writeln!(out, "phantom values:            {}", self.phantom_values);
        let _ = writeln!(out, "duplicate effects:         {}", self.duplicate_effects);
        let _ = writeln!(
            out,
            "counter mismatches:        {}",
            self.counter_mismatches
        );
        let _ = writeln!(
            out,
            "reference-model mismatches:{:>2}",
            self.model_mismatches
        );
        let _ = writeln!(out, "dead letters left:         {}", self.dead_letters);
        let _ = writeln!(out, "corrupt replicas:          {}", self.corrupt_replicas);
        let _ = writeln!(out, "not quiet after heal:      {}", self.not_quiet);
        let _ = writeln!(out, "unexpected node exits:     {}", self.unexpected_exits);
        let _ = writeln!(out, "unclean shutdowns:         {}", self.unclean_shutdowns);
        let _ = writeln!(out, "harness errors:            {}", self.harness_errors);
        let _ = writeln!(
            out,
            "time to converge after heal: p50 {}, p99 {}, max {} (over {} histories)",
            ms(50.0),
            ms(99.0),
            sorted.last().map_or("-".to_owned(), |v| format!("{v} ms")),
            sorted.len()
        );
        let _ = writeln!(
            out,
            "node metrics at the end of each history (summed; reset by restarts, so lower bounds):"
        );
        for name in crate::history::NODE_METRICS {
            // A labelled counter never incremented has no series: it reads as zero.
            let value = self.node_metrics.get(name).copied().unwrap_or(0.0);
            let _ = writeln!(out, "  {name:<40} {value}");
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "not injected / notes:");
            for (reason, n) in &self.skipped {
                let _ = writeln!(out, "  {n} x {reason}");
            }
        }
        for (seed, replay) in &self.failed {
            let _ = writeln!(out, "FAILED seed {seed}: replay with: {replay}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
