//! SVG plots of a bench report (`vmfork report FILE --svg DIR`): how the strategies
//! compare at a glance. Three charts, each from one run's records:
//!
//! * `clone_latency.svg`: clone time against guest size, per strategy (clone suite),
//!   and the fork's parent pause beside it (fork suite);
//! * `first_touch.svg`: cost of the first read and the first write of a page after a
//!   clone, per strategy, at the largest size measured;
//! * `fork_memory.svg`: memory held by a source and its idle clones or forks, as a
//!   multiple of one guest's size (clone suite, fork suite, and idle Linux forks);
//! * `snapshot_restore.svg`: a snapshot's restore, request to vCPUs running and to the
//!   guest's working set touched, against guest size, per restore strategy (snapshot
//!   suite, `written25` memory);
//! * `snapshot_touch.svg`: first touch of a chunk of restored memory, p50 and p99,
//!   against guest size, per restore strategy (snapshot suite, `written25` memory);
//! * `remote_restore.svg`: as `snapshot_restore.svg`, for restores from a local
//!   directory and from the object store, cold, warm, with prefetch and over a 20 ms
//!   round trip (remote suite, `written25` memory).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::remote::{COLUMNS, RemoteColumn};
use super::snapshot::{RESTORES, Restore};
use super::{BenchError, Error, Metric, Record, Scenario, Subject, Suite, Unit, human_bytes};
use crate::memory::Strategy;

/// Strategies in legend order, the `native` baseline first, then [`Strategy::CONCRETE`];
/// each keeps its colour in every chart.
const ORDER: [Subject; 1 + Strategy::CONCRETE.len()] = {
    let mut order = [Subject::Native; 1 + Strategy::CONCRETE.len()];
    let mut i = 0;
    while i < Strategy::CONCRETE.len() {
        order[i + 1] = Subject::Strategy(Strategy::CONCRETE[i]);
        i += 1;
    }
    order
};
const COLOURS: [RGBColor; ORDER.len()] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];
const SIZE: (u32, u32) = (760, 440);

/// The snapshot suite's restore strategies' colours, in its table order ([`RESTORES`]).
const SNAPSHOT_COLOURS: [RGBColor; RESTORES.len()] = [
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// The remote suite's restore columns' colours, in its column order ([`COLUMNS`]).
const REMOTE_COLOURS: [RGBColor; COLUMNS.len()] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
];

fn colour(strategy: Subject) -> RGBColor {
    let at = |r: Restore| RESTORES.iter().position(|s| *s == r).map(|i| SNAPSHOT_COLOURS[i]);
    let column = |c: RemoteColumn| COLUMNS.iter().position(|s| *s == c).map(|i| REMOTE_COLOURS[i]);
    let of = match strategy {
        Subject::Restore(r) => at(r),
        Subject::Remote(c) => column(c),
        s => ORDER.iter().position(|o| *o == s).map(|i| COLOURS[i]),
    };
    of.unwrap_or(BLACK)
}

/// What drawing on an SVG file fails with.
type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// A failure drawing the chart at `path`.
fn draw_err(path: &Path) -> impl Fn(DrawError) -> Error + Copy + '_ {
    move |source| Error::Draw { path: path.to_path_buf(), source }
}

/// Values of `metric` in the scenario named after it, by strategy: `(size, value)`.
fn series(records: &[Record], suite: Suite, metric: Metric) -> Vec<(Subject, Vec<(u64, f64)>)> {
    series_of(records, suite, Scenario::Of(metric), metric, ORDER)
}

/// [`series`] of `scenario` for the strategies `order`.
fn series_of(
    records: &[Record],
    suite: Suite,
    scenario: Scenario,
    metric: Metric,
    order: impl IntoIterator<Item = Subject>,
) -> Vec<(Subject, Vec<(u64, f64)>)> {
    let mut out: Vec<(Subject, Vec<(u64, f64)>)> = Vec::new();
    for s in order {
        let mut points: Vec<(u64, f64)> = records
            .iter()
            .filter(|r| r.suite == suite && r.scenario == scenario && r.metric == metric && r.strategy == s)
            .filter_map(|r| Some((r.size_bytes, r.value.filter(|v| *v > 0.0)?)))
            .collect();
        points.sort_by_key(|p| p.0);
        if !points.is_empty() {
            out.push((s, points));
        }
    }
    out
}

