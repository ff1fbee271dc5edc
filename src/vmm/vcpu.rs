//! vCPU threads: the run loop, and the kick that pulls a vCPU out of `KVM_RUN`.
//!
//! Pausing sets `want = Pause` under the control lock, then sets the vCPU's
//! `immediate_exit` and sends it [`kick_signal`] (a real-time signal with an empty
//! handler). `KVM_RUN` returns `EINTR`; the thread enters `KVM_RUN` once more with
//! `immediate_exit` set, which completes any pending port I/O (KVM advances RIP past an
//! `out` only on the next entry) without running the guest, so the registers a capture
//! reads are exact. Then it parks until `want` changes.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::crash::{self, ExitTrail};
use super::devices::PortAction;
use super::guest::{IDLE_PORT, PIO_MMIO_BASE, PIO_MMIO_SIZE, REPORT_PORT, Report};
use super::{ExitReason, Shared, Want};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the (empty) kick handler once per process. No `SA_RESTART`: `KVM_RUN` must
/// return `EINTR`.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (it does
        // nothing) and stays valid for the life of the process.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Pointer to a vCPU's `kvm_run.immediate_exit`, shared with the threads that kick it.
#[derive(Clone, Copy)]
pub struct ImmediateExit(*const AtomicU8);

// SAFETY: the pointer targets the vCPU's kvm_run mapping, which lives as long as the
// VcpuFd; `Vm` keeps every VcpuFd alive until the vCPU threads are joined and stops using
// the pointers before dropping them. All accesses are atomic.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    pub fn of(vcpu: &mut VcpuFd) -> Self {
        let p: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
        ImmediateExit(p as *const AtomicU8)
    }

    pub fn set(&self, v: bool) {
        // SAFETY: see the Send impl: the kvm_run mapping outlives every user of this
        // pointer, and u8 and AtomicU8 have the same layout.
        unsafe { &*self.0 }.store(u8::from(v), Ordering::SeqCst);
    }
}

/// What other threads need to kick one vCPU.
#[derive(Clone, Copy)]
pub struct Kick {
    pub immediate_exit: ImmediateExit,
    pub thread: libc::pthread_t,
}

impl Kick {
    /// Makes the vCPU leave `KVM_RUN` soon (or not enter it).
    pub fn kick(&self) {
        self.immediate_exit.set(true);
        // SAFETY: `thread` is a vCPU thread that has not been joined yet (Vm joins them
        // only after it stops kicking), so the id is valid.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

/// Body of vCPU thread `idx`.
pub(crate) fn run_loop(idx: usize, fd: Arc<Mutex<VcpuFd>>, ie: ImmediateExit, shared: Arc<Shared>) {
    /// Ends the VM if this thread unwinds, so nobody waits for it forever.
    struct Guard<'a>(&'a Shared, bool);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.vcpu_exited(Some(ExitReason::Crash("a vCPU thread panicked".into())));
            }
        }
    }
    let mut guard = Guard(&shared, false);
    let mut trail = ExitTrail::default();
    let reason = loop {
        let want = {
            let mut ctl = shared.ctl();
            while ctl.want == Want::Run && ctl.idle[idx] {
                ctl = shared.wait(ctl);
            }
            ctl.want
        };
        match want {
            Want::Stop => break None,
            Want::Pause => {
                {
                    let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
                    ie.set(true);
                    // Completes pending I/O and returns EINTR without running the guest.
                    // Should KVM still report an exit first, serve it and enter again until
                    // the EINTR comes, so no report is lost.
                    let end = loop {
                        match run_once(idx, &mut vcpu, &shared, &mut trail) {
                            Step::Continue => continue,
                            Step::Interrupted => break None,
                            Step::End(r) => break Some(r),
                        }
                    };
                    ie.set(false);
                    if let Some(r) = end {
                        break Some(r);
                    }
                }
                let mut ctl = shared.ctl();
                ctl.idle[idx] = false;
                ctl.parked += 1;
                shared.notify();
                while ctl.want == Want::Pause {
                    ctl = shared.wait(ctl);
                }
                ctl.parked -= 1;
                shared.notify();
            }
            Want::Run => {
                let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
                match run_once(idx, &mut vcpu, &shared, &mut trail) {
                    Step::Continue => {}
                    // A kick: clear it and look at what the VM wants (set before every
                    // kick).
                    Step::Interrupted => ie.set(false),
                    Step::End(r) => break Some(r),
                }
            }
        }
    };
    guard.1 = true;
    shared.vcpu_exited(reason);
}

