//! The control socket of a real VM process (the `vmfork` binary on this host's KVM)
//! under load, from a second uid, and fed malformed input. Each test skips with a
//! printed reason only where /dev/kvm is absent (or, for the second uid, where the test
//! does not run as root).
//!
//! Not timed tests: latencies are printed (`--nocapture`), never asserted.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::control::{self, children, connect, count_entries, counter, percentile, request, status};
use common::{Runtime, kvm_available};

/// Clients hammering the socket at once.
const CLIENTS: usize = 64;
/// Forks per strategy while they do.
const FORKS_PER_STRATEGY: usize = 2;

/// The strategies this host can fork with; `reflink` needs the kernel series.
fn strategies(test: &str) -> Vec<&'static str> {
    let mut s = vec!["copy", "cow", "uffd", "uffd-minor"];
    match vmfork::memory::reflink::probe() {
        Ok(()) => s.push("reflink"),
        Err(e) => common::skip_part(test, "reflink", &format!("this kernel cannot reflink tmpfs files: {e}")),
    }
    s
}

/// What one client thread did.
#[derive(Default)]
struct Tally {
    status_sent: u64,
    status_answered: u64,
    console_sent: u64,
    console_answered: u64,
    /// Status latencies, connect to answer.
    latencies: Vec<Duration>,
    /// Guest counters seen, in order.
    counters: Vec<u64>,
}

/// One `status` request: exactly one answer line, a status of VM `name`, then the end
/// of the stream.
fn one_status(rt: &Runtime, name: &str, t: &mut Tally) {
    let start = Instant::now();
    let mut s = connect(rt, name);
    t.status_sent += 1;
    s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap_or_else(|e| panic!("status: no answer: {e}"));
    t.latencies.push(start.elapsed());
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("status: {e}: {line:?}"));
    assert_eq!(v["ok"], true, "status answered {v}");
    assert_eq!(v["status"]["name"], name, "status answered for another VM: {v}");
    assert!(v.get("children").is_none() && v.get("pause_ns").is_none(), "another request's answer: {v}");
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "status answered more than one line");
    t.status_answered += 1;
    if let Some(c) = counter(&v["status"]) {
        t.counters.push(c);
    }
}

/// One `console` request: the answer `{"ok":true}` alone, then console text (the
/// backlog holds the guest's reports), then hang up.
fn one_console(rt: &Runtime, name: &str, t: &mut Tally) {
    let mut s = connect(rt, name);
    t.console_sent += 1;
    s.write_all(b"{\"cmd\":\"console\"}\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap_or_else(|e| panic!("console: no answer: {e}"));
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("console: {e}: {line:?}"));
    assert_eq!(v, serde_json::json!({"ok": true}), "console answered something else");
    line.clear();
    r.read_line(&mut line).unwrap_or_else(|e| panic!("console: no console line: {e}"));
    assert!(line.ends_with('\n') && serde_json::from_str::<Value>(&line).is_err(), "console sent {line:?}");
    t.console_answered += 1;
}