/// Writes the charts the records have data for into `dir`; returns their paths.
pub fn write_all(records: &[Record], dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let mut written = Vec::new();
    let clone = series(records, Suite::Clone, Metric::CloneNs);
    let pause = series(records, Suite::Fork, Metric::ForkParentPauseNs);
    if !clone.is_empty() || !pause.is_empty() {
        let path = dir.join("clone_latency.svg");
        latency_chart(&path, &clone, &pause)?;
        written.push(path);
    }
    let largest = records.iter().filter(|r| r.suite == Suite::Clone).map(|r| r.size_bytes).max();
    if let Some(size) = largest {
        let at = |metric: Metric| -> Vec<Option<f64>> {
            ORDER
                .iter()
                .map(|s| {
                    records
                        .iter()
                        .find(|r| {
                            r.suite == Suite::Clone
                                && r.metric == metric
                                && r.strategy == *s
                                && r.size_bytes == size
                        })
                        .and_then(|r| r.value)
                })
                .collect()
        };
        let groups = [
            ("first read", at(Metric::FirstReadNsPerPage)),
            ("first write", at(Metric::FirstWriteNsPerPage)),
        ];
        if groups.iter().any(|(_, v)| v.iter().any(Option::is_some)) {
            let path = dir.join("first_touch.svg");
            let title = format!("First touch of a page after a clone ({})", human_bytes(size));
            bar_chart(&path, &title, "ns per page (log)", &groups, true)?;
            written.push(path);
        }
    }
    let mut memory: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    // Each a group of bars, labelled by what was forked.
    let fanouts = records.iter().filter_map(|r| {
        let size = human_bytes(r.size_bytes);
        let label = match (r.suite, r.scenario, r.metric) {
            (Suite::Clone, _, Metric::Fanout16TotalBytes) => format!("16 clones, {size}"),
            (Suite::Fork, Scenario::Fanout(n), Metric::TotalBytes) => format!("{n} forks, {size}"),
            (Suite::Linux, Scenario::IdleForks(n), Metric::TotalBytes) => format!("{n} Linux forks, {size}"),
            _ => return None,
        };
        Some((label, r))
    });
    for (label, r) in fanouts {
        let i = match memory.iter().position(|(l, _)| *l == label) {
            Some(i) => i,
            None => {
                memory.push((label, vec![None; ORDER.len()]));
                memory.len() - 1
            }
        };
        if let Some(s) = ORDER.iter().position(|s| *s == r.strategy) {
            memory[i].1[s] = r.value.map(|v| v / r.size_bytes as f64);
        }
    }
    if !memory.is_empty() {
        let path = dir.join("fork_memory.svg");
        let groups: Vec<(&str, Vec<Option<f64>>)> =
            memory.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
        bar_chart(
            &path,
            "Memory of a source and its idle clones / forks",
            "× one guest's size",
            &groups,
            false,
        )?;
        written.push(path);
    }
    let w25 = Scenario::Written25;
    let snapshot =
        |metric: Metric| series_of(records, Suite::Snapshot, w25, metric, RESTORES.map(Subject::Restore));
    let (restore, ready) = (snapshot(Metric::RestoreNs), snapshot(Metric::ReadyNs));
    if !restore.is_empty() || !ready.is_empty() {
        let path = dir.join("snapshot_restore.svg");
        let caption = "Restore: request to vCPUs running (solid), to working set touched (dashed)";
        curves(&path, caption, &restore, &ready)?;
        written.push(path);
    }
    let (p50, p99) = (snapshot(Metric::TouchP50Ns), snapshot(Metric::TouchP99Ns));
    if !p50.is_empty() || !p99.is_empty() {
        let path = dir.join("snapshot_touch.svg");
        curves(&path, "First touch of a restored chunk: p50 (solid) and p99 (dashed)", &p50, &p99)?;
        written.push(path);
    }
    let remote =
        |metric: Metric| series_of(records, Suite::Remote, w25, metric, COLUMNS.map(Subject::Remote));
    let (restore, ready) = (remote(Metric::RestoreNs), remote(Metric::ReadyNs));
    if !restore.is_empty() || !ready.is_empty() {
        let path = dir.join("remote_restore.svg");
        let caption = "From the store: request to vCPUs running (solid), to working set touched (dashed)";
        curves(&path, caption, &restore, &ready)?;
        written.push(path);
    }
    Ok(written)
}