/// Whether `addr` is in the built-in guest's port window (a Linux guest has none).
fn is_port(addr: u64, shared: &Shared) -> bool {
    !shared.linux && (PIO_MMIO_BASE..PIO_MMIO_BASE + PIO_MMIO_SIZE).contains(&addr)
}

/// What one `KVM_RUN` came to.
enum Step {
    /// An exit was handled; run again.
    Continue,
    /// `KVM_RUN` returned `EINTR` (a kick).
    Interrupted,
    /// The VM ends.
    End(ExitReason),
}

/// A guest port write (real or through the MMIO window). `Some` ends the VM.
fn port_out(idx: usize, port: u16, data: &[u8], shared: &Shared) -> Option<ExitReason> {
    match port {
        REPORT_PORT if !shared.linux => {
            shared.ctl().owes_report[idx] = false;
            match Report::read(&shared.memory, idx as u32) {
                Ok(r) => shared.report(r),
                Err(e) => shared.console.line(format!("vmm: cannot read vCPU {idx}'s mailbox: {e}")),
            }
            None
        }
        IDLE_PORT if !shared.linux => {
            let mut ctl = shared.ctl();
            ctl.idle[idx] = !ctl.owes_report[idx];
            None
        }
        _ => match shared.devices.port_write(port, data) {
            PortAction::Reset => Some(ExitReason::Reset),
            _ => None,
        },
    }
}

/// Runs the guest until its next exit and handles it; a crash leaves the vCPU's state
/// and `trail` in the console ([`crash`]).
fn run_once(idx: usize, vcpu: &mut VcpuFd, shared: &Shared, trail: &mut ExitTrail) -> Step {
    let exit = vcpu.run();
    if let Ok(e) = &exit {
        trail.record(e);
    }
    if exit.is_ok() && !shared.guest_exited.load(std::sync::atomic::Ordering::Relaxed) {
        shared.guest_exited.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let end = match exit {
        Ok(VcpuExit::MmioWrite(addr, data)) if is_port(addr, shared) => {
            port_out(idx, (addr - PIO_MMIO_BASE) as u16, data, shared)
        }
        Ok(VcpuExit::MmioRead(addr, data)) if is_port(addr, shared) => {
            shared.devices.port_read((addr - PIO_MMIO_BASE) as u16, data);
            None
        }
        Ok(VcpuExit::IoOut(port, data)) => port_out(idx, port, data, shared),
        Ok(VcpuExit::IoIn(port, data)) => {
            shared.devices.port_read(port, data);
            None
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            data.fill(0xff);
            None
        }
        Ok(VcpuExit::MmioWrite(..)) => None,
        Ok(VcpuExit::Hlt) => Some(ExitReason::Halt),
        // Shutdown or reset asked of KVM (e.g. PSCI-like system events): the VM ends.
        Ok(VcpuExit::SystemEvent(..)) => Some(ExitReason::Reset),
        Ok(VcpuExit::Shutdown) => {
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            let (cs, cr2) = vcpu.get_sregs().map(|s| (s.cs.selector, s.cr2)).unwrap_or_default();
            Some(ExitReason::Crash(format!(
                "vCPU {idx} triple fault (shutdown) near rip={rip:#x} cs={cs:#x} cr2={cr2:#x}"
            )))
        }
        Ok(other) => {
            let what = format!("{other:?}");
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            Some(ExitReason::Crash(format!("vCPU {idx}: unexpected exit {what} at rip={rip:#x}")))
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Step::Interrupted,
        Err(e) => Some(ExitReason::Crash(format!("vCPU {idx}: KVM_RUN failed: {e}"))),
    };
    match end {
        Some(r) => {
            if let ExitReason::Crash(why) = &r {
                shared.console.line(format!("vmm: crash: {why}"));
                for line in crash::report(idx, vcpu, trail) {
                    shared.console.line(line);
                }
            }
            Step::End(r)
        }
        None => Step::Continue,
    }
}
