//! `reflink`: `ioctl(FICLONE)` from the source memfd into a new memfd.
//!
//! A `cow` view (a memory cloned before with `cow` or `uffd-minor`) is made of sealed
//! layer files; its child gets each run linked with `FICLONERANGE`, which the patched
//! kernel does in O(1) for a sealed source.
//!
//! Each side then keeps a `MAP_SHARED` mapping of its own file and the kernel shares the
//! pages underneath until one side writes. No Linux kernel offers this for tmpfs/memfd
//! yet (they answer `EOPNOTSUPP` or `EXDEV`); vmfork's `kernel-patch/` adds it, for memfds
//! created with its `MFD_REFLINK` flag, which vmfork sets on every guest memfd where the
//! kernel accepts it. Support is probed once per process with two one-page memfds.

use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use super::{Error, Layout, MemFile, Region, Result, cow};

/// Whether this kernel can reflink memfds; the error explains why not.
pub fn probe() -> Result<()> {
    static PROBE: OnceLock<Option<i32>> = OnceLock::new();
    let errno = *PROBE.get_or_init(|| {
        let try_clone = || -> Result<()> {
            let a = MemFile::create("vmfork-reflink-probe", super::PAGE_SIZE)?;
            a.write_all_at(&[1], 0)?;
            let b = MemFile::create("vmfork-reflink-probe", super::PAGE_SIZE)?;
            ficlone(&b, &a)
        };
        match try_clone() {
            Ok(()) => None,
            Err(Error::ReflinkUnsupported(e) | Error::Reflink(e)) => e.raw_os_error(),
            Err(_) => Some(libc::EIO),
        }
    });
    match errno {
        None => Ok(()),
        Some(e) => Err(Error::ReflinkUnsupported(std::io::Error::from_raw_os_error(e))),
    }
}

/// Clones `src` into a new memfd: the whole file with `FICLONE`, or, for a `cow` view,
/// each run of its (sealed) layers with `FICLONERANGE` after freezing the pages it
/// dirtied into a layer of their own.
pub(super) fn clone_region(src: &Region) -> Result<Region> {
    src.materialize()?;
    let child = MemFile::create("vmfork-reflink", src.size())?;
    let file = match &*src.layout() {
        Layout::File(f) => Some(f.clone()),
        Layout::Layers(_) => None,
    };
    match file {
        Some(file) => ficlone(&child, &file)?,
        None => {
            let image = cow::freeze(src)?;
            for e in &image.extents {
                ficlone_range(&child, &e.file, e.file_offset, e.len, e.offset)?;
            }
            // Later patches win: cloned over the layers in order.
            for p in &image.patches {
                for (s, e, at) in p.placed() {
                    ficlone_range(&child, p.file(), at, e - s, s)?;
                }
            }
        }
    }
    Region::with_file(src.guest_addr(), Arc::new(child))
}

/// Makes `dst` share all of `src`'s contents.
fn ficlone(dst: &MemFile, src: &MemFile) -> Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open for
    // the duration of the call and no memory of ours is passed.
    let rc = unsafe { libc::ioctl(dst.file().as_raw_fd(), libc::FICLONE, src.file().as_raw_fd()) };
    check(rc)
}

/// Makes `[dst_offset, dst_offset + len)` of `dst` share `src` from `src_offset`.
fn ficlone_range(
    dst: &MemFile,
    src: &MemFile,
    src_offset: usize,
    len: usize,
    dst_offset: usize,
) -> Result<()> {
    let arg = libc::file_clone_range {
        src_fd: src.file().as_raw_fd().into(),
        src_offset: src_offset as u64,
        src_length: len as u64,
        dest_offset: dst_offset as u64,
    };
    // SAFETY: FICLONERANGE reads one file_clone_range, which outlives the call.
    let rc = unsafe { libc::ioctl(dst.file().as_raw_fd(), libc::FICLONERANGE, &arg) };
    check(rc)
}

fn check(rc: libc::c_int) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::ENOTTY | libc::EINVAL) => {
            Err(Error::ReflinkUnsupported(err))
        }
        _ => Err(Error::Reflink(err)),
    }
}
