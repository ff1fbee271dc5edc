//! What happens to a lazily filled memory whose page server died: the pages it never
//! served are fenced off, and touching one ends the process with a message that says so,
//! instead of a fault that waits forever.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::sys::Uffd;
use crate::memory::PAGE_SIZE;

/// Exit status of a process that touched guest memory its dead page server never served.
pub const EXIT_PAGE_SERVER_DIED: i32 = 86;

/// Fenced address ranges, readable from the signal handler without locks.
const SLOTS: usize = 64;
static FENCED: [(AtomicUsize, AtomicUsize); SLOTS] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; SLOTS];
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Fences the `unserved` ranges (offsets) of the lazily filled range `[addr, addr + len)`,
/// then wakes every thread waiting on a fault there so it retries and meets the fence.
pub(super) fn fence(uffd: &Uffd, unserved: &[(usize, usize)], addr: usize, len: usize) {
    if let Some((start, end)) = FENCED.iter().find(|(s, _)| s.load(Ordering::Acquire) == 0) {
        end.store(addr + len, Ordering::Release);
        start.store(addr, Ordering::Release);
    }
    for &(from, to) in unserved {
        // SAFETY: the range lies inside the lazily filled region, which outlives its
        // watchdog; guest memory is never borrowed by Rust references.
        unsafe { libc::mprotect((addr + from) as *mut libc::c_void, to - from, libc::PROT_NONE) };
    }
    let _ = uffd.wake(addr, len);
}

/// Forgets a fenced range whose region is gone (its addresses may be reused).
pub(super) fn forget(addr: usize) {
    for (start, end) in &FENCED {
        if start.load(Ordering::Acquire) == addr {
            start.store(0, Ordering::Release);
            end.store(0, Ordering::Release);
        }
    }
}

/// Installs the SIGSEGV handler once per process; other faults go on to the handler that
/// was there before (Rust's stack-overflow report, or the default action).
pub(super) fn install_handler() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: an all-zero sigaction is a valid value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_segv as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to valid sigaction values; the handler only uses
        // async-signal-safe operations (atomics, write, _exit, sigaction).
        unsafe { libc::sigaction(libc::SIGSEGV, &action, &mut previous) };
        previous
    });
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let ours = FENCED.iter().any(|(s, e)| {
        let s = s.load(Ordering::Acquire);
        s != 0 && addr >= s && addr < e.load(Ordering::Acquire)
    });
    if ours {
        let mut msg = *b"vmfork: guest memory page 0x0000000000000000 was never served: its page server died; the VM cannot continue\n";
        let hex = b"0123456789abcdef";
        let page = addr & !(PAGE_SIZE - 1);
        for i in 0..16 {
            msg[28 + i] = hex[(page >> (60 - 4 * i)) & 0xf];
        }
        // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is a valid buffer.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(EXIT_PAGE_SERVER_DIED);
        }
    }
    match PREVIOUS.get() {
        Some(prev) if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN => {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so it has
                // this signature; we pass it the arguments we were given.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes only the signal.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Default action: reset and return, so the access faults again and kills us.
            // SAFETY: an all-zero sigaction with SIG_DFL is valid; sigaction is
            // async-signal-safe.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
            }
        }
    }
}
