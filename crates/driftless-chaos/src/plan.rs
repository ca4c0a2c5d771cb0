//! The plan of one history: topology, links and a timed schedule of faults, a pure function of
//! the seed (no IO, no clock), so a failing history replays from its seed.
//!
//! Which nodes keep their replica in PostgreSQL (the rest in SQLite) is chosen from the seed too,
//! by a generator of its own, so a plan without PostgreSQL nodes is the same as before they
//! existed. A full disk applies to SQLite files only (the small disk goes to a SQLite node);
//! PostgreSQL nodes get their own fault instead: their database connections terminated.
//!
//! Faults on one target never overlap: a node's process (kill, pause), a node's clock, a node's
//! disk and each link have their own timelines. Everything is healed by the runner at the end of
//! the schedule, whatever the plan left open.

use driftless_sim::Rng;
use std::collections::BTreeMap;
use std::fmt;

/// `max_clock_offset_ms` configured on every node; some clock faults go beyond it.
pub const MAX_CLOCK_OFFSET_MS: u64 = 2_000;
/// Shortest schedule; shorter durations are raised to it.
const DURATION_MS_MIN: u64 = 1_000;

/// How the nodes are linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every pair of nodes has a link.
    Mesh,
    /// Every other node has one link, to the hub; writes between spokes are relayed by it.
    HubAndSpoke { hub: usize },
}

/// A link: `dialer` lists `listener` in its `[[peers]]`, with the address of the link's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub dialer: usize,
    pub listener: usize,
}

/// The direction of traffic on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    DialerToListener,
    ListenerToDialer,
}

/// A partition of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// New connections are refused and open ones closed.
    Both,
    /// Frames in this direction are dropped (the connection then never carries that direction
    /// again, and is closed when the partition heals); the other direction flows.
    OneWay(Direction),
}

/// Frame-level noise on a link: each frame is affected with these probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Noise {
    pub duplicate_percent: u64,
    pub reorder_percent: u64,
    /// The frame is cut part-way and the connection closed.
    pub truncate_percent: u64,
    /// Each frame waits up to this long (frames stay in order).
    pub delay_ms_max: u64,
}

/// One step of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill(usize),
    Restart(usize),
    Pause(usize),
    Resume(usize),
    Skew {
        node: usize,
        ms: i64,
    },
    Cut {
        link: usize,
        cut: Cut,
    },
    Mend(usize),
    Noise {
        link: usize,
        noise: Noise,
    },
    FillDisk(usize),
    FreeDisk(usize),
    /// `pg_terminate_backend` on the node's driftless connections (PostgreSQL nodes only).
    TerminateBackends(usize),
}

/// An action at a moment of the schedule (ms after the workload starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub at_ms: u64,
    pub action: Action,
    /// The fault this action starts, if it starts one (for the figures).
    pub starts: Option<FaultKind>,
}

/// The kinds of fault, as counted in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    Kill,
    KillDuringCatchUp,
    Pause,
    Partition,
    OneWayPartition,
    Flap,
    Isolate,
    Duplicate,
    Reorder,
    Delay,
    Truncate,
    ClockSkew,
    ClockBeyondOffset,
    ClockJumpBack,
    DiskFull,
    PgTerminate,
}

