//! The clone engine's contract, for every strategy: the child holds exactly the parent's
//! contents at the clone instant, and afterwards neither side sees the other's writes.

mod common;

use vmfork::memory::{Error, GuestMemory, MemoryOptions, PAGE_SIZE, Strategy, accounting};

const PAGES: usize = 1024; // 4 MiB: big enough for several extents and fault-around windows.

fn new_memory(pages: usize) -> GuestMemory {
    GuestMemory::with_size(pages * PAGE_SIZE, &MemoryOptions::default()).expect("create memory")
}

/// Strategies this kernel can run; reflink is checked separately where it is missing.
fn strategies() -> Vec<Strategy> {
    Strategy::CONCRETE
        .into_iter()
        .filter(|&s| {
            if s == Strategy::Reflink && vmfork::memory::reflink::probe().is_err() {
                common::skip_part(
                    "the clone matrix",
                    "reflink",
                    "this kernel lacks memfd reflink (see reflink_reports_unsupported)",
                );
                return false;
            }
            true
        })
        .collect()
}

/// Writes a distinct marker into every `stride`-th page: `tag` in the first 8 bytes, the
/// page number in the last 8.
fn stamp(mem: &GuestMemory, tag: u64, stride: usize) {
    for page in (0..mem.size() / PAGE_SIZE).step_by(stride) {
        let at = (page * PAGE_SIZE) as u64;
        mem.write(at, &(tag ^ page as u64).to_le_bytes()).unwrap();
        mem.write(at + PAGE_SIZE as u64 - 8, &(page as u64).to_le_bytes()).unwrap();
    }
}

/// One FNV-1a checksum per page.
fn checksums(mem: &GuestMemory) -> Vec<u64> {
    let mut page = vec![0u8; PAGE_SIZE];
    (0..mem.size() / PAGE_SIZE)
        .map(|p| {
            mem.read((p * PAGE_SIZE) as u64, &mut page).unwrap();
            page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
        })
        .collect()
}

