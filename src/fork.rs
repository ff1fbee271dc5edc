//! Forking a running VM into a new process: the fork protocol, top to bottom.
//!
//! The parent (a `vmfork run` process serving its control socket) gets a `fork` request:
//!
//! 1. pause every vCPU;
//! 2. capture vCPU, VM and device state;
//! 3. clone guest memory with the chosen strategy;
//! 4. resume the parent: it never waits for the child to boot;
//! 5. start the child as a new `vmfork` process and hand it, over a Unix socket pair,
//!    the state, its name and the memory (manifest + memfds, `SCM_RIGHTS`); for `uffd`
//!    strategies the child registers its memory and hands the userfaultfds back, and the
//!    parent's page servers fill it from then on;
//! 6. the child restores the VM, writes a **new generation id and fresh entropy** into
//!    guest memory before any vCPU runs (for a Linux guest it also raises the ACPI
//!    Generic Event Device's interrupt, still before any vCPU runs, so the first thing
//!    the guest does is take it: its vmgenid driver rereads the id and reseeds the
//!    kernel's RNG), resumes, binds its own control socket, and reports back when the
//!    guest's first report (a Linux guest: its first console line) arrives.
//!
//! Failure anywhere before step 4 resumes the parent and reports what failed; after it,
//! the parent is already running and only the child is lost. A VM started with
//! `--private` refuses every fork.
//!
//! [`fork`] is the whole protocol. Its two halves are also entries of their own, for a
//! child in this very process (the bench times a child's guest that way): [`freeze`] is
//! steps 1–4 and returns a [`Frozen`] child, and [`restore_child`] is the child's step 6
//! up to its resume, the same call [`become_child`] makes; [`Frozen::restore_here`] joins
//! the two. Every message between the two processes is a [`crate::wire`] frame.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use serde::{Deserialize, Serialize};

use crate::memory::transfer::Detached;
use crate::memory::uffd::RemoteSource;
use crate::memory::{GuestMemory, Strategy};
use crate::runtime::Identity;
use crate::vmm::guest::{self, ENTROPY_GPA, ENTROPY_LEN};
use crate::vmm::{RunState, Vm, VmState};
use crate::wire::{self, Kind};

/// Where the child's fresh entropy goes, relative to the generation id (the built-in
/// guest reseeds from it; a Linux guest reseeds from the new generation id through its
/// vmgenid driver).
pub const ENTROPY_OFFSET: u64 = ENTROPY_GPA - guest::GENID_GPA;

/// Errors of a fork.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "VM {0:?} is private (started with --private) and is never forked: to fork it, start it without --private"
    )]
    Private(String),
    #[error("cannot pause the parent: {0}")]
    Pause(crate::vmm::Error),
    #[error("cannot capture the parent's state: {0}")]
    Capture(crate::vmm::Error),
    #[error("cannot clone guest memory with {strategy}: {error}")]
    Clone { strategy: Strategy, error: crate::memory::Error },
    #[error("cannot start the child process: {0}")]
    Spawn(std::io::Error),
    #[error("the child failed: {0}")]
    Child(String),
    #[error("lost contact with the child: {0}")]
    Handoff(wire::Error),
    #[error("cannot send the child its memory: {0}")]
    SendMemory(crate::memory::Error),
    #[error("cannot serve the child's memory from its userfaultfds: {0}")]
    Serve(crate::memory::Error),
    #[error("the child's answer is not a Ready message: {0}")]
    BadReady(serde_json::Error),
    #[error("the child answered ready before it handed back its userfaultfds")]
    ReadyTooSoon,
    #[error(
        "the child did not answer within {} s and was stopped; its log: {log}",
        HANDOFF_WAIT.as_secs()
    )]
    Unresponsive { log: String },
    /// The runtime directory (where the child's log goes) is unusable.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    /// The child process ended during the handoff; `then` is how the parent noticed.
    #[error("the child process {how} before it was ready ({then}); its log: {log}")]
    Died { how: String, then: Box<Error>, log: String },
}

/// How long a parent whose handoff failed waits for the child to have exited on its own
/// (its end of the socket closes as it exits, a moment before it can be reaped), to say
/// so instead of only that contact was lost.
const EXIT_WAIT: Duration = Duration::from_millis(500);

/// What ended a child process, in words.
fn how_it_ended(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, Signal::SIGKILL, _) => {
            "was killed by signal 9 (SIGKILL: another process, or the kernel's out-of-memory killer)".into()
        }
        WaitStatus::Signaled(_, sig, _) => format!("was killed by signal {} ({})", sig as i32, sig.as_str()),
        other => format!("ended ({other:?})"),
    }
}

