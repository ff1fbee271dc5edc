//! The control socket of a running VM.
//!
//! Each `vmfork run` process serves one VM on a Unix socket `NAME.sock` in the per-user
//! runtime directory ([`runtime_dir`]: `$XDG_RUNTIME_DIR/vmfork`, else `/run/vmfork` for
//! root, else `/tmp/vmfork-UID`; the directory is mode 0700 and the socket 0600).
//!
//! Protocol: the client sends one line of JSON, the server answers with one line of JSON.
//!
//! | request | answer |
//! |---|---|
//! | `{"cmd":"status"}` | `{"ok":true,"status":{name,pid,state,vcpus,workload,memory_bytes,private_bytes,shared_bytes,page_servers,uptime_secs,reports}}` |
//! | `{"cmd":"pause"}` | `{"ok":true,"pause_ns":N}` |
//! | `{"cmd":"resume"}` | `{"ok":true,"resume_ns":N}` |
//! | `{"cmd":"stop"}` | `{"ok":true}`, then the VM stops, the socket is removed and the process exits |
//! | `{"cmd":"console"}` | `{"ok":true}`, then console lines (plain text, backlog first) until the VM stops or the client hangs up |
//! | `{"cmd":"fork","strategy":"cow","name":"child","count":1}` (all but `cmd` optional) | `{"ok":true,"children":[{name,pid,strategy,why,timings}]}` once every child's guest runs |
//! | `{"cmd":"snapshot","dir":"/abs/path","level":1,"chunk":8192,"stop":false}` (all but `cmd` and `dir` optional) | lines `{"progress":{done_bytes,total_bytes,stored_bytes,elapsed_secs}}` while the chunks are written, then `{"ok":true,"summary":{...}}`; the VM is paused only while its memory is frozen, and stops after the answer with `"stop":true` |
//! | `{"cmd":"restore-stats"}` | `{"ok":true,"snapshot":DIR,"stats":{zero_faults,decoded_faults,prefetched_chunks,bytes_decoded,fault_p50_us,fault_p99_us,misses,ws_precision,ws_recall,trace}}` for a VM restored from a snapshot |
//!
//! Anything else gets `{"ok":false,"error":"..."}` and the VM keeps running. A client
//! that has not sent its whole request line within [`REQUEST_WAIT`] of connecting gets
//! such an error and is hung up on: each connection holds a thread of the VM process
//! while its line is awaited. The wait is for the request only; an answer may take as
//! long as its request needs (a fork answers once its child's guest runs).
//!
//! Requests that pause or resume the VM (fork, snapshot, pause, resume) run one at a
//! time: a pause or resume sent while a fork or snapshot is in flight is answered after
//! it. Every other request is answered at once.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::memory::Strategy;
use crate::runtime::{Identity, check_name, names, socket_path};
use crate::vmm::{Report, RunState, Vm};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// How long a connection may take to send its request line, from the connect (a client
/// that dribbles bytes gets no more time than one that sends none).
pub const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// How long the accepting thread pauses after it could not accept a connection or start
/// a thread for one (and how long it tries to tell that client so).
const REFUSE_BACKOFF: Duration = Duration::from_millis(10);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no VM named {0:?} (see `vmfork ls`)")]
    NoSuchVm(String),
    #[error("VM {name:?} is not running: its control socket {path} was stale and has been removed")]
    Stale { name: String, path: PathBuf },
    #[error("a VM named {0:?} is already running")]
    NameTaken(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    #[error("control socket {path}: {error}")]
    Socket { path: PathBuf, error: io::Error },
    #[error("the VM answered: {0}")]
    Refused(String),
    #[error("bad answer from the VM: {0}")]
    BadAnswer(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A request to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Stop,
    Console,
    /// Fork the VM into `count` new processes (see [`crate::fork`]).
    Fork {
        #[serde(default = "auto")]
        strategy: Strategy,
        /// Name of the (first) child; default `PARENT-N`.
        #[serde(default)]
        name: Option<String>,
        #[serde(default = "one")]
        count: u32,
    },
    /// Snapshot the VM into the new directory `dir` (see [`crate::snapshot`]).
    Snapshot {
        dir: PathBuf,
        #[serde(default)]
        level: Option<i32>,
        /// Chunk size in bytes: 4096 or 8192.
        #[serde(default)]
        chunk: Option<u32>,
        /// Stop the VM once the snapshot is written.
        #[serde(default)]
        stop: bool,
        /// Take it against this parent: chunks the parent holds unchanged are referenced.
        #[serde(default)]
        parent: Option<ParentSpec>,
    },
    /// What the page servers of a VM restored from a snapshot did.
    #[serde(rename = "restore-stats")]
    RestoreStats,
}

/// The parent of a snapshot: where the new snapshot's manifest will say it is, and a
/// directory holding its `snapshot.json`, `index.bin` and `hashes.bin` (the parent itself
/// when it is a directory; a copy fetched by the client when it is in a store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentSpec {
    pub location: String,
    pub meta: PathBuf,
}

