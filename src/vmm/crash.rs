//! What a vCPU looked like when its guest died: the record a triple fault leaves behind.
//!
//! A guest that triple-faults takes its evidence with it: KVM reports only
//! `KVM_EXIT_SHUTDOWN`. So each vCPU thread keeps its last [`KEPT`] exits in a small ring
//! ([`ExitTrail`]; a store per exit, no system call), and when the VM crashes the thread
//! writes every register it can read, the pending and injected events and that trail to
//! the VM's console (and so to its log), one `vmm: crash:` line each.
//!
//! One caveat: on AMD, KVM reinitializes a vCPU on a shutdown intercept before `KVM_RUN`
//! returns (`shutdown_interception()` in kvm_amd), so after a triple fault there the
//! registers are the vCPU's INIT state (`rip=0xfff0`) and only the trail is the guest's;
//! the guest's real rip is in KVM's `kvm_exit` trace (the testbed records it).

use std::fmt::Write as _;
use std::time::Instant;

use kvm_bindings::{kvm_dtable, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Exits remembered per vCPU.
pub const KEPT: usize = 16;

/// One exit, as little as it takes to say what the guest was doing.
#[derive(Clone, Copy, Debug)]
struct Seen {
    at: Instant,
    kind: &'static str,
    /// The port or guest-physical address, where the exit has one.
    arg: Option<u64>,
}

/// The last [`KEPT`] exits of one vCPU, oldest overwritten first.
#[derive(Debug, Default)]
pub struct ExitTrail {
    seen: [Option<Seen>; KEPT],
    next: usize,
    total: u64,
}

impl ExitTrail {
    /// Remembers `exit`.
    pub fn record(&mut self, exit: &VcpuExit<'_>) {
        let (kind, arg) = match exit {
            VcpuExit::IoOut(port, _) => ("io-out", Some(u64::from(*port))),
            VcpuExit::IoIn(port, _) => ("io-in", Some(u64::from(*port))),
            VcpuExit::MmioRead(addr, _) => ("mmio-read", Some(*addr)),
            VcpuExit::MmioWrite(addr, _) => ("mmio-write", Some(*addr)),
            VcpuExit::Hlt => ("hlt", None),
            VcpuExit::Shutdown => ("shutdown", None),
            VcpuExit::SystemEvent(kind, _) => ("system-event", Some(u64::from(*kind))),
            VcpuExit::InternalError => ("internal-error", None),
            VcpuExit::FailEntry(reason, _) => ("fail-entry", Some(*reason)),
            _ => ("other", None),
        };
        self.seen[self.next] = Some(Seen { at: Instant::now(), kind, arg });
        self.next = (self.next + 1) % KEPT;
        self.total += 1;
    }

    /// The remembered exits, oldest first, each with how long before `now` it came.
    fn lines(&self, now: Instant) -> Vec<String> {
        let order = (0..KEPT).map(|i| (self.next + i) % KEPT);
        order
            .filter_map(|i| self.seen[i])
            .map(|s| {
                let ago = now.saturating_duration_since(s.at).as_micros();
                match s.arg {
                    Some(arg) => format!("{} {arg:#x} ({ago} us before)", s.kind),
                    None => format!("{} ({ago} us before)", s.kind),
                }
            })
            .collect()
    }
}

fn segment(name: &str, s: &kvm_segment) -> String {
    format!(
        "{name}={:#06x} base={:#x} limit={:#x} type={} dpl={} p={} l={} db={}",
        s.selector, s.base, s.limit, s.type_, s.dpl, s.present, s.l, s.db
    )
}

fn table(name: &str, t: &kvm_dtable) -> String {
    format!("{name} base={:#x} limit={:#x}", t.base, t.limit)
}

/// Everything vCPU `idx` can tell about its state, as console lines. Registers that
/// cannot be read say why instead.
pub fn report(idx: usize, vcpu: &VcpuFd, trail: &ExitTrail) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = |text: String| out.push(format!("vmm: crash: vCPU {idx}: {text}"));
    match vcpu.get_regs() {
        Ok(r) => {
            line(format!("rip={:#x} rsp={:#x} rbp={:#x} rflags={:#x}", r.rip, r.rsp, r.rbp, r.rflags));
            line(format!(
                "rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            ));
            line(format!(
                "r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
                r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            ));
        }
        Err(e) => line(format!("registers unreadable: {e}")),
    }
    match vcpu.get_sregs() {
        Ok(s) => {
            line(format!(
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} cr8={:#x} efer={:#x} apic_base={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base
            ));
            for (name, seg) in [("cs", &s.cs), ("ss", &s.ss), ("ds", &s.ds), ("tr", &s.tr)] {
                line(segment(name, seg));
            }
            line(format!("{}, {}", table("gdt", &s.gdt), table("idt", &s.idt)));
        }
        Err(e) => line(format!("system registers unreadable: {e}")),
    }
    match vcpu.get_vcpu_events() {
        Ok(ev) => {
            let mut text = String::new();
            let _ = write!(
                text,
                "exception injected={} pending={} nr={} error_code={:#x}",
                ev.exception.injected, ev.exception.pending, ev.exception.nr, ev.exception.error_code
            );
            let _ = write!(
                text,
                "; interrupt injected={} nr={}; nmi injected={} pending={} masked={}",
                ev.interrupt.injected, ev.interrupt.nr, ev.nmi.injected, ev.nmi.pending, ev.nmi.masked
            );
            line(text);
        }
        Err(e) => line(format!("events unreadable: {e}")),
    }
    let exits = trail.lines(Instant::now());
    line(format!("last {} of {} exits, oldest first:", exits.len(), trail.total));
    for e in exits {
        line(format!("  {e}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trail_keeps_the_last_exits_oldest_first() {
        let mut trail = ExitTrail::default();
        for port in 0..(KEPT as u16 + 3) {
            trail.record(&VcpuExit::IoOut(port, &[]));
        }
        trail.record(&VcpuExit::Shutdown);
        let lines = trail.lines(Instant::now());
        assert_eq!(lines.len(), KEPT);
        assert_eq!(trail.total, KEPT as u64 + 4);
        // The first four ports were overwritten; the shutdown came last.
        assert!(lines[0].starts_with("io-out 0x4 "), "{lines:?}");
        assert!(lines[KEPT - 2].starts_with("io-out 0x12 "), "{lines:?}");
        assert!(lines[KEPT - 1].starts_with("shutdown "), "{lines:?}");
    }
}