/// Why a child could not become the VM its parent sent: the child's side of a fork.
/// The parent hears the message (as [`Error::Child`]).
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("receiving the fork: {0}")]
    Receive(wire::Error),
    #[error("bad fork hello: {0}")]
    Hello(serde_json::Error),
    #[error("receiving memory: {0}")]
    Memory(crate::memory::Error),
    #[error("registering memory and handing back its userfaultfds: {0}")]
    HandBack(crate::memory::Error),
    /// The caller's `bind` failed (the name's control socket).
    #[error("{0}")]
    Bind(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    NewVm(#[from] NewVmError),
    #[error("resuming: {0}")]
    Resume(crate::vmm::Error),
    #[error("the guest did not run: {0}")]
    DidNotRun(RunState),
    #[error("answering the parent: {0}")]
    Answer(wire::Error),
}

/// Why captured state and memory could not become a VM of its own.
#[derive(Debug, thiserror::Error)]
pub enum NewVmError {
    #[error("cannot draw a new generation id and entropy: getrandom: {0}")]
    Random(std::io::Error),
    #[error("cannot write the new generation id into guest memory: {0}")]
    Write(crate::memory::Error),
    #[error("restoring the VM: {0}")]
    Restore(crate::vmm::Error),
    #[error("announcing the new generation id: {0}")]
    Announce(crate::vmm::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where each step's time went, in nanoseconds from the fork request.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timings {
    /// All vCPUs of the parent stopped.
    pub paused_ns: u64,
    /// State captured.
    pub captured_ns: u64,
    /// Memory cloned.
    pub cloned_ns: u64,
    /// Parent running again: the parent was paused from (about) 0 to here.
    pub parent_resumed_ns: u64,
    /// The child process is asked for (`fork` and `exec` follow).
    #[serde(default)]
    pub child_spawned_ns: u64,
    /// The child process runs vmfork's code: `exec`, the dynamic loader and the runtime
    /// took it from [`Self::child_spawned_ns`] to here.
    #[serde(default)]
    pub child_started_ns: u64,
    /// The child has the parent's `Hello` (name, VM state).
    #[serde(default)]
    pub child_hello_ns: u64,
    /// The child has its memory mapped (and, for a lazy strategy, its userfaultfds
    /// handed back).
    #[serde(default)]
    pub child_memory_ns: u64,
    /// The child restored its VM: KVM VM and vCPUs created, memory registered, state
    /// and the new identity written, its control socket bound.
    pub child_restored_ns: u64,
    /// The child's vCPUs were resumed: the guest runs from here.
    #[serde(default)]
    pub child_running_ns: u64,
    /// The child's guest sent its first report; `None` if it had not within
    /// [`FIRST_REPORT_WAIT`] but was still running (a workload that reports rarely, slowed
    /// down by first-touch faults).
    pub child_first_report_ns: Option<u64>,
}

/// An instant of a fork's timeline ([`Timings`]), in order: the end of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Paused,
    Captured,
    Cloned,
    ParentResumed,
    Spawned,
    Started,
    Hello,
    Memory,
    Restored,
    Running,
}

impl Phase {
    /// Every phase, in the order a fork passes them.
    pub const ALL: [Phase; 10] = [
        Phase::Paused,
        Phase::Captured,
        Phase::Cloned,
        Phase::ParentResumed,
        Phase::Spawned,
        Phase::Started,
        Phase::Hello,
        Phase::Memory,
        Phase::Restored,
        Phase::Running,
    ];
}

impl crate::names::Named for Phase {
    const KIND: &'static str = "fork phase";

    fn all() -> impl Iterator<Item = Self> {
        Phase::ALL.into_iter()
    }

    fn name(self) -> &'static str {
        match self {
            Phase::Paused => "paused",
            Phase::Captured => "captured",
            Phase::Cloned => "cloned",
            Phase::ParentResumed => "parent resumed",
            Phase::Spawned => "spawned",
            Phase::Started => "started",
            Phase::Hello => "hello",
            Phase::Memory => "memory",
            Phase::Restored => "restored",
            Phase::Running => "running",
        }
    }
}

crate::names::by_name!(Phase);

/// A step of the child after its parent resumed, from one [`Phase`] to the next: what
/// the fork benchmark times one by one (`fork_step_{step}_ns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForkStep {
    /// Starting the child process.
    Spawn,
    /// `exec`, the dynamic loader and vmfork's start-up.
    Exec,
    /// Receiving the parent's `Hello`.
    Hello,
    /// Receiving (and for `uffd`, registering) the memory.
    Memory,
    /// Restoring the VM: KVM VM, memory slots, state, new identity, control socket.
    Restore,
    /// Resuming the vCPUs.
    Resume,
}

impl ForkStep {
    /// Every step, in the order the child takes them.
    pub const ALL: [ForkStep; 6] = [
        ForkStep::Spawn,
        ForkStep::Exec,
        ForkStep::Hello,
        ForkStep::Memory,
        ForkStep::Restore,
        ForkStep::Resume,
    ];

    /// The phases the step runs from and to.
    pub fn span(self) -> (Phase, Phase) {
        match self {
            ForkStep::Spawn => (Phase::ParentResumed, Phase::Spawned),
            ForkStep::Exec => (Phase::Spawned, Phase::Started),
            ForkStep::Hello => (Phase::Started, Phase::Hello),
            ForkStep::Memory => (Phase::Hello, Phase::Memory),
            ForkStep::Restore => (Phase::Memory, Phase::Restored),
            ForkStep::Resume => (Phase::Restored, Phase::Running),
        }
    }
}

