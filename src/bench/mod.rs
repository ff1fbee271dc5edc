//! `vmfork bench`: every strategy side by side, in one process, into one JSON file.
//!
//! Machines here are noisy (nested virtualisation, two shared cores), so absolute times
//! mean little across runs; the point is the ratios within one run. Every record carries
//! its strategy and size so those ratios can be taken from the file alone, and the
//! `native` strategy measures plain page faults without any clone as the denominator.

mod clone;
use clone::meminfo;
mod delay;
mod fork;
mod linux_fork;
mod plot;
mod record;
mod remote;
mod snapshot;
pub mod vm;

pub use record::{Metric, Scenario, Subject};
pub use remote::RemoteColumn;
pub use snapshot::Restore;

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::names::Named;

/// One measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub suite: Suite,
    pub scenario: Scenario,
    pub strategy: Subject,
    pub size_bytes: u64,
    pub metric: Metric,
    /// `None` when the scenario was skipped; `note` then says why.
    pub value: Option<f64>,
    pub unit: Unit,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Record {
    /// A measured value.
    pub fn value(
        suite: Suite,
        scenario: impl Into<Scenario>,
        strategy: impl Into<Subject>,
        size: u64,
        metric: Metric,
        value: f64,
        unit: Unit,
    ) -> Self {
        Record {
            suite,
            scenario: scenario.into(),
            strategy: strategy.into(),
            size_bytes: size,
            metric,
            value: Some(value),
            unit,
            note: None,
        }
    }

    /// A scenario that could not run here, with the reason.
    pub fn skipped(
        suite: Suite,
        scenario: impl Into<Scenario>,
        strategy: impl Into<Subject>,
        size: u64,
        metric: Metric,
        why: &str,
    ) -> Self {
        let measured = Record::value(suite, scenario, strategy, size, metric, 0.0, Unit::Skipped);
        Record { value: None, note: Some(why.into()), ..measured }
    }
}

/// What a record's value counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds.
    Ns,
    Bytes,
    /// A number of things (faults, requests, packs).
    Count,
    /// A multiple (`x`): a compression ratio.
    X,
    /// MiB of guest memory per second.
    MibPerSec,
    /// A share in percent (`%`): of resident memory mapped with huge pages.
    Percent,
    /// None: a skipped record has no value (`""`).
    Skipped,
}

impl Named for Unit {
    const KIND: &'static str = "unit";

    fn all() -> impl Iterator<Item = Self> {
        [Unit::Ns, Unit::Bytes, Unit::Count, Unit::X, Unit::MibPerSec, Unit::Percent, Unit::Skipped]
            .into_iter()
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Bytes => "bytes",
            Unit::Count => "count",
            Unit::X => "x",
            Unit::MibPerSec => "MiB/s",
            Unit::Percent => "%",
            Unit::Skipped => "",
        }
    }
}

crate::names::by_name!(Unit);

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// A smoke run, for CI and a first look: the smallest size of each suite (64 MiB;
    /// 256 MiB for a Linux guest), fewer forks.
    pub quick: bool,
    /// Sizes in bytes; empty means the default for `quick`.
    pub sizes: Vec<usize>,
    /// Ask for transparent huge pages on guest memory.
    pub huge_pages: bool,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// The suites to run; empty means all.
    pub suites: Vec<Suite>,
}

/// The benchmark suites (`--suite`, and each record's `suite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Clone,
    Vm,
    Fork,
    Linux,
    Snapshot,
    Remote,
}

impl Suite {
    /// Every suite, in the order a run takes them.
    pub const ALL: [Suite; 6] =
        [Suite::Clone, Suite::Vm, Suite::Fork, Suite::Linux, Suite::Snapshot, Suite::Remote];

    /// The suite's line of `--help`.
    fn help(self) -> &'static str {
        match self {
            Suite::Clone => "Memory clones, no VM: every strategy, first touches, fan-out, re-clone",
            Suite::Vm => "VM start, pause and resume",
            Suite::Fork => "Forking a running VM: pause, child start, child workload, fan-out, chains",
            Suite::Linux => "Booting and forking a Linux guest (where KVM can run one: the testbed)",
            Suite::Snapshot => "Snapshots of a running VM: pause, write, size; restores by every strategy",
            Suite::Remote => {
                "Restores from an S3-compatible object store against local ones (skipped without a store: `scripts/s3-server start`)"
            }
        }
    }
}

