//! The host's cache of packs fetched from object stores, shared by every restore on
//! the host: the second restore of a snapshot fetches nothing.
//!
//! One file per pack, named by the store, key, size and crc32c of the pack (so a pack
//! replaced in the store under the same key is another entry). An entry is written to a
//! temporary name and renamed, so a reader never sees half of one; it is checked
//! against its size and crc32c every time a restore takes it, and removed when it fails.
//! The cache is bounded (`VMFORK_PACK_CACHE_MB`, default 4096): after an insert the
//! least recently used entries go until it fits. Where: `VMFORK_PACK_CACHE`, else
//! `$XDG_CACHE_HOME/vmfork/packs`, else `~/.cache/vmfork/packs`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use super::{Result, io_err};

#[derive(Clone, Debug)]
pub struct PackCache {
    pub dir: PathBuf,
    pub limit_bytes: u64,
}

/// FNV-1a, 64 bits: a stable name for a key (not a checksum: entries carry the crc).
fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl PackCache {
    pub fn from_env() -> PackCache {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let dir = var("VMFORK_PACK_CACHE")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("vmfork/packs")))
            .or_else(|| var("HOME").map(|d| d.join(".cache/vmfork/packs")))
            .unwrap_or_else(|| std::env::temp_dir().join("vmfork-packs"));
        let mb = std::env::var("VMFORK_PACK_CACHE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(4096u64);
        PackCache { dir, limit_bytes: mb << 20 }
    }

    fn path(&self, scope: &str, name: &str, size: u64, crc: u32) -> PathBuf {
        self.dir.join(format!("{:016x}-{crc:08x}-{size}.pack", fnv64(&format!("{scope}|{name}"))))
    }

    /// The cached pack, if there is one of this size and checksum.
    pub fn get(&self, scope: &str, name: &str, size: u64, crc: u32) -> Option<File> {
        let path = self.path(scope, name, size, crc);
        let mut f = File::open(&path).ok()?;
        let mut data = Vec::with_capacity(size as usize);
        let good =
            f.read_to_end(&mut data).is_ok() && data.len() as u64 == size && crc32c::crc32c(&data) == crc;
        if !good {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // Recently used: the eviction goes by modification time.
        let _ = f.set_modified(SystemTime::now());
        Some(f)
    }

    /// Stores a pack (checked by the caller) and returns it open.
    pub fn put(&self, scope: &str, name: &str, data: &[u8], crc: u32) -> Result<File> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.path(scope, name, data.len() as u64, crc);
        let tmp =
            path.with_extension(format!("tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.evict();
        File::open(&path).map_err(io_err(&path))
    }

    /// Removes the least recently used entries until the cache fits its bound.
    fn evict(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return };
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = dir
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.limit_bytes {
                break;
            }
            // An open entry stays readable by whoever has it open.
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_checked_and_the_oldest_go_first() {
        let dir = std::env::temp_dir().join(format!("vmfork-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = PackCache { dir: dir.clone(), limit_bytes: 2500 };
        let pack = |b: u8| vec![b; 1000];
        for b in 0..3u8 {
            cache.put("s", &format!("p{b}"), &pack(b), crc32c::crc32c(&pack(b))).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(cache.get("s", "p0", 1000, crc32c::crc32c(&pack(0))).is_none(), "the oldest was kept");
        assert!(cache.get("s", "p2", 1000, crc32c::crc32c(&pack(2))).is_some());
        // A damaged entry is refused and removed.
        let path = cache.path("s", "p1", 1000, crc32c::crc32c(&pack(1)));
        std::fs::write(&path, pack(9)).unwrap();
        assert!(cache.get("s", "p1", 1000, crc32c::crc32c(&pack(1))).is_none());
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
