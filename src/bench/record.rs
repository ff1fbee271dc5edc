//! What a [`super::Record`] names: its subject (a strategy, or another column of a
//! suite's table), its scenario and its metric, each a closed set spelled in one place.
//!
//! Their text is what reports have always held (`"chain3"`, `"fork_step_spawn_ns"`):
//! JSON files of earlier runs read back and are written again the same.

use std::fmt;
use std::str::FromStr;

use super::remote::RemoteColumn;
use super::snapshot::Restore;
use crate::fork::ForkStep;
use crate::memory::Strategy;
use crate::names::{Named, canonical_number};

/// A column of a suite's table: a clone strategy, or what else a suite compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// The baseline: plain page faults without a clone, the parent's own pass over its
    /// memory, the booted parent alone.
    Native,
    /// Every strategy of the suite at once: a scenario that could not run at all.
    All,
    /// The VM suite's one column.
    Kvm,
    /// A clone strategy.
    Strategy(Strategy),
    /// The snapshot as `snapshot::take` writes it (snapshot suite).
    Zstd,
    /// The same frozen image written uncompressed into one sparse file (snapshot suite).
    Raw,
    /// A `cow` fork's parent pause, beside a snapshot's (snapshot suite).
    CowFork,
    /// A way the snapshot suite restores memory.
    Restore(Restore),
    /// A way the remote suite restores a snapshot.
    Remote(RemoteColumn),
    /// The remote suite's family: the first snapshot...
    Parent,
    /// ...and the one taken against it.
    Child,
}

impl Subject {
    const OTHERS: [Subject; 3] = [Subject::Native, Subject::All, Subject::Kvm];
    const SNAPSHOT: [Subject; 3] = [Subject::Zstd, Subject::Raw, Subject::CowFork];
    const FAMILY: [Subject; 2] = [Subject::Parent, Subject::Child];
}

impl Named for Subject {
    const KIND: &'static str = "bench strategy";

    fn all() -> impl Iterator<Item = Self> {
        Subject::OTHERS
            .into_iter()
            .chain(Strategy::ALL.map(Subject::Strategy))
            .chain(Subject::SNAPSHOT)
            .chain(super::snapshot::RESTORES.map(Subject::Restore))
            .chain(super::remote::COLUMNS.map(Subject::Remote))
            .chain(Subject::FAMILY)
    }

    fn name(self) -> &'static str {
        match self {
            Subject::Native => "native",
            Subject::All => "all",
            Subject::Kvm => "kvm",
            Subject::Strategy(s) => s.name(),
            Subject::Zstd => "zstd",
            Subject::Raw => "raw",
            Subject::CowFork => "cow-fork",
            Subject::Restore(r) => r.name(),
            Subject::Remote(c) => c.name(),
            Subject::Parent => "parent",
            Subject::Child => "child",
        }
    }
}

crate::names::by_name!(Subject);

impl From<Strategy> for Subject {
    fn from(s: Strategy) -> Self {
        Subject::Strategy(s)
    }
}

impl From<Restore> for Subject {
    fn from(r: Restore) -> Self {
        Subject::Restore(r)
    }
}

impl From<RemoteColumn> for Subject {
    fn from(c: RemoteColumn) -> Self {
        Subject::Remote(c)
    }
}

