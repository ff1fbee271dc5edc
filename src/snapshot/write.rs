//! Writing a snapshot: the pause, then the chunks from the frozen image.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::format::{
    self, ChunkHash, Entry, Hashes, Index, Kind, MAX_PARENTS, Manifest, ParentRef, RegionInfo, WorkingSet,
};
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
    /// The parent snapshot it was taken against, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// Chunks referenced in a parent's packs rather than stored again.
    #[serde(default)]
    pub parent_chunks: u64,
    /// Bytes written into this snapshot's own packs (`stored_bytes` counts the
    /// referenced chunks too).
    #[serde(default)]
    pub new_bytes: u64,
}

/// The snapshot a new one is taken against (`vmfork snapshot --parent`): a chunk whose
/// hash and crc32c equal the parent's at the same chunk number is referenced in the
/// packs the parent's index points it to, not compressed and stored again. So a
/// snapshot of a VM restored or forked from the parent, or of the same VM again, costs
/// the chunks that changed.
#[derive(Debug)]
pub struct Parent {
    /// Where the new snapshot's manifest says the parent is.
    pub location: String,
    manifest: Manifest,
    index: Index,
    hashes: Hashes,
    /// Bytes of every pack its index points into: where a child's own packs start.
    packs_bytes: u64,
}

impl Parent {
    /// Reads the parent's `snapshot.json`, `index.bin` and `hashes.bin` from directory
    /// `meta` (the parent itself, or those three files fetched from a store), checked.
    pub fn load(meta: &Path, location: String) -> Result<Parent> {
        let read = |name: &str| {
            let path = meta.join(name);
            std::fs::read(&path).map_err(|error| Error::Missing { path: path.clone(), error })
        };
        let manifest: Manifest = serde_json::from_slice(&read("snapshot.json")?)
            .map_err(|source| Error::ParentManifest { location: location.clone(), source })?;
        manifest.validate()?;
        if manifest.pack_crc32c.len() != manifest.packs.len() {
            return Err(Error::ParentNoChecksums { location });
        }
        if manifest.parents.len() >= MAX_PARENTS {
            return Err(Error::ParentChainFull { location, snapshots: manifest.parents.len() + 1 });
        }
        let total = manifest.all_packs().map(|p| p.2).sum();
        let index = Index::decode(&read("index.bin")?, manifest.chunks(), total)?;
        let hashes = match std::fs::read(meta.join("hashes.bin")) {
            Ok(b) => Hashes::decode(&b, manifest.chunks())?,
            Err(_) => return Err(Error::ParentNoHashes { location }),
        };
        Ok(Parent { location, manifest, index, hashes, packs_bytes: total })
    }

    /// The entry of chunk `c` in the parent, where its bytes are `data` (hash `h`).
    fn same_chunk(&self, c: u64, h: &ChunkHash, data: &[u8]) -> Option<Entry> {
        let e = *self.index.entries.get(c as usize)?;
        (e.kind != Kind::Zero && self.hashes.hashes[c as usize] == *h && e.crc == crc32c::crc32c(data))
            .then_some(e)
    }

    /// What a snapshot taken against this one lists as its parents.
    fn chain(&self) -> Vec<ParentRef> {
        let mut chain = self.manifest.parents.clone();
        chain.push(ParentRef {
            location: self.location.clone(),
            packs: self.manifest.packs.clone(),
            pack_crc32c: self.manifest.pack_crc32c.clone(),
        });
        chain
    }

    /// Refuses a parent of another layout or chunk size than the new snapshot.
    fn check_fits(&self, layout: &[(u64, usize)], chunk_size: u32) -> Result<()> {
        let m = &self.manifest;
        let same = m.regions.len() == layout.len()
            && m.regions
                .iter()
                .zip(layout)
                .all(|(r, &(gpa, size))| r.guest_addr == gpa && r.size == size as u64);
        let location = self.location.clone();
        if !same {
            Err(Error::ParentLayout { location })
        } else if m.chunk_size != chunk_size {
            Err(Error::ParentChunkSize { location, kib: m.chunk_size / 1024 })
        } else {
            Ok(())
        }
    }
}

