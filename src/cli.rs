//! The VM subcommands of `vmfork`: `run`, `ls`, `pause`, `resume`, `stop`, `console`.
//!
//! Human output by default, `--json` for scripts; errors go to stderr as one sentence
//! saying what to do, with exit code 1 (2 for usage errors, from clap).

use std::io::{BufRead, Write};
use std::path::PathBuf;
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
    /// How to clone guest memory: auto, cow, reflink, uffd, uffd-minor or copy.
    #[arg(long, default_value = "auto")]
    pub strategy: crate::memory::Strategy,
    /// How many children.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
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
    /// Ask for transparent huge pages on guest memory (MADV_HUGEPAGE; takes effect when
    /// /sys/kernel/mm/transparent_hugepage/shmem_enabled is `advise` or `always`). Keeps a
    /// fork's pause short at multi-GiB sizes: far fewer page-table entries to zap.
    #[arg(long)]
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
        VmCommand::Child => run_child(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmfork: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

fn free_name() -> Result<String, api::Error> {
    let taken = api::names()?;
    Ok((1..).map(|i| format!("vm{i}")).find(|n| !taken.contains(n)).expect("some name is free"))
}

/// `--huge-pages` asks with MADV_HUGEPAGE, which shmem honours only in some modes.
fn warn_if_shmem_thp_is_off() {
    const KNOB: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let mode = std::fs::read_to_string(KNOB).unwrap_or_default();
    let active = mode.split_whitespace().find(|w| w.starts_with('[')).unwrap_or("[unknown]");
    if !matches!(active, "[advise]" | "[always]" | "[within_size]" | "[force]") {
        eprintln!(
            "vmfork: warning: --huge-pages has no effect while {KNOB} is {active}; as root: echo advise > {KNOB}"
        );
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
    if args.huge_pages {
        warn_if_shmem_thp_is_off();
    }
    let opts = MemoryOptions { huge_pages: args.huge_pages };
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
    let who = api::Identity { name, private: args.private, ..Default::default() };
    serve(who, vm, server, listener, signals)
}

/// Serves a running VM on its control socket until it stops; SIGINT/SIGTERM (blocked by
/// the caller, in every thread) stop it cleanly.
fn serve(
    who: api::Identity,
    vm: Arc<Vm>,
    server: Server,
    listener: std::os::unix::net::UnixListener,
    signals: nix::sys::signal::SigSet,
) -> CliResult {
    let (name, parent) = (who.name.clone(), who.parent.clone());
    vm.console().set_echo(true);
    server.spawn(listener, who, vm.clone());
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
            eprintln!(
                "vmfork: VM {name}: its page server (the parent VM {}) died before all guest memory was served; stopping",
                parent.as_deref().unwrap_or("?")
            );
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
    match api::connect(&name) {
        Ok(_) => return Err(api::Error::NameTaken(name).into()),
        Err(e @ api::Error::Stale { .. }) => eprintln!("vmfork: {e}"),
        Err(e @ api::Error::BadName(_)) => return Err(e.into()),
        Err(_) => {}
    }
    let log_path: PathBuf = api::runtime_dir()?.join(format!("{name}.log"));
    let log =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&log_path)?;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["run", "--name", &name, "--mem", &args.mem.to_string()])
        .args(["--vcpus", &args.vcpus.to_string(), "--workload", &args.workload.to_string()])
        .args(args.private.then_some("--private"))
        .args(args.huge_pages.then_some("--huge-pages"))
        .args(args.kernel.iter().flat_map(|k| [std::ffi::OsStr::new("--kernel"), k.as_os_str()]))
        .args(args.initrd.iter().flat_map(|k| [std::ffi::OsStr::new("--initrd"), k.as_os_str()]))
        .args(args.kernel.as_ref().map(|_| format!("--cmdline={}", args.cmdline)))
        .args(args.console.iter().flat_map(|k| [std::ffi::OsStr::new("--console"), k.as_os_str()]))
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
        if api::call(&name, &Request::Status).is_ok() {
            println!("{name} (pid {}, log {})", child.id(), log_path.display());
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            return Err(format!("VM {name} did not answer within 20 s; see {}", log_path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let (vm, who, server, listener) =
        crate::fork::become_child(&sock).map_err(|e| format!("fork child: {e}"))?;
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
        "{:<16} {:>8} {:<10} {:>10} {:>10} {:>10} {:>12}",
        "CHILD", "PID", "STRATEGY", "PAUSE_MS", "CLONE_MS", "RESTORE_MS", "RUNNING_MS"
    );
    for c in &children {
        let t = &c.timings;
        println!(
            "{:<16} {:>8} {:<10} {:>10} {:>10} {:>10} {:>12}",
            c.name,
            c.pid,
            c.strategy.to_string(),
            ms(t.parent_resumed_ns),
            ms(t.cloned_ns.saturating_sub(t.captured_ns)),
            ms(t.child_restored_ns),
            t.child_first_report_ns.map_or_else(|| "not yet".to_string(), ms)
        );
    }
    if let Some(c) = children.first() {
        println!("strategy {}: {}", c.strategy, c.why);
    }
    Ok(ExitCode::SUCCESS)
}

/// Status of every live VM; stale sockets are removed with a message.
pub fn statuses() -> Result<Vec<Status>, api::Error> {
    let mut out = Vec::new();
    for name in api::names()? {
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
    let path = api::socket_path(name)?;
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