#[test]
fn sixty_four_clients_hammer_status_and_console_while_the_vm_forks() {
    const TEST: &str = "sixty_four_clients_hammer_status_and_console_while_the_vm_forks";
    let Some(_lock) = kvm_available(TEST) else { return };
    let rt = Arc::new(Runtime::new("load"));
    rt.run("p", &[]);
    let first = counter(&status(&rt, "p")).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (rt, done) = (rt.clone(), done.clone());
            std::thread::spawn(move || {
                let mut t = Tally::default();
                let mut n = i;
                while !done.load(Ordering::Relaxed) {
                    // Mostly status, every fourth a console.
                    if n % 4 == 3 {
                        one_console(&rt, "p", &mut t);
                    } else {
                        one_status(&rt, "p", &mut t);
                    }
                    n += 1;
                }
                t
            })
        })
        .collect();
    let started = Instant::now();
    let mut forks = 0;
    for strategy in strategies(TEST) {
        for k in 0..FORKS_PER_STRATEGY {
            let name = format!("{}-{k}", strategy.replace('-', ""));
            let json = format!(r#"{{"cmd":"fork","strategy":"{strategy}","name":"{name}"}}"#);
            let v = request(&rt, "p", &json);
            assert_eq!(v["ok"], true, "fork with {strategy} under load: {v}");
            assert_eq!(v["children"][0]["name"], name.as_str(), "{v}");
            assert!(v.get("status").is_none(), "a fork answered with a status: {v}");
            forks += 1;
            let c = counter(&status(&rt, &name));
            assert!(c.is_some(), "child {name} has not reported");
            assert_eq!(request(&rt, &name, r#"{"cmd":"stop"}"#)["ok"], true);
            // The parent's guest runs on, clients and all.
            let c = counter(&status(&rt, "p")).unwrap();
            control::wait_counter_past(&rt, "p", c, &format!("after the fork with {strategy}"));
        }
    }
    // Let the clients run a little past the last fork, then collect them.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    let tallies: Vec<Tally> = clients.into_iter().map(|c| c.join().expect("a client failed")).collect();
    let took = started.elapsed();

    let mut latencies = Vec::new();
    let (mut sent, mut answered) = (0, 0);
    for (i, t) in tallies.iter().enumerate() {
        assert_eq!(t.status_sent, t.status_answered, "client {i}: status requests without an answer");
        assert_eq!(t.console_sent, t.console_answered, "client {i}: console requests without an answer");
        assert!(t.status_answered > 0, "client {i} never got a status through");
        // Each client's view of the guest never goes back.
        assert!(t.counters.windows(2).all(|w| w[0] <= w[1]), "client {i} saw the counter go back");
        sent += t.status_sent + t.console_sent;
        answered += t.status_answered + t.console_answered;
        latencies.extend_from_slice(&t.latencies);
    }
    let last = tallies.iter().filter_map(|t| t.counters.last()).max().copied().unwrap_or(0);
    // And it runs on now that they have gone.
    let last = control::wait_counter_past(&rt, "p", last.max(first), "after the load");
    latencies.sort();
    eprintln!(
        "{CLIENTS} clients, {forks} forks in {took:.1?}: {sent} requests, {answered} answers; \
         status latency p50 {:?} p99 {:?} max {:?} ({} status requests); guest counter {first} -> {last}",
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        latencies.last().copied().unwrap_or_default(),
        latencies.len(),
    );
}

/// The runtime directory is 0700 and the socket 0600; another uid is refused by both,
/// while the owner connects.
#[test]
fn a_second_uid_cannot_reach_the_control_socket() {
    const TEST: &str = "a_second_uid_cannot_reach_the_control_socket";
    let Some(_lock) = kvm_available(TEST) else { return };
    if !nix::unistd::geteuid().is_root() {
        common::skip(TEST, "needs root to run a helper process as uid 65534");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let rt = Runtime::new("second-uid");
    rt.ok(&["run", "--detach", "--name", "p", "--mem", "16M", "--workload", "idle"]);
    let dir = rt.dir.join("vmfork");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&dir), 0o700, "the runtime directory must be private");
    assert_eq!(mode(&rt.socket("p")), 0o600, "the control socket must be private");

    // The helper is this very binary, so the binary must be reachable for uid 65534:
    // a copy in a directory of its own that anybody may enter.
    let bin_dir = rt.dir.join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    std::fs::set_permissions(&rt.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let own = std::env::var_os("VMFORK_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_vmfork").into());
    let bin = bin_dir.join("vmfork");
    std::fs::copy(own, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .env("XDG_RUNTIME_DIR", &rt.dir)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ran, err) = as_nobody(&["--help"]);
    assert!(ran, "uid 65534 cannot run the helper at all, so its refusal below would prove nothing: {err}");

    // The directory stops it first...
    let (ok, err) = as_nobody(&["pause", "p"]);
    assert!(!ok, "uid 65534 paused root's VM");
    assert!(err.contains("control socket") && err.contains("Permission denied"), "{err}");
    eprintln!("uid 65534 through the 0700 directory: {}", err.trim());
    // ...and where the directory lets it through, the socket does.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let (ok, err) = as_nobody(&["stop", "p"]);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!ok, "uid 65534 stopped root's VM through a 0600 socket");
    assert!(err.contains("control socket") && err.contains("Permission denied"), "{err}");
    eprintln!("uid 65534 at the 0600 socket: {}", err.trim());
    // Neither attempt removed the socket as stale.
    assert!(rt.socket("p").exists(), "a refused client removed the socket");
    assert_eq!(status(&rt, "p")["state"], "running");
    rt.ok(&["pause", "p"]);
    rt.ok(&["resume", "p"]);
}

/// The answer to `bytes` sent as one connection's request (the stream then shut for
/// writing): every line the VM sent back before it hung up, read with timeouts.
fn exchange(rt: &Runtime, bytes: &[u8]) -> Vec<Value> {
    let mut s = connect(rt, "p");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The VM reads one line of at most 4096 bytes, answers and hangs up: writing more
    // may fail, which is its business, not a failure.
    match s.write_all(bytes) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        Err(e) => panic!("writing {} bytes: {e}", bytes.len()),
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return out,
            Ok(_) => out.push(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer is not JSON: {e}: {line:?}")),
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) => {
                panic!("no answer to {:?}: {e}", String::from_utf8_lossy(&bytes[..bytes.len().min(80)]))
            }
        }
    }
}