/// Snapshots `vm` (named `name`) into the new directory `dir`: see the module
/// documentation; with `parent`, chunks it holds unchanged are referenced ([`Parent`]).
/// `progress` is called now and then while the chunks are written.
pub fn take(
    vm: &Vm,
    name: &str,
    private: bool,
    dir: &Path,
    opts: &TakeOptions,
    parent: Option<&Parent>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    if private {
        return Err(Error::Private(name.to_string()));
    }
    if !matches!(opts.chunk_size, 4096 | 8192) {
        return Err(Error::ChunkSize(opts.chunk_size));
    }
    if let Some(p) = parent {
        let layout: Vec<(u64, usize)> =
            vm.memory().regions().iter().map(|r| (r.guest_addr(), r.size())).collect();
        p.check_fits(&layout, opts.chunk_size)?;
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
            let image = cow::freeze(r)?;
            images.push(Region::with_layers(r.guest_addr(), r.size(), image)?);
        }
        Ok((state, images))
    })();
    let resumed = vm.resume();
    let pause_ns = t0.elapsed().as_nanos() as u64;
    let (state, images) = frozen?;
    resumed?;

    let state_json = state.to_json().map_err(Error::EncodeState)?;
    let source = |i: usize, off: usize, len: usize| -> &[u8] {
        let r = &images[i];
        assert!(off + len <= r.size());
        // SAFETY: the image maps sealed layers read-only (MAP_PRIVATE, never written
        // here) for as long as `images` lives, and `off + len` lies inside it.
        unsafe { std::slice::from_raw_parts(r.host_addr().add(off), len) }
    };
    let layout: Vec<(u64, usize)> = images.iter().map(|r| (r.guest_addr(), r.size())).collect();
    let image = Image { name, state_json: &state_json, layout: &layout, source: &source, pause_ns };
    write_image(&partial, dir, &image, opts, parent, progress)
}

/// What [`write_image`] writes: a VM's state and its frozen memory, regions `layout`
/// (`(guest address, size)`) read through `source(region, offset, len)`.
struct Image<'a, 'm> {
    name: &'a str,
    state_json: &'a str,
    layout: &'a [(u64, usize)],
    source: &'a (dyn Fn(usize, usize, usize) -> &'m [u8] + Sync),
    /// How long the VM was paused for it, for the summary.
    pause_ns: u64,
}

/// Writes `image` into `partial` (from [`begin`]) and renames it to `dir` once whole.
fn write_image(
    partial: &Path,
    dir: &Path,
    image: &Image<'_, '_>,
    opts: &TakeOptions,
    parent: Option<&Parent>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let layout = image.layout;
    write_file(&partial.join("state.json"), image.state_json.as_bytes())?;
    let t1 = Instant::now();
    let order: Vec<u64> = (0..layout.iter().map(|l| (l.1 / opts.chunk_size as usize) as u64).sum()).collect();
    let (index, hashes, packs) =
        write_chunks(partial, layout, opts, &order, image.source, parent, &mut |done, stored| {
            progress(&Progress {
                done_bytes: done,
                total_bytes: layout.iter().map(|l| l.1 as u64).sum(),
                stored_bytes: stored,
                elapsed_secs: t1.elapsed().as_secs_f64(),
            })
        })?;
    let parents = parent.map(Parent::chain).unwrap_or_default();
    let manifest = manifest_for(image.name, opts, layout, packs, false, parents);
    let summary = summarize(dir, &manifest, &index, image.pause_ns, t1.elapsed().as_secs_f64());
    write_file(&partial.join("hashes.bin"), &hashes.encode())?;
    finish(partial, dir, &manifest, &index)?;
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
    for name in ["state.json", "hashes.bin"] {
        match std::fs::copy(dir.join(name), tmp.join(name)) {
            Err(e) if name == "hashes.bin" && e.kind() == std::io::ErrorKind::NotFound => {}
            r => _ = r.map_err(io_err(dir.join(name)))?,
        }
    }
    // Stored bytes move as they are: nothing is decoded or compressed again. Chunks in
    // a parent's packs stay there.
    let t = Instant::now();
    let base = m.parents_bytes();
    let mut w = PackWriter::new(&tmp);
    let mut entries = vec![Entry::ZERO; chunks as usize];
    let mut buf = Vec::new();
    for &c in &order {
        let e = snap.index.entries[c as usize];
        if e.kind == Kind::Zero {
            continue;
        }
        if e.offset < base {
            entries[c as usize] = e;
            continue;
        }
        snap.read_stored(c, &e, &mut buf)?;
        entries[c as usize] = Entry { offset: base + w.add(&buf)?, ..e };
    }
    let packs = w.close()?;
    let index = Index { entries };
    let layout: Vec<(u64, usize)> = m.regions.iter().map(|r| (r.guest_addr, r.size as usize)).collect();
    let opts = TakeOptions { level: m.level, chunk_size: m.chunk_size };
    let mut manifest = manifest_for(&m.source_vm, &opts, &layout, packs, true, m.parents.clone());
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
    parents: Vec<ParentRef>,
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
        parents,
    }
}

