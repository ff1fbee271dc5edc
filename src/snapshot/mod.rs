//! Snapshots: a running VM persisted as zstd-compressed chunks, and restored lazily.
//!
//! # Taking one ([`take`])
//! The VM pauses only as a `cow` fork pauses it: its vCPU and device state is captured
//! and its memory frozen (the layers become immutable, the VM goes on copy-on-write over
//! them). It resumes at once; the chunks are compressed and written afterwards, from the
//! frozen image, on a few threads. Each chunk (4 or 8 KiB) is stored as `ZERO` (nothing
//! but a flag), `ZSTD` (one frame) or `RAW` (where zstd saves less than 5 %), with a crc32c
//! of its uncompressed bytes; chunks go into packs of a few MiB. The directory is built
//! under a temporary name and renamed when complete, so a crash never leaves something
//! that looks like a whole snapshot. Format: [`format`] and `docs/snapshot-format.md`.
//!
//! # Restoring one ([`restore_memory`])
//! A new VM gets empty memfds, registered for missing-page faults; a page server thread
//! answers each fault by decoding the chunk around it once and placing the whole chunk
//! with one `UFFDIO_COPY` (`UFFDIO_ZEROPAGE` for a zero chunk). The VM gets a new
//! generation id and fresh entropy, as a fork child does ([`crate::fork::new_identity`]),
//! written into the chunk that holds them as it is placed: nothing has to be faulted in
//! before the vCPUs run. Where the snapshot has a working set (`ws.bin`,
//! recorded from an earlier restore's first touches by `vmfork snapshot record-ws`), a
//! prefetch thread places those chunks in recorded order from the moment the memory
//! exists; demand faults never wait for it (they are served by the other thread, and a
//! chunk placed by both is taken by whoever is first). `--eager` decodes everything
//! before the VM starts instead.
//!
//! A chunk that fails its checksum or does not decode stops the page server: the error
//! names the chunk and guest address, the pages never served are fenced, and the VM
//! stops (nothing hangs, and no wrong byte reaches the guest). A restore never writes to
//! the snapshot directory.

pub mod cache;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
mod inspect;
pub mod remote;
mod restore;
mod write;

use std::path::PathBuf;

pub use inspect::describe;
pub use restore::{RestoreOptions, RestoreStats, Snapshot, StatsReport, restore_memory};
pub use write::{Parent, Progress, Summary, TakeOptions, record_working_set, take};

/// Errors of snapshots: each says what is wrong, where, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("VM {0:?} is private (started with --private): it is never snapshotted")]
    Private(String),
    #[error("{0} already exists: snapshot into a new directory, or remove it first")]
    Exists(PathBuf),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path} is not a complete snapshot: {error} (was it written to the end?)")]
    Missing { path: PathBuf, error: std::io::Error },
    #[error("bad snapshot ({file}): {what}")]
    Format { file: &'static str, what: String },
    #[error("snapshot format version {0} is not supported by this vmfork (it reads version 1)")]
    Version(u32),
    #[error("snapshot chunk {chunk} is corrupt: {what}")]
    CorruptChunk { chunk: u64, what: String },
    #[error(
        "the snapshot holds a {guest_mib} MiB guest and this host has {host_mib} MiB of memory: restore it on a bigger host"
    )]
    TooBig { guest_mib: u64, host_mib: u64 },
    #[error(transparent)]
    Vm(#[from] crate::vmm::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
    #[error("bad VM state in state.json: {0}")]
    State(serde_json::Error),
    #[error("bad VM state in state.json: the state is of a {state}-byte guest, the memory of {memory} bytes")]
    StateSize { state: u64, memory: u64 },
    #[error("cannot encode the VM state as JSON: {0}")]
    EncodeState(serde_json::Error),
    #[error("{object}: {what}")]
    Remote { object: String, what: String },
    #[error("parent snapshot {location}: {what}")]
    Parent { location: String, what: String },
    #[error("cannot make the restored VM's new identity: {0}")]
    Identity(crate::fork::NewVmError),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |error| Error::Io { path, error }
}

/// The snapshot this process's VM was restored from, and its page servers' counters (a
/// process serves one VM).
static RESTORED: std::sync::OnceLock<(std::sync::Arc<Snapshot>, std::sync::Arc<RestoreStats>)> =
    std::sync::OnceLock::new();

/// Records that this process's VM was restored from `snap`, for [`restored_report`].
pub fn set_restored(snap: std::sync::Arc<Snapshot>, stats: std::sync::Arc<RestoreStats>) {
    let _ = RESTORED.set((snap, stats));
}

/// The snapshot directory and the restore's counters, if this VM was restored.
pub fn restored_report() -> Option<(PathBuf, StatsReport)> {
    RESTORED.get().map(|(snap, stats)| {
        let mut report = stats.report(snap.working_set.as_ref());
        report.remote = snap.remote_report();
        (snap.dir.clone(), report)
    })
}