impl Named for Suite {
    const KIND: &'static str = "bench suite";

    fn all() -> impl Iterator<Item = Self> {
        Suite::ALL.into_iter()
    }

    fn name(self) -> &'static str {
        match self {
            Suite::Clone => "clone",
            Suite::Vm => "vm",
            Suite::Fork => "fork",
            Suite::Linux => "linux",
            Suite::Snapshot => "snapshot",
            Suite::Remote => "remote",
        }
    }
}

crate::names::by_name!(Suite, value_enum);

impl BenchOptions {
    fn runs(&self, suite: Suite) -> bool {
        self.suites.is_empty() || self.suites.contains(&suite)
    }
}

/// Facts about the run that every ratio depends on.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunInfo {
    pub date_utc: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub shmem_thp: String,
    pub huge_pages_requested: bool,
}

impl RunInfo {
    fn collect(opts: &BenchOptions) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_string();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let shmem_thp = read("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
        RunInfo {
            date_utc: utc_now(),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shmem_thp,
            huge_pages_requested: opts.huge_pages,
        }
    }
}

fn utc_now() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// The report written by `--json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub run: RunInfo,
    pub records: Vec<Record>,
    /// The issue's targets, as ratios taken from `records`.
    pub ratios: Vec<Ratio>,
}

/// One ratio between two records of the same run, against a target.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ratio {
    pub name: String,
    pub size_bytes: u64,
    pub value: f64,
    /// The target, e.g. `>= 1000`.
    pub target: String,
    pub met: bool,
}

/// The record of one measurement in `records`, if any.
fn find(
    records: &[Record],
    suite: Suite,
    scenario: impl Into<Scenario>,
    strategy: impl Into<Subject>,
    metric: Metric,
    size: u64,
) -> Option<&Record> {
    let (scenario, strategy) = (scenario.into(), strategy.into());
    records.iter().find(|r| {
        r.suite == suite
            && r.scenario == scenario
            && r.strategy == strategy
            && r.metric == metric
            && r.size_bytes == size
    })
}