fn summarize(dir: &Path, m: &Manifest, index: &Index, pause_ns: u64, write_secs: f64) -> Summary {
    let zero = index.entries.iter().filter(|e| e.kind == Kind::Zero).count() as u64;
    let raw = index.entries.iter().filter(|e| e.kind == Kind::Raw).count() as u64;
    let stored: u64 = index.entries.iter().map(|e| e.len as u64).sum();
    let nonzero = (index.entries.len() as u64 - zero) * m.chunk_size as u64;
    let base = m.parents_bytes();
    let inherited = || index.entries.iter().filter(|e| e.kind != Kind::Zero && e.offset < base);
    let parent_bytes: u64 = inherited().map(|e| e.len as u64).sum();
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
        parent: m.parents.last().map(|p| p.location.clone()),
        parent_chunks: inherited().count() as u64,
        new_bytes: stored - parent_bytes,
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
            let f = w.into_inner().map_err(|e| Error::Io { path: path.clone(), error: e.into_error() })?;
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

/// A chunk number, its index entry, its stored bytes (`None`: it is the parent's, and
/// the entry is the parent's) and its hash.
type Compressed = (u64, Entry, Option<Vec<u8>>, ChunkHash);

/// Compresses the chunks of `layout` (regions `(guest address, size)`) read through
/// `source(region, offset, len)` and stores them in the packs in `order` (chunk
/// numbers), on a few threads; a chunk `parent` holds unchanged is referenced instead.
/// Returns the index, the chunks' hashes and the packs' sizes and checksums.
fn write_chunks<'a>(
    dir: &Path,
    layout: &[(u64, usize)],
    opts: &TakeOptions,
    order: &[u64],
    source: &(dyn Fn(usize, usize, usize) -> &'a [u8] + Sync),
    parent: Option<&Parent>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Index, Hashes, PackSums)> {
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
    let mut hashes = vec![[0u8; format::HASH_LEN]; n as usize];
    // This snapshot's packs come after its parents' in the index's offsets.
    let base = parent.map_or(0, |p| p.packs_bytes);
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
                            let data = source(region, off, cs);
                            if format::is_zero(data) {
                                out.push((c, Entry::ZERO, None, [0; format::HASH_LEN]));
                                continue;
                            }
                            let h = format::chunk_hash(data);
                            if let Some(e) = parent.and_then(|p| p.same_chunk(c, &h, data)) {
                                out.push((c, e, None, h));
                                continue;
                            }
                            let mut buf = Vec::new();
                            let e = format::encode_chunk(data, &mut comp, &mut buf)?;
                            out.push((c, e, Some(buf), h));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("compression threads do not panic")).collect()
        });
        for batch in results {
            for (c, e, bytes, h) in batch.map_err(io_err(dir))? {
                hashes[c as usize] = h;
                match bytes {
                    Some(bytes) => {
                        stored += bytes.len() as u64;
                        entries[c as usize] = Entry { offset: base + w.add(&bytes)?, ..e };
                    }
                    None => entries[c as usize] = e,
                }
            }
        }
        if last_report.elapsed().as_millis() >= 200 {
            progress(((done + 1) * threads * BATCH * cs).min(n as usize * cs) as u64, stored);
            last_report = Instant::now();
        }
    }
    progress(n * cs as u64, stored);
    Ok((Index { entries }, Hashes { hashes }, w.close()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temporary one, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
            let d = std::env::temp_dir().join(format!("vmfork-{test}-{}-{t}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CHUNK: usize = 8192;

    /// Chunk `c`'s bytes in generation `g`: compressible, never all zero.
    fn chunk_bytes(c: usize, g: u8) -> Vec<u8> {
        (0..CHUNK).map(|i| b"vmfork family "[(i + c) % 14] ^ g.wrapping_mul((i % 7) as u8)).collect()
    }

    /// Snapshots the one-region guest `mem` into `dir`, against `parent`.
    fn snapshot(dir: &Path, mem: &[u8], parent: Option<&Parent>) -> Summary {
        let layout = [(0u64, mem.len())];
        let source = |_: usize, off: usize, len: usize| &mem[off..off + len];
        let image = Image { name: "vm", state_json: "{}", layout: &layout, source: &source, pause_ns: 0 };
        let partial = begin(dir).unwrap();
        write_image(&partial, dir, &image, &TakeOptions::default(), parent, &mut |_| {}).unwrap()
    }

    /// Every chunk of the snapshot in `dir` decodes to `mem`'s.
    fn assert_holds(dir: &Path, mem: &[u8]) {
        let snap = Snapshot::open(dir).unwrap();
        let mut dec = zstd::bulk::Decompressor::new().unwrap();
        let (mut buf, mut out) = (Vec::new(), vec![0u8; CHUNK]);
        for (c, want) in mem.chunks(CHUNK).enumerate() {
            snap.decode(c as u64, &mut dec, &mut buf, &mut out).unwrap();
            assert!(out == want, "{}: chunk {c} differs", dir.display());
        }
    }

    fn parent(dir: &Path) -> Parent {
        Parent::load(dir, dir.to_str().unwrap().to_string()).unwrap()
    }

    fn own_pack_bytes(dir: &Path) -> u64 {
        Snapshot::open(dir).unwrap().manifest.packs.iter().sum()
    }

    #[test]
    fn a_snapshot_against_its_parent_stores_only_the_chunks_that_changed() {
        let tmp = Scratch::new("family");
        let chunks = 512; // 4 MiB: half text, half zero.
        let mut mem: Vec<u8> =
            (0..chunks).flat_map(|c| if c < 256 { chunk_bytes(c, 0) } else { vec![0; CHUNK] }).collect();
        let (a, b, c) = (tmp.0.join("a"), tmp.0.join("b"), tmp.0.join("c"));
        let first = snapshot(&a, &mem, None);
        assert_eq!((first.parent_chunks, first.new_bytes), (0, first.stored_bytes));

        // 16 chunks rewritten, 2 zeroed, 3 zero ones written.
        let mut changed = Vec::new();
        for c in (0..256).step_by(16) {
            mem[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&chunk_bytes(c, 1));
            changed.push(c);
        }
        for c in [5usize, 6] {
            mem[c * CHUNK..(c + 1) * CHUNK].fill(0);
        }
        for c in [300usize, 301, 400] {
            mem[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&chunk_bytes(c, 2));
            changed.push(c);
        }
        let second = snapshot(&b, &mem, Some(&parent(&a)));
        assert_eq!(second.parent_chunks, 256 - 16 - 2, "{second:?}");
        assert_eq!(second.parent.as_deref(), a.to_str());
        let snap = Snapshot::open(&b).unwrap();
        let base = snap.manifest.parents_bytes();
        let own: u64 = changed.iter().map(|&c| snap.index.entries[c].len as u64).sum();
        assert!(
            changed.iter().all(|&c| snap.index.entries[c].offset >= base),
            "a changed chunk was referenced"
        );
        assert_eq!(own_pack_bytes(&b), own, "its own packs hold more than the changed chunks");
        assert_eq!(second.new_bytes, own);
        assert!(own * 10 < first.stored_bytes, "{own} of {}", first.stored_bytes);
        drop(snap);
        assert_holds(&b, &mem);

        // A grandchild references both, flat: two parents, no chain to walk.
        mem[7 * CHUNK] ^= 0xff;
        let third = snapshot(&c, &mem, Some(&parent(&b)));
        assert_eq!(third.parent_chunks, 256 - 2 + 3 - 1);
        let m = Snapshot::open(&c).unwrap().manifest;
        assert_eq!(
            m.parents.iter().map(|p| p.location.as_str()).collect::<Vec<_>>(),
            [a.to_str().unwrap(), b.to_str().unwrap()]
        );
        assert_holds(&c, &mem);

        // Its working set rewritten keeps the parents' chunks where they are.
        let ws = WorkingSet { chunks: vec![(7, 0), (300, 5), (1, 9)] };
        record_working_set(&c, &ws).unwrap();
        assert_holds(&c, &mem);
        assert!(c.join("hashes.bin").exists(), "record-ws dropped the chunk hashes");

        // Without its oldest parent it does not open, and says which and why.
        std::fs::rename(&a, tmp.0.join("moved")).unwrap();
        let err = Snapshot::open(&c).unwrap_err().to_string();
        assert!(
            err.contains(&format!("parent snapshot {}", a.display())) && err.contains("needs its parents"),
            "{err}"
        );
    }

    #[test]
    fn a_parent_of_another_layout_or_chunk_size_or_without_hashes_is_refused() {
        let tmp = Scratch::new("family-refused");
        let mem: Vec<u8> = (0..64).flat_map(|c| chunk_bytes(c, 0)).collect();
        let a = tmp.0.join("a");
        snapshot(&a, &mem, None);
        let p = parent(&a);
        let err = p.check_fits(&[(0, mem.len() * 2)], 8192).unwrap_err().to_string();
        assert!(err.contains("another guest memory layout"), "{err}");
        let err = p.check_fits(&[(0, mem.len())], 4096).unwrap_err().to_string();
        assert!(err.contains("--chunk 8K"), "{err}");
        assert!(p.check_fits(&[(0, mem.len())], 8192).is_ok());
        std::fs::remove_file(a.join("hashes.bin")).unwrap();
        let err = Parent::load(&a, "x".into()).unwrap_err().to_string();
        assert!(err.contains("no chunk hashes"), "{err}");
    }
}