impl FaultKind {
    pub const ALL: [FaultKind; 16] = [
        FaultKind::Kill,
        FaultKind::KillDuringCatchUp,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::OneWayPartition,
        FaultKind::Flap,
        FaultKind::Isolate,
        FaultKind::Duplicate,
        FaultKind::Reorder,
        FaultKind::Delay,
        FaultKind::Truncate,
        FaultKind::ClockSkew,
        FaultKind::ClockBeyondOffset,
        FaultKind::ClockJumpBack,
        FaultKind::DiskFull,
        FaultKind::PgTerminate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "sigkill+restart",
            FaultKind::KillDuringCatchUp => "sigkill during catch-up",
            FaultKind::Pause => "sigstop/sigcont",
            FaultKind::Partition => "partition",
            FaultKind::OneWayPartition => "one-way partition",
            FaultKind::Flap => "flapping link",
            FaultKind::Isolate => "node isolated",
            FaultKind::Duplicate => "frame duplication",
            FaultKind::Reorder => "frame reordering",
            FaultKind::Delay => "frame delay",
            FaultKind::Truncate => "frame truncation",
            FaultKind::ClockSkew => "clock skew (within max offset)",
            FaultKind::ClockBeyondOffset => "clock skew beyond max offset",
            FaultKind::ClockJumpBack => "clock jump backwards",
            FaultKind::DiskFull => "disk full",
            FaultKind::PgTerminate => "postgres connections terminated",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a history will do, decided up front.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub nodes: usize,
    pub duration_ms: u64,
    pub topology: Topology,
    pub links: Vec<Link>,
    /// Whether node `i`'s replica is a PostgreSQL database (else a SQLite file).
    pub postgres: Vec<bool>,
    /// The node whose database lives on a small tmpfs (disk-full faults), if any: always a
    /// SQLite node.
    pub small_disk_node: Option<usize>,
    pub workload_seed: u64,
    /// Sorted by time.
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Process(usize),
    Clock(usize),
    Disk(usize),
    Link(usize),
}

/// Busy intervals per target, so faults on one target never overlap.
#[derive(Default)]
struct Timelines(BTreeMap<Target, Vec<(u64, u64)>>);

impl Timelines {
    fn free(&self, target: Target, start: u64, end: u64) -> bool {
        self.0
            .get(&target)
            .is_none_or(|busy| busy.iter().all(|&(s, e)| end < s || start > e))
    }

    /// Reserves `start..=end` on every target, or on none if one is busy.
    fn reserve(&mut self, targets: &[Target], start: u64, end: u64) -> bool {
        if !targets.iter().all(|t| self.free(*t, start, end)) {
            return false;
        }
        for t in targets {
            self.0.entry(*t).or_default().push((start, end));
        }
        true
    }
}

/// Relative weights of the fault kinds (disk full only where a small disk exists, connection
/// termination only where a PostgreSQL node exists; both last, so leaving them out changes no
/// other roll).
const WEIGHTS: [(FaultKind, u64); 15] = [
    (FaultKind::Kill, 14),
    (FaultKind::Pause, 8),
    (FaultKind::Partition, 9),
    (FaultKind::OneWayPartition, 8),
    (FaultKind::Flap, 6),
    (FaultKind::Isolate, 5),
    (FaultKind::Duplicate, 7),
    (FaultKind::Reorder, 7),
    (FaultKind::Delay, 6),
    (FaultKind::Truncate, 6),
    (FaultKind::ClockSkew, 5),
    (FaultKind::ClockBeyondOffset, 6),
    (FaultKind::ClockJumpBack, 4),
    (FaultKind::DiskFull, 10),
    (FaultKind::PgTerminate, 8),
];

struct Builder {
    rng: Rng,
    duration_ms: u64,
    timelines: Timelines,
    events: Vec<Event>,
}

impl Builder {
    fn push(&mut self, at_ms: u64, action: Action, starts: Option<FaultKind>) {
        self.events.push(Event {
            at_ms,
            action,
            starts,
        });
    }

    /// A window of `len_min..=len_max` ms inside the schedule.
    fn window(&mut self, len_min: u64, len_max: u64) -> (u64, u64) {
        let hi = len_max.min(self.duration_ms - 100);
        let len = self.rng.range(len_min.min(hi), hi);
        let start = self.rng.range(0, self.duration_ms - len);
        (start, start + len)
    }
}

impl Plan {
    /// The plan for `seed` with `nodes` SQLite nodes (at least 2) and faults over `duration_ms`.
    pub fn generate(seed: u64, nodes: usize, duration_ms: u64, faults: bool) -> Plan {
        Plan::generate_with_postgres(seed, nodes, duration_ms, faults, 0)
    }