/// The sizes `suite` has records for, smallest first.
fn sizes_of(records: &[Record], suite: Suite) -> Vec<u64> {
    let mut sizes: Vec<u64> = records.iter().filter(|r| r.suite == suite).map(|r| r.size_bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

type SuiteFn = fn(&BenchOptions, &mut Vec<Record>) -> Result<(), BenchError>;

/// Runs the suites and prints a table; writes JSON when asked.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let run = RunInfo::collect(opts);
    eprintln!(
        "vmfork bench: kernel {}, {} CPUs, shmem THP {:?}, huge pages {}",
        run.kernel,
        run.cpus,
        run.shmem_thp,
        if opts.huge_pages { "requested" } else { "not requested" }
    );
    let mut records = Vec::new();
    // Each suite says how long it took: under TCG a suite can run for many minutes, and
    // whoever trims a run needs to know which.
    let suites: [(Suite, SuiteFn); 6] = [
        (Suite::Clone, clone::run),
        (Suite::Vm, |_, out| vm::run(out)),
        (Suite::Fork, fork::run),
        (Suite::Linux, linux_fork::run),
        (Suite::Snapshot, snapshot::run),
        (Suite::Remote, remote::run),
    ];
    for (suite, run_suite) in suites {
        if opts.runs(suite) {
            let t0 = std::time::Instant::now();
            run_suite(opts, &mut records).map_err(|e| Error::Suite { suite, source: Box::new(e) })?;
            eprintln!("{suite} suite done in {:.1} s", t0.elapsed().as_secs_f64());
        }
    }
    let mut ratios = clone::ratios(&records);
    ratios.extend(fork::ratios(&records));
    ratios.extend(linux_fork::ratios(&records));
    ratios.extend(snapshot::ratios(&records));
    ratios.extend(remote::ratios(&records));
    let report = Report { run, records, ratios };
    print_report(&report, &mut std::io::stdout().lock()).map_err(Error::io("cannot print the report"))?;
    if let Some(path) = &opts.json {
        let json = serde_json::to_string_pretty(&report).map_err(Error::Encode)?;
        std::fs::write(path, json).map_err(Error::io(format!("cannot write {}", path.display())))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report)
}

/// The table and the ratios.
pub fn print_report(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    print_table(&report.records, out)?;
    for r in &report.ratios {
        let verdict = if r.met { "met" } else { "NOT met" };
        writeln!(
            out,
            "ratio {} at {}: {:.2} (target {}: {verdict})",
            r.name,
            human_bytes(r.size_bytes),
            r.value,
            r.target
        )?;
    }
    Ok(())
}

/// `vmfork report`: prints a saved report and, if asked, writes it as Markdown and draws
/// its SVG charts into a directory (linked from the Markdown when both are asked).
pub fn render(
    path: &std::path::Path,
    markdown: Option<&std::path::Path>,
    svg_dir: Option<&std::path::Path>,
) -> Result<(), BenchError> {
    let text = std::fs::read_to_string(path).map_err(Error::io(format!("cannot read {}", path.display())))?;
    let report: Report = serde_json::from_str(&text)
        .map_err(|source| Error::BadReport { path: path.to_path_buf(), source })?;
    print_report(&report, &mut std::io::stdout().lock()).map_err(Error::io("cannot print the report"))?;
    let charts = match svg_dir {
        Some(dir) => plot::write_all(&report.records, dir)?,
        None => Vec::new(),
    };
    for c in &charts {
        eprintln!("wrote {}", c.display());
    }
    if let Some(md) = markdown {
        let buf =
            markdown_of(&report, md, &charts).map_err(Error::io("cannot compose the Markdown report"))?;
        std::fs::write(md, buf).map_err(Error::io(format!("cannot write {}", md.display())))?;
        eprintln!("wrote {}", md.display());
    }
    Ok(())
}

/// The Markdown of `report`, to be written to `md`, linking `charts`.
fn markdown_of(report: &Report, md: &std::path::Path, charts: &[PathBuf]) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    writeln!(
        buf,
        "# vmfork bench report\n\nMeasured {} on kernel {} ({}, {} CPUs), shmem THP `{}`.\n\n```text",
        report.run.date_utc, report.run.kernel, report.run.cpu, report.run.cpus, report.run.shmem_thp
    )?;
    print_report(report, &mut buf)?;
    writeln!(buf, "```")?;
    let md_dir = md.parent().unwrap_or(std::path::Path::new("."));
    for c in charts {
        // Relative to the Markdown file when the chart is beside or below it.
        let shown = c.strip_prefix(md_dir).unwrap_or(c);
        writeln!(buf, "\n![{}]({})", c.file_stem().unwrap_or_default().to_string_lossy(), shown.display())?;
    }
    Ok(buf)
}