impl crate::names::Named for ForkStep {
    const KIND: &'static str = "fork step";

    fn all() -> impl Iterator<Item = Self> {
        ForkStep::ALL.into_iter()
    }

    fn name(self) -> &'static str {
        match self {
            ForkStep::Spawn => "spawn",
            ForkStep::Exec => "exec",
            ForkStep::Hello => "hello",
            ForkStep::Memory => "memory",
            ForkStep::Restore => "restore",
            ForkStep::Resume => "resume",
        }
    }
}

crate::names::by_name!(ForkStep);

impl Timings {
    /// When `phase` ended, in nanoseconds from the request (0 for a child's phase it
    /// never reported).
    pub fn at(&self, phase: Phase) -> u64 {
        match phase {
            Phase::Paused => self.paused_ns,
            Phase::Captured => self.captured_ns,
            Phase::Cloned => self.cloned_ns,
            Phase::ParentResumed => self.parent_resumed_ns,
            Phase::Spawned => self.child_spawned_ns,
            Phase::Started => self.child_started_ns,
            Phase::Hello => self.child_hello_ns,
            Phase::Memory => self.child_memory_ns,
            Phase::Restored => self.child_restored_ns,
            Phase::Running => self.child_running_ns,
        }
    }

    /// Each step with its end, in nanoseconds from the request, in order: where a fork's
    /// time went. The child's steps are 0 for a child that never reported them.
    pub fn phases(&self) -> [(&'static str, u64); 10] {
        Phase::ALL.map(|p| (crate::names::Named::name(p), self.at(p)))
    }

    /// How long the child's `step` took, in nanoseconds (0 where it reported neither
    /// end, or the end before the start).
    pub fn took(&self, step: ForkStep) -> u64 {
        let (from, to) = step.span();
        self.at(to).saturating_sub(self.at(from))
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for the whole host, so that a child
/// process can place its steps on its parent's timeline.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the parent sends the child first.
#[derive(Serialize, Deserialize)]
struct Hello {
    name: String,
    parent: String,
    strategy: Strategy,
    state: VmState,
    /// Nanoseconds since the fork request when this was sent, to continue the timeline.
    sent_ns: u64,
    /// The fork request's time on the host's monotonic clock ([`monotonic_ns`]): the
    /// child's steps are counted from it.
    #[serde(default)]
    t0_monotonic_ns: u64,
}

/// What the child answers once its guest runs (or fails).
#[derive(Serialize, Deserialize)]
struct Ready {
    ok: bool,
    error: Option<String>,
    pid: u32,
    /// The child's steps, in nanoseconds from the fork request.
    #[serde(default)]
    steps: ChildSteps,
}

/// When the child got through each of its steps, in nanoseconds from the fork request
/// (see [`Timings`]).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct ChildSteps {
    started_ns: u64,
    hello_ns: u64,
    memory_ns: u64,
    restored_ns: u64,
    running_ns: u64,
    first_report_ns: Option<u64>,
}

/// How long a child waits for its guest's first report before it answers without one.
pub const FIRST_REPORT_WAIT: Duration = Duration::from_secs(10);
/// The same for a Linux guest's first console line (slow under nested TCG).
pub const LINUX_FIRST_LINE_WAIT: Duration = Duration::from_secs(30);
/// How long the parent waits on the child during the handoff, at most: its longest wait
/// for a first sign of life, plus ample time to receive and restore the VM. A child that
/// takes longer is stuck; it is stopped, and the fork fails instead of hanging the parent's
/// control connection for good.
pub const HANDOFF_WAIT: Duration = Duration::from_secs(LINUX_FIRST_LINE_WAIT.as_secs() + 90);

/// One forked child, as the parent reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Child {
    pub name: String,
    pub pid: u32,
    pub strategy: Strategy,
    /// Why this strategy (what `auto` chose).
    pub why: String,
    pub timings: Timings,
}

/// Forks `vm` (named `parent`) into a new process named `child`.
pub fn fork(vm: &Vm, parent: &str, private: bool, child: &str, strategy: Strategy) -> Result<Child> {
    if private {
        return Err(Error::Private(parent.to_string()));
    }
    // 1–4: pause, capture, clone, resume.
    let Frozen { strategy, why, state, memory, mut timings, t0, t0_monotonic_ns } = freeze(vm, strategy)?;

    // 5: the child process, and everything it needs.
    let (ours, theirs) = UnixStream::pair().map_err(Error::Spawn)?;
    ours.set_read_timeout(Some(HANDOFF_WAIT)).map_err(Error::Spawn)?;
    timings.child_spawned_ns = ns(t0);
    let process = spawn_child(child, theirs)?;
    let hello = Hello {
        name: child.to_string(),
        parent: parent.to_string(),
        strategy,
        state,
        sent_ns: ns(t0),
        t0_monotonic_ns,
    };
    // A lazily filled child's page servers, once the parent's VM serves them.
    let mut served = None;
    let handoff = || -> Result<Ready> {
        let json = serde_json::to_vec(&hello).expect("a Hello serializes");
        wire::send(&ours, Kind::Hello, &json, &[]).map_err(Error::Handoff)?;
        match memory {
            ChildMemory::Ready(child_memory) => child_memory.send(&ours).map_err(Error::SendMemory)?,
            ChildMemory::Frozen(child_memory) => child_memory.send(&ours).map_err(Error::SendMemory)?,
            ChildMemory::Lazy(mut source, child_memory) => {
                child_memory.send(&ours).map_err(Error::SendMemory)?;
                source.serve_handed_back(await_hand_back(&ours)?).map_err(Error::Serve)?;
                let link = ours.try_clone().map_err(|e| Error::Handoff(wire::Error::Io(e)))?;
                served = Some(vm.page_servers().adopt(source, link));
            }
        }
        let frame = wire::recv(&ours, &[Kind::Ready]).map_err(Error::Handoff)?;
        decode_ready(&frame.payload)
    };
    let outcome = handoff();
    // The child outlives this request; reap it when it exits, and end it if the handoff
    // failed halfway (it would wait for the rest forever otherwise). Its page servers
    // serve nobody once it has exited: they go with it.
    let mut process = process;
    // A child that said why it failed, or that stopped answering, is still there; after
    // any other failure it may have died (killed, or out of memory): say so if it did.
    let died = match &outcome {
        Err(Error::Child(_) | Error::Handoff(wire::Error::TimedOut)) | Ok(_) => None,
        Err(_) => process.exited_within(EXIT_WAIT),
    };
    if died.is_none() && !matches!(outcome, Ok(Ready { ok: true, .. })) {
        process.kill();
    }
    let page_servers = served.map(|key| (vm.page_servers().clone(), key));
    std::thread::spawn(move || {
        process.wait();
        if let Some((servers, key)) = page_servers {
            servers.release(key);
        }
    });
    let log = || child_log(child).map_or_else(|e| e.to_string(), |p| p.display().to_string());
    let ready = outcome.map_err(|e| match (e, died) {
        (e, Some(status)) => Error::Died { how: how_it_ended(status), then: Box::new(e), log: log() },
        (Error::Handoff(wire::Error::TimedOut), None) => Error::Unresponsive { log: log() },
        (e, None) => e,
    })?;
    if !ready.ok {
        return Err(Error::Child(ready.error.unwrap_or_default()));
    }
    let steps = ready.steps;
    timings.child_started_ns = steps.started_ns;
    timings.child_hello_ns = steps.hello_ns;
    timings.child_memory_ns = steps.memory_ns;
    timings.child_restored_ns = steps.restored_ns;
    timings.child_running_ns = steps.running_ns;
    timings.child_first_report_ns = steps.first_report_ns;
    Ok(Child { name: child.to_string(), pid: ready.pid, strategy, why, timings })
}

fn ns(t0: Instant) -> u64 {
    t0.elapsed().as_nanos() as u64
}

fn decode_ready(payload: &[u8]) -> Result<Ready> {
    serde_json::from_slice(payload).map_err(Error::BadReady)
}

/// A lazy child's hand-back frame, or the child's `Ready` saying why there is none.
fn await_hand_back(sock: &UnixStream) -> Result<wire::Frame> {
    let frame = wire::recv(sock, &[Kind::HandBack, Kind::Ready]).map_err(Error::Handoff)?;
    if frame.kind == Kind::HandBack {
        return Ok(frame);
    }
    match decode_ready(&frame.payload)? {
        Ready { ok: false, error, .. } => Err(Error::Child(error.unwrap_or_default())),
        _ => Err(Error::ReadyTooSoon),
    }
}

/// A child as the parent's half of a fork ([`freeze`]) leaves it: everything it needs to
/// become a VM of its own, in this process ([`Frozen::restore_here`]) or another
/// ([`fork`]).
pub struct Frozen {
    /// The strategy the memory was cloned with (`auto` resolved).
    pub strategy: Strategy,
    /// Why this strategy (what `auto` chose).
    pub why: String,
    /// The parent's vCPU, VM and device state at the pause.
    pub state: VmState,
    /// The child's memory.
    pub memory: ChildMemory,
    /// Steps 1–4; the child's fields are still 0.
    pub timings: Timings,
    /// The fork request: where [`Timings`] count from.
    t0: Instant,
    /// The same instant on the host's monotonic clock, for a child process.
    t0_monotonic_ns: u64,
}

/// The child's memory, as the clone left it.
pub enum ChildMemory {
    /// Complete: hand it over and forget it.
    Ready(GuestMemory),
    /// A `cow` image, not mapped in the parent: the child maps its layers and copies
    /// its patches in (so the parent's pause is the freeze alone).
    Frozen(Detached),
    /// Filled lazily from the [`RemoteSource`], which the parent keeps serving once the
    /// child has registered the memory and handed back its userfaultfds.
    Lazy(RemoteSource, Detached),
}

/// The parent's half of a fork, steps 1–4: pauses `vm`, captures its state, clones its
/// memory with `strategy` (`auto` resolved first) and resumes it, whatever happened in
/// between. [`fork`] continues with a child process; [`Frozen::restore_here`] with a
/// child in this one.
pub fn freeze(vm: &Vm, strategy: Strategy) -> Result<Frozen> {
    let (strategy, why) = strategy.resolve();
    let (t0, t0_monotonic_ns) = (Instant::now(), monotonic_ns());
    let mut timings = Timings::default();
    // A VM its owner paused stays paused: the fork resumes only what it paused itself.
    let was_paused = matches!(vm.state(), RunState::Paused);
    vm.pause().map_err(Error::Pause)?;
    timings.paused_ns = ns(t0);
    let frozen = capture_and_clone(vm, strategy, &mut timings, t0);
    // 4: the parent runs again before the child exists.
    let resumed = if was_paused { Ok(()) } else { vm.resume() };
    timings.parent_resumed_ns = ns(t0);
    let (state, memory) = frozen?;
    resumed.map_err(Error::Pause)?;
    Ok(Frozen { strategy, why, state, memory, timings, t0, t0_monotonic_ns })
}

fn capture_and_clone(
    vm: &Vm,
    strategy: Strategy,
    timings: &mut Timings,
    t0: Instant,
) -> Result<(VmState, ChildMemory)> {
    let state = vm.capture().map_err(Error::Capture)?;
    timings.captured_ns = ns(t0);
    let clone_err = |error| Error::Clone { strategy, error };
    let memory = match strategy {
        s if s.is_lazy() => {
            let (source, child) = vm.memory().lazy_clone_for_remote(strategy).map_err(clone_err)?;
            ChildMemory::Lazy(source, child)
        }
        Strategy::Cow => ChildMemory::Frozen(vm.memory().freeze_detached().map_err(clone_err)?),
        _ => ChildMemory::Ready(vm.memory().clone_with(strategy).map_err(clone_err)?.0),
    };
    timings.cloned_ns = ns(t0);
    Ok((state, memory))
}

/// A fork's child restored in the parent's own process ([`Frozen::restore_here`]).
/// Dropping it stops the VM and drops its memory first, then the page servers that
/// filled it (fields drop in declaration order).
pub struct LocalChild {
    /// The child's VM, paused: resume it to run.
    pub vm: Vm,
    /// Steps 1–4 of the fork, and `child_restored_ns`.
    pub timings: Timings,
    /// A lazily filled child's page servers and both ends of the socket they were
    /// handed over (the child's memory watches one end for the servers' death).
    _servers: Option<(RemoteSource, UnixStream, UnixStream)>,
}

impl Frozen {
    /// The child, restored in this process as a child process would restore it
    /// ([`restore_child`]: for a lazy strategy its userfaultfds are handed back over a
    /// socket pair, to page servers that run as threads here), paused. No messages but
    /// the hand-back cross, and no control socket is bound.
    pub fn restore_here(self) -> std::result::Result<LocalChild, ChildError> {
        let Frozen { state, memory, mut timings, t0, .. } = self;
        let (vm, servers) = match memory {
            ChildMemory::Ready(memory) => (restore_child(memory, &state, None)?, None),
            ChildMemory::Frozen(memory) => {
                (restore_child(memory.map().map_err(ChildError::Memory)?, &state, None)?, None)
            }
            ChildMemory::Lazy(mut source, memory) => {
                let memory = memory.map().map_err(ChildError::Memory)?;
                let (ours, theirs) =
                    UnixStream::pair().map_err(|e| ChildError::Receive(wire::Error::Io(e)))?;
                // The restore writes the new identity into the memory it has just
                // registered: the page servers must be up by then, as a parent process's
                // are. (Should they fail to start, `ours` closes and the child's memory
                // takes it as their death.)
                let server = std::thread::spawn(move || {
                    let frame = wire::recv(&ours, &[Kind::HandBack]).map_err(ChildError::Receive)?;
                    source.serve_handed_back(frame).map_err(ChildError::HandBack)?;
                    Ok::<_, ChildError>((source, ours))
                });
                let vm = restore_child(memory, &state, Some(&theirs));
                if vm.is_err() {
                    // The hand-back may never have been sent: end the server's wait.
                    let _ = theirs.shutdown(std::net::Shutdown::Both);
                }
                let served = server.join().expect("the hand-back's receiver does not panic");
                let vm = vm?;
                let (source, ours) = served?;
                (vm, Some((source, ours, theirs)))
            }
        };
        timings.child_restored_ns = ns(t0);
        Ok(LocalChild { vm, timings, _servers: servers })
    }
}

/// Starts `vmfork __child` with `sock` as its fd 3, in a process group of its own, its
/// stdout and stderr going to its log.
///
/// With posix_spawn(3), which glibc runs as `clone(CLONE_VM | CLONE_VFORK)`: the child
/// shares the parent's address space until it execs. `fork()` (what `Command` falls back
/// to for a `pre_exec` hook) would copy the page tables of every private mapping first,
/// and a parent's guest memory is one once it has been frozen: 7.5 ms at 1 GiB, growing
/// with the guest, all of it between the fork request and the child running.
fn spawn_child(name: &str, sock: UnixStream) -> Result<ChildProcess> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    let spawn_err = |e: nix::Error| Error::Spawn(e.into());
    let log = std::fs::File::create(child_log(name)?).map_err(Error::Spawn)?;
    let null = std::fs::File::open("/dev/null").map_err(Error::Spawn)?;
    let exe = std::env::current_exe().map_err(Error::Spawn)?;
    let cstr = |b: &[u8]| std::ffi::CString::new(b).map_err(|e| Error::Spawn(e.into()));
    let path = cstr(exe.as_os_str().as_bytes())?;
    let args = [path.clone(), cstr(b"__child")?];
    let env = std::env::vars_os()
        .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<Result<Vec<_>>>()?;
    // Sources above the targets, so that no dup2 overwrites a source a later one reads;
    // each keeps close-on-exec, only its copy at 0–3 survives the exec.
    let sources = [null.as_fd(), log.as_fd(), log.as_fd(), sock.as_fd()]
        .into_iter()
        .map(|fd| fd.try_clone_to_owned().and_then(above_stdio))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(Error::Spawn)?;
    let mut actions = PosixSpawnFileActions::init().map_err(spawn_err)?;
    for (at, fd) in (0..).zip(&sources) {
        actions.add_dup2(fd.as_raw_fd(), at).map_err(spawn_err)?;
    }
    let mut attr = PosixSpawnAttr::init().map_err(spawn_err)?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(spawn_err)?;
    attr.set_pgroup(nix::unistd::Pid::from_raw(0)).map_err(spawn_err)?;
    // A VM process blocks SIGINT/SIGTERM in its threads and ignores SIGPIPE: the child
    // starts with neither, as `Command` would start it.
    attr.set_sigmask(&nix::sys::signal::SigSet::empty()).map_err(spawn_err)?;
    let mut defaults = nix::sys::signal::SigSet::empty();
    defaults.add(nix::sys::signal::SIGPIPE);
    attr.set_sigdefault(&defaults).map_err(spawn_err)?;
    let pid = posix_spawn(path.as_c_str(), &actions, &attr, &args, &env).map_err(spawn_err)?;
    Ok(ChildProcess { pid, reaped: false })
}

