//! A lazy clone across processes, as a forked VM uses it: the page server runs in the
//! parent process, the child's memory faults pages in from it, and the child notices
//! when the parent dies instead of hanging.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vmfork::memory::{Error, GuestMemory, MemoryOptions, PAGE_SIZE, Strategy};

const PAGES: usize = 512;

/// The parent's role, run in a subprocess: owns the source, serves the child's faults.
#[test]
#[ignore = "runs only as the subprocess of remote_page_server_fills_the_child"]
fn page_server_subprocess() {
    let Some(path) = std::env::var_os("VMFORK_REMOTE_SERVER") else {
        eprintln!("skipped: only meaningful as the subprocess of remote_page_server_fills_the_child");
        return;
    };
    let source = GuestMemory::with_size(PAGES * PAGE_SIZE, &MemoryOptions::default()).unwrap();
    for p in 0..PAGES {
        source.write((p * PAGE_SIZE) as u64, &(p as u64 * 3).to_le_bytes()).unwrap();
    }
    let strategy: Strategy = std::env::var("VMFORK_REMOTE_STRATEGY").unwrap().parse().unwrap();
    let (mut remote, child) = source.lazy_clone_for_remote(strategy).unwrap();
    // The parent keeps running and writing; the child must see the clone instant.
    source.write(0, &u64::MAX.to_le_bytes()).unwrap();
    let sock = UnixStream::connect(path).unwrap();
    child.send(&sock).unwrap();
    drop(child);
    let hand_back = vmfork::wire::recv(&sock, &[vmfork::wire::Kind::HandBack]).unwrap();
    remote.serve_handed_back(hand_back).unwrap();
    // Serve until the child hangs up (or we are killed).
    let mut buf = [0u8; 1];
    let _ = (&sock).read(&mut buf);
}

#[test]
fn remote_page_server_fills_the_child_and_its_death_is_noticed() {
    for strategy in ["uffd", "uffd-minor"] {
        remote_fill(strategy);
    }
}

fn remote_fill(strategy: &str) {
    let dir = std::env::temp_dir().join(format!("vmfork-uffd-remote-{}-{strategy}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let listener = UnixListener::bind(&dir).unwrap();
    let mut server = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "page_server_subprocess", "--ignored", "--nocapture"])
        .env("VMFORK_REMOTE_SERVER", &dir)
        .env("VMFORK_REMOTE_STRATEGY", strategy)
        .spawn()
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    let _ = std::fs::remove_file(&dir);

    let child = GuestMemory::receive(&sock).unwrap();
    vmfork::memory::uffd::hand_back(&child, &sock).unwrap();

    // Pages come from the other process, as of the clone instant.
    let read = |p: usize| {
        let mut b = [0u8; 8];
        child.read((p * PAGE_SIZE) as u64, &mut b).map(|_| u64::from_le_bytes(b))
    };
    assert_eq!(read(0).unwrap(), 0, "the parent's write after the clone must not show");
    assert_eq!(read(100).unwrap(), 300);
    child.write(100 * PAGE_SIZE as u64, &7u64.to_le_bytes()).unwrap();
    assert_eq!(read(100).unwrap(), 7);

    // The parent dies: the child must say so promptly, not hang.
    server.kill().unwrap();
    server.wait().unwrap();
    let killed = Instant::now();
    if strategy == "uffd-minor" {
        // The child maps the frozen layers itself: it carries on as a cow view.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read(400).unwrap(), 1200, "minor child must keep its memory");
        assert!(child.regions()[0].check_served().is_ok());
        return;
    }
    while child.regions()[0].check_served().is_ok() {
        assert!(killed.elapsed() < Duration::from_secs(1), "child did not notice its page server died");
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("{strategy}: child noticed its page server died after {:?}", killed.elapsed());
    assert!(matches!(read(400), Err(Error::PageServerDied)));
}
