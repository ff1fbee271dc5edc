//! Criterion benches of the clone engine: clone latency per strategy and size, the cost
//! of touching a child's pages afterwards, and uffd fault service.
//!
//! Sizes: 64 MiB, 256 MiB and 1 GiB; set `VMFORK_BENCH_SIZES=64M,4G` for others and
//! `VMFORK_BENCH_HUGE=1` for transparent huge pages. The per-page benches touch a clone
//! of 64 MiB, or `VMFORK_BENCH_TOUCH_SIZE`. Strategies the kernel lacks
//! (reflink on stock kernels) are left out with a printed reason.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use vmfork::memory::{GuestMemory, MemoryOptions, PAGE_SIZE, Strategy};

fn sizes() -> Vec<usize> {
    match std::env::var("VMFORK_BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|s| vmfork::units::parse_size(s).unwrap_or_else(|e| panic!("VMFORK_BENCH_SIZES: {e}")))
            .collect(),
        Err(_) => vec![64 << 20, 256 << 20, 1 << 30],
    }
}

fn options() -> MemoryOptions {
    MemoryOptions { huge_pages: std::env::var_os("VMFORK_BENCH_HUGE").is_some() }
}

fn strategies() -> Vec<Strategy> {
    Strategy::CONCRETE
        .into_iter()
        .filter(|&s| match (s, vmfork::memory::reflink::probe()) {
            (Strategy::Reflink, Err(e)) => {
                eprintln!("reflink left out: {e}");
                false
            }
            _ => true,
        })
        .collect()
}

fn populated(size: usize) -> GuestMemory {
    let mem = GuestMemory::with_size(size, &options()).expect("guest memory");
    for at in (0..size).step_by(PAGE_SIZE) {
        mem.write(at as u64, &[0x5A; 8]).expect("write");
    }
    mem
}

/// Touches one byte per page of region 0.
fn touch(mem: &GuestMemory, write: bool) {
    let r = &mem.regions()[0];
    for p in 0..r.size() / PAGE_SIZE {
        // SAFETY: page `p` is inside the region's mapping, which the bench owns.
        unsafe {
            let ptr = r.host_addr().add(p * PAGE_SIZE);
            if write {
                std::ptr::write_volatile(ptr, 1)
            } else {
                black_box(std::ptr::read_volatile(ptr));
            }
        }
    }
}

fn clone_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("clone");
    g.sample_size(10).warm_up_time(Duration::from_millis(100));
    for size in sizes() {
        for s in strategies() {
            g.bench_with_input(BenchmarkId::new(s.name(), size >> 20), &size, |b, &size| {
                b.iter_batched(
                    || populated(size),
                    |src| {
                        let child = src.clone_with(s).expect("clone");
                        (src, child) // Dropped outside the timed part.
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
}

/// Size of the clones whose pages `first_touch` and `uffd_fault_service` touch:
/// `VMFORK_BENCH_TOUCH_SIZE`, else 64 MiB.
fn touch_size() -> usize {
    std::env::var("VMFORK_BENCH_TOUCH_SIZE").map_or(64 << 20, |s| {
        vmfork::units::parse_size(&s).unwrap_or_else(|e| panic!("VMFORK_BENCH_TOUCH_SIZE: {e}"))
    })
}

fn first_touch(c: &mut Criterion) {
    let size = touch_size();
    let pages = (size / PAGE_SIZE) as u32;
    for (name, write) in [("first_read_per_page", false), ("first_write_per_page", true)] {
        let mut g = c.benchmark_group(name);
        g.sample_size(10).warm_up_time(Duration::from_millis(100));
        for s in strategies() {
            g.bench_function(s.name(), |b| {
                let src = populated(size);
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (child, _) = src.clone_with(s).expect("clone");
                        let t = Instant::now();
                        touch(&child, write);
                        total += t.elapsed() / pages;
                    }
                    total
                })
            });
        }
    }
}

fn uffd_fault_service(c: &mut Criterion) {
    let mut g = c.benchmark_group("uffd_fault_service");
    g.sample_size(10).warm_up_time(Duration::from_millis(100));
    let src = populated(touch_size());
    g.bench_function("per_fault", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (child, _) = src.clone_with(Strategy::Uffd).expect("clone");
                touch(&child, false);
                let (faults, ns) = child.regions()[0]
                    .with_page_server(|s| s.service_time())
                    .flatten()
                    .expect("a fresh uffd child has a page server");
                total += Duration::from_nanos(ns / faults.max(1));
            }
            total
        })
    });
}

criterion_group!(benches, clone_latency, first_touch, uffd_fault_service);
criterion_main!(benches);