    /// The plan for `seed` where `postgres_nodes` of the `nodes` nodes (chosen by the seed) keep
    /// their replica in PostgreSQL.
    pub fn generate_with_postgres(
        seed: u64,
        nodes: usize,
        duration_ms: u64,
        faults: bool,
        postgres_nodes: usize,
    ) -> Plan {
        assert!(nodes >= 2, "a history needs at least two nodes");
        assert!(
            postgres_nodes <= nodes,
            "{postgres_nodes} PostgreSQL nodes asked for in a history of {nodes}"
        );
        let mut stores = Rng::new(seed ^ 0x7067_7265_706c);
        let mut postgres = vec![false; nodes];
        while postgres.iter().filter(|p| **p).count() < postgres_nodes {
            postgres[stores.index(nodes)] = true;
        }
        let duration_ms = duration_ms.max(DURATION_MS_MIN);
        let mut rng = Rng::new(seed);
        let topology = if nodes >= 3 && rng.percent(50) {
            Topology::HubAndSpoke {
                hub: rng.index(nodes),
            }
        } else {
            Topology::Mesh
        };
        let mut links = Vec::new();
        let mut link = |rng: &mut Rng, x: usize, y: usize| {
            let (dialer, listener) = if rng.percent(50) { (x, y) } else { (y, x) };
            links.push(Link { dialer, listener });
        };
        match topology {
            Topology::Mesh => {
                for x in 0..nodes {
                    for y in x + 1..nodes {
                        link(&mut rng, x, y);
                    }
                }
            }
            Topology::HubAndSpoke { hub } => {
                for spoke in (0..nodes).filter(|n| *n != hub) {
                    link(&mut rng, hub, spoke);
                }
            }
        }
        // Drawn as before PostgreSQL nodes existed, then moved to the next SQLite node.
        let small_disk_node = rng
            .percent(40)
            .then(|| rng.index(nodes))
            .and_then(|n| (0..nodes).map(|d| (n + d) % nodes).find(|i| !postgres[*i]));
        let workload_seed = rng.next_u64();
        let mut plan = Plan {
            seed,
            nodes,
            duration_ms,
            topology,
            links,
            postgres,
            small_disk_node,
            workload_seed,
            events: Vec::new(),
        };
        if faults {
            plan.schedule(rng.fork());
        }
        plan
    }

    fn schedule(&mut self, rng: Rng) {
        let mut b = Builder {
            rng,
            duration_ms: self.duration_ms,
            timelines: Timelines::default(),
            events: Vec::new(),
        };
        let weights: Vec<(FaultKind, u64)> = WEIGHTS
            .iter()
            .copied()
            .filter(|(k, _)| *k != FaultKind::DiskFull || self.small_disk_node.is_some())
            .filter(|(k, _)| *k != FaultKind::PgTerminate || self.postgres.contains(&true))
            .collect();
        let total: u64 = weights.iter().map(|(_, w)| w).sum();
        // About three fault attempts per two seconds; attempts on a busy target are dropped.
        let attempts = (self.duration_ms * 3 / 2_000).max(3);
        for _ in 0..attempts {
            let mut roll = b.rng.below(total);
            let kind = weights
                .iter()
                .find(|(_, w)| {
                    if roll < *w {
                        true
                    } else {
                        roll -= w;
                        false
                    }
                })
                .map(|(k, _)| *k)
                .expect("roll below total");
            self.add_fault(&mut b, kind);
        }
        b.events.sort_by_key(|e| e.at_ms);
        self.events = b.events;
    }