/// `fd` moved to a number above 3 (close-on-exec), where it is not already.
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 3 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own to the lowest free number >= 4
    // and touches no memory of ours.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 4) };
    if high < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `high` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

/// A forked VM's process, as started by [`spawn_child`].
struct ChildProcess {
    pid: nix::unistd::Pid,
    /// Reaped already: its pid may belong to another process by now.
    reaped: bool,
}

impl ChildProcess {
    fn kill(&self) {
        if !self.reaped {
            let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        }
    }

    /// Waits for the process to exit, and reaps it.
    fn wait(self) {
        if !self.reaped {
            while let Err(nix::Error::EINTR) = waitpid(self.pid, None) {}
        }
    }

    /// How the process ended, if it exits (and is reaped) within `wait`.
    fn exited_within(&mut self, wait: Duration) -> Option<WaitStatus> {
        let t = Instant::now();
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if t.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.reaped = true;
                    return Some(status);
                }
                Err(nix::Error::EINTR) => {}
                _ => return None,
            }
        }
    }
}

/// Where a child's stdout and stderr (its guest's console echo included) go.
fn child_log(name: &str) -> Result<std::path::PathBuf> {
    Ok(crate::runtime::log_path(name)?)
}

/// The child's side, run as `vmfork __child` with the socket to the parent on fd 3.
/// `bind(name)` makes the child reachable under the name the parent gave it (its
/// control socket); it is called before the guest runs, so that once the parent hears
/// the child is ready, the child answers. Returns once the guest runs: the VM, who it
/// is, and what `bind` returned; the caller then serves the VM like any other.
pub fn become_child<T, E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    sock: &UnixStream,
    bind: impl FnOnce(&str) -> std::result::Result<T, E>,
) -> std::result::Result<(Arc<Vm>, Identity, T), ChildError> {
    let started = monotonic_ns();
    let frame = wire::recv(sock, &[Kind::Hello]).map_err(ChildError::Receive)?;
    let hello: Hello = serde_json::from_slice(&frame.payload).map_err(ChildError::Hello)?;
    // Each step's end on the parent's timeline.
    let since_request = |t: u64| t.saturating_sub(hello.t0_monotonic_ns);
    let mut steps = ChildSteps {
        started_ns: since_request(started),
        hello_ns: since_request(monotonic_ns()),
        ..Default::default()
    };
    // From here on the parent waits for a Ready: a failure is told to it as well.
    let fail = move |e: ChildError| -> ChildError {
        let ready = Ready { ok: false, error: Some(e.to_string()), pid: std::process::id(), steps };
        let _ = answer(sock, &ready);
        e
    };
    let memory = GuestMemory::receive(sock).map_err(|e| fail(ChildError::Memory(e)))?;
    let hand_back = hello.strategy.is_lazy().then_some(sock);
    if let Some(sock) = hand_back {
        crate::memory::uffd::hand_back(&memory, sock).map_err(|e| fail(ChildError::HandBack(e)))?;
    }
    steps.memory_ns = since_request(monotonic_ns());
    let vm = restore_child(memory, &hello.state, None).map_err(fail)?;
    let bound = bind(&hello.name).map_err(|e| fail(ChildError::Bind(e.into())))?;
    steps.restored_ns = since_request(monotonic_ns());
    let reports = vm.subscribe();
    let (_, lines) = vm.console().subscribe();
    // The child's log must hold everything the guest prints once it runs: a Linux
    // guest's first lines are its kernel's reaction to the new generation id.
    vm.console().set_echo(true);
    vm.resume().map_err(|e| fail(ChildError::Resume(e)))?;
    steps.running_ns = since_request(monotonic_ns());
    // The guest's first sign of life (a report; a Linux guest's first console line) is
    // the proof it runs. A workload may report rarely (and run slowly at first, paying
    // for first touches), so no report within the wait is fine as long as the VM still
    // runs; a crashed or stopped guest fails the fork.
    let first = if hello.state.config.linux.is_some() {
        lines.recv_timeout(LINUX_FIRST_LINE_WAIT).map(drop)
    } else {
        reports.recv_timeout(FIRST_REPORT_WAIT).map(drop)
    };
    let first_report = match first {
        Ok(()) => Some(since_request(monotonic_ns())),
        Err(_) => match vm.state() {
            RunState::Running => {
                eprintln!("vmfork: no sign of the guest since its resume; vCPUs: {}", vm.describe_vcpus());
                None
            }
            state => return Err(fail(ChildError::DidNotRun(state))),
        },
    };
    steps.first_report_ns = first_report;
    let ready = Ready { ok: true, error: None, pid: std::process::id(), steps };
    answer(sock, &ready).map_err(ChildError::Answer)?;
    let who = Identity {
        name: hello.name,
        private: false,
        parent: Some(hello.parent),
        strategy: Some(hello.strategy),
        restored_from: None,
    };
    Ok((Arc::new(vm), who, bound))
}

