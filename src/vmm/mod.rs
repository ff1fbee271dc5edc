//! The VMM: runs the built-in guest ([`guest`]) in a KVM virtual machine whose memory is a
//! [`GuestMemory`] from the clone engine.
//!
//! A [`Vm`] owns the KVM VM, one thread per vCPU ([`vcpu`]) and the legacy devices
//! ([`devices`]). It can be paused, resumed, stopped, and — while paused — captured into a
//! serializable [`VmState`] ([`state`]) from which [`Vm::restore`] builds an identical VM
//! over the same (or a cloned) memory, in this process or another.
//!
//! ```text
//!   Vm::create ──► Running ◄──resume── Paused ──capture──► VmState ──Vm::restore──► Paused
//!                     └──────pause───────►┘
//!   stop (or guest reset / crash) ──► Stopped
//! ```

pub mod consts;
pub mod crash;
pub mod devices;
pub mod guest;
pub mod linux;
pub mod state;
pub mod vcpu;

use std::fmt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_msr_entry, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::memory::GuestMemory;
use consts::{
    APIC_LVT_MASKED, APIC_LVT0, APIC_LVT1, APIC_MODE_EXTINT, APIC_MODE_MASK, APIC_MODE_NMI, APIC_MODE_SHIFT,
    MSR_IA32_APICBASE, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, X2APIC_MSRS,
};
use devices::{Console, Devices, SerialSnapshot};
pub use guest::{Report, Workload};
pub use state::{VcpuState, VmState};
use vcpu::{ImmediateExit, Kick};

/// Where KVM may put the TSS it needs on VMX hosts: below 4 GiB, in the guest's MMIO hole.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error(
        "cannot open /dev/kvm: {0}. vmfork runs VMs on KVM: load the kvm module (modprobe kvm_intel, kvm_amd or kvm_pvm) and give this user read-write access to /dev/kvm (e.g. add it to the `kvm` group, then log in again)"
    )]
    KvmOpen(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {error}")]
    Kvm { what: &'static str, error: kvm_ioctls::Error },
    #[error("{asked} vCPUs requested; this host's KVM runs 1 to {max}")]
    VcpuCount { asked: u32, max: u32 },
    #[error("the VM is {now}; {action} needs it {need}")]
    WrongState { now: RunState, action: &'static str, need: &'static str },
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("the saved state does not fit this VM: {0}")]
    StateMismatch(String),
    #[error("{0} MSRs do not fit in one KVM MSR list (at most {max})", max = kvm_bindings::KVM_MAX_MSR_ENTRIES)]
    MsrList(usize),
    #[error("KVM could not read MSR {0:#x} of a vCPU")]
    MsrRead(u32),
    #[error("a Linux guest needs a VmConfig whose `linux` is set")]
    NotLinux,
    #[error(transparent)]
    Setup(#[from] guest::SetupError),
    #[error(transparent)]
    Boot(#[from] linux::BootError),
    #[error("cannot create an event fd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
}

/// Result of the VMM.
pub type Result<T> = std::result::Result<T, Error>;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |error| Error::Kvm { what, error }
}

/// What a VM runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub vcpus: u32,
    pub workload: Workload,
    /// Start vCPUs in ring 0 (an `iretq` drops to ring 3) instead of directly in ring 3.
    pub ring0_entry: bool,
    /// A Linux guest's machine (None: the built-in guest).
    #[serde(default)]
    pub linux: Option<linux::LinuxMachine>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig { vcpus: 1, workload: Workload::default(), ring0_entry: false, linux: None }
    }
}

impl VmConfig {
    /// Where the guest keeps its 16-byte VM generation id.
    pub fn genid_gpa(&self) -> u64 {
        self.linux.as_ref().map_or(guest::GENID_GPA, |m| m.genid_gpa)
    }
}

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "reason", content = "detail")]
pub enum ExitReason {
    /// `stop` was asked for.
    Stopped,
    /// The guest reset the machine through the i8042 controller.
    Reset,
    /// A vCPU halted with nothing to wake it.
    Halt,
    /// The guest or KVM failed.
    Crash(String),
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Stopped => f.write_str("stopped on request"),
            ExitReason::Reset => f.write_str("guest reset (i8042)"),
            ExitReason::Halt => f.write_str("guest halted"),
            ExitReason::Crash(why) => write!(f, "crashed: {why}"),
        }
    }
}

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    Stopped(ExitReason),
}