fn read_u64(mem: &GuestMemory, at: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read(at, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn child_equals_parent_at_the_clone_instant() {
    for s in strategies() {
        let parent = new_memory(PAGES);
        stamp(&parent, 0xA, 1);
        let before = checksums(&parent);
        let (child, used) = parent.clone_with(s).unwrap();
        assert_eq!(used, s);
        assert_eq!(checksums(&child), before, "{s}: child differs from the clone instant");
        assert_eq!(checksums(&parent), before, "{s}: the clone changed the parent");
    }
}

#[test]
fn writes_are_isolated_both_ways() {
    for s in strategies() {
        let parent = new_memory(PAGES);
        stamp(&parent, 0xA, 1);
        let image = checksums(&parent);
        let (child, _) = parent.clone_with(s).unwrap();
        // Interleave: the parent writes even pages, the child odd pages and page 0.
        stamp(&parent, 0xB, 2);
        for page in (1..PAGES).step_by(2).chain([0]) {
            child.write((page * PAGE_SIZE + 64) as u64, &[0xCC; 64]).unwrap();
        }
        let (p, c) = (checksums(&parent), checksums(&child));
        for page in 0..PAGES {
            let parent_wrote = page % 2 == 0;
            let child_wrote = page % 2 == 1 || page == 0;
            assert_eq!(p[page] != image[page], parent_wrote, "{s}: parent page {page}");
            assert_eq!(c[page] != image[page], child_wrote, "{s}: child page {page}");
        }
    }
}

#[test]
fn fan_out_of_eight_children_stay_independent() {
    for s in strategies() {
        let parent = new_memory(PAGES);
        stamp(&parent, 0xA, 1);
        let image = checksums(&parent);
        let children: Vec<_> = (0..8).map(|_| parent.clone_with(s).unwrap().0).collect();
        for (i, c) in children.iter().enumerate() {
            c.write((i * 3 * PAGE_SIZE) as u64, &(1000 + i as u64).to_le_bytes()).unwrap();
        }
        stamp(&parent, 0xB, 5);
        for (i, c) in children.iter().enumerate() {
            let sums = checksums(c);
            for page in 0..PAGES {
                assert_eq!(sums[page] != image[page], page == i * 3, "{s}: child {i} page {page}");
            }
            assert_eq!(read_u64(c, (i * 3 * PAGE_SIZE) as u64), 1000 + i as u64);
        }
    }
}

#[test]
fn chain_of_eight_clones_of_clones() {
    for s in strategies() {
        let mut chain = vec![new_memory(PAGES)];
        stamp(&chain[0], 0, 1);
        for generation in 1..=8u64 {
            let (next, _) = chain.last().unwrap().clone_with(s).unwrap();
            // Each generation overwrites its own pages; older generations keep theirs.
            stamp(&next, generation, 7 + generation as usize);
            chain.push(next);
        }
        for (generation, mem) in chain.iter().enumerate() {
            // Rebuild what generation `generation` must hold from the rules above.
            for page in 0..PAGES {
                let owner = (1..=generation).rev().find(|&g| page % (7 + g) == 0).unwrap_or(0);
                let want = owner as u64 ^ page as u64;
                assert_eq!(
                    read_u64(mem, (page * PAGE_SIZE) as u64),
                    want,
                    "{s}: generation {generation} page {page}"
                );
            }
        }
    }
}

#[test]
fn parent_cloned_again_after_dirtying() {
    for s in strategies() {
        let parent = new_memory(PAGES);
        stamp(&parent, 1, 1);
        let (first, _) = parent.clone_with(s).unwrap();
        stamp(&parent, 2, 3);
        let (second, _) = parent.clone_with(s).unwrap();
        stamp(&parent, 3, 4);
        for page in 0..PAGES {
            let at = (page * PAGE_SIZE) as u64;
            let p = page as u64;
            assert_eq!(read_u64(&first, at), 1 ^ p, "{s}: first child page {page}");
            let second_want = if page % 3 == 0 { 2 ^ p } else { 1 ^ p };
            assert_eq!(read_u64(&second, at), second_want, "{s}: second child page {page}");
            let parent_want = if page % 4 == 0 { 3 ^ p } else { second_want };
            assert_eq!(read_u64(&parent, at), parent_want, "{s}: parent page {page}");
        }
    }
}

#[test]
fn cow_reclone_copies_only_dirtied_pages() {
    let parent = new_memory(PAGES);
    stamp(&parent, 1, 1);
    let (_first, _) = parent.clone_with(Strategy::Cow).unwrap();
    let after_first = accounting::usage(&parent).unwrap();
    // Dirty 10 scattered pages, far apart so gap filling cannot merge them.
    for i in 0..10 {
        parent.write((i * 100 * PAGE_SIZE) as u64, &[9]).unwrap();
    }
    let (_second, _) = parent.clone_with(Strategy::Cow).unwrap();
    let mem_total = accounting::footprint(&[&parent, &_first, &_second]).unwrap();
    // One full base, the 10-page patch, and the 10 pages the parent wrote and the second
    // child copied in, each its own; nothing else was copied.
    assert_eq!(mem_total, (PAGES * PAGE_SIZE + 3 * 10 * PAGE_SIZE) as u64, "footprint after re-clone");
    assert_eq!(after_first.private_bytes, 0, "a fresh cow parent owns nothing privately");
    let layout = parent.regions()[0].layout();
    match &*layout {
        vmfork::memory::Layout::Layers(image) => {
            assert_eq!(image.extents.len(), 1, "a re-clone remaps nothing: the base stays one extent");
            assert_eq!(image.patches.len(), 1);
            let want: Vec<_> = (0..10).map(|i| (i * 100 * PAGE_SIZE, (i * 100 + 1) * PAGE_SIZE)).collect();
            assert_eq!(image.patches[0].runs(), &want[..], "the patch holds exactly the dirtied pages");
        }
        vmfork::memory::Layout::File(_) => panic!("a cloned cow parent is a layered view"),
    }
}

#[test]
fn many_reclones_of_a_parent_that_writes_everywhere_stay_exact_and_bounded() {
    // Each round writes a different 1/8 of the pages, so after a few rounds the pages
    // written since the first clone cover the whole memory: folds must turn into a new
    // layer rather than a patch every child copies in, and every child must still hold
    // exactly what the parent held at its clone.
    let parent = new_memory(PAGES);
    stamp(&parent, 1, 1);
    let mut kept = Vec::new();
    for round in 0..40usize {
        for p in ((round % 8)..PAGES).step_by(8) {
            parent.write((p * PAGE_SIZE) as u64, &(round as u64 + 100).to_le_bytes()).unwrap();
        }
        let want = checksums(&parent);
        let (child, _) = parent.clone_with(Strategy::Cow).unwrap();
        assert_eq!(checksums(&child), want, "child of round {round}");
        if round % 5 == 0 {
            kept.push((child, want));
        }
        // Let background folds finish now and then, as they would between real forks.
        if round % 4 == 3 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    for (i, (child, want)) in kept.iter().enumerate() {
        assert_eq!(&checksums(child), want, "kept child {i} changed after later clones");
    }
    let layout = parent.regions()[0].layout();
    match &*layout {
        vmfork::memory::Layout::Layers(image) => {
            assert!(
                image.patches.len() <= 2 * vmfork::memory::cow::FOLD_AT,
                "{} patches",
                image.patches.len()
            );
            assert!(
                image.patch_bytes() < PAGES * PAGE_SIZE,
                "patches hold {} bytes: a child would copy the whole memory in",
                image.patch_bytes()
            );
        }
        vmfork::memory::Layout::File(_) => panic!("a cloned cow parent is a layered view"),
    }
}

#[test]
fn idle_cow_clones_share_everything() {
    let parent = new_memory(PAGES);
    stamp(&parent, 1, 1);
    let children: Vec<_> = (0..16).map(|_| parent.clone_with(Strategy::Cow).unwrap().0).collect();
    let mut all: Vec<&GuestMemory> = children.iter().collect();
    all.push(&parent);
    assert_eq!(accounting::footprint(&all).unwrap(), (PAGES * PAGE_SIZE) as u64);
    let u = accounting::usage(&children[0]).unwrap();
    assert_eq!(u, accounting::Usage { private_bytes: 0, shared_bytes: (PAGES * PAGE_SIZE) as u64 });
    children[0].write(0, &[1]).unwrap();
    assert_eq!(accounting::usage(&children[0]).unwrap().private_bytes, PAGE_SIZE as u64);
}

#[test]
fn huge_page_memory_clones_correctly() {
    // Whether THP is used depends on shmem_enabled; correctness must not.
    let opts = MemoryOptions::HUGE_PAGES;
    for s in strategies() {
        let parent = GuestMemory::with_size(8 << 20, &opts).unwrap();
        stamp(&parent, 5, 1);
        let image = checksums(&parent);
        let (child, _) = parent.clone_with(s).unwrap();
        assert_eq!(checksums(&child), image, "{s}");
        child.write(4096 * 3, &[7; 10]).unwrap();
        assert_eq!(checksums(&parent), image, "{s}: parent changed by child write");
    }
}

#[test]
fn multi_region_memory_clones_every_region() {
    let mem = GuestMemory::new(&[(0, 1 << 20), (4 << 30, 2 << 20)], &MemoryOptions::default()).unwrap();
    mem.write(4096, b"low").unwrap();
    mem.write((4 << 30) + 8192, b"high").unwrap();
    for s in strategies() {
        let (child, _) = mem.clone_with(s).unwrap();
        let mut b = [0u8; 4];
        child.read((4 << 30) + 8192, &mut b).unwrap();
        assert_eq!(&b, b"high", "{s}");
        child.read(4096, &mut b[..3]).unwrap();
        assert_eq!(&b[..3], b"low", "{s}");
    }
    assert!(matches!(mem.read(2 << 20, &mut [0u8; 4]), Err(Error::BadGuestAddress { .. })));
}

#[test]
fn reflink_reports_unsupported_and_auto_falls_back() {
    let mem = new_memory(16);
    match vmfork::memory::reflink::probe() {
        Ok(()) => {
            let (_, used) = mem.clone_with(Strategy::Auto).unwrap();
            assert_eq!(used, Strategy::Reflink, "auto must pick reflink where the kernel has it");
        }
        Err(_) => {
            let err = mem.clone_with(Strategy::Reflink).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::ReflinkUnsupported(_)), "{msg}");
            assert!(
                msg.contains("cannot reflink") && msg.contains("cow"),
                "message must say what and what to do: {msg}"
            );
            let (_, used) = mem.clone_with(Strategy::Auto).unwrap();
            assert_eq!(used, Strategy::Cow);
            let (_, why) = Strategy::Auto.resolve();
            assert!(why.contains("reflink unavailable"), "{why}");
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let o = MemoryOptions::default();
    assert!(matches!(GuestMemory::with_size(0, &o), Err(Error::BadSize(0))));
    assert!(matches!(GuestMemory::with_size(4097, &o), Err(Error::BadSize(4097))));
    assert!(matches!(GuestMemory::new(&[(0, 8192), (4096, 8192)], &o), Err(Error::BadLayout(_))));
    assert!(matches!(GuestMemory::new(&[(100, 8192)], &o), Err(Error::BadLayout(_))));
    let e = "fork".parse::<Strategy>().unwrap_err();
    assert!(e.to_string().contains("copy, cow, reflink, uffd, uffd-minor, auto"), "{e}");
    let mem = new_memory(4);
    assert!(matches!(mem.write(3 * 4096 + 4000, &[0; 200]), Err(Error::BadGuestAddress { .. })));
}

#[test]
fn uffd_child_is_filled_lazily_and_materializes() {
    let parent = new_memory(PAGES);
    stamp(&parent, 3, 1);
    let (child, _) = parent.clone_with(Strategy::Uffd).unwrap();
    assert!(child.regions()[0].is_lazy());
    assert_eq!(accounting::usage(&child).unwrap().private_bytes, 0, "nothing served before the first touch");
    assert_eq!(read_u64(&child, 5 * PAGE_SIZE as u64), 3 ^ 5);
    let served = accounting::usage(&child).unwrap().private_bytes;
    assert_eq!(
        served,
        (vmfork::memory::uffd::FAULT_AROUND * PAGE_SIZE) as u64,
        "one fault serves one window"
    );
    child.materialize().unwrap();
    assert!(!child.regions()[0].is_lazy());
    assert_eq!(checksums(&child), checksums(&parent));
}

#[test]
fn uffd_serves_discarded_pages_as_zero() {
    let parent = new_memory(64);
    stamp(&parent, 3, 1);
    let (child, _) = parent.clone_with(Strategy::Uffd).unwrap();
    assert_eq!(read_u64(&child, 0), 3);
    // Discard pages 32..48 before they were ever served: they must read as zeros.
    // (What a guest's balloon does; vmfork's own API gives no advice that changes
    // contents, so the test asks the kernel directly.)
    let at = child.regions()[0].host_addr();
    // SAFETY: pages 32..48 of the child's mapping, which this test holds no reference
    // into; MADV_REMOVE only punches them out of the child's memfd.
    let rc = unsafe { libc::madvise(at.add(32 * PAGE_SIZE).cast(), 16 * PAGE_SIZE, libc::MADV_REMOVE) };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    assert_eq!(read_u64(&child, 40 * PAGE_SIZE as u64), 0);
    assert_eq!(read_u64(&child, 50 * PAGE_SIZE as u64), 3 ^ 50);
}

/// Runs in a child process (see `uffd_dead_page_server_is_a_clear_error`).
#[test]
#[ignore = "runs only as the subprocess of uffd_dead_page_server_is_a_clear_error"]
fn dead_page_server_subprocess() {
    if std::env::var_os("VMFORK_DEAD_SERVER_CHILD").is_none() {
        eprintln!("skipped: only meaningful as the subprocess of uffd_dead_page_server_is_a_clear_error");
        return;
    }
    let strategy: Strategy = std::env::var("VMFORK_DEAD_SERVER_CHILD").unwrap().parse().unwrap();
    let parent = new_memory(PAGES);
    stamp(&parent, 3, 1);
    let (child, _) = parent.clone_with(strategy).unwrap();
    assert_eq!(read_u64(&child, 0), 3);
    child.regions()[0].with_page_server(|s| s.kill_server()).unwrap();
    if strategy == Strategy::UffdMinor {
        // A minor view holds every page itself: it carries on as a cow view.
        for page in [100, 200, PAGES - 1] {
            assert_eq!(read_u64(&child, (page * PAGE_SIZE) as u64), 3 ^ page as u64);
        }
        eprintln!("minor child carried on without its server");
        return;
    }
    // The library refuses up front...
    let err = child.read(100 * PAGE_SIZE as u64, &mut [0u8; 8]).unwrap_err();
    eprintln!("library error: {err}");
    assert!(matches!(err, Error::PageServerDied));
    // ...and a raw access to a never-served page ends the process with a message.
    let p = child.regions()[0].host_addr();
    // SAFETY: the address lies inside the child's mapping; the access is meant to fault.
    let v = unsafe { std::ptr::read_volatile(p.add(200 * PAGE_SIZE)) };
    eprintln!("unexpectedly read {v}");
}

#[test]
fn uffd_dead_page_server_is_a_clear_error() {
    dead_page_server("uffd");
}

#[test]
fn uffd_minor_child_outlives_its_page_server() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "dead_page_server_subprocess", "--ignored", "--nocapture"])
        .env("VMFORK_DEAD_SERVER_CHILD", "uffd-minor")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("minor child carried on without its server"), "{stderr}");
}