type Series = [(Subject, Vec<(u64, f64)>)];

fn latency_chart(path: &Path, clone: &Series, pause: &Series) -> Result<(), BenchError> {
    curves(path, "Clone time (solid) and fork parent pause (dashed) vs guest size", clone, pause)
}

/// Times (ns, log scale) against guest size (log2): `solid` and `dashed` lines, one
/// legend entry per strategy.
fn curves(path: &Path, caption: &str, solid: &Series, dashed_lines: &Series) -> Result<(), BenchError> {
    // x is log2 of the size, so that every power of two gets a plain label.
    let log2 = |b: u64| (b as f64).log2();
    let all = solid.iter().chain(dashed_lines).flat_map(|(_, p)| p.iter().map(|&(x, y)| (log2(x), y)));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, 0f64, f64::MAX, 0f64);
    for (x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    // Room on the right for the legend.
    let (x0, x1) = (x0.floor() - 0.5, x1.ceil() + 2.0);
    let err = draw_err(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0 / 2.0..y1 * 20.0).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("guest memory")
        .y_desc("time")
        .x_labels((x1 - x0) as usize + 1)
        .x_label_formatter(&|x| {
            if x.fract().abs() < 1e-9 { human_bytes(2f64.powf(*x) as u64) } else { String::new() }
        })
        .y_label_formatter(&|ns| super::human_value(*ns, Unit::Ns))
        .draw()
        .map_err(err)?;
    for (dashed, set) in [(false, solid), (true, dashed_lines)] {
        for (name, points) in set {
            let c = colour(*name);
            let style = c.stroke_width(2);
            let pts: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (log2(x), y)).collect();
            // One legend entry per strategy: the caption tells solid from dashed.
            let labelled = !dashed || !solid.iter().any(|(n, _)| n == name);
            let drawn = if dashed {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style)).map_err(err)?
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(err)?
            };
            if labelled {
                let name = name.to_string();
                drawn
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            }
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled()))).map_err(err)?;
        }
    }
    legend(&mut chart).map_err(err)?;
    root.present().map_err(err)
}

