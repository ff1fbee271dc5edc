//! vmfork: fork running KVM virtual machines by cloning their guest memory as a file.
//!
//! [`memory`] holds guest memory and the clone strategies (copy, cow, reflink, uffd,
//! auto); [`bench`] compares them side by side.

pub mod bench;
pub mod memory;
pub mod units;