crate::names::plain_names! {
    /// What a record counts.
    pub enum Metric {
        // The clone suite (see `clone.rs`).
        SourceHugePct = "source_huge_pct",
        CloneNs = "clone_ns",
        ChildPrivateBytes = "child_private_bytes",
        FirstReadNsPerPage = "first_read_ns_per_page",
        ChildHugePct = "child_huge_pct",
        UffdFaultServiceNs = "uffd_fault_service_ns",
        FirstWriteNsPerPage = "first_write_ns_per_page",
        Fanout16TotalBytes = "fanout16_total_bytes",
        RecloneNs = "reclone_ns",
        RecloneSeriesP50Ns = "reclone_series_p50_ns",
        RecloneSeriesMaxNs = "reclone_series_max_ns",
        // The vm suite.
        VmStartNs = "vm_start_ns",
        PauseNs = "pause_ns",
        ResumeNs = "resume_ns",
        // The fork and linux suites.
        ForkParentPauseNs = "fork_parent_pause_ns",
        ForkToChildRunningNs = "fork_to_child_running_ns",
        ForkToVcpusRunningNs = "fork_to_vcpus_running_ns",
        ParentPauseNs = "parent_pause_ns",
        ParentPauseMaxNs = "parent_pause_max_ns",
        ChildWorkloadNs = "child_workload_ns",
        TotalBytes = "total_bytes",
        FirstForkNs = "first_fork_ns",
        LastForkNs = "last_fork_ns",
        FirstPauseNs = "first_pause_ns",
        LastPauseNs = "last_pause_ns",
        BootToFirstTickNs = "boot_to_first_tick_ns",
        ParentBytes = "parent_bytes",
        ForkToChildConsoleNs = "fork_to_child_console_ns",
        // The snapshot and remote suites.
        WriteMibS = "write_mib_s",
        StoredBytes = "stored_bytes",
        Ratio = "ratio",
        RestoreNs = "restore_ns",
        ReadyNs = "ready_ns",
        Faults = "faults",
        Prefetched = "prefetched",
        WsTouchNs = "ws_touch_ns",
        TouchP50Ns = "touch_p50_ns",
        TouchP99Ns = "touch_p99_ns",
        SrvP50Ns = "srv_p50_ns",
        SrvP99Ns = "srv_p99_ns",
        Packs = "packs",
        Requests = "requests",
        FetchedBytes = "fetched_bytes",
        PacksFetched = "packs_fetched",
        PackCacheHits = "pack_cache_hits",
        WriteNs = "write_ns",
        NewBytes = "new_bytes",
        PushedBytes = "pushed_bytes",
        PushNs = "push_ns",
        ;
        /// `fork_step_{step}_ns`: one step of a fork's child (fork suite).
        ForkStep(ForkStep),
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.plain_name()) {
            (Metric::ForkStep(step), _) => f.pad(&format!("fork_step_{step}_ns")),
            (_, Some(name)) => f.pad(name),
            (_, None) => unreachable!("only ForkStep carries a parameter"),
        }
    }
}

impl FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let step = || s.strip_prefix("fork_step_")?.strip_suffix("_ns").and_then(ForkStep::from_name);
        Metric::from_plain_name(s).or_else(|| step().map(Metric::ForkStep)).ok_or_else(|| {
            let names: Vec<String> = Metric::all().map(|m| m.to_string()).collect();
            format!("unknown bench metric {s:?}: expected one of {}", names.join(", "))
        })
    }
}

impl Metric {
    /// Every metric, the fork steps last.
    pub fn all() -> impl Iterator<Item = Metric> {
        Metric::PLAIN.iter().copied().chain(ForkStep::ALL.map(Metric::ForkStep))
    }
}

crate::names::by_text!(Metric);

crate::names::plain_names! {
    /// What was set up for a record's measurement.
    pub enum Scenario {
        /// Clone suite: a strategy's clones, when they could not run.
        Clone = "clone",
        /// Clone suite: the plain faults, when they could not be measured.
        Native = "native",
        /// Fork and linux suites: forks of a running parent (the child's steps; and
        /// every fork measurement of a strategy, when it could not run).
        Fork = "fork",
        /// Vm suite: starting a VM process.
        Start = "start",
        /// Fork suite: forks of a parent that wrote 1 % of its pages since the last one.
        Refork1pct = "refork1pct",
        /// Snapshot and remote suites: an idle guest; linux suite: the booted parent.
        Idle = "idle",
        /// Snapshot and remote suites: a guest a quarter of whose memory holds text.
        Written25 = "written25",
        /// Remote suite: a snapshot and one taken against it.
        Family = "family",
        ;
        /// A scenario named after its only metric (the clone suite's, and single
        /// measurements elsewhere).
        Of(Metric),
        /// `touch{N}pct`: a forked child touches N % of its memory (fork suite).
        Touch(u32),
        /// `fanout{N}`: an idle parent and N idle children (fork suite).
        Fanout(u32),
        /// `chain{N}`: a chain of forks N deep (fork suite).
        Chain(u32),
        /// `{N}vcpu`: pausing and resuming a VM of N vCPUs (vm suite).
        Vcpus(u32),
        /// `idle{N}`: a booted parent and N idle children (linux suite).
        IdleForks(u32),
    }
}