    fn add_fault(&self, b: &mut Builder, kind: FaultKind) {
        let node = b.rng.index(self.nodes);
        let link = b.rng.index(self.links.len());
        match kind {
            FaultKind::Kill => {
                let (start, end) = b.window(200, 2_500);
                if b.timelines.reserve(&[Target::Process(node)], start, end) {
                    b.push(start, Action::Kill(node), Some(kind));
                    b.push(end, Action::Restart(node), None);
                }
            }
            FaultKind::Pause => {
                let (start, end) = b.window(500, 4_000);
                if b.timelines.reserve(&[Target::Process(node)], start, end) {
                    b.push(start, Action::Pause(node), Some(kind));
                    b.push(end, Action::Resume(node), None);
                }
            }
            FaultKind::Partition | FaultKind::OneWayPartition => {
                let cut = if kind == FaultKind::Partition {
                    Cut::Both
                } else if b.rng.percent(50) {
                    Cut::OneWay(Direction::DialerToListener)
                } else {
                    Cut::OneWay(Direction::ListenerToDialer)
                };
                let (start, end) = b.window(300, 3_000);
                if !b.timelines.reserve(&[Target::Link(link)], start, end) {
                    return;
                }
                b.push(start, Action::Cut { link, cut }, Some(kind));
                b.push(end, Action::Mend(link), None);
                // Sometimes kill an end of the link while it catches up after the heal.
                if b.rng.percent(35) {
                    let l = self.links[link];
                    let victim = if b.rng.percent(50) {
                        l.dialer
                    } else {
                        l.listener
                    };
                    let kill_at = end + b.rng.range(20, 400);
                    let restart_at = kill_at + b.rng.range(300, 1_500);
                    if restart_at < self.duration_ms
                        && b.timelines
                            .reserve(&[Target::Process(victim)], kill_at, restart_at)
                    {
                        b.push(
                            kill_at,
                            Action::Kill(victim),
                            Some(FaultKind::KillDuringCatchUp),
                        );
                        b.push(restart_at, Action::Restart(victim), None);
                    }
                }
            }
            FaultKind::Flap => {
                let (start, end) = b.window(1_000, 4_000);
                if !b.timelines.reserve(&[Target::Link(link)], start, end) {
                    return;
                }
                let period = b.rng.range(100, 600);
                let mut at = start;
                let mut starts = Some(kind);
                while at + period < end {
                    b.push(
                        at,
                        Action::Cut {
                            link,
                            cut: Cut::Both,
                        },
                        starts.take(),
                    );
                    b.push(at + period / 2, Action::Mend(link), None);
                    at += period;
                }
                b.push(end, Action::Mend(link), None);
            }
            FaultKind::Isolate => {
                let (start, end) = b.window(300, 3_000);
                let own: Vec<usize> = (0..self.links.len())
                    .filter(|l| self.links[*l].dialer == node || self.links[*l].listener == node)
                    .collect();
                let targets: Vec<Target> = own.iter().map(|l| Target::Link(*l)).collect();
                if !b.timelines.reserve(&targets, start, end) {
                    return;
                }
                let mut starts = Some(kind);
                for l in own {
                    b.push(
                        start,
                        Action::Cut {
                            link: l,
                            cut: Cut::Both,
                        },
                        starts.take(),
                    );
                    b.push(end, Action::Mend(l), None);
                }
            }
            FaultKind::Duplicate | FaultKind::Reorder | FaultKind::Delay | FaultKind::Truncate => {
                let (start, end) = b.window(500, 3_000);
                if !b.timelines.reserve(&[Target::Link(link)], start, end) {
                    return;
                }
                let mut noise = Noise::default();
                match kind {
                    FaultKind::Duplicate => noise.duplicate_percent = b.rng.range(10, 40),
                    FaultKind::Reorder => noise.reorder_percent = b.rng.range(10, 40),
                    FaultKind::Delay => noise.delay_ms_max = b.rng.range(20, 300),
                    _ => noise.truncate_percent = b.rng.range(2, 10),
                }
                b.push(start, Action::Noise { link, noise }, Some(kind));
                b.push(
                    end,
                    Action::Noise {
                        link,
                        noise: Noise::default(),
                    },
                    None,
                );
            }
            FaultKind::ClockSkew | FaultKind::ClockBeyondOffset | FaultKind::ClockJumpBack => {
                let (start, end) = b.window(500, 3_000);
                if !b.timelines.reserve(&[Target::Clock(node)], start, end) {
                    return;
                }
                let ms = match kind {
                    FaultKind::ClockSkew => {
                        let ms = b.rng.range(200, MAX_CLOCK_OFFSET_MS * 3 / 4) as i64;
                        if b.rng.percent(50) { ms } else { -ms }
                    }
                    FaultKind::ClockBeyondOffset => b
                        .rng
                        .range(MAX_CLOCK_OFFSET_MS + 1_000, MAX_CLOCK_OFFSET_MS * 4)
                        as i64,
                    _ => -(b.rng.range(2_000, 20_000) as i64),
                };
                b.push(start, Action::Skew { node, ms }, Some(kind));
                b.push(end, Action::Skew { node, ms: 0 }, None);
            }
            FaultKind::DiskFull => {
                let Some(node) = self.small_disk_node else {
                    return;
                };
                let (start, end) = b.window(500, 3_000);
                if b.timelines.reserve(&[Target::Disk(node)], start, end) {
                    b.push(start, Action::FillDisk(node), Some(kind));
                    b.push(end, Action::FreeDisk(node), None);
                }
            }
            FaultKind::PgTerminate => {
                // An instant, not a window: the node reconnects on its own. Drawn only from
                // PostgreSQL nodes; it may land while the node is down (then nothing is
                // terminated and the report says it was not injected).
                let pg: Vec<usize> = (0..self.nodes).filter(|n| self.postgres[*n]).collect();
                if pg.is_empty() {
                    return;
                }
                let node = pg[b.rng.index(pg.len())];
                let at = b.rng.range(0, self.duration_ms - 100);
                b.push(at, Action::TerminateBackends(node), Some(kind));
            }
            FaultKind::KillDuringCatchUp => {}
        }
    }