/// Exactly one answer: an error, or an `ok` answer of the expected kind.
fn one_answer(answers: &[Value], what: &str) -> Value {
    assert_eq!(answers.len(), 1, "{what}: {} answers: {answers:?}", answers.len());
    let v = answers[0].clone();
    match &v["ok"] {
        Value::Bool(false) => assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {v}"),
        Value::Bool(true) => {}
        _ => panic!("{what}: neither an answer nor an error: {v}"),
    }
    v
}

#[test]
fn the_fuzz_corpus_and_broken_clients_on_a_live_socket_leave_the_vm_running() {
    const TEST: &str = "the_fuzz_corpus_and_broken_clients_on_a_live_socket_leave_the_vm_running";
    let Some(_lock) = kvm_available(TEST) else { return };
    let rt = Runtime::new("live-fuzz");
    rt.run("p", &[]);
    let pid = status(&rt, "p")["pid"].as_i64().unwrap() as i32;
    let (threads_before, fds_before) = idle_baseline(pid);

    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/api_request");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the api_request corpus is empty");
    let (mut errors, mut answered, mut held_back) = (0, 0, Vec::new());
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let what = f.file_name().unwrap().to_string_lossy().into_owned();
        // What the VM would do with the line it reads (up to the first newline): a
        // request that would stop, fork or snapshot the VM is not sent.
        let first = bytes.split(|&b| b == b'\n').next().unwrap();
        let first = &first[..first.len().min(4096)];
        let parsed = std::str::from_utf8(first).ok().and_then(|l| vmfork::api::parse_request(l).ok());
        use vmfork::api::Request;
        if let Some(Request::Stop | Request::Fork { .. } | Request::Snapshot { .. }) = &parsed {
            held_back.push(format!("{what} ({parsed:?})"));
            continue;
        }
        if parsed == Some(Request::Console) {
            // It streams until the client hangs up: its first line, then hang up.
            let mut s = connect(&rt, "p");
            s.write_all(&bytes).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&line).unwrap(),
                serde_json::json!({"ok": true}),
                "{what}"
            );
            answered += 1;
            continue;
        }
        let v = one_answer(&exchange(&rt, &bytes), &what);
        if v["ok"] == true {
            assert!(parsed.is_some(), "{what}: the VM accepted what the parser refuses: {v}");
            answered += 1;
        } else {
            assert!(
                parsed.is_none() || matches!(parsed, Some(Request::RestoreStats)),
                "{what}: the VM refused a request the parser accepts ({parsed:?}): {v}"
            );
            errors += 1;
        }
        if parsed == Some(Request::Pause) {
            assert_eq!(request(&rt, "p", r#"{"cmd":"resume"}"#)["ok"], true);
        }
    }
    eprintln!(
        "{} corpus files: {errors} refused, {answered} answered, {} held back: {held_back:?}",
        files.len(),
        held_back.len()
    );

    // A line longer than any limit: a status request padded past the 4096 bytes read.
    let mut long = b"{\"cmd\":\"status\"".to_vec();
    long.resize(4 << 20, b' ');
    long.extend_from_slice(b"}\n");
    let v = one_answer(&exchange(&rt, &long), "a 4 MiB line");
    assert_eq!(v["ok"], false, "a line past the limit was accepted: {v}");
    // Bytes that are not UTF-8 get an error too, not a hang-up.
    let v = one_answer(&exchange(&rt, b"{\"cmd\":\"st\xffatus\"}\n"), "a line that is not UTF-8");
    assert_eq!(v["ok"], false, "{v}");

    // A client that connects and never sends does not hold up anyone else.
    let silent = connect(&rt, "p");
    // Clients that send half a line and go.
    for _ in 0..100 {
        let mut s = connect(&rt, "p");
        s.write_all(b"{\"cmd\":\"sta").unwrap();
    }
    let c = counter(&status(&rt, "p")).unwrap();
    control::wait_counter_past(&rt, "p", c, "after the corpus and the broken clients");
    drop(silent);

    // Nothing stays behind: every connection's thread and fd is gone again.
    back_to(pid, threads_before, &fds_before, "the clients left");
    assert!(children(pid).is_empty(), "the corpus started a process: {:?}", children(pid));
    assert_eq!(status(&rt, "p")["state"], "running");
}

