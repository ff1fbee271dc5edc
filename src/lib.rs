//! vmfork: fork running KVM virtual machines by cloning their guest memory as a file.
//!
//! [`memory`] holds guest memory and the clone strategies (copy, cow, reflink, uffd,
//! auto); [`vmm`] runs the built-in guest in KVM VMs over that memory; [`fork`] turns one
//! running VM into two processes; [`snapshot`] persists one as compressed chunks and
//! restores it lazily; [`bench`] compares the strategies side by side; [`wire`] frames
//! every message that crosses between the processes of a fork.
//!
//! Errors are an enum per module, one meaning per variant. Each message says what
//! happened and, where it helps, what to do. A variant either writes its cause into its
//! message or hands it out as `source()`, never both; the `vmfork` command prints an
//! error with [`error::Report`], which follows `source()`, so every cause is printed
//! once. Most variants write their cause in (so `{e}` alone says everything); the
//! bench's errors hand theirs out. Wrappers that add nothing are `#[error(transparent)]`.

pub mod api;
pub mod bench;
pub mod cli;
pub mod error;
pub mod fork;
pub mod memory;
pub mod names;
pub mod runtime;
pub mod snapshot;
pub mod units;
pub mod vmm;
pub mod wire;