fn auto() -> Strategy {
    Strategy::Auto
}

fn one() -> u32 {
    1
}

/// What `status` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    /// Forked from this VM (None for a VM started with `vmfork run`).
    #[serde(default)]
    pub parent: Option<String>,
    /// How its memory was cloned from the parent.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub private: bool,
    /// Restored from this snapshot directory.
    #[serde(default)]
    pub restored_from: Option<PathBuf>,
    pub pid: u32,
    pub state: String,
    /// The state with its detail (the exit reason of a stopped VM).
    pub state_detail: String,
    pub vcpus: u32,
    pub workload: String,
    pub memory_bytes: u64,
    /// Guest memory only this VM holds, from the clone engine's accounting.
    pub private_bytes: u64,
    /// Guest memory this VM shares with clones.
    pub shared_bytes: u64,
    /// Page servers this VM runs for its lazily filled (`uffd`, `uffd-minor`) children.
    #[serde(default)]
    pub page_servers: usize,
    pub uptime_secs: f64,
    pub reports: Vec<Option<Report>>,
}

/// Connects to VM `name`. A socket nobody listens on is removed ([`Error::Stale`]).
pub fn connect(name: &str) -> Result<UnixStream> {
    let path = socket_path(name)?;
    match UnixStream::connect(&path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NoSuchVm(name.to_string())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(&path);
            Err(Error::Stale { name: name.to_string(), path })
        }
        Err(error) => Err(Error::Socket { path, error }),
    }
}

/// Sends `req` to VM `name` and returns the answer (an `ok: true` object) and the stream,
/// which carries the console for [`Request::Console`].
pub fn call(name: &str, req: &Request) -> Result<(serde_json::Value, BufReader<UnixStream>)> {
    let mut s = connect(name)?;
    let path = || socket_path(name).unwrap_or_default();
    let line = serde_json::to_string(req).expect("requests serialize");
    s.write_all(format!("{line}\n").as_bytes()).map_err(|error| Error::Socket { path: path(), error })?;
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    r.read_line(&mut answer).map_err(|error| Error::Socket { path: path(), error })?;
    let v: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| Error::BadAnswer(format!("{e}: {answer:?}")))?;
    if v["ok"] == serde_json::Value::Bool(true) {
        Ok((v, r))
    } else {
        Err(Error::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()))
    }
}

/// Sends `req` to VM `name` and hands every `{"progress": ...}` line before the answer to
/// `progress`; returns the answer (an `ok: true` object).
pub fn call_with_progress(
    name: &str,
    req: &Request,
    progress: &mut dyn FnMut(&serde_json::Value),
) -> Result<serde_json::Value> {
    let mut s = connect(name)?;
    let path = || socket_path(name).unwrap_or_default();
    let line = serde_json::to_string(req).expect("requests serialize");
    s.write_all(format!("{line}\n").as_bytes()).map_err(|error| Error::Socket { path: path(), error })?;
    let mut r = BufReader::new(s);
    loop {
        let mut answer = String::new();
        let n = r.read_line(&mut answer).map_err(|error| Error::Socket { path: path(), error })?;
        if n == 0 {
            return Err(Error::BadAnswer("the VM hung up before it answered".into()));
        }
        let v: serde_json::Value =
            serde_json::from_str(&answer).map_err(|e| Error::BadAnswer(format!("{e}: {answer:?}")))?;
        if let Some(p) = v.get("progress") {
            progress(p);
            continue;
        }
        if v["ok"] == serde_json::Value::Bool(true) {
            return Ok(v);
        }
        return Err(Error::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()));
    }
}