/// What VM process `pid` holds when idle: the thread that answered the last status
/// request may still be on its way out (with its connection's fds), so the leanest of a
/// second's samples.
fn idle_baseline(pid: i32) -> (usize, Vec<String>) {
    let (mut threads_before, mut fds_before) = (count_entries(pid, "task"), control::fds(pid));
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        let (threads, fds) = (count_entries(pid, "task"), control::fds(pid));
        if threads < threads_before || (threads == threads_before && fds.len() < fds_before.len()) {
            (threads_before, fds_before) = (threads, fds);
        }
    }
    (threads_before, fds_before)
}

/// Waits (10 s at most) until VM process `pid` holds `threads` threads and `fds` again.
fn back_to(pid: i32, threads_before: usize, fds_before: &[String], after: &str) {
    let t = Instant::now();
    loop {
        let (threads, fds) = (count_entries(pid, "task"), control::fds(pid));
        if threads == threads_before && fds == fds_before {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "10 s after {after}, the VM has {threads} threads (before: {threads_before}) and \
             fds {fds:?} (before: {fds_before:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest counter of a console line `report vcpu=0 ... counter=N ...`.
fn console_counter(line: &str) -> Option<u64> {
    if !line.starts_with("report vcpu=0 ") {
        return None;
    }
    line.split_whitespace().find_map(|w| w.strip_prefix("counter="))?.parse().ok()
}

/// Connections that never send their request line, or only half of it, each hold a
/// thread of the VM process while the line is awaited: they are answered with an error
/// and hung up on once `REQUEST_WAIT` has passed since they connected, not before, and
/// `status` answers meanwhile. A console connection (a request whose answer goes on
/// past the wait) is not cut off.
#[test]
fn connections_that_never_send_a_request_are_hung_up_on_after_the_wait() {
    const TEST: &str = "connections_that_never_send_a_request_are_hung_up_on_after_the_wait";
    const IDLE: usize = 64;
    let Some(_lock) = kvm_available(TEST) else { return };
    let wait = vmfork::api::REQUEST_WAIT;
    let rt = Runtime::new("idle");
    rt.run("p", &[]);
    let pid = status(&rt, "p")["pid"].as_i64().unwrap() as i32;
    let mut console = connect(&rt, "p");
    console.write_all(b"{\"cmd\":\"console\"}\n").unwrap();
    let mut console = BufReader::new(console);
    let mut line = String::new();
    console.read_line(&mut line).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), serde_json::json!({"ok": true}));
    let (threads_before, fds_before) = idle_baseline(pid);

    let connected = Instant::now();
    let idle: Vec<_> = (0..IDLE)
        .map(|i| {
            let mut s = connect(&rt, "p");
            if i % 4 == 0 {
                s.write_all(b"{\"cmd\":\"sta").unwrap();
            }
            s
        })
        .collect();
    // Each of them holds a thread: the premise of the test.
    let t = Instant::now();
    while count_entries(pid, "task") < threads_before + IDLE {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{IDLE} connections but only {} threads (idle: {threads_before})",
            count_entries(pid, "task")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The VM answers others and runs on meanwhile.
    let c = counter(&status(&rt, "p")).unwrap();
    let c = control::wait_counter_past(&rt, "p", c, "with idle connections open");
    let meanwhile = connected.elapsed();
    if meanwhile >= wait {
        eprintln!("note: status took {meanwhile:.1?}, past the {wait:?} wait: not shown to answer meanwhile");
    }

    // Every one of them gets one error line, then the end of the stream: after the wait
    // (counted from its connect, which came after `connected`) and well within twice it.
    for (i, s) in idle.into_iter().enumerate() {
        s.set_read_timeout(Some(
            (2 * wait).saturating_sub(connected.elapsed()).max(Duration::from_millis(1)),
        ))
        .unwrap();
        let mut got = String::new();
        if let Err(e) = BufReader::new(s).read_to_string(&mut got) {
            panic!(
                "connection {i} is still open {:.1?} after it connected, without a request line ({e}); \
                 it got {got:?}",
                connected.elapsed()
            );
        }
        let at = connected.elapsed();
        assert!(at >= wait, "connection {i} was hung up on after {at:.1?}, before the {wait:?} wait");
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 1, "connection {i}: {got:?}");
        let v: Value =
            serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("connection {i}: {e}: {got:?}"));
        assert_eq!(v["ok"], false, "connection {i}: {v}");
        let err = v["error"].as_str().unwrap();
        assert!(err.contains("no request line within"), "connection {i}: {err}");
    }
    eprintln!("{IDLE} silent connections hung up on after {:.1?}", connected.elapsed());
    back_to(pid, threads_before, &fds_before, "the silent connections were hung up on");

    // The console, open all along, still streams: a report newer than any before.
    let now = counter(&status(&rt, "p")).unwrap();
    assert!(now > c);
    console.get_ref().set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    loop {
        line.clear();
        let n = console.read_line(&mut line).unwrap_or_else(|e| panic!("the console went quiet: {e}"));
        assert!(n > 0, "the console was hung up on");
        if console_counter(&line).is_some_and(|k| k > now) {
            break;
        }
    }
    assert_eq!(status(&rt, "p")["state"], "running");
}

