//! Writing a snapshot: the pause, then the chunks from the frozen image.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::format::{self, Entry, Index, Kind, Manifest, RegionInfo, WorkingSet};
use super::{Error, Result, Snapshot, io_err};
use crate::memory::{Region, cow};
use crate::vmm::Vm;

/// A pack is closed once it holds this much.
pub const PACK_SIZE: u64 = 4 << 20;

/// Options of [`take`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TakeOptions {
    /// zstd level (1 is fast; 3 a little smaller).
    pub level: i32,
    /// 4096 or 8192.
    pub chunk_size: u32,
}

impl Default for TakeOptions {
    fn default() -> Self {
        TakeOptions { level: 1, chunk_size: 8192 }
    }
}

/// How far the write is, for a progress bar.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub stored_bytes: u64,
    pub elapsed_secs: f64,
}

/// What [`take`] wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub dir: PathBuf,
    pub guest_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub raw_chunks: u64,
    pub stored_bytes: u64,
    /// Non-zero guest bytes / stored bytes.
    pub ratio: f64,
    /// How long the VM was paused.
    pub pause_ns: u64,
    /// Compressing and writing, after the VM resumed.
    pub write_secs: f64,
}

/// Snapshots `vm` (named `name`) into the new directory `dir`: see the module
/// documentation. `progress` is called now and then while the chunks are written.
pub fn take(
    vm: &Vm,
    name: &str,
    private: bool,
    dir: &Path,
    opts: &TakeOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    if private {
        return Err(Error::Private(name.to_string()));
    }
    if !matches!(opts.chunk_size, 4096 | 8192) {
        return Err(Error::Format {
            file: "options",
            what: format!("chunk size {} (4K or 8K)", opts.chunk_size),
        });
    }
    let partial = begin(dir)?;
    // The pause: state and a frozen image of memory, as a cow fork takes them.
    let t0 = Instant::now();
    vm.pause()?;
    let frozen = (|| -> Result<_> {
        let state = vm.capture()?;
        let mut images = Vec::new();
        for r in vm.memory().regions() {
            r.materialize()?;
            let layers = cow::freeze(r)?;
            images.push(Region::with_layers(r.guest_addr(), r.size(), layers)?);
        }
        Ok((state, images))
    })();
    let resumed = vm.resume();
    let pause_ns = t0.elapsed().as_nanos() as u64;
    let (state, images) = frozen?;
    resumed?;

    let state_json = state.to_json().map_err(|e| Error::State(e.to_string()))?;
    write_file(&partial.join("state.json"), state_json.as_bytes())?;
    let t1 = Instant::now();
    let source = |i: usize, off: usize, len: usize| -> &[u8] {
        let r = &images[i];
        assert!(off + len <= r.size());
        // SAFETY: the image maps sealed layers read-only (MAP_PRIVATE, never written
        // here) for as long as `images` lives, and `off + len` lies inside it.
        unsafe { std::slice::from_raw_parts(r.host_addr().add(off), len) }
    };
    let layout: Vec<(u64, usize)> = images.iter().map(|r| (r.guest_addr(), r.size())).collect();
    let order: Vec<u64> = (0..layout.iter().map(|l| (l.1 / opts.chunk_size as usize) as u64).sum()).collect();
    let (index, packs) = write_chunks(&partial, &layout, opts, &order, &source, &mut |done, stored| {
        progress(&Progress {
            done_bytes: done,
            total_bytes: layout.iter().map(|l| l.1 as u64).sum(),
            stored_bytes: stored,
            elapsed_secs: t1.elapsed().as_secs_f64(),
        })
    })?;
    let manifest = manifest_for(name, opts, &layout, packs, false);
    let summary = summarize(dir, &manifest, &index, pause_ns, t1.elapsed().as_secs_f64());
    finish(&partial, dir, &manifest, &index)?;
    Ok(summary)
}

