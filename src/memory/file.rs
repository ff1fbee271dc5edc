//! The two kernel objects every strategy is built from: a memfd holding guest memory
//! ([`MemFile`]) and an mmap of (part of) it ([`Mapping`]).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Error, Result};

/// The base page size; every size and offset vmfork accepts is a multiple of it.
pub const PAGE_SIZE: usize = 4096;

/// A memfd that holds (part of) a guest's memory.
///
/// Created with sealing allowed, so that a clone can turn it into an immutable base
/// ([`MemFile::seal_immutable`]) that any number of copy-on-write views may share.
#[derive(Debug)]
pub struct MemFile {
    file: File,
    size: usize,
}

impl MemFile {
    /// Creates a memfd of `size` bytes (a sparse file: no memory is used until written).
    pub fn create(name: &str, size: usize) -> Result<Self> {
        check_size(size)?;
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | reflink_flag();
        let file = File::from(memfd_create(name, flags).map_err(Error::Memfd)?);
        file.set_len(size as u64).map_err(Error::Memfd)?;
        Ok(MemFile { file, size })
    }

    /// Wraps a memfd received from elsewhere (e.g. over a Unix socket).
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let file = File::from(fd);
        let size = file.metadata().map_err(Error::File)?.len() as usize;
        check_size(size)?;
        Ok(MemFile { file, size })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The file descriptor, e.g. for `FICLONE` or to pass to another process.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of memory the file holds (allocated pages), whoever maps it.
    pub fn allocated_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata().map_err(Error::File)?.blocks() * 512)
    }

    /// Makes the file immutable: no write, grow or shrink, ever again.
    ///
    /// The kernel refuses `F_SEAL_WRITE` while any writable shared mapping of the file
    /// exists (`EBUSY`), so callers first turn their own shared mappings private.
    pub fn seal_immutable(&self) -> Result<()> {
        let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl(F_ADD_SEALS) takes an int argument and touches no memory of ours.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        if rc < 0 {
            return Err(Error::Seal(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Cuts the file to `size` bytes (a page multiple), freeing the pages past it. Before
    /// sealing only: a sealed file cannot shrink.
    pub fn truncate(&mut self, size: usize) -> Result<()> {
        check_size(size)?;
        self.file.set_len(size as u64).map_err(Error::File)?;
        self.size = size;
        Ok(())
    }

    /// Writes `data` at `offset` with pwrite(2), allocating pages in the kernel without
    /// touching any page table: the fastest way to fill a fresh memfd.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset).map_err(Error::File)
    }

    /// Writes `parts` back to back from `offset` with pwritev(2), up to `IOV_MAX` of
    /// them per call: one system call for what would be a thousand pwrites of single
    /// pages (a re-freeze's patch is mostly scattered 4 KiB runs).
    pub fn write_all_vectored_at(&self, mut parts: &[&[u8]], mut offset: u64) -> Result<()> {
        const IOV_MAX: usize = 1024;
        // Where the first part's unwritten bytes start, after a short write.
        let mut skip = 0;
        while let Some(first) = parts.first() {
            if skip == first.len() {
                (parts, skip) = (&parts[1..], 0);
                continue;
            }
            let iov: Vec<libc::iovec> = parts
                .iter()
                .take(IOV_MAX)
                .enumerate()
                .map(|(i, p)| {
                    let p = if i == 0 { &p[skip..] } else { p };
                    libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }
                })
                .collect();
            // SAFETY: every iovec describes bytes of a live `&[u8]` in `parts`, which
            // pwritev only reads; the fd is ours and open.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::File(e));
            }
            if n == 0 {
                return Err(Error::File(std::io::ErrorKind::WriteZero.into()));
            }
            let mut n = n as usize;
            offset += n as u64;
            // Step over what was written.
            while n > 0 {
                let left = parts[0].len() - skip;
                if n >= left {
                    n -= left;
                    (parts, skip) = (&parts[1..], 0);
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Ranges `[start, end)` of the file that hold data (allocated pages), from
    /// `SEEK_DATA`/`SEEK_HOLE`.
    pub fn data_ranges(&self) -> Vec<(usize, usize)> {
        let fd = self.file.as_raw_fd();
        let mut ranges = Vec::new();
        let mut pos: libc::off_t = 0;
        while (pos as usize) < self.size {
            // SAFETY: lseek only moves this fd's file offset; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data past `pos`.
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { self.size as libc::off_t } else { hole };
            ranges.push((data as usize, end as usize));
            pos = end;
        }
        ranges
    }
}

impl AsFd for MemFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `MFD_REFLINK` from vmfork's kernel patch (`kernel-patch/`): marks a memfd as allowed
/// to be a `FICLONE` source or destination. Kernels without the patch reject the flag.
pub const MFD_REFLINK: libc::c_uint = 0x0020;

/// `MFD_REFLINK` where the kernel knows it, else nothing: every guest memfd is made
/// clonable, since a fork may come at any time.
fn reflink_flag() -> libc::c_uint {
    static FLAG: OnceLock<libc::c_uint> = OnceLock::new();
    *FLAG.get_or_init(|| match memfd_create("vmfork-probe", libc::MFD_CLOEXEC | MFD_REFLINK) {
        Ok(_) => MFD_REFLINK,
        Err(_) => 0,
    })
}

fn memfd_create(name: &str, flags: libc::c_uint) -> std::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks that `size` is a non-zero multiple of [`PAGE_SIZE`].
pub fn check_size(size: usize) -> Result<()> {
    if size == 0 || size % PAGE_SIZE != 0 {
        return Err(Error::BadSize(size));
    }
    Ok(())
}

/// How a [`Mapping`] sees its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// `MAP_SHARED`: writes go to the file.
    Shared,
    /// `MAP_PRIVATE`: writes copy the page into anonymous memory of this mapping only.
    Private,
}

/// The `madvise(2)` advice vmfork gives guest memory: only kinds that keep its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_HUGEPAGE`: back the range with transparent huge pages where the kernel can.
    HugePage,
    /// `MADV_POPULATE_READ`: fault every page of the range in for reading.
    PopulateRead,
    /// `MADV_POPULATE_WRITE`: fault every page of the range in for writing (allocating
    /// it), as if written, without changing what it holds.
    PopulateWrite,
}

/// An owned, page-aligned virtual address range, unmapped on drop.
///
/// A region reserves its whole range once and then maps files over parts of it with
/// `MAP_FIXED`, so the host address of guest memory never changes (KVM memory slots and
/// raw pointers handed out stay valid across clones).
#[derive(Debug)]
pub struct Mapping {
    addr: NonNull<u8>,
    len: usize,
    /// `MADV_HUGEPAGE` was asked for; it is per VMA, so every `map_file` renews it.
    huge: AtomicBool,
}

// SAFETY: a Mapping is an address range; access to the bytes is synchronised by the owners
// of the memory (GuestMemory hands out copies, not references), as for any mmap.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping only exposes the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Reserves `len` bytes of address space with no access, to be filled with
    /// [`Mapping::map_file`].
    pub fn reserve(len: usize) -> Result<Self> {
        check_size(len)?;
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address of the kernel's choice
        // cannot alias any memory Rust knows about.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Mapping {
            addr: NonNull::new(ptr.cast()).expect("mmap never returns NULL on success"),
            len,
            huge: AtomicBool::new(false),
        })
    }

    /// Maps `len` bytes of `fd` from `file_offset` at `offset` within this range,
    /// replacing whatever was mapped there (`MAP_FIXED`).
    pub fn map_file(
        &self,
        offset: usize,
        len: usize,
        fd: RawFd,
        file_offset: usize,
        share: Share,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let flags = libc::MAP_FIXED
            | match share {
                Share::Shared => libc::MAP_SHARED,
                Share::Private => libc::MAP_PRIVATE,
            };
        // SAFETY: the target range lies inside our own reservation (checked above), so
        // MAP_FIXED replaces only pages this Mapping owns; no Rust reference points into
        // guest memory (it is accessed through raw copies only).
        let ptr = unsafe {
            libc::mmap(
                self.addr.as_ptr().add(offset).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                file_offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        if self.huge.load(Ordering::Relaxed) {
            self.madvise(offset, len, Advice::HugePage)?;
        }
        Ok(())
    }

    /// Fills `[offset, offset + len)` of the mapping with `len` bytes of `file` from
    /// `file_offset` (pread(2) straight into the mapping: a private mapping copies each
    /// page on write, so only this mapping sees the bytes).
    pub fn fill_from(&self, offset: usize, len: usize, file: &File, file_offset: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::BadRange { offset, len });
        }
        let mut done = 0;
        while done < len {
            // SAFETY: [offset + done, offset + len) lies inside this mapping (checked
            // above), which is ours and readable and writable; guest memory is never
            // held by a Rust reference, so writing it behind Rust's back is sound.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    self.addr.as_ptr().add(offset + done).cast(),
                    len - done,
                    (file_offset + done) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(Error::File(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("file ends before offset {:#x}", file_offset + done),
                    )));
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::File(e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Asks for transparent huge pages over the whole range (`MADV_HUGEPAGE`). Whether
    /// shmem uses them also depends on `/sys/kernel/mm/transparent_hugepage/shmem_enabled`.
    pub fn advise_huge(&self) -> Result<()> {
        self.huge.store(true, Ordering::Relaxed);
        self.madvise(0, self.len, Advice::HugePage)
    }

    /// `madvise(2)` over a sub-range, with one of the pieces of advice that leave the
    /// contents as they are.
    pub fn madvise(&self, offset: usize, len: usize, advice: Advice) -> Result<()> {
        self.check_range(offset, len)?;
        let advice = match advice {
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::PopulateRead => libc::MADV_POPULATE_READ,
            Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
        };
        // SAFETY: the range lies inside our reservation, and no piece of advice
        // changes what the memory holds (no DONTNEED, FREE or REMOVE), so no Rust
        // reference into it is invalidated.
        let rc = unsafe { libc::madvise(self.addr.as_ptr().add(offset).cast(), len, advice) };
        if rc < 0 {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// `mprotect(2)` over a sub-range.
    pub fn protect(&self, offset: usize, len: usize, prot: libc::c_int) -> Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: the range lies inside our reservation; guest memory is never borrowed
        // by Rust references, so changing its protection cannot invalidate one.
        let rc = unsafe { libc::mprotect(self.addr.as_ptr().add(offset).cast(), len, prot) };
        if rc < 0 {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// First byte of the range.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(Error::BadRange { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::BadRange { offset, len }),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this range since `reserve`; nothing may use it after drop.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}