impl RunState {
    /// One word, for listings.
    pub fn name(&self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopped(_) => "stopped",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunState::Stopped(r) => write!(f, "stopped ({r})"),
            s => f.write_str(s.name()),
        }
    }
}

/// What the VMM asks of its vCPU threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    Run,
    Pause,
    Stop,
}

pub(crate) struct Ctl {
    pub want: Want,
    /// vCPUs parked by the guest's idle port.
    pub idle: Vec<bool>,
    /// vCPUs resumed since their last report: their next idle does not park, so the
    /// guest reports after every resume even when it was paused between its report and
    /// its idle (a fork taken right then would otherwise leave a child that never reports).
    pub owes_report: Vec<bool>,
    /// vCPUs parked by a pause.
    pub parked: usize,
    /// vCPU threads still running.
    pub alive: usize,
    pub exit: Option<ExitReason>,
}

/// State shared by the VM handle and its vCPU threads.
pub(crate) struct Shared {
    ctl: Mutex<Ctl>,
    cond: Condvar,
    pub memory: Arc<GuestMemory>,
    pub console: Arc<Console>,
    pub devices: Devices,
    /// A Linux guest: the built-in guest's report and idle ports and its MMIO port
    /// window do not exist.
    pub linux: bool,
    /// A vCPU left `KVM_RUN` with an exit of the guest's (not a kick): it has run.
    pub guest_exited: std::sync::atomic::AtomicBool,
    kicks: OnceLock<Vec<Kick>>,
    latest: Mutex<Vec<Option<Report>>>,
    report_subscribers: Mutex<Vec<Sender<Report>>>,
}

impl Shared {
    pub fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn wait<'a>(&self, g: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
        self.cond.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    pub fn notify(&self) {
        self.cond.notify_all();
    }

    fn kick_all(&self) {
        for k in self.kicks.get().into_iter().flatten() {
            k.kick();
        }
    }

    pub fn report(&self, r: Report) {
        if let Some(slot) = self.latest.lock().unwrap_or_else(|p| p.into_inner()).get_mut(r.vcpu as usize) {
            *slot = Some(r);
        }
        self.report_subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| s.send(r).is_ok());
        self.console.line(r.to_string());
    }

    /// Called by a vCPU thread as it ends; `Some` reason stops the whole VM.
    pub fn vcpu_exited(&self, reason: Option<ExitReason>) {
        let mut ctl = self.ctl();
        let mut kick = false;
        if let Some(r) = reason {
            self.console.line(format!("vmm: {r}"));
            ctl.exit.get_or_insert(r);
            if ctl.want != Want::Stop {
                ctl.want = Want::Stop;
                kick = true;
            }
        }
        ctl.alive -= 1;
        drop(ctl);
        self.notify();
        if kick {
            self.kick_all();
        }
    }
}

/// A running (or paused, or stopped) virtual machine.
pub struct Vm {
    _kvm: Kvm,
    vm: VmFd,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
    config: VmConfig,
    msrs: Vec<u32>,
    started: Instant,
    /// A Linux guest's Generic Event Device interrupt (announces a new generation id).
    ged: Option<EventFd>,
    /// The page servers of this VM's lazily filled children in other processes.
    page_servers: Arc<crate::memory::uffd::PageServers>,
}

