//! The VM subcommands of `vmfork`: `run`, `ls`, `pause`, `resume`, `stop`, `console`.
//!
//! Human output by default, `--json` for scripts; errors go to stderr as one sentence
//! saying what to do, with exit code 1 (2 for usage errors, from clap).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{self, Request, Server, Status};
use crate::memory::MemoryOptions;
use crate::vmm::{ExitReason, Vm, VmConfig, Workload, guest};

/// VM subcommands (flattened into the `vmfork` command line).
#[derive(clap::Subcommand, Debug)]
pub enum VmCommand {
    /// Run a VM with the built-in guest, or a Linux guest with --kernel (in the foreground
    /// unless --detach).
    Run(RunArgs),
    /// List the VMs of this user.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a VM's vCPUs.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Stop a VM (its process exits).
    Stop { name: String },
    /// Stream a VM's console (serial output and guest reports) until it stops.
    Console { name: String },
    /// Fork a running VM into new, independent VMs (each its own process).
    Fork(ForkArgs),
    /// Snapshot a running VM into a new directory of zstd-compressed chunks; or inspect a
    /// snapshot, or record a restored VM's working set into it.
    Snapshot(SnapshotArgs),
    /// Start a new VM from a snapshot (a directory or s3://BUCKET/PREFIX); its memory
    /// fills lazily from the chunks.
    Restore(RestoreArgs),
    /// Upload a snapshot directory to an S3-compatible object store.
    Push {
        dir: PathBuf,
        /// s3://BUCKET/PREFIX (a prefix that holds no snapshot yet).
        to: String,
        /// The store's address (default: $AWS_ENDPOINT_URL).
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// The child's end of a fork (started by the parent VM with its socket on fd 3).
    #[command(name = "__child", hide = true)]
    Child,
}

/// Options of `vmfork fork`.
#[derive(clap::Args, Debug, Clone)]
pub struct ForkArgs {
    /// The running VM to fork.
    pub parent: String,
    /// Name of the child (with --count N, children are NAME, NAME-1, ...); default PARENT-N.
    #[arg(long)]
    pub name: Option<String>,
    /// How to clone guest memory.
    #[arg(long, value_enum, default_value_t = crate::memory::Strategy::Auto)]
    pub strategy: crate::memory::Strategy,
    /// How many children.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `vmfork snapshot`.
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub sub: Option<SnapshotSub>,
    /// The running VM to snapshot.
    #[arg(required = true)]
    pub name: Option<String>,
    /// The new directory to write (it must not exist), or s3://BUCKET/PREFIX to upload
    /// the snapshot to an object store.
    #[arg(required = true)]
    pub dir: Option<PathBuf>,
    /// The object store's address for an s3:// snapshot (default: $AWS_ENDPOINT_URL).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// zstd level (1 fast; 3 a little smaller).
    #[arg(long, default_value_t = 1)]
    pub level: i32,
    /// Chunk size: 4K or 8K.
    #[arg(long, default_value = "8K", value_parser = parse_chunk)]
    pub chunk: u32,
    /// Stop the VM once the snapshot is written.
    #[arg(long)]
    pub stop: bool,
    /// An earlier snapshot of this VM, or of the VM it was restored or forked from (a
    /// directory or s3://BUCKET/PREFIX): chunks unchanged since are referenced in it, not
    /// stored again. The new snapshot needs the parent to restore.
    #[arg(long)]
    pub parent: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmfork snapshot inspect|record-ws`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum SnapshotSub {
    /// Show a snapshot's index and working set, and with --vm what a restore of it did.
    Inspect {
        /// A snapshot directory or s3://BUCKET/PREFIX.
        dir: PathBuf,
        #[arg(long)]
        endpoint: Option<String>,
        /// A VM restored from this snapshot: add its faults by source and prefetch figures.
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Store the first-touch order of VM --from (restored from DIR) as DIR's working set,
    /// and put those chunks first in the packs: later restores prefetch them.
    RecordWs {
        dir: PathBuf,
        #[arg(long)]
        from: String,
    },
}

/// A `--chunk` that is not a chunk size snapshots use.
#[derive(Debug, thiserror::Error)]
enum ChunkError {
    #[error(transparent)]
    Size(#[from] crate::units::SizeError),
    #[error("chunk size {0}: 4K or 8K")]
    Unsupported(usize),
}

fn parse_chunk(s: &str) -> Result<u32, ChunkError> {
    match crate::units::parse_size(s)? {
        4096 => Ok(4096),
        8192 => Ok(8192),
        n => Err(ChunkError::Unsupported(n)),
    }
}

/// Options of `vmfork restore`.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The snapshot directory, or s3://BUCKET/PREFIX.
    pub dir: PathBuf,
    /// The object store's address for an s3:// snapshot (default: $AWS_ENDPOINT_URL).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Name of the new VM (default: the first free vmN).
    #[arg(long)]
    pub name: Option<String>,
    /// Decode all memory before the VM runs instead of on first touch.
    #[arg(long)]
    pub eager: bool,
    /// Do not prefetch the snapshot's working set.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Start the VM in a background process and return once it runs.
    #[arg(long)]
    pub detach: bool,
    /// Also append the console to this file.
    #[arg(long)]
    pub console: Option<PathBuf>,
}

/// Options of `vmfork run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Name of the VM (default: the first free vmN).
    #[arg(long)]
    pub name: Option<String>,
    /// Guest memory size, e.g. 512M or 1G.
    #[arg(long, default_value = "512M", value_parser = crate::units::parse_size)]
    pub mem: usize,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// What the guest does: count[:EVERY], idle, exit, touch:MIB[:seq|rand][:EVERY].
    #[arg(long, default_value = "count")]
    pub workload: Workload,
    /// Start the VM in a background process and return once it runs.
    #[arg(long)]
    pub detach: bool,
    /// Never fork this VM (it may hold secrets): fork requests are refused.
    #[arg(long)]
    pub private: bool,
    /// Back guest memory with 4 KiB pages only. By default vmfork asks for transparent
    /// huge pages (MADV_HUGEPAGE), which keep a fork's pause short at multi-GiB sizes (far
    /// fewer page-table entries to zap); shmem gives them when
    /// /sys/kernel/mm/transparent_hugepage/shmem_enabled is `advise` or `always`, and
    /// vmfork says so when it is not.
    #[arg(long, conflicts_with = "huge_pages")]
    pub small_pages: bool,
    /// Ask for transparent huge pages: the default, accepted so that older scripts work.
    #[arg(long, hide = true)]
    pub huge_pages: bool,
    /// Boot this Linux kernel (bzImage or ELF vmlinux) instead of the built-in guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs for --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel", default_value = crate::vmm::linux::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Also append the console (serial output) to this file.
    #[arg(long)]
    pub console: Option<PathBuf>,
}

/// Runs a VM subcommand.
pub fn run(cmd: VmCommand) -> ExitCode {
    let result = match cmd {
        VmCommand::Run(args) if args.detach => run_detached(args),
        VmCommand::Run(args) => run_foreground(args),
        VmCommand::Ls { json } => ls(json),
        VmCommand::Pause { name } => simple(&name, Request::Pause, "paused"),
        VmCommand::Resume { name } => simple(&name, Request::Resume, "resumed"),
        VmCommand::Stop { name } => stop(&name),
        VmCommand::Console { name } => console(&name),
        VmCommand::Fork(args) => fork(args),
        VmCommand::Snapshot(args) => snapshot(args),
        VmCommand::Push { dir, to, endpoint } => push(&dir, &to, endpoint),
        VmCommand::Restore(args) if args.detach => restore_detached(args),
        VmCommand::Restore(args) => restore_foreground(args),
        VmCommand::Child => run_child(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmfork: {}", crate::error::Report(&*e));
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

/// Errors of the command itself; the library's pass through as they are.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("fork child: {0}")]
    Child(crate::fork::ChildError),
    #[error(
        "--parent {}: a snapshot in an object store cannot reference a local directory; push the parent (vmfork push) and name it as s3://BUCKET/PREFIX",
        .0.display()
    )]
    LocalParent(PathBuf),
    #[error("--parent {}: {error}", path.display())]
    Parent { path: PathBuf, error: std::io::Error },
    #[error("--parent {}: not a UTF-8 path", .0.display())]
    ParentNotUtf8(PathBuf),
}

fn free_name() -> Result<String, api::Error> {
    let taken = crate::runtime::names()?;
    Ok((1..).map(|i| format!("vm{i}")).find(|n| !taken.contains(n)).expect("some name is free"))
}

/// Huge pages are asked for with MADV_HUGEPAGE, which shmem honours only in some modes:
/// says so (once per command) when this host's mode will give 4 KiB pages.
pub fn note_if_huge_pages_unavailable(opts: &MemoryOptions) {
    if !opts.huge_pages {
        return;
    }
    if let Some(why) = crate::memory::accounting::huge_pages_unavailable() {
        eprintln!("vmfork: note: {why}");
    }
}

fn run_foreground(args: RunArgs) -> CliResult {
    let name = match args.name {
        Some(n) => n,
        None => free_name()?,
    };
    // SIGINT/SIGTERM stop the VM cleanly (socket removed): block them in every thread
    // and wait for them in one.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::SIGINT);
    signals.add(nix::sys::signal::SIGTERM);
    signals.thread_block()?;
    let (server, listener) = Server::bind(&name)?;
    let opts = MemoryOptions { huge_pages: !args.small_pages };
    // (A detached VM says it in its log as well as in the command that started it.)
    note_if_huge_pages_unavailable(&opts);
    // RAM laid out around the 3-4 GiB hole, as on a PC, for either guest.
    let memory = Arc::new(guest::memory(args.mem, &opts)?);
    let mut config = VmConfig { vcpus: args.vcpus, workload: args.workload, ..Default::default() };
    let t0 = Instant::now();
    let vm = match &args.kernel {
        Some(kernel) => {
            if let Err(why) = crate::vmm::linux::host_can_boot_linux() {
                eprintln!("vmfork: warning: {why}; trying anyway");
            }
            config.linux = Some(Default::default());
            let boot = crate::vmm::linux::LinuxBoot {
                kernel: kernel.clone(),
                initrd: args.initrd.clone(),
                cmdline: args.cmdline.clone(),
            };
            Vm::create_linux(memory, &config, &boot)?
        }
        None => Vm::create(memory, &config)?,
    };
    let vm = Arc::new(vm);
    if let Some(path) = &args.console {
        vm.console().set_file(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    }
    vm.console().set_echo(true);
    let what = match &args.kernel {
        Some(k) => format!("Linux {} (set up in {:.1} ms)", k.display(), t0.elapsed().as_secs_f64() * 1e3),
        None => format!("workload {}", args.workload),
    };
    eprintln!(
        "vmfork: VM {name} running (pid {}), {} vCPU(s), {} MiB, {what}{}",
        std::process::id(),
        args.vcpus,
        args.mem >> 20,
        if args.private { ", private (never forked)" } else { "" }
    );
    let who = crate::runtime::Identity { name, private: args.private, ..Default::default() };
    serve(who, vm, server, listener, signals)
}

/// Serves a running VM on its control socket until it stops; SIGINT/SIGTERM (blocked by
/// the caller, in every thread) stop it cleanly.
fn serve(
    who: crate::runtime::Identity,
    vm: Arc<Vm>,
    server: Server,
    listener: std::os::unix::net::UnixListener,
    signals: nix::sys::signal::SigSet,
) -> CliResult {
    let (name, parent) = (who.name.clone(), who.parent.clone());
    vm.console().set_echo(true);
    server.spawn(listener, who.clone(), vm.clone());
    let stopper = vm.clone();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            stopper.stop();
        }
    });
    let reason = loop {
        if let Some(r) = vm.wait_exit(Duration::from_millis(100)) {
            break r;
        }
        // A lazily forked child whose parent (its page server) died cannot go on: the
        // pages it was never sent are gone. Stop now, loudly, rather than at the first
        // touch of one of them.
        if vm.memory().regions().iter().any(|r| r.check_served().is_err()) {
            match &who.restored_from {
                Some(dir) => eprintln!(
                    "vmfork: VM {name}: guest memory could not be restored from the snapshot {} (the error above names the chunk); stopping",
                    dir.display()
                ),
                None => eprintln!(
                    "vmfork: VM {name}: its page server (the parent VM {}) died before all guest memory was served; stopping",
                    parent.as_deref().unwrap_or("?")
                ),
            }
            vm.stop();
            drop(server);
            return Ok(ExitCode::FAILURE);
        }
    };
    vm.stop();
    drop(server);
    eprintln!("vmfork: VM {name} {reason}");
    Ok(match reason {
        ExitReason::Stopped | ExitReason::Reset => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn run_detached(args: RunArgs) -> CliResult {
    // Fail here, with the real reason, rather than in a background process.
    kvm_ioctls::Kvm::new().map_err(crate::vmm::Error::KvmOpen)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => free_name()?,
    };
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |a: &dyn AsRef<std::ffi::OsStr>| argv.push(a.as_ref().to_os_string());
    for a in ["run", "--name", &name, "--mem", &args.mem.to_string(), "--vcpus", &args.vcpus.to_string()] {
        push(&a);
    }
    push(&"--workload");
    push(&args.workload.to_string());
    if args.private {
        push(&"--private");
    }
    if args.small_pages {
        push(&"--small-pages");
    }
    note_if_huge_pages_unavailable(&MemoryOptions { huge_pages: !args.small_pages });
    if let Some(k) = &args.kernel {
        push(&"--kernel");
        push(k);
        push(&format!("--cmdline={}", args.cmdline));
    }
    if let Some(i) = &args.initrd {
        push(&"--initrd");
        push(i);
    }
    if let Some(c) = &args.console {
        push(&"--console");
        push(c);
    }
    spawn_detached(&name, &argv)
}

/// Starts `vmfork ARGV` (which serves VM `name`) in a background process logging to the
/// runtime directory, and returns once the VM answers on its socket.
fn spawn_detached(name: &str, argv: &[std::ffi::OsString]) -> CliResult {
    match api::connect(name) {
        Ok(_) => return Err(api::Error::NameTaken(name.to_string()).into()),
        Err(e @ api::Error::Stale { .. }) => eprintln!("vmfork: {e}"),
        Err(e @ api::Error::Runtime(crate::runtime::Error::BadName(_))) => return Err(e.into()),
        Err(_) => {}
    }
    let log_path: PathBuf = crate::runtime::log_path(name)?;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let log =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&log_path)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("VM {name} did not start ({status}): {}", log.trim()).into());
        }
        if api::call(name, &Request::Status).is_ok() {
            println!("{name} (pid {}, log {})", child.id(), log_path.display());
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            return Err(format!("VM {name} did not answer within 20 s; see {}", log_path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn restore_detached(args: RestoreArgs) -> CliResult {
    kvm_ioctls::Kvm::new().map_err(crate::vmm::Error::KvmOpen)?;
    // Refuse a bad snapshot here, with its reason, not in the background.
    let (_, dir) = open_snapshot(&args.dir, args.endpoint.clone())?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => free_name()?,
    };
    let mut argv: Vec<std::ffi::OsString> =
        vec!["restore".into(), dir.into(), "--name".into(), name.clone().into()];
    if let Some(e) = &args.endpoint {
        argv.push("--endpoint".into());
        argv.push(e.into());
    }
    if args.eager {
        argv.push("--eager".into());
    }
    if args.no_prefetch {
        argv.push("--no-prefetch".into());
    }
    if let Some(c) = &args.console {
        argv.push("--console".into());
        argv.push(c.into());
    }
    spawn_detached(&name, &argv)
}

/// `vmfork restore` in the foreground: the VM runs in this process until it stops.
fn restore_foreground(args: RestoreArgs) -> CliResult {
    let t0 = Instant::now();
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::SIGINT);
    signals.add(nix::sys::signal::SIGTERM);
    signals.thread_block()?;
    let (snap, dir) = open_snapshot(&args.dir, args.endpoint.clone())?;
    let state = snap.state()?;
    let snap = Arc::new(snap);
    let name = match args.name {
        Some(n) => n,
        None => free_name()?,
    };
    let (server, listener) = Server::bind(&name)?;
    let opts = crate::snapshot::RestoreOptions { eager: args.eager, no_prefetch: args.no_prefetch };
    let (memory, stats) = crate::snapshot::restore_memory(snap.clone(), &opts)?;
    let memory = Arc::new(memory);
    // A VM of its own, as a fork child: its new identity is in the memory already,
    // written into its chunk as that is placed.
    let vm = Arc::new(crate::fork::vm_with_new_identity(memory, &state)?);
    let prefetch =
        snap.working_set.as_ref().filter(|_| !args.no_prefetch && !args.eager).map(|w| w.chunks.len());
    crate::snapshot::set_restored(snap, stats);
    if let Some(path) = &args.console {
        vm.console().set_file(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    }
    vm.console().set_echo(true);
    vm.resume()?;
    eprintln!(
        "vmfork: VM {name} restored from {} (pid {}), running {:.2} ms after the request; memory {}",
        dir.display(),
        std::process::id(),
        t0.elapsed().as_secs_f64() * 1e3,
        if args.eager {
            "decoded before start".to_string()
        } else {
            match prefetch {
                Some(n) => format!("lazy, prefetching a working set of {n} chunks"),
                None => "lazy (no working set prefetched)".to_string(),
            }
        }
    );
    let who = crate::runtime::Identity { name, restored_from: Some(dir), ..Default::default() };
    serve(who, vm, server, listener, signals)
}

/// `vmfork __child`: becomes the VM a parent forked, on the socket it left on fd 3.
fn run_child() -> CliResult {
    use std::os::fd::FromRawFd;
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::SIGINT);
    signals.add(nix::sys::signal::SIGTERM);
    signals.thread_block()?;
    // SAFETY: the parent's fork made fd 3 our end of its socket pair (see fork.rs), and
    // nothing else in this process owns it.
    let sock = unsafe { std::os::unix::net::UnixStream::from_raw_fd(3) };
    let bind = api::Server::bind;
    let (vm, who, (server, listener)) = crate::fork::become_child(&sock, bind).map_err(Error::Child)?;
    eprintln!(
        "vmfork: VM {} forked from {} ({}), pid {}",
        who.name,
        who.parent.as_deref().unwrap_or("?"),
        who.strategy.map_or("?".into(), |s| s.to_string()),
        std::process::id()
    );
    serve(who, vm, server, listener, signals)
}

/// `vmfork fork`: asks a running VM to fork and prints what happened.
fn fork(args: ForkArgs) -> CliResult {
    let req = Request::Fork { strategy: args.strategy, name: args.name, count: args.count };
    let (answer, _) = api::call(&args.parent, &req)?;
    let children: Vec<crate::fork::Child> = serde_json::from_value(answer["children"].clone())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&children)?);
        return Ok(ExitCode::SUCCESS);
    }
    let ms = |ns: u64| format!("{:.3}", ns as f64 / 1e6);
    println!(
        "{:<16} {:>8} {:<10} {:>10} {:>10} {:>10} {:>15}",
        "CHILD", "PID", "STRATEGY", "PAUSE_MS", "CLONE_MS", "RUNNING_MS", "FIRST_REPORT_MS"
    );
    for c in &children {
        let t = &c.timings;
        println!(
            "{:<16} {:>8} {:<10} {:>10} {:>10} {:>10} {:>15}",
            c.name,
            c.pid,
            c.strategy.to_string(),
            ms(t.parent_resumed_ns),
            ms(t.cloned_ns.saturating_sub(t.captured_ns)),
            ms(t.child_running_ns),
            t.child_first_report_ns.map_or_else(|| "not yet".to_string(), ms)
        );
    }
    // Where the time to a running child went, for the first one.
    if let Some(c) = children.first() {
        let steps: Vec<String> =
            c.timings.phases().iter().map(|(step, at)| format!("{step} {}", ms(*at))).collect();
        println!("{} (ms from the request): {}", c.name, steps.join(", "));
        println!("strategy {}: {}", c.strategy, c.why);
    }
    Ok(ExitCode::SUCCESS)
}