/// Serves VM `vm` under `name` until the VM stops. Removes the socket on the way out.
pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Binds the socket of `name`, cleaning up a stale one (and saying so on stderr).
    pub fn bind(name: &str) -> Result<(Server, UnixListener)> {
        let path = socket_path(name)?;
        match connect(name) {
            Ok(_) => return Err(Error::NameTaken(name.to_string())),
            Err(Error::Stale { path, .. }) => {
                eprintln!("vmfork: removed stale control socket {}", path.display())
            }
            Err(_) => {}
        }
        // Bound and listening under a temporary name, then renamed into place: a client
        // polling for the VM (`run --detach`, `restore --detach`) must never find the
        // socket between bind and listen, where its connect is refused and it would
        // remove the socket as stale.
        for p in crate::runtime::remove_stale_bindings()? {
            eprintln!("vmfork: removed the socket {} of a VM process killed as it bound it", p.display());
        }
        let tmp = crate::runtime::binding_path(name, std::process::id())?;
        let _ = std::fs::remove_file(&tmp);
        let err = |error| Error::Socket { path: path.clone(), error };
        let l = UnixListener::bind(&tmp).map_err(err)?;
        // A link, not a rename: a VM of this name that bound meanwhile keeps its socket.
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::hard_link(&tmp, &path));
        let _ = std::fs::remove_file(&tmp);
        match placed {
            Ok(()) => Ok((Server { path }, l)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::NameTaken(name.to_string())),
            Err(e) => Err(err(e)),
        }
    }

    /// Accepts connections on `listener` in a background thread, one thread each. A
    /// connection that gets no thread (the process is at a limit of threads or memory)
    /// is told so and hung up on, and the server goes on: a thread spawn that panicked
    /// once ended the accepting thread, and with it the control socket for good.
    pub fn spawn(&self, listener: UnixListener, who: Identity, vm: Arc<Vm>) {
        let freezes = Arc::new(Mutex::new(()));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of fds, say: wait a little rather than spin.
                        eprintln!("vmfork: control socket: accept: {e}");
                        std::thread::sleep(REFUSE_BACKOFF);
                        continue;
                    }
                };
                let reply = conn.try_clone();
                let (vm, who, freezes) = (vm.clone(), who.clone(), freezes.clone());
                let spawned = std::thread::Builder::new().spawn(move || {
                    let _ = handle(conn, &who, &vm, &freezes);
                });
                if let Err(e) = spawned {
                    eprintln!("vmfork: control socket: no thread for a connection: {e}");
                    if let Ok(mut w) = reply {
                        let _ = w.set_write_timeout(Some(REFUSE_BACKOFF));
                        let _ = error(&mut w, format!("the VM process cannot start a thread to answer: {e}"));
                    }
                    std::thread::sleep(REFUSE_BACKOFF);
                }
            }
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(w: &mut impl Write, v: serde_json::Value) -> io::Result<()> {
    w.write_all(format!("{v}\n").as_bytes())
}

fn error(w: &mut impl Write, msg: impl std::fmt::Display) -> io::Result<()> {
    answer(w, serde_json::json!({"ok": false, "error": msg.to_string()}))
}

/// The status of `vm`.
pub fn status(who: &Identity, vm: &Vm) -> Status {
    // Resident pages as the kernel counts them: a forked parent and child are two
    // processes mapping the same layers.
    let usage = crate::memory::accounting::resident_usage(vm.memory()).unwrap_or_default();
    let state = vm.state();
    Status {
        name: who.name.clone(),
        parent: who.parent.clone(),
        strategy: who.strategy,
        private: who.private,
        restored_from: who.restored_from.clone(),
        pid: std::process::id(),
        state: state.name().to_string(),
        state_detail: state.to_string(),
        vcpus: vm.config().vcpus,
        workload: if vm.config().linux.is_some() { "linux".into() } else { vm.config().workload.to_string() },
        memory_bytes: vm.memory().size() as u64,
        private_bytes: usage.private_bytes,
        shared_bytes: usage.shared_bytes,
        page_servers: vm.page_servers().count(),
        uptime_secs: vm.uptime().as_secs_f64(),
        reports: vm.latest_reports(),
    }
}