/// Every chart's legend: on the right, boxed, over a faded background.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// Grouped bars: one group per label, one bar per strategy of [`ORDER`] with a value.
fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    groups: &[(&str, Vec<Option<f64>>)],
    log: bool,
) -> Result<(), BenchError> {
    let values = groups.iter().flat_map(|(_, v)| v.iter().flatten().copied()).filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= 0.0 {
        return Ok(());
    }
    let present: Vec<usize> =
        (0..ORDER.len()).filter(|&s| groups.iter().any(|(_, v)| v[s].is_some())).collect();
    let width = present.len() as f64 + 1.0;
    let x_max = groups.len() as f64 * width;
    let err = draw_err(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 18)).margin(12).x_label_area_size(40).y_label_area_size(70);
    let bars = groups.iter().enumerate().flat_map(|(g, (_, v))| {
        present.iter().enumerate().filter_map(move |(k, &s)| {
            let x = g as f64 * width + 0.5 + k as f64;
            v[s].map(|y| (x, y, s))
        })
    });
    let bars: Vec<(f64, f64, usize)> = bars.collect();
    macro_rules! draw {
        ($chart:expr, $floor:expr, $top:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(y_desc).draw().map_err(err)?;
            for &s in &present {
                let c = colour(ORDER[s]);
                let mine = bars.iter().filter(|b| b.2 == s);
                chart
                    .draw_series(
                        mine.map(|&(x, y, _)| Rectangle::new([(x, $floor), (x + 0.9, y)], c.filled())),
                    )
                    .map_err(err)?
                    .label(ORDER[s].to_string())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
            }
            // Group names inside the plot, under its top edge.
            let names = groups.iter().enumerate().map(|(g, (label, _))| {
                let style =
                    ("sans-serif", 14).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
                Text::new(label.to_string(), ((g as f64 + 0.5) * width, $top), style)
            });
            chart.draw_series(names).map_err(err)?;
            legend(&mut chart).map_err(err)?;
        }};
    }
    if log {
        let floor = lo / 2.0;
        let top = hi * 8.0;
        draw!(
            builder.build_cartesian_2d(0.0..x_max + 2.0, (floor..top).log_scale()).map_err(err)?,
            floor,
            top
        );
    } else {
        let top = hi * 1.15;
        draw!(builder.build_cartesian_2d(0.0..x_max + 2.0, 0.0..top).map_err(err)?, 0.0, top);
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_drawn_from_records_and_name_each_strategy() {
        let mut records = Vec::new();
        for (i, s) in [Strategy::Copy, Strategy::Cow, Strategy::Uffd].into_iter().enumerate() {
            for size in [64u64 << 20, 256 << 20] {
                let v = (i as f64 + 1.0) * size as f64 / 1e3;
                let (clone, read, fanout) =
                    (Metric::CloneNs, Metric::FirstReadNsPerPage, Metric::Fanout16TotalBytes);
                records.push(Record::value(Suite::Clone, clone, s, size, clone, v, Unit::Ns));
                // Of another scenario than the metric's: the first touches are found by metric.
                records.push(Record::value(Suite::Clone, Scenario::Clone, s, size, read, 10.0 + v, Unit::Ns));
                let bytes = size as f64 * (i as f64 + 1.0);
                records.push(Record::value(
                    Suite::Clone,
                    Scenario::Clone,
                    s,
                    size,
                    fanout,
                    bytes,
                    Unit::Bytes,
                ));
            }
        }
        let clone = Metric::CloneNs;
        records.push(Record::skipped(Suite::Clone, clone, Strategy::Reflink, 64 << 20, clone, "no reflink"));
        let dir = std::env::temp_dir().join(format!("vmfork-plot-test-{}", std::process::id()));
        let written = write_all(&records, &dir).unwrap();
        let names: Vec<_> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["clone_latency.svg", "first_touch.svg", "fork_memory.svg"]);
        for p in &written {
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.starts_with("<svg"), "{} is an SVG", p.display());
            for s in ["copy", "cow", "uffd"] {
                assert!(svg.contains(&format!(">\n{s}\n<")), "{} has a legend entry for {s}", p.display());
            }
            assert!(!svg.contains(">\nreflink\n<"), "a skipped strategy has no entry");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_snapshot_suite_gets_curves_of_its_restore_strategies() {
        let mut records = Vec::new();
        let w25 = Scenario::Written25;
        for (i, s) in RESTORES.into_iter().enumerate() {
            for size in [256u64 << 20, 1 << 30] {
                let v = (i as f64 + 1.0) * size as f64 / 1e2;
                for m in [Metric::RestoreNs, Metric::ReadyNs, Metric::TouchP50Ns, Metric::TouchP99Ns] {
                    records.push(Record::value(Suite::Snapshot, w25, s, size, m, v, Unit::Ns));
                }
            }
        }
        let zstd = Subject::Zstd;
        records.push(Record::value(Suite::Snapshot, w25, zstd, 1 << 30, Metric::PauseNs, 1e5, Unit::Ns));
        let dir = std::env::temp_dir().join(format!("vmfork-plot-snapshot-test-{}", std::process::id()));
        let written = write_all(&records, &dir).unwrap();
        let names: Vec<_> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["snapshot_restore.svg", "snapshot_touch.svg"]);
        for p in &written {
            let svg = std::fs::read_to_string(p).unwrap();
            for s in RESTORES.map(Restore::name) {
                assert!(svg.contains(&format!(">\n{s}\n<")), "{} has a legend entry for {s}", p.display());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_remote_suite_gets_curves_of_its_restore_columns() {
        let mut records = Vec::new();
        for (i, s) in COLUMNS.into_iter().enumerate() {
            for size in [256u64 << 20, 1 << 30] {
                let v = (i as f64 + 1.0) * size as f64 / 1e2;
                for m in [Metric::RestoreNs, Metric::ReadyNs] {
                    records.push(Record::value(Suite::Remote, Scenario::Written25, s, size, m, v, Unit::Ns));
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("vmfork-plot-remote-test-{}", std::process::id()));
        let written = write_all(&records, &dir).unwrap();
        assert_eq!(written.len(), 1);
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(written[0].ends_with("remote_restore.svg"));
        for s in COLUMNS.map(RemoteColumn::name) {
            assert!(svg.contains(&format!(">\n{s}\n<")), "no legend entry for {s}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