/// A VM process that cannot start a thread for a connection (here: a pids cgroup at its
/// limit) refuses that connection with an error or a hang-up, and serves again once it
/// can: the thread spawn once panicked in the accepting thread, which ended the control
/// socket for good.
#[test]
fn a_connection_that_gets_no_thread_is_refused_and_the_socket_serves_on() {
    const TEST: &str = "a_connection_that_gets_no_thread_is_refused_and_the_socket_serves_on";
    let Some(_lock) = kvm_available(TEST) else { return };
    let cg = match common::cgroup::Cgroup::new("pids", "vmfork-test-pids") {
        Ok(cg) => cg,
        Err(why) => {
            return common::skip(TEST, &format!("needs a pids cgroup to cap the VM's threads: {why}"));
        }
    };
    let rt = Runtime::new("no-thread");
    rt.run("p", &[]);
    let pid = status(&rt, "p")["pid"].as_i64().unwrap() as i32;
    let (threads, _) = idle_baseline(pid);
    cg.add(pid).unwrap();
    // Not one thread more.
    cg.set_limit(Some(threads as u64)).unwrap();
    let (mut errors, mut hangups) = (0, 0);
    for _ in 0..5 {
        let answers = exchange(&rt, b"{\"cmd\":\"status\"}\n");
        match answers.as_slice() {
            [] => hangups += 1,
            [v] => {
                assert_eq!(v["ok"], false, "a status was answered without a thread to answer it: {v}");
                let e = v["error"].as_str().unwrap();
                assert!(e.contains("cannot start a thread"), "{e}");
                errors += 1;
            }
            more => panic!("{} answers: {more:?}", more.len()),
        }
    }
    eprintln!("at the thread limit: {errors} errors, {hangups} hang-ups; pids.current {}", cg.usage());
    cg.set_limit(None).unwrap();
    let c = counter(&status(&rt, "p")).expect("the VM answers again once it may start threads");
    control::wait_counter_past(&rt, "p", c, "after the thread limit was lifted");
    cg.send_home(pid).unwrap();
}