/// Serves one connection. `freezes` is held by every request that pauses or resumes
/// the VM (fork, snapshot, pause, resume) for as long as it runs: the VM's pause is one
/// flag, not a count, so a second fork in flight would find the VM already paused, and
/// the first fork's resume would then let the guest run while the second captured and
/// cloned it (or the second's pause would fail, seeing it run again); a `resume`
/// between a fork's pause and its clone would do the same. A pause or resume sent
/// during a fork waits until the fork has answered.
fn handle(conn: UnixStream, who: &Identity, vm: &Vm, freezes: &Mutex<()>) -> io::Result<()> {
    let mut w = conn.try_clone()?;
    // Bytes, not a `String`: a line that is not UTF-8 gets its error answer like any
    // other bad request, instead of a hang-up without a word.
    let mut line = Vec::new();
    let until = Instant::now() + REQUEST_WAIT;
    let read = BufReader::new(Deadline { conn: &conn, until }.take(MAX_REQUEST)).read_until(b'\n', &mut line);
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            // The client may never read this; a full socket buffer must not hold the
            // thread either.
            w.set_write_timeout(Some(REQUEST_WAIT))?;
            return error(
                &mut w,
                format!(
                    "no request line within {} s of connecting ({} bytes came); send one JSON line \
                     like {{\"cmd\":\"status\"}}",
                    REQUEST_WAIT.as_secs(),
                    line.len()
                ),
            );
        }
        Err(e) => return Err(e),
    }
    // The answer may take long (a fork's), and a console streams: no timeout from here.
    conn.set_read_timeout(None)?;
    let req: Request = match std::str::from_utf8(&line).map_err(BadRequest::NotUtf8).and_then(parse_request) {
        Ok(r) => r,
        Err(e) => {
            return error(
                &mut w,
                format!("bad request ({e}); send one JSON line like {{\"cmd\":\"status\"}}"),
            );
        }
    };
    let timed = |f: &dyn Fn() -> crate::vmm::Result<()>| {
        let t = Instant::now();
        f().map(|()| t.elapsed().as_nanos() as u64)
    };
    match req {
        Request::Status => answer(&mut w, serde_json::json!({"ok": true, "status": status(who, vm)})),
        Request::Fork { strategy, name, count } => {
            let forked = {
                let _one_at_a_time = freezes.lock().unwrap_or_else(|p| p.into_inner());
                fork_many(vm, who, strategy, name, count)
            };
            match forked {
                Ok(children) => answer(&mut w, serde_json::json!({"ok": true, "children": children})),
                Err(e) => error(&mut w, crate::error::Report(&e)),
            }
        }
        Request::Snapshot { dir, level, chunk, stop, parent } => {
            let defaults = crate::snapshot::TakeOptions::default();
            let opts = crate::snapshot::TakeOptions {
                level: level.unwrap_or(defaults.level),
                chunk_size: chunk.unwrap_or(defaults.chunk_size),
            };
            if !dir.is_absolute() {
                return error(&mut w, format!("snapshot dir {} must be an absolute path", dir.display()));
            }
            // The client may hang up: the snapshot is written to the end all the same.
            let mut out = w.try_clone()?;
            let mut progress = |p: &crate::snapshot::Progress| {
                let _ = answer(&mut out, serde_json::json!({"progress": p}));
            };
            let parent = match parent.map(|p| crate::snapshot::Parent::load(&p.meta, p.location)).transpose()
            {
                Ok(p) => p,
                Err(e) => return error(&mut w, e),
            };
            let taken = {
                let _one_at_a_time = freezes.lock().unwrap_or_else(|p| p.into_inner());
                crate::snapshot::take(vm, &who.name, who.private, &dir, &opts, parent.as_ref(), &mut progress)
            };
            match taken {
                Ok(summary) => {
                    let sent = answer(&mut w, serde_json::json!({"ok": true, "summary": summary}));
                    if stop {
                        vm.stop();
                    }
                    sent
                }
                Err(e) => error(&mut w, e),
            }
        }
        Request::RestoreStats => match crate::snapshot::restored_report() {
            Some((dir, stats)) => {
                answer(&mut w, serde_json::json!({"ok": true, "snapshot": dir, "stats": stats}))
            }
            None => error(&mut w, format!("VM {} was not restored from a snapshot", who.name)),
        },
        Request::Pause => {
            let _one_at_a_time = freezes.lock().unwrap_or_else(|p| p.into_inner());
            match timed(&|| vm.pause()) {
                Ok(ns) => answer(&mut w, serde_json::json!({"ok": true, "pause_ns": ns})),
                Err(e) => error(&mut w, e),
            }
        }
        Request::Resume => {
            let _one_at_a_time = freezes.lock().unwrap_or_else(|p| p.into_inner());
            match timed(&|| vm.resume()) {
                Ok(ns) => answer(&mut w, serde_json::json!({"ok": true, "resume_ns": ns})),
                Err(e) => error(&mut w, e),
            }
        }
        Request::Stop => {
            // Answer first: once the VM stops, the process exits. The client waits for
            // the socket to go away.
            let sent = answer(&mut w, serde_json::json!({"ok": true}));
            vm.stop();
            sent
        }
        Request::Console => {
            let (backlog, rx) = vm.console().subscribe();
            answer(&mut w, serde_json::json!({"ok": true}))?;
            for l in backlog {
                writeln!(w, "{l}")?;
            }
            loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(l) => writeln!(w, "{l}")?,
                    Err(_) if matches!(vm.state(), RunState::Stopped(_)) => return Ok(()),
                    Err(_) => {}
                }
            }
        }
    }
}