/// Sends the parent the child's [`Ready`].
fn answer(sock: &UnixStream, ready: &Ready) -> std::result::Result<(), wire::Error> {
    let json = serde_json::to_vec(ready).expect("a Ready serializes");
    wire::send(sock, Kind::Ready, &json, &[])
}

/// The child's side of a fork from its memory's arrival to a VM ready to resume, in a
/// child process ([`become_child`]) or the parent's own ([`Frozen::restore_here`]): a
/// lazily filled memory (of a `uffd` or `uffd-minor` fork) is registered for remote fill
/// and its userfaultfds handed back over `hand_back` (whose closing then means the page
/// servers are gone); then the VM `state` describes is restored over `memory` as a VM of
/// its own ([`restore_as_new_vm`]). Paused.
pub fn restore_child(
    memory: GuestMemory,
    state: &VmState,
    hand_back: Option<&UnixStream>,
) -> std::result::Result<Vm, ChildError> {
    if let Some(sock) = hand_back {
        crate::memory::uffd::hand_back(&memory, sock).map_err(ChildError::HandBack)?;
    }
    Ok(restore_as_new_vm(Arc::new(memory), state)?)
}

/// The VM `state` describes, over `memory`, as a VM of its own: a new generation id and
/// fresh entropy written before any vCPU runs, and (for a Linux guest) the generation
/// change pending as an interrupt. Paused; the caller resumes it. What a fork child and
/// a VM restored from a snapshot both start from.
pub fn restore_as_new_vm(memory: Arc<GuestMemory>, state: &VmState) -> std::result::Result<Vm, NewVmError> {
    refresh_identity(&memory, state.config.genid_gpa())?;
    vm_with_new_identity(memory, state)
}