    /// The faults this plan starts, by kind.
    pub fn faults_by_kind(&self) -> BTreeMap<FaultKind, u64> {
        let mut out = BTreeMap::new();
        for e in &self.events {
            if let Some(kind) = e.starts {
                *out.entry(kind).or_default() += 1;
            }
        }
        out
    }

    /// A readable listing of the plan (kept with a failing history).
    pub fn describe(&self) -> String {
        let stores: Vec<String> = (0..self.nodes)
            .map(|n| {
                format!(
                    "n{n}={}",
                    if self.postgres[n] {
                        "postgres"
                    } else {
                        "sqlite"
                    }
                )
            })
            .collect();
        let mut out = format!(
            "seed {} ({:#x}), {} nodes, {:?}, faults over {} ms, small disk on {:?}\nstores: {}\nlinks:\n",
            self.seed,
            self.seed,
            self.nodes,
            self.topology,
            self.duration_ms,
            self.small_disk_node,
            stores.join(" ")
        );
        for (i, l) in self.links.iter().enumerate() {
            out.push_str(&format!(
                "  link {i}: n{} dials n{}\n",
                l.dialer, l.listener
            ));
        }
        out.push_str("events:\n");
        for e in &self.events {
            let starts = e.starts.map(|k| format!("  [{k}]")).unwrap_or_default();
            out.push_str(&format!("  {:>6} ms  {:?}{starts}\n", e.at_ms, e.action));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_a_function_of_its_seed() {
        let a = Plan::generate(7, 3, 8_000, true);
        let b = Plan::generate(7, 3, 8_000, true);
        assert_eq!(a.events, b.events);
        assert_eq!(a.links, b.links);
        assert!(!a.events.is_empty());
    }

    #[test]
    fn postgres_nodes_change_stores_not_the_rest_of_the_plan() {
        for seed in 0..100 {
            let sqlite = Plan::generate(seed, 3, 6_000, true);
            let mixed = Plan::generate_with_postgres(seed, 3, 6_000, true, 2);
            assert_eq!(mixed.postgres.iter().filter(|p| **p).count(), 2);
            assert_eq!(sqlite.links, mixed.links, "seed {seed}");
            assert_eq!(sqlite.workload_seed, mixed.workload_seed, "seed {seed}");
            if let Some(n) = mixed.small_disk_node {
                assert!(
                    !mixed.postgres[n],
                    "seed {seed}: the small disk is for SQLite files"
                );
            }
            for e in &mixed.events {
                if let Action::TerminateBackends(n) = e.action {
                    assert!(mixed.postgres[n], "seed {seed}: {}", mixed.describe());
                }
                if let Action::FillDisk(n) = e.action {
                    assert!(!mixed.postgres[n], "seed {seed}: {}", mixed.describe());
                }
            }
            let all = Plan::generate_with_postgres(seed, 3, 6_000, true, 3);
            assert_eq!(all.small_disk_node, None, "seed {seed}");
        }
        // Without PostgreSQL nodes there is no PostgreSQL fault.
        let plain = Plan::generate(7, 3, 8_000, true);
        assert!(
            !plain
                .events
                .iter()
                .any(|e| matches!(e.action, Action::TerminateBackends(_)))
        );
    }

    #[test]
    fn faults_on_one_target_do_not_overlap_and_every_kill_is_restarted() {
        for seed in 0..200 {
            let plan = Plan::generate(seed, 3, 10_000, true);
            let mut down = [false; 3];
            for e in &plan.events {
                match e.action {
                    Action::Kill(n) | Action::Pause(n) => {
                        assert!(!down[n], "seed {seed}: {}", plan.describe());
                        down[n] = true;
                    }
                    Action::Restart(n) | Action::Resume(n) => {
                        assert!(down[n], "seed {seed}: {}", plan.describe());
                        down[n] = false;
                    }
                    _ => {}
                }
                assert!(e.at_ms <= plan.duration_ms);
            }
            assert_eq!(down, [false; 3], "seed {seed}");
        }
    }
}