/// A table per suite: one row per (scenario, metric, size), one column per strategy
/// of that suite.
pub fn print_table(records: &[Record], out: &mut impl Write) -> std::io::Result<()> {
    let mut suites: Vec<Suite> = Vec::new();
    for r in records {
        if !suites.contains(&r.suite) {
            suites.push(r.suite);
        }
    }
    for suite in suites {
        let mut strategies: Vec<Subject> = Vec::new();
        let mut rows: Vec<(Scenario, Metric, u64)> = Vec::new();
        for r in records.iter().filter(|r| r.suite == suite) {
            if !strategies.contains(&r.strategy) {
                strategies.push(r.strategy);
            }
            let key = (r.scenario, r.metric, r.size_bytes);
            if !rows.contains(&key) {
                rows.push(key);
            }
        }
        // The baseline first, then the strategies in the order they ran.
        strategies.sort_by_key(|s| *s != Subject::Native);
        let width = |s: Subject| s.name().len().max(12);
        write!(out, "{:<8} {:<26} {:>9}", "suite", "metric", "size")?;
        for &s in &strategies {
            write!(out, " {s:>w$}", w = width(s))?;
        }
        writeln!(out)?;
        for (scenario, metric, size) in rows {
            let label = if scenario == Scenario::Of(metric) {
                metric.to_string()
            } else {
                format!("{scenario}/{metric}")
            };
            write!(out, "{suite:<8} {label:<26} {:>9}", human_bytes(size))?;
            for &s in &strategies {
                let cell = find(records, suite, scenario, s, metric, size).map_or(String::new(), |r| match r
                    .value
                {
                    Some(v) => human_value(v, r.unit),
                    None => "skipped".into(),
                });
                write!(out, " {cell:>w$}", w = width(s))?;
            }
            writeln!(out)?;
        }
    }
    // Each distinct reason once, with the sizes it applied to.
    let mut skips: Vec<(Subject, &str, Vec<u64>)> = Vec::new();
    for r in records.iter().filter(|r| r.value.is_none()) {
        let note = r.note.as_deref().unwrap_or("no reason recorded");
        match skips.iter_mut().find(|(s, n, _)| *s == r.strategy && *n == note) {
            Some((_, _, sizes)) if sizes.contains(&r.size_bytes) => {}
            Some((_, _, sizes)) => sizes.push(r.size_bytes),
            None => skips.push((r.strategy, note, vec![r.size_bytes])),
        }
    }
    for (strategy, note, sizes) in skips {
        let sizes: Vec<String> = sizes.into_iter().map(human_bytes).collect();
        writeln!(out, "skipped {strategy} at {}: {note}", sizes.join(", "))?;
    }
    Ok(())
}

pub use crate::units::human_bytes;

pub(crate) fn human_value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Ns if v >= 1e9 => format!("{:.2}s", v / 1e9),
        Unit::Ns if v >= 1e6 => format!("{:.2}ms", v / 1e6),
        Unit::Ns if v >= 1e4 => format!("{:.1}us", v / 1e3),
        Unit::Ns => format!("{v:.0}ns"),
        Unit::Bytes => human_bytes(v as u64),
        Unit::Count => format!("{v:.0}"),
        Unit::X => format!("{v:.2}x"),
        Unit::MibPerSec => format!("{v:.0}MiB/s"),
        Unit::Percent => format!("{v:.0}%"),
        Unit::Skipped => format!("{v:.3}"),
    }
}

