//! The progress bar of `driftless diff` and `driftless reconcile`, fed by the node's
//! `/reconcile/progress`: a bar when the phase's size is known (rows of the local check, fine
//! buckets to compare), a spinner with a count when it is not (rows checked on the peer).

use driftless_node::reconcile::ReconcileProgress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Duration;

pub struct ReconcileBar {
    bar: ProgressBar,
    sized: ProgressStyle,
    unsized_: ProgressStyle,
}

impl ReconcileBar {
    pub fn new() -> Self {
        Self::drawing_to(ProgressDrawTarget::stderr())
    }

    fn drawing_to(target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(None, target);
        let sized = ProgressStyle::with_template(
            "{prefix} {msg} [{bar:30}] {pos}/{len} ({percent}%, {elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let unsized_ = ProgressStyle::with_template("{spinner} {prefix} {msg} {pos} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(unsized_.clone());
        bar.set_message("starting");
        bar.enable_steady_tick(Duration::from_millis(120));
        ReconcileBar {
            bar,
            sized,
            unsized_,
        }
    }

    /// Shows the node's latest progress; `None` means it has not started (or already ended).
    pub fn show(&self, progress: Option<&ReconcileProgress>) {
        let Some(p) = progress else {
            return;
        };
        self.bar.set_prefix(format!(
            "{} table {}/{} {}:",
            p.peer,
            (p.tables_done + 1).min(p.tables_total),
            p.tables_total,
            p.table
        ));
        self.bar.set_message(p.phase.clone());
        if p.total > 0 {
            self.bar.set_style(self.sized.clone());
            self.bar.set_length(p.total);
        } else {
            self.bar.set_style(self.unsized_.clone());
            self.bar.unset_length();
        }
        self.bar.set_position(p.done);
    }

    /// Removes the bar, so the report prints on a clean terminal.
    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(phase: &str, done: u64, total: u64) -> ReconcileProgress {
        ReconcileProgress {
            peer: "hub".into(),
            table: "items".into(),
            tables_done: 0,
            tables_total: 2,
            phase: phase.into(),
            done,
            total,
        }
    }

    #[test]
    fn a_known_total_draws_a_bar_and_an_unknown_one_a_count() {
        let bar = ReconcileBar::drawing_to(ProgressDrawTarget::hidden());
        bar.show(None);
        assert_eq!(bar.bar.message(), "starting");
        bar.show(Some(&progress("local check", 5_000, 1_000_000)));
        assert_eq!(bar.bar.length(), Some(1_000_000));
        assert_eq!(bar.bar.position(), 5_000);
        assert_eq!(bar.bar.message(), "local check");
        assert_eq!(bar.bar.prefix(), "hub table 1/2 items:");
        bar.show(Some(&progress("local check on peer", 10_000, 0)));
        assert_eq!(bar.bar.length(), None);
        assert_eq!(bar.bar.position(), 10_000);
        bar.finish();
    }
}
