//! A thin userfaultfd binding: the handful of ioctls vmfork uses, one method each.
//!
//! vmfork binds the uAPI itself rather than using the `userfaultfd` crate, whose build
//! runs bindgen (it needs libclang on every build machine) and pins an old `nix`; the
//! structures below are fixed kernel ABI (include/uapi/linux/userfaultfd.h).
//!
//! # Where the unsafety sits
//! Placing bytes into memory (`copy`, `zeropage`, `continue_range`) takes raw addresses
//! but is a safe method: the kernel refuses any destination outside a range registered
//! with the same descriptor (`ENOENT`/`EINVAL`), and registering is the `unsafe fn`
//! [`Uffd::register`], whose caller promises that no Rust reference or allocation covers
//! the range for as long as it stays registered. A descriptor received from another
//! process ([`Uffd::from_fd`]) fills only ranges that process registered, under the same
//! promise made there.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFD_API: u64 = 0xAA;

/// The ioctl type of userfaultfd, and each command's number and argument, as
/// include/uapi/linux/userfaultfd.h declares them: the macros size each request by its
/// struct below, so a struct that drifts from the ABI changes the request number too
/// (and the test pins the numbers).
const UFFDIO: u32 = 0xAA;
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, ApiArg);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, RegisterArg);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, Range);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, Range);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, CopyArg);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, ZeroPageArg);
ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, ContinueArg);
// `/dev/userfaultfd`'s own ioctl (include/uapi/linux/userfaultfd.h, `_IO(UFFDIO, 0x00)`).
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// Features vmfork asks for.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// uffd-WP on shmem (and hugetlbfs) mappings, private ones included.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protecting a range also covers its unpopulated pages (with PTE markers).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// A write to a write-protected page is let through by the kernel itself, which only
/// notes that the page was written (read back with `PAGEMAP_SCAN`): no message, no
/// server.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// Which faults a range reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No page in the page cache (shmem) or page table: fill with `UFFDIO_COPY`.
    Missing = 1,
    /// A write to a write-protected page (with [`FEATURE_WP_ASYNC`], resolved by the
    /// kernel and only recorded).
    WriteProtect = 2,
    /// The page is in the page cache but not mapped here: map it with `UFFDIO_CONTINUE`.
    Minor = 4,
}

/// Events read from the descriptor.
pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_REMOVE: u8 = 0x15;

#[repr(C)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct ContinueArg {
    range: Range,
    mode: u64,
    mapped: i64,
}

#[repr(C)]
struct ZeroPageArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// One message read from a userfaultfd (`struct uffd_msg`, 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Msg {
    pub event: u8,
    _reserved: [u8; 7],
    /// pagefault: flags; remove: start.
    pub arg0: u64,
    /// pagefault: address; remove: end.
    pub arg1: u64,
    _arg2: u64,
}

/// An open userfaultfd (non-blocking, close-on-exec).
///
/// Filling a range (`copy`, `zeropage`, `continue_range`) writes memory behind the back
/// of any Rust code that holds it, so ranges come in only through [`Uffd::register`],
/// which is `unsafe`: its caller promises the range is memory no Rust reference covers.
/// After that, the kernel refuses every fill outside the registered ranges, and the fills
/// are safe to call.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd and negotiates `features`. Kernel-mode faults (KVM's accesses
    /// to guest memory) are handled too: `UFFD_USER_MODE_ONLY` is not set.
    pub fn open(features: u64) -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let fd = if raw >= 0 {
            // SAFETY: `raw` is a fresh fd that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            // Unprivileged syscall use may be off (vm.unprivileged_userfaultfd=0);
            // /dev/userfaultfd grants it by file permission instead.
            let dev = OpenOptions::new().read(true).write(true).open("/dev/userfaultfd").map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create a userfaultfd ({}; /dev/userfaultfd: {e}): run as root, set vm.unprivileged_userfaultfd=1, or give this user access to /dev/userfaultfd",
                        io::Error::last_os_error()
                    ),
                )
            })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
            let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW(), flags) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the ioctl returned a fresh fd that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let mut api = ApiArg { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes one ApiArg, which lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API(), &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uffd { fd })
    }

    /// Wraps a userfaultfd received from another process (it keeps serving the address
    /// space of the process that created it).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Uffd { fd }
    }

    /// Routes faults of `mode` in `[start, start + len)` to this descriptor.
    ///
    /// # Safety
    /// The range must be a mapping that no Rust reference or allocation covers, for as
    /// long as it stays registered (guest memory, reached only by raw pointers): filling
    /// it later places bytes there, and a fault in it waits for whoever serves it.
    pub unsafe fn register(&self, start: usize, len: usize, mode: Mode) -> io::Result<()> {
        let mut arg = RegisterArg {
            range: Range { start: start as u64, len: len as u64 },
            mode: mode as u64,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one RegisterArg that outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER(), &mut arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops routing faults in the range here.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let arg = Range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads one Range that outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER(), &arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes threads waiting on faults in the range, so they retry.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let arg = Range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE reads one Range that outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE(), &arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Atomically fills `src.len()` bytes at `dst` (registered, missing) with a copy of
    /// `src` and wakes the faulting threads. Returns the bytes copied; on an error after a
    /// partial copy, the error is returned with nothing more to say about the prefix.
    pub fn copy(&self, dst: usize, src: &[u8]) -> io::Result<usize> {
        let mut arg =
            CopyArg { dst: dst as u64, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY reads the `src.len()` bytes of `src` and writes only into
        // ranges registered with this descriptor (whose registration promised no Rust
        // reference covers them) and the CopyArg, which outlives the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY(), &mut arg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(arg.copy as usize)
    }

    /// Maps the page-cache pages already backing `[dst, dst + len)` and wakes the
    /// faulting threads; returns the bytes mapped. In a `MAP_PRIVATE` mapping the pages
    /// are mapped read-only, so a later write still copies.
    pub fn continue_range(&self, dst: usize, len: usize) -> io::Result<usize> {
        let mut arg = ContinueArg { range: Range { start: dst as u64, len: len as u64 }, mode: 0, mapped: 0 };
        // SAFETY: UFFDIO_CONTINUE writes only page tables of the registered range and
        // the argument, which outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE(), &mut arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(arg.mapped as usize)
    }

    /// Fills `len` bytes at `dst` with zeros and wakes the faulting threads.
    pub fn zeropage(&self, dst: usize, len: usize) -> io::Result<()> {
        let mut arg =
            ZeroPageArg { range: Range { start: dst as u64, len: len as u64 }, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE writes only into the registered range and the argument.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE(), &mut arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads pending messages into `buf`; returns how many (0 when none is pending).
    pub fn read(&self, buf: &mut [Msg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is valid for `bytes` bytes of writes, and Msg is plain old data
        // for which any bit pattern is valid.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        Ok(n as usize / std::mem::size_of::<Msg>())
    }

    /// The descriptor, for poll(2) or to pass to another process.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Uffd {
    /// The descriptor, to pass to another process.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

const _: () = assert!(std::mem::size_of::<Msg>() == 32);

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers the kernel's headers give (x86-64), against the ones the
    /// macros compute from the structs here.
    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(UFFDIO_API(), 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER(), 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE(), 0x8010_AA02);
        assert_eq!(UFFDIO_COPY(), 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xC020_AA04);
        assert_eq!(UFFDIO_CONTINUE(), 0xC020_AA07);
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xAA00);
        assert_eq!(std::mem::size_of::<Msg>(), 32);
    }
}
