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

use super::{BenchError, Error, Record, Suite, Unit, human_bytes};
use crate::memory::Strategy;

/// Strategies in legend order, the `native` baseline first, then [`Strategy::CONCRETE`];
/// each keeps its colour in every chart.
const ORDER: [&str; 1 + Strategy::CONCRETE.len()] = {
    let mut order = ["native"; 1 + Strategy::CONCRETE.len()];
    let mut i = 0;
    while i < Strategy::CONCRETE.len() {
        order[i + 1] = Strategy::CONCRETE[i].name();
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

/// The snapshot suite's restore strategies, in legend order, and their colours.
const SNAPSHOT_ORDER: [&str; 5] = ["file-private", "file-uffd", "zstd-uffd", "zstd-prefetch", "eager"];
const SNAPSHOT_COLOURS: [RGBColor; 5] = [
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// The remote suite's restore columns' colours, in its column order
/// (`remote::column_names`).
const REMOTE_COLOURS: [RGBColor; 7] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
];

fn colour(strategy: &str) -> RGBColor {
    let snapshot = || SNAPSHOT_ORDER.iter().position(|s| *s == strategy).map(|i| SNAPSHOT_COLOURS[i]);
    let remote =
        || super::remote::column_names().iter().position(|s| *s == strategy).map(|i| REMOTE_COLOURS[i]);
    ORDER
        .iter()
        .position(|s| *s == strategy)
        .map(|i| COLOURS[i])
        .or_else(snapshot)
        .or_else(remote)
        .unwrap_or(BLACK)
}

/// What drawing on an SVG file fails with.
type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// A failure drawing the chart at `path`.
fn draw_err(path: &Path) -> impl Fn(DrawError) -> Error + Copy + '_ {
    move |source| Error::Draw { path: path.to_path_buf(), source }
}

/// Values of `metric` (suite, scenario = metric unless given) by strategy: `(size, value)`.
fn series(records: &[Record], suite: Suite, scenario: &str, metric: &str) -> Vec<(String, Vec<(u64, f64)>)> {
    series_of(records, suite, scenario, metric, &ORDER)
}

/// [`series`] for the strategies `order`.
fn series_of(
    records: &[Record],
    suite: Suite,
    scenario: &str,
    metric: &str,
    order: &[&str],
) -> Vec<(String, Vec<(u64, f64)>)> {
    let mut out: Vec<(String, Vec<(u64, f64)>)> = Vec::new();
    for &s in order {
        let mut points: Vec<(u64, f64)> = records
            .iter()
            .filter(|r| r.suite == suite && r.scenario == scenario && r.metric == metric && r.strategy == s)
            .filter_map(|r| Some((r.size_bytes, r.value.filter(|v| *v > 0.0)?)))
            .collect();
        points.sort_by_key(|p| p.0);
        if !points.is_empty() {
            out.push((s.to_string(), points));
        }
    }
    out
}

/// Writes the charts the records have data for into `dir`; returns their paths.
pub fn write_all(records: &[Record], dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let mut written = Vec::new();
    let clone = series(records, Suite::Clone, "clone_ns", "clone_ns");
    let pause = series(records, Suite::Fork, "fork_parent_pause_ns", "fork_parent_pause_ns");
    if !clone.is_empty() || !pause.is_empty() {
        let path = dir.join("clone_latency.svg");
        latency_chart(&path, &clone, &pause)?;
        written.push(path);
    }
    let largest = records.iter().filter(|r| r.suite == Suite::Clone).map(|r| r.size_bytes).max();
    if let Some(size) = largest {
        let at = |metric: &str| -> Vec<Option<f64>> {
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
        let groups =
            [("first read", at("first_read_ns_per_page")), ("first write", at("first_write_ns_per_page"))];
        if groups.iter().any(|(_, v)| v.iter().any(Option::is_some)) {
            let path = dir.join("first_touch.svg");
            let title = format!("First touch of a page after a clone ({})", human_bytes(size));
            bar_chart(&path, &title, "ns per page (log)", &groups, true)?;
            written.push(path);
        }
    }
    let mut memory: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    let fanouts = records.iter().filter(|r| {
        (r.suite == Suite::Clone && r.metric == "fanout16_total_bytes")
            || (r.suite == Suite::Fork && r.scenario.starts_with("fanout") && r.metric == "total_bytes")
            || (r.suite == Suite::Linux && r.scenario.starts_with("idle") && r.metric == "total_bytes")
    });
    for r in fanouts {
        let label = match r.suite {
            Suite::Clone => format!("16 clones, {}", human_bytes(r.size_bytes)),
            Suite::Linux => {
                format!(
                    "{} Linux forks, {}",
                    r.scenario.trim_start_matches("idle"),
                    human_bytes(r.size_bytes)
                )
            }
            _ => format!("{} forks, {}", r.scenario.trim_start_matches("fanout"), human_bytes(r.size_bytes)),
        };
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
    let snapshot = |metric: &str| series_of(records, Suite::Snapshot, "written25", metric, &SNAPSHOT_ORDER);
    let (restore, ready) = (snapshot("restore_ns"), snapshot("ready_ns"));
    if !restore.is_empty() || !ready.is_empty() {
        let path = dir.join("snapshot_restore.svg");
        let caption = "Restore: request to vCPUs running (solid), to working set touched (dashed)";
        curves(&path, caption, &restore, &ready)?;
        written.push(path);
    }
    let (p50, p99) = (snapshot("touch_p50_ns"), snapshot("touch_p99_ns"));
    if !p50.is_empty() || !p99.is_empty() {
        let path = dir.join("snapshot_touch.svg");
        curves(&path, "First touch of a restored chunk: p50 (solid) and p99 (dashed)", &p50, &p99)?;
        written.push(path);
    }
    let remote_order = super::remote::column_names();
    let remote = |metric: &str| series_of(records, Suite::Remote, "written25", metric, &remote_order);
    let (restore, ready) = (remote("restore_ns"), remote("ready_ns"));
    if !restore.is_empty() || !ready.is_empty() {
        let path = dir.join("remote_restore.svg");
        let caption = "From the store: request to vCPUs running (solid), to working set touched (dashed)";
        curves(&path, caption, &restore, &ready)?;
        written.push(path);
    }
    Ok(written)
}

type Series = [(String, Vec<(u64, f64)>)];

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
            let c = colour(name);
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
                let name = name.clone();
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
                    .label(ORDER[s])
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
        for (i, s) in ["copy", "cow", "uffd"].into_iter().enumerate() {
            for size in [64u64 << 20, 256 << 20] {
                let v = (i as f64 + 1.0) * size as f64 / 1e3;
                records.push(Record::value(Suite::Clone, "clone_ns", s, size, "clone_ns", v, Unit::Ns));
                records.push(Record::value(
                    Suite::Clone,
                    "x",
                    s,
                    size,
                    "first_read_ns_per_page",
                    10.0 + v,
                    Unit::Ns,
                ));
                let bytes = size as f64 * (i as f64 + 1.0);
                records.push(Record::value(
                    Suite::Clone,
                    "x",
                    s,
                    size,
                    "fanout16_total_bytes",
                    bytes,
                    Unit::Bytes,
                ));
            }
        }
        records.push(Record::skipped(
            Suite::Clone,
            "clone_ns",
            "reflink",
            64 << 20,
            "clone_ns",
            "no reflink",
        ));
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
        for (i, s) in SNAPSHOT_ORDER.into_iter().enumerate() {
            for size in [256u64 << 20, 1 << 30] {
                let v = (i as f64 + 1.0) * size as f64 / 1e2;
                for m in ["restore_ns", "ready_ns", "touch_p50_ns", "touch_p99_ns"] {
                    records.push(Record::value(Suite::Snapshot, "written25", s, size, m, v, Unit::Ns));
                }
            }
        }
        records.push(Record::value(Suite::Snapshot, "written25", "zstd", 1 << 30, "pause_ns", 1e5, Unit::Ns));
        let dir = std::env::temp_dir().join(format!("vmfork-plot-snapshot-test-{}", std::process::id()));
        let written = write_all(&records, &dir).unwrap();
        let names: Vec<_> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["snapshot_restore.svg", "snapshot_touch.svg"]);
        for p in &written {
            let svg = std::fs::read_to_string(p).unwrap();
            for s in SNAPSHOT_ORDER {
                assert!(svg.contains(&format!(">\n{s}\n<")), "{} has a legend entry for {s}", p.display());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_remote_suite_gets_curves_of_its_restore_columns() {
        let mut records = Vec::new();
        for (i, s) in super::super::remote::column_names().into_iter().enumerate() {
            for size in [256u64 << 20, 1 << 30] {
                let v = (i as f64 + 1.0) * size as f64 / 1e2;
                for m in ["restore_ns", "ready_ns"] {
                    records.push(Record::value(Suite::Remote, "written25", s, size, m, v, Unit::Ns));
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("vmfork-plot-remote-test-{}", std::process::id()));
        let written = write_all(&records, &dir).unwrap();
        assert_eq!(written.len(), 1);
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(written[0].ends_with("remote_restore.svg"));
        for s in super::super::remote::column_names() {
            assert!(svg.contains(&format!(">\n{s}\n<")), "no legend entry for {s}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