impl Scenario {
    /// The number a scenario carries, if it is one of [`NUMBERED`].
    fn number(self) -> Option<u32> {
        match self {
            Scenario::Touch(n)
            | Scenario::Fanout(n)
            | Scenario::Chain(n)
            | Scenario::Vcpus(n)
            | Scenario::IdleForks(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Scenario::Of(m) = self {
            return m.fmt(f);
        }
        if let Some(name) = self.plain_name() {
            return f.pad(name);
        }
        let n = self.number().expect("a scenario without a name has a number");
        let (prefix, suffix, _) =
            NUMBERED.into_iter().find(|(_, _, make)| make(n) == *self).expect("every number is in NUMBERED");
        f.pad(&format!("{prefix}{n}{suffix}"))
    }
}

/// A scenario with a number: the text before it, the text after it, the scenario.
type Numbered = (&'static str, &'static str, fn(u32) -> Scenario);

/// How each scenario with a number is written and read.
const NUMBERED: [Numbered; 5] = [
    ("touch", "pct", Scenario::Touch),
    ("fanout", "", Scenario::Fanout),
    ("chain", "", Scenario::Chain),
    ("", "vcpu", Scenario::Vcpus),
    ("idle", "", Scenario::IdleForks),
];

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |prefix: &str, suffix: &str| {
            s.strip_prefix(prefix)?.strip_suffix(suffix).and_then(canonical_number)
        };
        let parametrised =
            || NUMBERED.into_iter().find_map(|(prefix, suffix, make)| number(prefix, suffix).map(make));
        Scenario::from_plain_name(s)
            .or_else(parametrised)
            .or_else(|| s.parse().ok().map(Scenario::Of))
            .ok_or_else(|| {
                let plain: Vec<String> = Scenario::PLAIN.iter().map(|s| s.to_string()).collect();
                format!(
                    "unknown bench scenario {s:?}: expected one of {}, touch{{N}}pct, fanout{{N}}, chain{{N}}, {{N}}vcpu, idle{{N}}, or a metric",
                    plain.join(", ")
                )
            })
    }
}

crate::names::by_text!(Scenario);

impl From<Metric> for Scenario {
    fn from(m: Metric) -> Self {
        Scenario::Of(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subject_round_trips_by_one_name() {
        crate::names::check_round_trips::<Subject>();
        assert_eq!(Subject::all().filter(|s| matches!(s, Subject::Strategy(_))).count(), Strategy::ALL.len());
    }

    /// Writes `v` as text and as JSON and reads it back both ways.
    fn round_trip<T>(v: T)
    where
        T: Copy + fmt::Display + FromStr<Err = String> + PartialEq + fmt::Debug,
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        let text = v.to_string();
        assert_eq!(text.parse::<T>(), Ok(v), "{text}");
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, serde_json::to_string(&text).unwrap());
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), v);
    }

    #[test]
    fn every_metric_round_trips_by_one_name() {
        let names: Vec<String> = Metric::all().map(|m| m.to_string()).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "every metric has a name of its own: {names:?}");
        Metric::all().for_each(round_trip);
        assert_eq!(Metric::ForkStep(ForkStep::Spawn).to_string(), "fork_step_spawn_ns");
        let e = "no_such_ns".parse::<Metric>().unwrap_err();
        assert!(e.contains("clone_ns") && e.contains("fork_step_resume_ns"), "{e}");
        assert!(serde_json::from_str::<Metric>("\"fork_step_nap_ns\"").is_err());
    }

    #[test]
    fn every_scenario_round_trips_by_one_name() {
        let plain: Vec<String> = Scenario::PLAIN.iter().map(|s| s.to_string()).collect();
        for name in &plain {
            assert!(name.parse::<Metric>().is_err(), "scenario {name} is also a metric's name");
        }
        let numbered = [0, 1, 2, 3, 16, 100].into_iter().flat_map(|n| NUMBERED.map(|(_, _, make)| make(n)));
        let all: Vec<Scenario> =
            Scenario::PLAIN.iter().copied().chain(Metric::all().map(Scenario::Of)).chain(numbered).collect();
        let mut names: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        names.sort_unstable();
        let len = names.len();
        names.dedup();
        assert_eq!(names.len(), len, "every scenario has a name of its own");
        all.into_iter().for_each(round_trip);
        let cases = [
            (Scenario::Chain(3), "chain3"),
            (Scenario::Vcpus(2), "2vcpu"),
            (Scenario::Touch(100), "touch100pct"),
            (Scenario::IdleForks(8), "idle8"),
            (Scenario::Idle, "idle"),
            (Scenario::Of(Metric::CloneNs), "clone_ns"),
        ];
        for (s, name) in cases {
            assert_eq!(s.to_string(), name);
        }
        // Numbers are read only as they are written.
        for bad in ["chain03", "chain", "chain+3", "idle-1", "vcpu", "touchpct", "written26"] {
            assert!(bad.parse::<Scenario>().is_err(), "{bad}");
        }
    }
}
