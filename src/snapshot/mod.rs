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
    /// A file of the snapshot breaks the format; `what` says how.
    #[error("bad snapshot ({file}): {what}")]
    Format { file: &'static str, what: String },
    #[error("bad snapshot (snapshot.json): it does not read as a vmfork snapshot manifest")]
    Manifest(#[source] serde_json::Error),
    /// The entries of `index.bin` or `hashes.bin` do not decompress.
    #[error("bad snapshot ({file}): its entries do not decompress")]
    Entries {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("bad snapshot (state.json): it is not UTF-8 text")]
    StateText(#[source] std::string::FromUtf8Error),
    #[error("chunk size {0} is not one a snapshot can have: take it with --chunk 4K or 8K")]
    ChunkSize(u32),
    #[error("snapshot format version {0} is not supported by this vmfork (it reads version 1)")]
    Version(u32),
    /// A chunk's stored bytes are not what its index entry says; `what` says how.
    #[error("snapshot chunk {chunk} is corrupt: {what}")]
    CorruptChunk { chunk: u64, what: String },
    #[error("snapshot chunk {chunk} is corrupt: its zstd frame does not decompress")]
    CorruptFrame {
        chunk: u64,
        #[source]
        source: std::io::Error,
    },
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

    // The object store. `object` is `s3://BUCKET/KEY`.
    #[error("cannot set up a client for {url} at {endpoint}")]
    Client {
        url: String,
        endpoint: String,
        #[source]
        source: remote::ClientError,
    },
    #[error("{object}: not found (no such object, or no such bucket)")]
    NotFound { object: String },
    #[error("{object}: access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")]
    Denied { object: String },
    /// Any other failure of a request: the store's client says what.
    #[error("{object}: the request to the store at {endpoint} failed")]
    Request {
        object: String,
        endpoint: String,
        #[source]
        source: remote::ClientError,
    },
    #[error("{object}: a snapshot is there already: push to a new prefix")]
    Pushed { object: String },
    #[error("{object}: not found: the snapshot in the store is incomplete")]
    PackMissing { object: String },
    #[error(
        "{object}: {len} bytes that fail their checksum (the manifest says {size} bytes, crc32c {crc:08x})"
    )]
    PackChecksum { object: String, len: u64, size: u64, crc: u32 },

    // Parents: `location` is where the child's manifest says its parent is.
    #[error(
        "parent snapshot {location}: {} references its packs in a local directory, which other hosts cannot read: push the parent, then snapshot the VM to the store with --parent s3://...",
        dir.display()
    )]
    LocalParentPushed { location: String, dir: PathBuf },
    #[error(
        "parent snapshot {location}: a snapshot in an object store names a local directory as its parent"
    )]
    LocalParentInStore { location: String },
    #[error("the snapshot names a parent at an address no snapshot can be at")]
    ParentUrl(#[source] remote::BadS3Url),
    #[error("parent snapshot {location}: a snapshot taken with --parent needs its parents' packs")]
    ParentPacks {
        location: String,
        #[source]
        source: Box<Error>,
    },
    #[error("parent snapshot {location}: its snapshot.json does not read as a vmfork snapshot manifest")]
    ParentManifest {
        location: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("parent snapshot {location}: it has no pack checksums: take it again with this vmfork")]
    ParentNoChecksums { location: String },
    #[error(
        "parent snapshot {location}: it is the end of a chain of {snapshots} snapshots already: take this one without --parent"
    )]
    ParentChainFull { location: String, snapshots: usize },
    #[error(
        "parent snapshot {location}: it has no chunk hashes (hashes.bin): take it again with this vmfork to use it as a parent"
    )]
    ParentNoHashes { location: String },
    #[error("parent snapshot {location}: it holds another guest memory layout (a VM of another size)")]
    ParentLayout { location: String },
    #[error("parent snapshot {location}: its chunks are {kib} KiB: take this one with --chunk {kib}K")]
    ParentChunkSize { location: String, kib: u32 },
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors that wrap another hand it out as their source: the report shows it once,
    /// after what went wrong.
    #[test]
    fn a_wrapped_cause_is_reported_once_after_what_went_wrong() {
        let parse = serde_json::from_str::<format::Manifest>("{").unwrap_err();
        let parse_text = parse.to_string();
        let text = crate::error::tests::report_once(&Error::Manifest(parse));
        assert!(text.starts_with("bad snapshot (snapshot.json): "), "{text}");
        assert_eq!(text.matches(&parse_text).count(), 1, "{text}");

        let missing = Error::Missing {
            path: "/snaps/a/pack-0000.bin".into(),
            error: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let e = Error::ParentPacks { location: "/snaps/a".into(), source: Box::new(missing) };
        let text = crate::error::tests::report_once(&e);
        assert!(text.starts_with("parent snapshot /snaps/a: a snapshot taken with --parent needs"), "{text}");
        assert_eq!(text.matches("No such file").count(), 1, "{text}");

        let cause = object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        let cause_text = cause.to_string();
        let e = Error::Request {
            object: "s3://b/p/snapshot.json".into(),
            endpoint: "http://127.0.0.1:9".into(),
            source: remote::ClientError(Box::new(cause)),
        };
        let text = crate::error::tests::report_once(&e);
        assert!(
            text.starts_with("s3://b/p/snapshot.json: the request to the store at http://127.0.0.1:9"),
            "{text}"
        );
        assert_eq!(text.matches(&cause_text).count(), 1, "{text}");

        let bad = remote::S3Url::parse("s3://B").unwrap().unwrap_err();
        let text = crate::error::tests::report_once(&Error::ParentUrl(bad));
        assert_eq!(text.matches("s3://B").count(), 1, "the address once: {text}");
        assert!(text.contains("3 to 63 characters"), "{text}");
    }
}