fn dead_page_server(strategy: &str) {
    let start = std::time::Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "dead_page_server_subprocess", "--ignored", "--nocapture"])
        .env("VMFORK_DEAD_SERVER_CHILD", strategy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(vmfork::memory::uffd::EXIT_PAGE_SERVER_DIED), "{strategy}: {stderr}");
    assert!(stderr.contains("library error: the page server of this lazily cloned memory died"), "{stderr}");
    assert!(stderr.contains("was never served: its page server died"), "{stderr}");
    assert!(start.elapsed() < std::time::Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn uffd_minor_children_share_clean_pages_after_reading_them() {
    let parent = new_memory(PAGES);
    stamp(&parent, 4, 1);
    let children: Vec<_> = (0..4).map(|_| parent.clone_with(Strategy::UffdMinor).unwrap().0).collect();
    for c in &children {
        assert_eq!(checksums(c), checksums(&parent));
    }
    let mut all: Vec<&GuestMemory> = children.iter().collect();
    all.push(&parent);
    // Every child read every page, yet nothing was copied: the pages were only mapped.
    assert_eq!(accounting::footprint(&all).unwrap(), (PAGES * PAGE_SIZE) as u64);
    let served: u64 = children
        .iter()
        .map(|c| c.regions()[0].with_page_server(|s| s.service_time()).flatten().unwrap().0)
        .sum();
    assert!(served > 0, "first touches must have gone through the page server");
    children[0].materialize().unwrap();
    assert!(!children[0].regions()[0].is_lazy());
}

#[test]
fn a_uffd_minor_child_forks_again_without_first_mapping_all_its_memory() {
    let parent = new_memory(PAGES);
    stamp(&parent, 1, 7);
    let (child, _) = parent.clone_with(Strategy::UffdMinor).unwrap();
    child.write(0, &[9]).unwrap();
    let (grandchild, _) = child.clone_with(Strategy::UffdMinor).unwrap();
    // Finishing the child's fill unregistered it; it did not fault in every page (one
    // page of it was touched, and the writes to it are all it maps).
    assert!(!child.regions()[0].is_lazy());
    let mapped = accounting::page_sizes(&child).unwrap().resident_bytes;
    assert!(mapped <= 16 * PAGE_SIZE as u64, "the child maps {mapped} bytes before anyone read them");
    // And every view still reads what it should: the parent's pages, but the one the
    // child wrote, as the child had it.
    let (parents, childs) = (checksums(&parent), checksums(&child));
    assert_ne!(parents[0], childs[0]);
    assert_eq!(parents[1..], childs[1..]);
    assert_eq!(checksums(&grandchild), childs);
}

#[test]
fn page_map_runs_are_sorted_and_disjoint_over_large_memory() {
    // 656 scattered dirty pages over 256 MiB: enough for PAGEMAP_SCAN to stop early and
    // report some regions twice (seen on Linux 6.18).
    let parent = new_memory(65536);
    stamp(&parent, 1, 1);
    let (_child, _) = parent.clone_with(Strategy::Cow).unwrap();
    for p in (0..65536).step_by(100) {
        parent.write((p * PAGE_SIZE) as u64, &[1]).unwrap();
    }
    let r = &parent.regions()[0];
    let runs = accounting::resident_anon_runs(r.host_addr() as usize, r.size()).unwrap();
    assert_eq!(runs.len(), 656);
    for w in runs.windows(2) {
        assert!(w[0].1 < w[1].0, "runs out of order or touching: {w:?}");
    }
    // And a re-clone over them keeps every page right.
    let (again, _) = parent.clone_with(Strategy::Cow).unwrap();
    for p in (0..65536).step_by(100) {
        // The stamp was 1 ^ page; the dirtying write replaced its low byte with 1.
        let want = ((1 ^ p as u64) & !0xff) | 1;
        assert_eq!(read_u64(&again, (p * PAGE_SIZE) as u64), want, "page {p}");
    }
}

/// A `copy` of a memory that was cloned `cow` before (a view of layers) copies what the
/// layers and patches hold, not every page of the view: reading a hole through the view
/// would put a page into the shared layer for it, and take a fault per page.
#[test]
fn a_copy_of_a_layered_memory_reads_no_holes() {
    let pages = 4096; // 16 MiB, almost all of it holes
    let parent = GuestMemory::with_size(pages * PAGE_SIZE, &MemoryOptions::SMALL_PAGES).unwrap();
    parent.write(7 * PAGE_SIZE as u64, b"layer").unwrap();
    let (cow_child, _) = parent.clone_with(Strategy::Cow).unwrap();
    parent.write(3000 * PAGE_SIZE as u64, b"written since").unwrap();
    let shared_before = accounting::usage(&cow_child).unwrap().shared_bytes;
    let (copy, _) = parent.clone_with(Strategy::Copy).unwrap();
    let read = |m: &GuestMemory, page: usize, len: usize| {
        let mut b = vec![0u8; len];
        m.read((page * PAGE_SIZE) as u64, &mut b).unwrap();
        b
    };
    assert_eq!(read(&copy, 7, 5), b"layer");
    assert_eq!(read(&copy, 3000, 13), b"written since");
    assert_eq!(read(&copy, 100, 4), [0; 4]);
    let shared_after = accounting::usage(&cow_child).unwrap().shared_bytes;
    assert!(
        shared_after <= shared_before + 4 * PAGE_SIZE as u64,
        "the copy grew the shared layers from {shared_before} to {shared_after} bytes"
    );
    let held = copy.regions()[0].layout();
    let vmfork::memory::Layout::File(f) = &*held else { panic!("a copy owns one file") };
    assert!(f.allocated_bytes().unwrap() <= 16 * PAGE_SIZE as u64, "the copy filled holes");
}
