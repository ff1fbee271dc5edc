//! Where VM processes live on a host, and who each is: the per-user runtime directory
//! with every VM's control socket and log, and a VM's [`Identity`]. Shared by the
//! control socket ([`crate::api`]) and the fork protocol ([`crate::fork`]), which
//! otherwise know nothing of each other's insides.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::memory::Strategy;

/// Errors of names and the runtime directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad VM name {0:?}: use letters, digits, '.', '_' and '-' (at most 64)")]
    BadName(String),
    #[error("cannot use runtime directory {path}: {error}")]
    RuntimeDir { path: PathBuf, error: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Who a VM process is: its name, whether it may be forked, and whom it was forked from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    /// Started with `--private`: never forked.
    pub private: bool,
    /// The VM this one was forked from, and how.
    pub parent: Option<String>,
    pub strategy: Option<Strategy>,
    /// The snapshot directory this VM was restored from.
    #[serde(default)]
    pub restored_from: Option<PathBuf>,
}

/// The per-user directory holding the control sockets, created (mode 0700) if needed.
pub fn runtime_dir() -> Result<PathBuf> {
    let dir = if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("vmfork")
    } else if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/vmfork")
    } else {
        PathBuf::from(format!("/tmp/vmfork-{}", nix::unistd::geteuid()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|error| Error::RuntimeDir { path: dir.clone(), error })?;
    Ok(dir)
}

/// Checks a VM name (it becomes a file name).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok { Ok(()) } else { Err(Error::BadName(name.to_string())) }
}

/// Path of VM `name`'s socket.
pub fn socket_path(name: &str) -> Result<PathBuf> {
    check_name(name)?;
    Ok(runtime_dir()?.join(format!("{name}.sock")))
}

/// Names of every VM with a socket in the runtime directory (live or stale), sorted.
pub fn names() -> Result<Vec<String>> {
    let dir = runtime_dir()?;
    let rd = std::fs::read_dir(&dir).map_err(|error| Error::RuntimeDir { path: dir.clone(), error })?;
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".sock").map(str::to_string))
        .collect();
    v.sort();
    Ok(v)
}

/// Where the process `pid` binds VM `name`'s socket before it links it into place as
/// [`socket_path`] (see [`crate::api::Server::bind`]): `NAME.sock.new-PID`.
pub fn binding_path(name: &str, pid: u32) -> Result<PathBuf> {
    Ok(socket_path(name)?.with_extension(format!("sock.new-{pid}")))
}

/// Removes the [`binding_path`]s of processes that are gone: a VM process killed between
/// binding its socket and linking it into place leaves one, which no client would ever
/// meet as stale. Returns what it removed.
pub fn remove_stale_bindings() -> Result<Vec<PathBuf>> {
    let dir = runtime_dir()?;
    let rd = std::fs::read_dir(&dir).map_err(|error| Error::RuntimeDir { path: dir.clone(), error })?;
    let mut removed = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let file = e.file_name();
        let Some((_, pid)) = file.to_str().and_then(|f| f.rsplit_once(".sock.new-")) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    Ok(removed)
}

/// Path of VM `name`'s log (its stdout and stderr, the guest's console echo included).
pub fn log_path(name: &str) -> Result<PathBuf> {
    check_name(name)?;
    Ok(runtime_dir()?.join(format!("{name}.log")))
}