/// [`restore_as_new_vm`] for memory that holds its new identity already: a snapshot's
/// page servers write [`new_identity`] into the chunks they place, so that no page has
/// to be faulted in (from an object store: fetched) before the vCPUs run.
pub fn vm_with_new_identity(
    memory: Arc<GuestMemory>,
    state: &VmState,
) -> std::result::Result<Vm, NewVmError> {
    let vm = Vm::restore(memory, state).map_err(NewVmError::Restore)?;
    vm.notify_generation_changed().map_err(NewVmError::Announce)?;
    Ok(vm)
}

/// A fresh random VM generation id for the one at `genid_gpa`, and fresh entropy beside
/// it: the guest-physical writes, `(address, bytes)`, that make a fork child or a
/// restored VM a VM of its own.
pub fn new_identity(genid_gpa: u64) -> std::result::Result<Vec<(u64, Vec<u8>)>, NewVmError> {
    let mut bytes = [0u8; 16 + ENTROPY_LEN];
    getrandom(&mut bytes)?;
    Ok(vec![(genid_gpa, bytes[..16].to_vec()), (genid_gpa + ENTROPY_OFFSET, bytes[16..].to_vec())])
}

/// Writes [`new_identity`] into guest memory, before any of the VM's vCPUs runs.
pub fn refresh_identity(memory: &GuestMemory, genid_gpa: u64) -> std::result::Result<(), NewVmError> {
    for (gpa, bytes) in new_identity(genid_gpa)? {
        memory.write(gpa, &bytes).map_err(NewVmError::Write)?;
    }
    Ok(())
}