/// Reads from a connection until `until`: each read waits only for what is left of
/// the time, so that the whole request line, not each byte of it, has [`REQUEST_WAIT`].
/// Past it, reads fail with [`io::ErrorKind::TimedOut`] (or `WouldBlock`, the socket's
/// own timeout).
struct Deadline<'a> {
    conn: &'a UnixStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no request line in time"));
        }
        self.conn.set_read_timeout(Some(left))?;
        let mut conn = self.conn;
        conn.read(buf)
    }
}

/// Why a `fork` request made no (or not every) child; its report is the `error` the
/// client sees.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("count {0}: fork 1 to 64 children at a time")]
    Count(u32),
    /// No name for a child: taken, not a valid name, or the runtime directory unreadable.
    #[error(transparent)]
    Name(#[from] Error),
    #[error(transparent)]
    Fork(#[from] crate::fork::Error),
}

/// Forks `count` children one after the other (each fork pauses the parent briefly).
fn fork_many(
    vm: &Vm,
    who: &Identity,
    strategy: Strategy,
    name: Option<String>,
    count: u32,
) -> std::result::Result<Vec<crate::fork::Child>, ForkError> {
    if count == 0 || count > 64 {
        return Err(ForkError::Count(count));
    }
    let mut children = Vec::new();
    for i in 0..count {
        let child = match (&name, i) {
            (Some(n), 0) => n.clone(),
            (Some(n), i) => format!("{n}-{i}"),
            (None, _) => free_child_name(&who.name)?,
        };
        check_name(&child).map_err(Error::from)?;
        if connect(&child).is_ok() {
            return Err(Error::NameTaken(child).into());
        }
        children.push(crate::fork::fork(vm, &who.name, who.private, &child, strategy)?);
    }
    Ok(children)
}

/// The first free `PARENT-N`.
fn free_child_name(parent: &str) -> Result<String> {
    let taken = names()?;
    Ok((1..).map(|i| format!("{parent}-{i}")).find(|n| !taken.contains(n)).expect("some name is free"))
}

/// Parses one request line: `{"cmd": NAME}` plus the fields of that [`Request`].
/// Serde ignores unknown fields of internally tagged enums, so they are checked here,
/// against the fields the parsed request serializes (every field, `null` when unset):
/// the enum is the one list of what each command takes.
pub fn parse_request(line: &str) -> std::result::Result<Request, BadRequest> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(BadRequest::Json)?;
    let Some(o) = v.as_object() else { return Err(BadRequest::NotAnObject) };
    if !o.contains_key("cmd") {
        return Err(BadRequest::NoCmd);
    }
    let keys: Vec<String> = o.keys().cloned().collect();
    let req: Request = serde_json::from_value(v).map_err(BadRequest::Json)?;
    let known = serde_json::to_value(&req).map_err(BadRequest::Json)?;
    if let Some(k) = keys.into_iter().find(|k| known.get(k.as_str()).is_none()) {
        return Err(BadRequest::UnknownField(k));
    }
    Ok(req)
}

/// Why a request line is not a request.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("{0}")]
    Json(serde_json::Error),
    #[error("a request is a JSON object like {{\"cmd\":\"status\"}}")]
    NotAnObject,
    #[error("a request needs a \"cmd\"")]
    NoCmd,
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("a request is UTF-8 text: {0}")]
    NotUtf8(std::str::Utf8Error),
}

/// Whether `path` is a socket file (for tests and listings).
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).map(|m| m.file_type().is_socket()).unwrap_or(false)
}