/// Rewrites the snapshot in `dir` so that `ws` (a restore's first touches) is its working
/// set and its chunks come first in the packs, in that order (one sequential read for
/// the prefetch). The old directory is replaced only once the new one is complete.
pub fn record_working_set(dir: &Path, ws: &WorkingSet) -> Result<Summary> {
    let snap = Snapshot::open(dir)?;
    let m = &snap.manifest;
    let chunks = m.chunks();
    let mut seen = vec![false; chunks as usize];
    let mut order: Vec<u64> = Vec::with_capacity(chunks as usize);
    let mut kept = Vec::new();
    for &(c, us) in &ws.chunks {
        if (c as u64) < chunks && !std::mem::replace(&mut seen[c as usize], true) {
            order.push(c as u64);
            kept.push((c, us));
        }
    }
    order.extend((0..chunks).filter(|&c| !seen[c as usize]));
    let tmp = dir.with_file_name(format!(
        ".{}.ws-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("snapshot"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    std::fs::copy(dir.join("state.json"), tmp.join("state.json")).map_err(io_err(dir.join("state.json")))?;
    // Stored bytes move as they are: nothing is decoded or compressed again.
    let t = Instant::now();
    let mut w = PackWriter::new(&tmp);
    let mut entries = vec![Entry::ZERO; chunks as usize];
    let mut buf = Vec::new();
    for &c in &order {
        let e = snap.index.entries[c as usize];
        if e.kind == Kind::Zero {
            continue;
        }
        snap.read_stored(c, &e, &mut buf)?;
        entries[c as usize] = Entry { offset: w.add(&buf)?, ..e };
    }
    let packs = w.close()?;
    let index = Index { entries };
    let layout: Vec<(u64, usize)> = m.regions.iter().map(|r| (r.guest_addr, r.size as usize)).collect();
    let opts = TakeOptions { level: m.level, chunk_size: m.chunk_size };
    let mut manifest = manifest_for(&m.source_vm, &opts, &layout, packs, true);
    manifest.created_unix = m.created_unix;
    write_file(&tmp.join("ws.bin"), &WorkingSet { chunks: kept }.encode())?;
    let summary = summarize(dir, &manifest, &index, 0, t.elapsed().as_secs_f64());
    write_file(&tmp.join("index.bin"), &index.encode())?;
    write_manifest(&tmp, &manifest)?;
    drop(snap);
    let old = tmp.with_extension("old");
    std::fs::rename(dir, &old).map_err(io_err(dir))?;
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(summary)
}

/// The temporary directory a snapshot of `dir` is built in.
fn begin(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        return Err(Error::Exists(dir.to_path_buf()));
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("snapshot");
    let partial = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
    Ok(partial)
}

/// Writes the index and then the manifest, and renames the directory into place.
fn finish(partial: &Path, dir: &Path, manifest: &Manifest, index: &Index) -> Result<()> {
    write_file(&partial.join("index.bin"), &index.encode())?;
    write_manifest(partial, manifest)?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(partial);
        return Err(Error::Exists(dir.to_path_buf()));
    }
    std::fs::rename(partial, dir).map_err(io_err(dir))
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let json = serde_json::to_vec_pretty(m).expect("manifests serialize");
    write_file(&dir.join("snapshot.json"), &json)
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io_err(path))
}

fn manifest_for(
    name: &str,
    opts: &TakeOptions,
    layout: &[(u64, usize)],
    (packs, pack_crc32c): PackSums,
    ws: bool,
) -> Manifest {
    let mut first = 0;
    let regions = layout
        .iter()
        .map(|&(gpa, size)| {
            let r = RegionInfo { guest_addr: gpa, size: size as u64, first_chunk: first };
            first += (size / opts.chunk_size as usize) as u64;
            r
        })
        .collect();
    Manifest {
        format: format::FORMAT.into(),
        version: format::VERSION,
        source_vm: name.to_string(),
        created_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        page_size: 4096,
        chunk_size: opts.chunk_size,
        codec: "zstd".into(),
        level: opts.level,
        regions,
        packs,
        pack_crc32c,
        working_set_first: ws,
    }
}

fn summarize(dir: &Path, m: &Manifest, index: &Index, pause_ns: u64, write_secs: f64) -> Summary {
    let zero = index.entries.iter().filter(|e| e.kind == Kind::Zero).count() as u64;
    let raw = index.entries.iter().filter(|e| e.kind == Kind::Raw).count() as u64;
    let stored: u64 = index.entries.iter().map(|e| e.len as u64).sum();
    let nonzero = (index.entries.len() as u64 - zero) * m.chunk_size as u64;
    Summary {
        dir: dir.to_path_buf(),
        guest_bytes: m.guest_size(),
        chunks: index.entries.len() as u64,
        zero_chunks: zero,
        raw_chunks: raw,
        stored_bytes: stored,
        ratio: if stored == 0 { 0.0 } else { nonzero as f64 / stored as f64 },
        pause_ns,
        write_secs,
    }
}

/// The packs' sizes and crc32c checksums, in pack order.
type PackSums = (Vec<u64>, Vec<u32>);