fn getrandom(buf: &mut [u8]) -> std::result::Result<(), NewVmError> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            return Err(NewVmError::Random(std::io::Error::last_os_error()));
        }
        filled += n as usize;
    }
    Ok(())
}

/// The checks behind the `fork_hello` and `fork_ready` fuzz targets (`fuzz/fuzz_targets/`),
/// also run over their committed corpora by `tests/snapshot_corpora.rs`. Not an API.
pub mod fuzzing {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::{Hello, Ready};

    /// Each fuzz target's name (its directory under `fuzz/corpus/`) and its check.
    pub const TARGETS: &[(&str, crate::snapshot::fuzzing::Check)] =
        &[("fork_hello", hello), ("fork_ready", ready)];

    /// The input as the payload of the `Hello` frame a child receives first, decoded as
    /// [`super::become_child`] does: no panic, and what decodes encodes to JSON that decodes to the same again.
    pub fn hello(b: &[u8]) {
        round_trip::<Hello>(b);
    }

    /// The input as the payload of the `Ready` frame a parent reads from its child,
    /// decoded as [`super::fork`] does: as for [`hello`]. (Before `Ready` was a frame it
    /// was a line; a line's trailing newline is whitespace JSON allows, so the lines of
    /// the committed corpus are valid payloads still.)
    pub fn ready(b: &[u8]) {
        round_trip::<Ready>(b);
    }