/// The check behind the `api_request` fuzz target (`fuzz/fuzz_targets/`), also run over
/// its committed corpus by `tests/snapshot_corpora.rs`. Not an API.
pub mod fuzzing {
    use super::{BadRequest, MAX_REQUEST, parse_request};

    /// Each fuzz target's name (its directory under `fuzz/corpus/`) and its check.
    pub const TARGETS: &[(&str, crate::snapshot::fuzzing::Check)] = &[("api_request", request_line)];

    /// The input as a request line (lossy UTF-8, cut to the longest line the server
    /// reads) to [`parse_request`]: it never panics; an accepted request serializes to a
    /// line that parses back to the same request, and the input's object named no field
    /// but the request's own; a refusal says why in words.
    pub fn request_line(b: &[u8]) {
        let b = &b[..b.len().min(MAX_REQUEST as usize)];
        let line = String::from_utf8_lossy(b);
        match parse_request(&line) {
            Ok(req) => {
                let again = serde_json::to_string(&req).expect("requests serialize");
                assert_eq!(parse_request(&again).expect("a parsed request parses again"), req, "{line:?}");
                let input: serde_json::Value = serde_json::from_str(line.trim()).expect("accepted JSON");
                let known = serde_json::to_value(&req).expect("requests serialize");
                for k in input.as_object().expect("accepted an object").keys() {
                    assert!(known.get(k).is_some(), "{line:?}: field {k:?} accepted but not part of {req:?}");
                }
            }
            Err(e) => {
                assert!(!e.to_string().is_empty(), "{line:?}: refused without a reason");
                if let BadRequest::NotAnObject | BadRequest::NoCmd = e {
                    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("refused as JSON");
                    assert!(v.get("cmd").is_none(), "{line:?}: refused for want of a cmd it has");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `error` a client hears for a refused fork request.
    fn fork_reply(e: &ForkError) -> String {
        let mut w = Vec::new();
        error(&mut w, crate::error::Report(e)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&w).unwrap();
        assert_eq!(v["ok"], false);
        v["error"].as_str().unwrap().to_string()
    }

    #[test]
    fn a_refused_fork_tells_the_client_why_and_what_to_do() {
        let private = ForkError::from(crate::fork::Error::Private("web".into()));
        let text = crate::error::tests::report_once(&private);
        assert_eq!(fork_reply(&private), text);
        assert!(text.contains(r#""web" is private (started with --private)"#), "{text}");
        assert!(text.contains("never forked") && text.contains("start it without --private"), "{text}");

        let count = ForkError::Count(65);
        assert_eq!(fork_reply(&count), "count 65: fork 1 to 64 children at a time");

        let taken = ForkError::from(Error::NameTaken("web-1".into()));
        assert_eq!(fork_reply(&taken), r#"a VM named "web-1" is already running"#);
    }

    #[test]
    fn requests_parse_and_junk_does_not() {
        assert_eq!(parse_request(" {\"cmd\":\"pause\"}\n").unwrap(), Request::Pause);
        let junk = ["", "status", r#"{"cmd":"reboot"}"#, r#"{"cmd":"stop","now":1}"#, "[1]", "{}"];
        for bad in junk {
            assert!(parse_request(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn every_field_a_request_serializes_is_accepted_and_no_other() {
        let parent = ParentSpec { location: "s3://b/p".into(), meta: "/tmp/m".into() };
        let all = [
            Request::Fork { strategy: Strategy::Cow, name: Some("c".into()), count: 2 },
            Request::Snapshot {
                dir: "/s".into(),
                level: Some(3),
                chunk: Some(4096),
                stop: true,
                parent: Some(parent),
            },
            Request::RestoreStats,
        ];
        for req in all {
            let line = serde_json::to_string(&req).unwrap();
            assert_eq!(parse_request(&line).unwrap(), req, "{line}");
            let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
            v["surplus"] = 1.into();
            let err = parse_request(&v.to_string()).unwrap_err().to_string();
            assert!(err.contains("unknown field") && err.contains("surplus"), "{err}");
        }
        let nested = r#"{"cmd":"snapshot","dir":"/s","parent":{"location":"/p","meta":"/p","x":1}}"#;
        assert!(parse_request(nested).unwrap_err().to_string().contains("unknown field"));
        assert!(parse_request(r#"{"cmd":"snapshot","dir":"/s"}"#).is_ok(), "optional fields are optional");
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "vm-1", "web_2.test"] {
            check_name(good).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