/// Appends stored chunks to packs of about [`PACK_SIZE`], never splitting a chunk.
struct PackWriter {
    dir: PathBuf,
    sizes: Vec<u64>,
    crcs: Vec<u32>,
    current: Option<std::io::BufWriter<File>>,
    offset: u64,
}

impl PackWriter {
    fn new(dir: &Path) -> Self {
        PackWriter { dir: dir.to_path_buf(), sizes: Vec::new(), crcs: Vec::new(), current: None, offset: 0 }
    }

    /// Stores `data`; returns its offset in the concatenation of the packs.
    fn add(&mut self, data: &[u8]) -> Result<u64> {
        if self.current.is_none() || self.sizes.last().is_some_and(|&s| s + data.len() as u64 > PACK_SIZE) {
            self.close_current()?;
            let path = self.dir.join(Manifest::pack_name(self.sizes.len()));
            self.current =
                Some(std::io::BufWriter::with_capacity(1 << 20, File::create(&path).map_err(io_err(&path))?));
            self.sizes.push(0);
            self.crcs.push(0);
        }
        let at = self.offset;
        let path = self.dir.join(Manifest::pack_name(self.sizes.len() - 1));
        self.current.as_mut().expect("a pack is open").write_all(data).map_err(io_err(path))?;
        *self.sizes.last_mut().expect("a pack is open") += data.len() as u64;
        let crc = self.crcs.last_mut().expect("a pack is open");
        *crc = crc32c::crc32c_append(*crc, data);
        self.offset += data.len() as u64;
        Ok(at)
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            let path = self.dir.join(Manifest::pack_name(self.sizes.len() - 1));
            let f = w.into_inner().map_err(|e| Error::Io { path: path.clone(), source: e.into_error() })?;
            f.sync_all().map_err(io_err(path))?;
        }
        Ok(())
    }

    /// The packs' sizes and checksums.
    fn close(mut self) -> Result<PackSums> {
        self.close_current()?;
        Ok((self.sizes, self.crcs))
    }
}

/// A chunk number, its index entry and its stored bytes.
type Compressed = (u64, Entry, Vec<u8>);

/// Compresses the chunks of `layout` (regions `(guest address, size)`) read through
/// `source(region, offset, len)` and stores them in the packs in `order` (chunk
/// numbers), on a few threads. Returns the index and the packs' sizes and checksums.
fn write_chunks<'a>(
    dir: &Path,
    layout: &[(u64, usize)],
    opts: &TakeOptions,
    order: &[u64],
    source: &(dyn Fn(usize, usize, usize) -> &'a [u8] + Sync),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Index, PackSums)> {
    let cs = opts.chunk_size as usize;
    let mut starts = Vec::new();
    let mut n = 0u64;
    for &(_, size) in layout {
        starts.push(n);
        n += (size / cs) as u64;
    }
    let locate = |c: u64| {
        let i = starts.partition_point(|&s| s <= c) - 1;
        (i, (c - starts[i]) as usize * cs)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    const BATCH: usize = 256;
    let mut entries = vec![Entry::ZERO; n as usize];
    let mut w = PackWriter::new(dir);
    let mut last_report = Instant::now();
    let mut stored = 0u64;
    for (done, group) in order.chunks(threads * BATCH).enumerate() {
        let results: Vec<std::io::Result<Vec<Compressed>>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .chunks(BATCH)
                .map(|batch| {
                    s.spawn(move || {
                        let mut comp = zstd::bulk::Compressor::new(opts.level)?;
                        let mut out = Vec::with_capacity(batch.len());
                        for &c in batch {
                            let (region, off) = locate(c);
                            let mut buf = Vec::new();
                            let e = format::encode_chunk(source(region, off, cs), &mut comp, &mut buf)?;
                            out.push((c, e, buf));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("compression threads do not panic")).collect()
        });
        for batch in results {
            for (c, e, bytes) in batch.map_err(io_err(dir))? {
                if e.kind != Kind::Zero {
                    stored += bytes.len() as u64;
                    entries[c as usize] = Entry { offset: w.add(&bytes)?, ..e };
                }
            }
        }
        if last_report.elapsed().as_millis() >= 200 {
            progress(((done + 1) * threads * BATCH * cs).min(n as usize * cs) as u64, stored);
            last_report = Instant::now();
        }
    }
    progress(n * cs as u64, stored);
    Ok((Index { entries }, w.close()?))
}