/// Why a benchmark (or one of its measurements) failed. Variants that wrap another
/// module's error show that error's message; the others hand their cause out as
/// [`std::error::Error::source`] (shown by [`crate::error::Report`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A suite failed as a whole (the variant inside says how).
    #[error("the {suite} suite failed")]
    Suite {
        suite: Suite,
        #[source]
        source: Box<Error>,
    },
    #[error(transparent)]
    Vm(#[from] crate::vmm::Error),
    #[error(transparent)]
    Setup(#[from] crate::vmm::guest::SetupError),
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    #[error(transparent)]
    NewVm(#[from] crate::fork::NewVmError),
    #[error(transparent)]
    Fork(#[from] crate::fork::Error),
    /// A file, directory or process operation failed; `what` says which.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a vmfork bench report (one is written by `vmfork bench --json FILE`)", path.display())]
    BadReport {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} holds no VM state this vmfork reads", path.display())]
    BadState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the report as JSON")]
    Encode(#[source] serde_json::Error),
    #[error("cannot draw the chart {}", path.display())]
    Draw {
        path: PathBuf,
        #[source]
        source: plotters::drawing::DrawingAreaErrorKind<std::io::Error>,
    },
    /// A guest did not show it was running in time.
    #[error("{guest} did not {event} within {secs} s")]
    Silent { guest: &'static str, event: &'static str, secs: u64 },
    #[error("`{} run` printed no guest report", exe.display())]
    StartNoReport { exe: PathBuf },
    #[error("`{} run` did not stop cleanly: {status}", exe.display())]
    StartUnclean { exe: PathBuf, status: std::process::ExitStatus },
    #[error(
        "{} of memory available, a {} guest's snapshot and restores need about {}: free memory or measure a smaller --size",
        human_bytes(*available), human_bytes(*guest), human_bytes(*needs)
    )]
    NoMemory { available: u64, guest: u64, needs: u64 },
    #[error(
        "{} free in {}, a {} guest's snapshot and raw file need about {}: free disk space there (or point TMPDIR elsewhere) or measure a smaller --size",
        human_bytes(*free), dir.display(), human_bytes(*guest), human_bytes(*needs)
    )]
    NoDisk { free: u64, dir: PathBuf, guest: u64, needs: u64 },
    #[error(
        "the object store at {endpoint} does not answer (start one with scripts/s3-server start and export what it prints, or unset VMFORK_S3_ENDPOINT to skip the remote suite)"
    )]
    StoreDown {
        endpoint: String,
        #[source]
        source: crate::snapshot::Error,
    },
    #[error("the snapshot has no working set")]
    NoWorkingSet,
    #[error("no snapshot was taken")]
    NoSnapshot,
    #[error("the snapshot has no chunk to touch")]
    NothingToTouch,
    #[error(transparent)]
    Child(#[from] crate::fork::ChildError),
    #[error(transparent)]
    Api(#[from] crate::api::Error),
    #[error("a fork answered {answer}, which names no child")]
    NoChild {
        answer: String,
        #[source]
        source: Option<serde_json::Error>,
    },
    /// A link of a chain of forks failed (the variant inside says how).
    #[error("link {link} of the chain")]
    ChainLink {
        link: usize,
        #[source]
        source: Box<Error>,
    },
    #[error(
        "stopped: {} of memory left, {what} needs about {}: free memory or measure a smaller --size",
        human_bytes(*available), human_bytes(*needs)
    )]
    NoRoom { available: u64, what: String, needs: u64 },
}

/// The name the suites use.
pub type BenchError = Error;