impl Vm {
    /// Boots the built-in guest on `memory` (which it overwrites with the guest's layout).
    pub fn create(memory: Arc<GuestMemory>, config: &VmConfig) -> Result<Vm> {
        guest::setup(&memory, config.vcpus, config.workload)?;
        let mut vm = Vm::build(memory, config, None)?;
        let base = vm.vcpu(0).get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        for i in 0..config.vcpus {
            let user = !config.ring0_entry;
            if !user {
                guest::iret_frame(&vm.shared.memory, i)?;
            }
            let v = vm.vcpu(i as usize);
            v.set_sregs(&guest::sregs(&base, user)).map_err(kvm_err("KVM_SET_SREGS"))?;
            v.set_regs(&guest::regs(i, user)).map_err(kvm_err("KVM_SET_REGS"))?;
            // With the in-kernel LAPIC, vCPUs other than the first wait for INIT/SIPI;
            // the built-in guest starts them all at once, already in long mode.
            let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
            v.set_mp_state(runnable).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        vm.start(Want::Run)?;
        Ok(vm)
    }

    /// Boots a Linux guest on `memory` (which it overwrites); `config.linux` must be set.
    pub fn create_linux(memory: Arc<GuestMemory>, config: &VmConfig, boot: &linux::LinuxBoot) -> Result<Vm> {
        let machine = config.linux.clone().ok_or(Error::NotLinux)?;
        let loaded = linux::boot::load(&memory, boot)?;
        linux::acpi::write_tables(&memory, config.vcpus, &machine)?;
        let mut vm = Vm::build(memory, config, None)?;
        for i in 0..config.vcpus as usize {
            let v = vm.vcpu(i);
            // LINT0 would deliver the 8259's interrupts (ExtINT), LINT1 is NMI.
            let mut lapic = v.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
            // LINT0 stays masked until Linux programs it (with a hardware-reduced FADT it
            // uses the IOAPIC only). Unmasked, the PIT that KVM starts ticking at once
            // keeps an ExtINT pending from the first instruction, while interrupts are
            // off; under nested KVM in QEMU TCG we saw boots stall at the entry point in
            // runs that had it unmasked (and not since masking it).
            set_lvt(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT, true);
            set_lvt(&mut lapic, APIC_LVT1, APIC_MODE_NMI, false);
            v.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
            let entries: Vec<kvm_msr_entry> = linux::boot::BOOT_MSRS
                .iter()
                .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList(entries.len()))?;
            v.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if i == 0 {
                let base = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                v.set_sregs(&linux::boot::sregs(&base)).map_err(kvm_err("KVM_SET_SREGS"))?;
                v.set_regs(&linux::boot::regs(loaded.entry)).map_err(kvm_err("KVM_SET_REGS"))?;
                v.set_fpu(&linux::boot::fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
                let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
                v.set_mp_state(runnable).map_err(kvm_err("KVM_SET_MP_STATE"))?;
            }
            // The other vCPUs wait for INIT/SIPI from the first, as on hardware.
        }
        vm.start(Want::Run)?;
        vm.nudge_until_running();
        Ok(vm)
    }

    /// Under nested KVM in QEMU TCG (the testbed), a freshly booted Linux vCPU
    /// sometimes never gets past its first instruction until it leaves `KVM_RUN` and
    /// enters again. So until the guest's first exit of its own (its first port I/O,
    /// within seconds of boot), kick the boot vCPU every 100 ms, for at most a minute.
    /// A kick costs a round trip to the VMM and changes nothing in the guest.
    fn nudge_until_running(&self) {
        use std::sync::atomic::Ordering;
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new().name("boot-nudge".into()).spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) && !shared.guest_exited.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                // Under the lock with `want == Run`, no stop has begun, so the vCPU
                // threads are not joined yet and their ids are valid to signal.
                let ctl = shared.ctl();
                match ctl.want {
                    Want::Stop => break,
                    Want::Pause => continue,
                    Want::Run => {
                        if let Some(k) = shared.kicks.get().and_then(|k| k.first()) {
                            k.kick();
                        }
                    }
                }
            }
        });
        // Without the nudge the guest still boots, just not reliably under TCG.
        drop(spawned);
    }

    /// Raises the Generic Event Device's interrupt of a Linux guest: its `_EVT` notifies
    /// the VMGenID device, whose driver rereads the generation id. Without a Linux guest,
    /// does nothing.
    pub fn notify_generation_changed(&self) -> Result<()> {
        match &self.ged {
            Some(fd) => fd.write(1).map_err(Error::EventFd),
            None => Ok(()),
        }
    }

    /// Builds a paused VM from `state` over `memory`, which must hold the guest memory of
    /// the moment `state` was captured (the same memory, or a clone of it).
    pub fn restore(memory: Arc<GuestMemory>, state: &VmState) -> Result<Vm> {
        if memory.size() as u64 != state.memory_size {
            return Err(Error::StateMismatch(format!(
                "state is of a VM with {} bytes of memory, this memory has {}",
                state.memory_size,
                memory.size()
            )));
        }
        let mut vm = Vm::build(memory, &state.config, Some(&state.serial))?;
        for (i, s) in state.vcpus.iter().enumerate() {
            s.restore(&vm.vcpu(i))?;
        }
        state.restore_vm(&vm.vm)?;
        vm.start(Want::Pause)?;
        vm.wait_parked();
        Ok(vm)
    }

    /// KVM VM with irqchip, PIT, memory slots and vCPUs (not started).
    fn build(memory: Arc<GuestMemory>, config: &VmConfig, serial: Option<&SerialSnapshot>) -> Result<Vm> {
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        let max = (kvm.get_max_vcpus() as u32).max(1);
        if config.vcpus == 0 || config.vcpus > max {
            return Err(Error::VcpuCount { asked: config.vcpus, max });
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Needed on VMX hosts; other KVMs may refuse it harmlessly.
        let _ = vm.set_tss_address(TSS_ADDRESS);
        vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for (slot, r) in memory.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.guest_addr(),
                memory_size: r.size() as u64,
                userspace_addr: r.host_addr() as u64,
            };
            // SAFETY: the region's mapping is valid for its size and lives as long as
            // `memory`, which the Vm keeps (in `shared`) until the VM fd is closed.
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // A Linux guest's interrupts: COM1 and the Generic Event Device, through irqfds
        // (KVM's default routing sends a GSI below 16 to both the PIC and the IOAPIC).
        let (serial_irq, ged) = match &config.linux {
            Some(m) => {
                let serial = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                vm.register_irqfd(&serial, m.serial_gsi).map_err(kvm_err("KVM_IRQFD"))?;
                let ged = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                vm.register_irqfd(&ged, m.ged_gsi).map_err(kvm_err("KVM_IRQFD"))?;
                (Some(serial), Some(ged))
            }
            None => (None, None),
        };
        let cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let v = vm.create_vcpu(i as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let c = vcpu_cpuid(&cpuid, i, config.linux.is_some());
            v.set_cpuid2(&c).map_err(kvm_err("KVM_SET_CPUID2"))?;
            vcpus.push(Arc::new(Mutex::new(v)));
        }
        let supported = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = if config.linux.is_some() {
            linux_msrs(supported.as_slice(), &vcpus[0].lock().unwrap_or_else(|p| p.into_inner()))
        } else {
            state::MSRS_TO_SAVE.iter().copied().filter(|m| supported.as_slice().contains(m)).collect()
        };
        let console = Arc::new(Console::default());
        let n = config.vcpus as usize;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                idle: vec![false; n],
                owes_report: vec![true; n],
                parked: 0,
                alive: 0,
                exit: None,
            }),
            cond: Condvar::new(),
            memory,
            devices: Devices::new(console.clone(), serial, serial_irq, config.linux.is_some()),
            linux: config.linux.is_some(),
            guest_exited: std::sync::atomic::AtomicBool::new(false),
            console,
            kicks: OnceLock::new(),
            latest: Mutex::new(vec![None; n]),
            report_subscribers: Mutex::new(Vec::new()),
        });
        Ok(Vm {
            _kvm: kvm,
            vm,
            vcpus,
            threads: Mutex::new(Vec::new()),
            shared,
            config: config.clone(),
            msrs,
            started: Instant::now(),
            ged,
            page_servers: Arc::default(),
        })
    }

    fn start(&mut self, want: Want) -> Result<()> {
        vcpu::install_kick_handler();
        {
            let mut ctl = self.shared.ctl();
            ctl.want = want;
            ctl.alive = self.vcpus.len();
        }
        let mut kicks = Vec::new();
        for (i, fd) in self.vcpus.iter().enumerate() {
            let ie = ImmediateExit::of(&mut fd.lock().unwrap_or_else(|p| p.into_inner()));
            let (fd, shared) = (fd.clone(), self.shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run_loop(i, fd, ie, shared))
                .map_err(Error::Thread)?;
            use std::os::unix::thread::JoinHandleExt;
            kicks.push(Kick { immediate_exit: ie, thread: t.as_pthread_t() });
            self.threads.lock().unwrap_or_else(|p| p.into_inner()).push(t);
        }
        let _ = self.shared.kicks.set(kicks);
        self.started = Instant::now();
        Ok(())
    }

    fn vcpu(&self, i: usize) -> MutexGuard<'_, VcpuFd> {
        self.vcpus[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_parked(&self) {
        let mut ctl = self.shared.ctl();
        while ctl.want == Want::Pause && ctl.parked < ctl.alive {
            ctl = self.shared.wait(ctl);
        }
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    /// The page servers this VM runs for its lazily filled children.
    pub fn page_servers(&self) -> &Arc<crate::memory::uffd::PageServers> {
        &self.page_servers
    }

    /// Serial output and report lines.
    pub fn console(&self) -> &Arc<Console> {
        &self.shared.console
    }

    /// Time since the vCPUs were started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Where the VM is.
    pub fn state(&self) -> RunState {
        let ctl = self.shared.ctl();
        if let Some(r) = &ctl.exit {
            return RunState::Stopped(r.clone());
        }
        match ctl.want {
            Want::Run => RunState::Running,
            Want::Pause => RunState::Paused,
            Want::Stop => RunState::Stopped(ExitReason::Stopped),
        }
    }

    /// What the vCPU threads are doing, for a diagnostic: the VM's wish, and per vCPU
    /// whether it is parked idle and whether it owes a report.
    pub fn describe_vcpus(&self) -> String {
        let ctl = self.shared.ctl();
        let vcpus: Vec<String> = (0..ctl.idle.len())
            .map(|i| format!("vcpu{i} idle={} owes_report={}", ctl.idle[i], ctl.owes_report[i]))
            .collect();
        format!("want={:?} parked={} alive={}: {}", ctl.want, ctl.parked, ctl.alive, vcpus.join(", "))
    }

    /// The latest report of each vCPU.
    pub fn latest_reports(&self) -> Vec<Option<Report>> {
        self.shared.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every report from now on.
    pub fn subscribe(&self) -> Receiver<Report> {
        let (tx, rx) = channel();
        self.shared.report_subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    /// Stops every vCPU at its next instruction boundary and waits until all are parked.
    pub fn pause(&self) -> Result<()> {
        let was = {
            let mut ctl = self.shared.ctl();
            let was = ctl.want;
            if was == Want::Run {
                ctl.want = Want::Pause;
            }
            was
        };
        match was {
            Want::Run => {}
            Want::Pause => return Ok(()),
            Want::Stop => return Err(self.wrong_state("pause", "running")),
        }
        // Idle vCPUs wait on the condition variable, running ones in KVM_RUN.
        self.shared.notify();
        self.shared.kick_all();
        self.wait_parked();
        match self.state() {
            RunState::Paused => Ok(()),
            _ => Err(self.wrong_state("pause", "running")),
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<()> {
        let mut ctl = self.shared.ctl();
        match ctl.want {
            Want::Pause => {
                ctl.want = Want::Run;
                ctl.owes_report.fill(true);
            }
            Want::Run => return Ok(()),
            Want::Stop => {
                drop(ctl);
                return Err(self.wrong_state("resume", "paused"));
            }
        }
        drop(ctl);
        self.shared.notify();
        Ok(())
    }

    /// Stops the VM (if it still runs) and waits for its vCPU threads to end.
    pub fn stop(&self) -> ExitReason {
        // Holding the thread list for the whole stop: no kick can reach a joined thread.
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if !threads.is_empty() {
            self.shared.ctl().want = Want::Stop;
            self.shared.notify();
            self.shared.kick_all();
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
        drop(threads);
        let mut ctl = self.shared.ctl();
        ctl.exit.get_or_insert(ExitReason::Stopped).clone()
    }

    /// Waits until the VM ends by itself (guest reset, crash) or from another thread's
    /// `stop`, or `timeout` passes. Returns the reason if it ended.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        let mut ctl = self.shared.ctl();
        while ctl.alive > 0 {
            let left = deadline.checked_duration_since(Instant::now())?;
            ctl = self.shared.cond.wait_timeout(ctl, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        Some(ctl.exit.clone().unwrap_or(ExitReason::Stopped))
    }

    fn wrong_state(&self, action: &'static str, need: &'static str) -> Error {
        Error::WrongState { now: self.state(), action, need }
    }

    /// Captures the whole VM state. The VM must be paused.
    pub fn capture(&self) -> Result<VmState> {
        let parked = {
            let ctl = self.shared.ctl();
            ctl.exit.is_none() && ctl.want == Want::Pause && ctl.parked == ctl.alive
        };
        // Paused means every vCPU is parked (a pause from another thread may still be
        // on its way).
        if !parked {
            return Err(self.wrong_state("capture", "paused"));
        }
        let vcpus = (0..self.vcpus.len())
            .map(|i| VcpuState::capture(&self.vcpu(i), &self.msrs))
            .collect::<Result<Vec<_>>>()?;
        let mut state =
            VmState::capture(&self.vm, self.config.clone(), self.shared.memory.size() as u64, vcpus)?;
        state.serial = self.shared.devices.serial_state();
        Ok(state)
    }
}

/// Sets the delivery mode (`APIC_MODE_*`) and the mask bit of the local APIC LVT register
/// at `offset`.
fn set_lvt(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, mode: u32, masked: bool) {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *d = *s as u8;
    }
    let mask = if masked { APIC_LVT_MASKED } else { 0 };
    let v = (u32::from_le_bytes(b) & !(APIC_LVT_MASKED | APIC_MODE_MASK)) | (mode << APIC_MODE_SHIFT) | mask;
    for (d, s) in lapic.regs[offset..offset + 4].iter_mut().zip(v.to_le_bytes()) {
        *d = s as _;
    }
}

/// The CPUID vCPU `index` gets: KVM's supported set with its APIC id filled in; for a
/// Linux guest also the hypervisor bit and the x2APIC ids of the topology leaves.
fn vcpu_cpuid(supported: &CpuId, index: u32, linux: bool) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24); // initial APIC id
                if linux {
                    e.ecx |= 1 << 31; // running under a hypervisor
                }
            }
            0xb | 0x1f if linux => e.edx = index,  // x2APIC id
            0x8000_001e if linux => e.eax = index, // AMD extended APIC id
            _ => {}
        }
    }
    c
}

/// The MSRs saved with a Linux guest's vCPU: every MSR KVM lists that this vCPU can both
/// read and write back, except the APIC base (in SREGS) and the x2APIC registers (in the
/// LAPIC state); TSC first and TSC_DEADLINE last, as restore needs them.
fn linux_msrs(listed: &[u32], vcpu: &VcpuFd) -> Vec<u32> {
    let mut out: Vec<u32> = listed
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_APICBASE && !X2APIC_MSRS.contains(&i))
        .filter(|&index| {
            let Ok(mut m) = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]) else {
                return false;
            };
            matches!(vcpu.get_msrs(&mut m), Ok(1)) && matches!(vcpu.set_msrs(&m), Ok(1))
        })
        .collect();
    out.sort_by_key(|&i| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    out
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names stand for exactly the numbers they replaced.
    #[test]
    fn named_registers_and_msrs_keep_their_values() {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[APIC_LVT0..APIC_LVT0 + 4].fill(0x55);
        set_lvt(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT, true);
        set_lvt(&mut lapic, APIC_LVT1, APIC_MODE_NMI, false);
        let reg = |at: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[at + i] as u8));
        assert_eq!(reg(0x350), (0x5555_5555 & !0x1_0700) | 0x1_0700, "LINT0: ExtINT, masked");
        assert_eq!(reg(0x360), 0x400, "LINT1: NMI, not masked");
        assert_eq!(linux::boot::BOOT_MSRS, [(0x1a0, 1), (0x2ff, 0x806)]);
        let old_list = [
            0x10,
            0x174,
            0x175,
            0x176,
            0x1a0,
            0x277,
            0xc000_0081,
            0xc000_0082,
            0xc000_0083,
            0xc000_0084,
            0xc000_0102,
            0xc000_0103,
            0x4b56_4d00,
            0x4b56_4d01,
            0x6e0,
        ];
        assert_eq!(state::MSRS_TO_SAVE, old_list);
        assert_eq!((MSR_IA32_APICBASE, X2APIC_MSRS), (0x1b, 0x800..0x900));
        let base = kvm_bindings::kvm_sregs::default();
        assert_eq!(linux::boot::sregs(&base).efer, 0x500);
        assert_eq!(guest::sregs(&base, false).efer, 0x501);
    }
}