/// Status of every live VM; stale sockets are removed with a message.
pub fn statuses() -> Result<Vec<Status>, api::Error> {
    for p in crate::runtime::remove_stale_bindings()? {
        eprintln!("vmfork: removed the stale socket {} of a VM process killed as it bound it", p.display());
    }
    let mut out = Vec::new();
    for name in crate::runtime::names()? {
        match api::call(&name, &Request::Status) {
            Ok((v, _)) => match serde_json::from_value(v["status"].clone()) {
                Ok(s) => out.push(s),
                Err(e) => eprintln!("vmfork: {name}: bad status: {e}"),
            },
            Err(e) => eprintln!("vmfork: {e}"),
        }
    }
    Ok(out)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1 << 20) as f64)
}

fn ls(json: bool) -> CliResult {
    let all = statuses()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:>8} {:<8} {:>5} {:>9} {:>9} {:>9} {:>9}  {:<16} {:<10}",
        "NAME", "PID", "STATE", "VCPUS", "MEMORY", "PRIVATE", "SHARED", "UPTIME", "PARENT", "STRATEGY"
    );
    for s in all {
        let lineage =
            if s.private { "(private)".to_string() } else { s.parent.clone().unwrap_or_else(|| "-".into()) };
        println!(
            "{:<16} {:>8} {:<8} {:>5} {:>9} {:>9} {:>9} {:>8.0}s  {:<16} {:<10}",
            s.name,
            s.pid,
            s.state,
            s.vcpus,
            mib(s.memory_bytes),
            mib(s.private_bytes),
            mib(s.shared_bytes),
            s.uptime_secs,
            lineage,
            s.strategy.map_or("-".to_string(), |st| st.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn simple(name: &str, req: Request, done: &str) -> CliResult {
    api::call(name, &req)?;
    println!("{name} {done}");
    Ok(ExitCode::SUCCESS)
}

fn stop(name: &str) -> CliResult {
    api::call(name, &Request::Stop)?;
    let path = crate::runtime::socket_path(name)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() {
        if Instant::now() > deadline {
            return Err(format!("VM {name} accepted stop but its socket is still there after 10 s").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("{name} stopped");
    Ok(ExitCode::SUCCESS)
}

fn console(name: &str) -> CliResult {
    let (_, mut r) = api::call(name, &Request::Console)?;
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    while r.read_line(&mut line)? > 0 {
        if out.write_all(line.as_bytes()).is_err() {
            break; // stdout closed (e.g. piped into head)
        }
        line.clear();
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmfork snapshot NAME DIR`, `snapshot inspect DIR`, `snapshot record-ws DIR --from VM`.
fn snapshot(args: SnapshotArgs) -> CliResult {
    match args.sub {
        Some(SnapshotSub::Inspect { dir, endpoint, vm, json }) => {
            let (snap, _) = open_snapshot(&dir, endpoint)?;
            let stats = match &vm {
                Some(v) => Some(api::call(v, &Request::RestoreStats)?.0),
                None => None,
            };
            if !json {
                let report: Option<crate::snapshot::StatsReport> =
                    stats.as_ref().map(|s| serde_json::from_value(s["stats"].clone())).transpose()?;
                let restore = vm.as_deref().zip(report.as_ref());
                return print_out(&crate::snapshot::describe(&snap, restore));
            }
            let idx = &snap.index.entries;
            let count = |k| idx.iter().filter(|e| e.kind == k).count();
            use crate::snapshot::format::Kind;
            let v = serde_json::json!({
                "dir": snap.dir, "manifest": snap.manifest,
                "chunks": {"zero": count(Kind::Zero), "raw": count(Kind::Raw), "zstd": count(Kind::Zstd)},
                "stored_bytes": idx.iter().map(|e| e.len as u64).sum::<u64>(),
                "working_set": snap.working_set.as_ref().map(|w| w.chunks.len()),
                "restore": stats,
            });
            print_out(&format!("{}\n", serde_json::to_string_pretty(&v)?))
        }
        Some(SnapshotSub::RecordWs { dir, from }) => {
            let (v, _) = api::call(&from, &Request::RestoreStats)?;
            let trace: Vec<(u32, u32)> = serde_json::from_value(v["stats"]["trace"].clone())?;
            let ws = crate::snapshot::format::WorkingSet { chunks: trace };
            let s = crate::snapshot::record_working_set(&dir, &ws)?;
            println!("{}: working set of {} chunks recorded from {from}", s.dir.display(), ws.chunks.len());
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let (name, dir) = (args.name.unwrap_or_default(), args.dir.unwrap_or_default());
            // To an object store: written here first (the VM writes it), then uploaded.
            let remote = match dir.to_str().and_then(crate::snapshot::remote::S3Url::parse) {
                Some(url) => Some(url?),
                None => None,
            };
            let target = dir.clone();
            let dir = match &remote {
                Some(_) => std::env::temp_dir().join(format!("vmfork-upload-{}-{name}", std::process::id())),
                None => std::path::absolute(&dir)?,
            };
            let parent = match &args.parent {
                Some(p) => Some(parent_spec(p, remote.is_some(), args.endpoint.clone())?),
                None => None,
            };
            let req = Request::Snapshot {
                dir: dir.clone(),
                level: Some(args.level),
                chunk: Some(args.chunk),
                stop: args.stop,
                parent: parent.clone(),
            };
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let v = api::call_with_progress(&name, &req, &mut |p| {
                if tty {
                    let mib = |k: &str| p[k].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
                    let secs = p["elapsed_secs"].as_f64().unwrap_or(0.0).max(1e-6);
                    let (done, stored) = (mib("done_bytes"), mib("stored_bytes"));
                    eprint!(
                        "\r{done:.0}/{:.0} MiB, {:.0} MiB/s, stored {stored:.1} MiB (ratio {:.1} of all)   ",
                        mib("total_bytes"),
                        done / secs,
                        done / stored.max(1e-9)
                    );
                }
            });
            if tty {
                eprintln!();
            }
            if let Some(p) = parent.filter(|p| p.meta != Path::new(&p.location)) {
                let _ = std::fs::remove_dir_all(&p.meta);
            }
            let v = v?;
            let mut summary = v["summary"].clone();
            if let Some(url) = remote {
                let pushed = upload(&dir, url, args.endpoint);
                let _ = std::fs::remove_dir_all(&dir);
                summary["uploaded_bytes"] = pushed?.into();
                summary["dir"] = target.to_string_lossy().into();
            }
            if args.json {
                return print_out(&format!("{}\n", serde_json::to_string_pretty(&summary)?));
            }
            let text: crate::snapshot::Summary = serde_json::from_value(summary.clone())?;
            match summary["uploaded_bytes"].as_u64() {
                Some(b) => print_out(&format!("{text}; uploaded {}\n", crate::units::human_bytes(b))),
                None => print_out(&format!("{text}\n")),
            }
        }
    }
}

/// The parent of a new snapshot (`--parent AT`): a directory, whose files the VM reads
/// itself, or `s3://BUCKET/PREFIX`, whose manifest, index and chunk hashes are fetched
/// here into a temporary directory for it. A snapshot going to a store (`to_store`)
/// takes only a parent in a store: other hosts cannot read this one's directories.
fn parent_spec(
    at: &Path,
    to_store: bool,
    endpoint: Option<String>,
) -> Result<api::ParentSpec, Box<dyn std::error::Error>> {
    use crate::snapshot::remote::{Remote, S3Config, S3Url};
    let Some(url) = at.to_str().and_then(S3Url::parse) else {
        if to_store {
            return Err(Error::LocalParent(at.to_path_buf()).into());
        }
        let dir =
            std::fs::canonicalize(at).map_err(|error| Error::Parent { path: at.to_path_buf(), error })?;
        let location = dir.to_str().ok_or_else(|| Error::ParentNotUtf8(dir.clone()))?;
        return Ok(api::ParentSpec { location: location.to_string(), meta: dir.clone() });
    };
    let remote = Remote::new(url?, &S3Config::from_env(endpoint))?;
    let meta = std::env::temp_dir().join(format!("vmfork-parent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&meta);
    std::fs::create_dir_all(&meta)?;
    for name in ["snapshot.json", "index.bin", "hashes.bin"] {
        if let Some(data) = remote.get(name)? {
            std::fs::write(meta.join(name), data)?;
        }
    }
    Ok(api::ParentSpec { location: remote.url.to_string(), meta })
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> CliResult {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Opens the snapshot at `at`: a directory, or `s3://BUCKET/PREFIX` in the object store
/// at `endpoint` (default `$AWS_ENDPOINT_URL`). Returns it and its location as given to a
/// background process (a directory made absolute).
fn open_snapshot(
    at: &Path,
    endpoint: Option<String>,
) -> Result<(crate::snapshot::Snapshot, PathBuf), Box<dyn std::error::Error>> {
    use crate::snapshot::remote::{Remote, S3Config, S3Url};
    match at.to_str().and_then(S3Url::parse) {
        Some(url) => {
            let remote = Remote::new(url?, &S3Config::from_env(endpoint))?;
            Ok((crate::snapshot::Snapshot::open_remote(remote)?, at.to_path_buf()))
        }
        None => {
            let dir = std::path::absolute(at)?;
            Ok((crate::snapshot::Snapshot::open(&dir)?, dir))
        }
    }
}

/// Uploads the snapshot directory `dir` to `url`; returns the bytes sent.
fn upload(
    dir: &Path,
    url: crate::snapshot::remote::S3Url,
    endpoint: Option<String>,
) -> Result<u64, crate::snapshot::Error> {
    use crate::snapshot::remote::{Remote, S3Config};
    let remote = Remote::new(url, &S3Config::from_env(endpoint))?;
    crate::snapshot::remote::push(dir, &remote)
}

/// `vmfork push DIR s3://BUCKET/PREFIX`.
fn push(dir: &Path, to: &str, endpoint: Option<String>) -> CliResult {
    let url = match crate::snapshot::remote::S3Url::parse(to) {
        Some(u) => u?,
        None => return Err(format!("{to:?} is not an s3://BUCKET/PREFIX address").into()),
    };
    let t = Instant::now();
    let bytes = upload(dir, url, endpoint)?;
    print_out(&format!(
        "{}: uploaded to {to}, {} in {:.2} s\n",
        dir.display(),
        crate::units::human_bytes(bytes),
        t.elapsed().as_secs_f64()
    ))
}