    fn round_trip<T: Serialize + DeserializeOwned>(b: &[u8]) {
        match serde_json::from_slice::<T>(b) {
            Ok(t) => {
                let once = serde_json::to_value(&t).expect("messages serialize");
                let back: T = serde_json::from_value(once.clone()).expect("an encoded message decodes");
                assert_eq!(serde_json::to_value(&back).expect("messages serialize"), once, "not stable");
            }
            Err(e) => assert!(!e.to_string().is_empty(), "refused without a reason"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_and_step_round_trips_by_one_name() {
        crate::names::check_round_trips::<Phase>();
        crate::names::check_round_trips::<ForkStep>();
        // The child's steps run from the parent's resume to the child's, one after another.
        let spans = ForkStep::ALL.map(ForkStep::span);
        assert_eq!(spans[0].0, Phase::ParentResumed);
        assert_eq!(spans[5].1, Phase::Running);
        assert!(spans.windows(2).all(|w| w[0].1 == w[1].0), "{spans:?}");
    }

    #[test]
    fn a_step_takes_the_time_between_its_phases() {
        let t = Timings {
            parent_resumed_ns: 10,
            child_spawned_ns: 15,
            child_started_ns: 40,
            ..Default::default()
        };
        assert_eq!(t.took(ForkStep::Spawn), 5);
        assert_eq!(t.took(ForkStep::Exec), 25);
        assert_eq!(t.took(ForkStep::Hello), 0, "a phase never reported");
        assert_eq!(t.phases()[3], ("parent resumed", 10));
    }

    fn ready(ok: bool, error: Option<&str>) -> Ready {
        let error = error.map(str::to_string);
        Ready { ok, error, pid: 7, steps: ChildSteps::default() }
    }

    /// A lazy child that fails before its hand-back answers with a `Ready` frame where the
    /// hand-back was due: the parent reports the child's own error.
    #[test]
    fn a_child_failing_before_its_hand_back_is_heard() {
        let (parent, child) = UnixStream::pair().unwrap();
        answer(&child, &ready(false, Some("registering memory: no userfaultfd"))).unwrap();
        match await_hand_back(&parent) {
            Err(Error::Child(e)) => assert_eq!(e, "registering memory: no userfaultfd"),
            other => panic!("{other:?}"),
        }
        answer(&child, &ready(true, None)).unwrap();
        assert!(matches!(await_hand_back(&parent), Err(Error::ReadyTooSoon)));
        wire::send(&child, Kind::HandBack, b"[]", &[]).unwrap();
        assert_eq!(await_hand_back(&parent).unwrap().kind, Kind::HandBack);
        // A child that dies instead is lost contact, not a hang.
        drop(child);
        assert!(matches!(await_hand_back(&parent), Err(Error::Handoff(wire::Error::Closed { .. }))));
    }
}
