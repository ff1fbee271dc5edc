//! `reflink`: `ioctl(FICLONE)` from the source memfd into a new memfd.
//!
//! Each side then keeps a `MAP_SHARED` mapping of its own file and the kernel shares the
//! pages underneath until one side writes. No Linux kernel offers this for tmpfs/memfd
//! yet (they answer `EOPNOTSUPP` or `EXDEV`); vmfork's `kernel-patch/` adds it. Support is
//! probed once per process with two one-page memfds.

use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use super::{Error, Layout, MemFile, Region, Result};

/// `_IOW(0x94, 9, int)` from include/uapi/linux/fs.h.
const FICLONE: libc::c_ulong = 0x4004_9409;

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

/// Clones `src` into a new memfd with `FICLONE`.
pub(super) fn clone_region(src: &Region) -> Result<Region> {
    src.materialize()?;
    let file = match &*src.layout() {
        Layout::File(f) => f.clone(),
        Layout::Layers(extents) => return Err(Error::ReflinkNeedsFile(extents.len())),
    };
    let child = MemFile::create("vmfork-reflink", file.size())?;
    ficlone(&child, &file)?;
    Region::with_file(src.guest_addr(), Arc::new(child))
}

/// Makes `dst` share all of `src`'s contents.
fn ficlone(dst: &MemFile, src: &MemFile) -> Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open for
    // the duration of the call and no memory of ours is passed.
    let rc = unsafe { libc::ioctl(dst.file().as_raw_fd(), FICLONE, src.file().as_raw_fd()) };
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