impl Error {
    /// An I/O failure: `what` says what could not be done ("cannot write FILE").
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The text a skipped record keeps of `e`: its message and causes.
pub(crate) fn note(e: &Error) -> String {
    crate::error::report(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real report: `vmfork bench --quick --json` on a KVM host with an object store
    /// (`scripts/s3-server start`), written by vmfork at 9cd59d0, when every field of a
    /// record was a string. Every suite and every strategy of the table is in it.
    const QUICK_REPORT: &str = include_str!("testdata/quick-report.json");
    /// `vmfork report` of that file, by the same vmfork.
    const QUICK_REPORT_TEXT: &str = include_str!("testdata/quick-report.txt");

    #[test]
    fn every_suite_round_trips_by_one_name_everywhere() {
        assert_eq!(Suite::ALL.map(Named::name), ["clone", "vm", "fork", "linux", "snapshot", "remote"]);
        crate::names::check_round_trips::<Suite>();
        crate::names::check_value_enum::<Suite>();
    }

    #[test]
    fn every_unit_round_trips_by_one_name() {
        let names: Vec<_> = Unit::all().map(Unit::name).collect();
        assert_eq!(names, ["ns", "bytes", "count", "x", "MiB/s", "%", ""]);
        crate::names::check_round_trips::<Unit>();
    }

    fn quick_report() -> Report {
        serde_json::from_str(QUICK_REPORT).expect("the saved report reads")
    }

    /// Saved reports are read and written unchanged, byte for byte.
    #[test]
    fn a_saved_report_reads_and_writes_back_byte_for_byte() {
        let json = serde_json::to_string_pretty(&quick_report()).unwrap();
        assert!(json == QUICK_REPORT, "the report changed:\n{json}");
    }

    /// Every report committed to the repository (test data, documented runs) reads with
    /// typed records, and each record is written back with the same names and values.
    #[test]
    fn every_committed_report_reads_and_writes_back_its_names() {
        let root = env!("CARGO_MANIFEST_DIR");
        let listed = std::process::Command::new("git").args(["-C", root, "ls-files", "*.json"]).output();
        let texts: Vec<(String, String)> = match listed {
            Ok(out) if out.status.success() => String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|f| {
                    (f.to_string(), std::fs::read_to_string(std::path::Path::new(root).join(f)).unwrap())
                })
                .collect(),
            // Not a git checkout (a packaged crate, or the test binary run where it was
            // not built, as in the testbed): the test data built in is what there is.
            _ => vec![("src/bench/testdata/quick-report.json".into(), QUICK_REPORT.to_string())],
        };
        let listed: Vec<&String> = texts.iter().map(|(f, _)| f).collect();
        let mut reports = 0;
        for (file, text) in &texts {
            let json: serde_json::Value = serde_json::from_str(text).unwrap();
            let Some(records) = json.get("records").and_then(|r| r.as_array()) else { continue };
            for saved in records {
                let record: Record =
                    serde_json::from_value(saved.clone()).unwrap_or_else(|e| panic!("{file}: {e}: {saved}"));
                assert_eq!(&serde_json::to_value(&record).unwrap(), saved, "{file}");
            }
            reports += 1;
        }
        assert!(reports >= 1, "no report among {listed:?}");
    }

    /// The ratios taken from the saved records are the ones saved with them.
    #[test]
    fn the_ratios_of_a_saved_report_are_taken_again_alike() {
        let report = quick_report();
        let records = &report.records;
        let mut ratios = clone::ratios(records);
        ratios.extend(fork::ratios(records));
        ratios.extend(linux_fork::ratios(records));
        ratios.extend(snapshot::ratios(records));
        ratios.extend(remote::ratios(records));
        let json = |r: &[Ratio]| serde_json::to_string_pretty(r).unwrap();
        assert_eq!(json(&ratios), json(&report.ratios));
    }

    /// What `vmfork` prints when a suite's VM cannot open KVM: what failed, the cause
    /// once, and what to do about it.
    #[test]
    fn a_suite_without_kvm_says_why_once_and_what_to_do() {
        let missing = std::ffi::CString::new("/nonexistent/vmfork-test/kvm").unwrap();
        let cause = kvm_ioctls::Kvm::new_with_path(&missing).map(drop).expect_err("no KVM there");
        let e = Error::Suite { suite: Suite::Vm, source: Box::new(crate::vmm::Error::KvmOpen(cause).into()) };
        let text = crate::error::tests::report_once(&e);
        assert!(text.starts_with("the vm suite failed: cannot open /dev/kvm: "), "{text}");
        assert_eq!(text.matches("No such file or directory").count(), 1, "{text}");
        assert!(text.contains("modprobe") && text.contains("`kvm` group"), "no fix in: {text}");
    }

    /// `vmfork report` of a file that is not a report: the file, the parser's complaint
    /// once, and how to get a report.
    #[test]
    fn a_file_that_is_not_a_report_is_named_with_the_way_to_write_one() {
        let path = std::env::temp_dir().join(format!("vmfork-not-a-report-{}.json", std::process::id()));
        std::fs::write(&path, "not json").unwrap();
        let e = render(&path, None, None).expect_err("not a report");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(e, Error::BadReport { .. }), "{e:?}");
        let text = crate::error::tests::report_once(&e);
        assert_eq!(text.matches(&*path.display().to_string()).count(), 1, "{text}");
        assert!(text.contains("vmfork bench --json FILE"), "no fix in: {text}");
        assert_eq!(text.matches("expected ident").count(), 1, "the parser's complaint once: {text}");
    }

    /// A size that does not fit says so, with both numbers and what to change.
    #[test]
    fn too_little_memory_for_a_size_says_what_to_change() {
        let e = Error::NoMemory { available: 1 << 30, guest: 4 << 30, needs: (4 << 30) + (512 << 20) };
        let text = crate::error::tests::report_once(&e);
        assert!(text.starts_with("1G of memory available, a 4G guest's"), "{text}");
        assert!(text.contains("--size"), "{text}");
    }

    /// The table and ratios printed of a saved report are what `vmfork report` printed.
    #[test]
    fn a_saved_report_prints_as_it_did() {
        let mut out = Vec::new();
        print_report(&quick_report(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text == QUICK_REPORT_TEXT, "the printed report changed:\n{text}");
    }
}
