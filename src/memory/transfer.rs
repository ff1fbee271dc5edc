//! Handing guest memory to another process.
//!
//! KVM VMs cannot cross `fork()`, so a forked VM is a new process that must receive its
//! memory: a [`Manifest`] (JSON) saying how each region is laid out over files, and the
//! memfds themselves, passed with `SCM_RIGHTS`. The receiver maps the same files the
//! same way, so a `cow` child shares every page with its parent, and a `copy` or
//! `reflink` child simply owns its file.
//!
//! On the wire the manifest is the payload of one [`crate::wire`] frame of kind
//! [`Kind::Manifest`], and the memfds ride with it, each file once.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cow::{Image, Patch};
use super::{Error, Extent, GuestMemory, Layout, MemFile, PAGE_SIZE, Region, Result};
use crate::wire::{self, Kind};

/// How a memory is laid out over files; `fd` fields index the fds sent alongside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub huge_pages: bool,
    pub regions: Vec<RegionManifest>,
}

/// One region of a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionManifest {
    pub guest_addr: u64,
    pub size: usize,
    pub layout: LayoutManifest,
}

/// A region's [`Layout`], with files replaced by fd indices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LayoutManifest {
    File {
        fd: usize,
    },
    Layers {
        extents: Vec<ExtentManifest>,
        /// The image's patches, oldest first.
        #[serde(default)]
        patches: Vec<PatchManifest>,
    },
}

/// One [`Patch`] of a layered region: its file and the region offsets `[start, end)`
/// it holds, packed in that order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchManifest {
    pub fd: usize,
    pub runs: Vec<(usize, usize)>,
}

/// One [`Extent`] of a layered region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentManifest {
    pub offset: usize,
    pub len: usize,
    pub fd: usize,
    pub file_offset: usize,
}

/// Memory on its way to another process: each region's layout over files, mapped
/// nowhere in this one. A fork's parent makes one inside its pause
/// ([`GuestMemory::freeze_detached`], [`GuestMemory::lazy_clone_for_remote`]) so that the
/// pause costs the freeze alone: mapping the layers and copying the patches in is the
/// receiver's work, in its own process ([`GuestMemory::from_manifest`]).
#[derive(Debug)]
pub struct Detached {
    huge_pages: bool,
    regions: Vec<DetachedRegion>,
}

/// One region of a [`Detached`] memory.
#[derive(Debug)]
pub(super) struct DetachedRegion {
    pub guest_addr: u64,
    pub size: usize,
    pub layout: Layout,
}

impl Detached {
    pub(super) fn new(regions: Vec<DetachedRegion>, huge_pages: bool) -> Self {
        Detached { huge_pages, regions }
    }

    /// Sends this memory over `sock`, as [`GuestMemory::send`] does.
    pub fn send(&self, sock: &UnixStream) -> Result<()> {
        let mut files = Files::default();
        let regions = self
            .regions
            .iter()
            .map(|r| RegionManifest {
                guest_addr: r.guest_addr,
                size: r.size,
                layout: layout_manifest(&r.layout, &mut files),
            })
            .collect();
        send_manifest(sock, &Manifest { huge_pages: self.huge_pages, regions }, &files.0)
    }

    /// Maps this memory here: what a receiving process builds from it.
    pub fn map(self) -> Result<GuestMemory> {
        let regions = self
            .regions
            .into_iter()
            .map(|r| match r.layout {
                Layout::File(f) => Region::with_file(r.guest_addr, f),
                Layout::Layers(image) => Region::with_layers(r.guest_addr, r.size, image),
            })
            .collect::<Result<Vec<_>>>()?;
        GuestMemory::from_regions(regions, self.huge_pages)
    }
}

/// The files a manifest names, each once, in the order of their fd indices.
#[derive(Default)]
struct Files(Vec<Arc<MemFile>>);

impl Files {
    fn index(&mut self, f: &Arc<MemFile>) -> usize {
        match self.0.iter().position(|g| Arc::ptr_eq(f, g)) {
            Some(i) => i,
            None => {
                self.0.push(f.clone());
                self.0.len() - 1
            }
        }
    }
}

fn layout_manifest(layout: &Layout, files: &mut Files) -> LayoutManifest {
    match layout {
        Layout::File(f) => LayoutManifest::File { fd: files.index(f) },
        Layout::Layers(image) => LayoutManifest::Layers {
            patches: image
                .patches
                .iter()
                .map(|p| PatchManifest { fd: files.index(p.file()), runs: p.runs().to_vec() })
                .collect(),
            extents: image
                .extents
                .iter()
                .map(|e| ExtentManifest {
                    offset: e.offset,
                    len: e.len,
                    fd: files.index(&e.file),
                    file_offset: e.file_offset,
                })
                .collect(),
        },
    }
}

fn send_manifest(sock: &UnixStream, manifest: &Manifest, files: &[Arc<MemFile>]) -> Result<()> {
    let json = serde_json::to_vec(manifest).map_err(|e| bad(e.to_string()))?;
    let fds: Vec<BorrowedFd> = files.iter().map(|f| f.as_fd()).collect();
    wire::send(sock, Kind::Manifest, &json, &fds).map_err(Error::Transfer)
}

impl GuestMemory {
    /// Describes this memory for another process: the manifest and the files it names.
    /// A lazily filled (uffd) memory is materialized first: its page server stays here.
    pub fn manifest(&self) -> Result<(Manifest, Vec<Arc<MemFile>>)> {
        let mut files = Files::default();
        let mut regions = Vec::with_capacity(self.regions().len());
        for r in self.regions() {
            r.materialize()?;
            let layout = layout_manifest(&r.layout(), &mut files);
            regions.push(RegionManifest { guest_addr: r.guest_addr(), size: r.size(), layout });
        }
        Ok((Manifest { huge_pages: self.huge_pages(), regions }, files.0))
    }

    /// Builds memory from a manifest and the files it indexes, checking that the
    /// manifest really describes those files before mapping anything.
    pub fn from_manifest(manifest: &Manifest, files: Vec<MemFile>) -> Result<GuestMemory> {
        let files: Vec<Arc<MemFile>> = files.into_iter().map(Arc::new).collect();
        let file = |i: usize| {
            files.get(i).cloned().ok_or_else(|| bad(format!("fd index {i} but only {} fds", files.len())))
        };
        let mut regions = Vec::with_capacity(manifest.regions.len());
        for rm in &manifest.regions {
            super::check_size(rm.size)?;
            let layout = match &rm.layout {
                LayoutManifest::File { fd } => {
                    let f = file(*fd)?;
                    if f.size() != rm.size {
                        return Err(bad(format!(
                            "region of {} bytes backed by a file of {}",
                            rm.size,
                            f.size()
                        )));
                    }
                    Layout::File(f)
                }
                LayoutManifest::Layers { extents, patches } => {
                    let mut next = 0;
                    let mut out = Vec::with_capacity(extents.len());
                    for e in extents {
                        let f = file(e.fd)?;
                        let aligned = [e.offset, e.len, e.file_offset].iter().all(|v| v % PAGE_SIZE == 0);
                        // A sender's offsets are any usize: the end must not overflow.
                        let fits = e.file_offset.checked_add(e.len).is_some_and(|end| end <= f.size());
                        if e.offset != next || e.len == 0 || !aligned || !fits {
                            return Err(bad(format!(
                                "extent {e:?} does not tile the region or fit its file"
                            )));
                        }
                        next += e.len;
                        out.push(Extent {
                            offset: e.offset,
                            len: e.len,
                            file: f,
                            file_offset: e.file_offset,
                        });
                    }
                    if next != rm.size {
                        return Err(bad(format!("extents cover {next} of {} bytes", rm.size)));
                    }
                    let patches = patches
                        .iter()
                        .map(|p| Patch::new(file(p.fd)?, p.runs.clone(), rm.size).map(Arc::new))
                        .collect::<Result<Vec<_>>>()
                        .map_err(|e| bad(format!("patch: {e}")))?;
                    Layout::Layers(Image { extents: out, patches })
                }
            };
            regions.push(DetachedRegion { guest_addr: rm.guest_addr, size: rm.size, layout });
        }
        Detached::new(regions, manifest.huge_pages).map()
    }

    /// Sends this memory over `sock`: its manifest, with the files it names.
    pub fn send(&self, sock: &UnixStream) -> Result<()> {
        let (manifest, files) = self.manifest()?;
        send_manifest(sock, &manifest, &files)
    }

    /// Receives memory sent with [`GuestMemory::send`].
    pub fn receive(sock: &UnixStream) -> Result<GuestMemory> {
        let frame = wire::recv(sock, &[Kind::Manifest]).map_err(Error::Transfer)?;
        GuestMemory::from_frame(frame)
    }

    /// Builds memory from a received [`Kind::Manifest`] frame (see
    /// [`GuestMemory::from_manifest`]).
    pub fn from_frame(frame: wire::Frame) -> Result<GuestMemory> {
        let manifest: Manifest =
            serde_json::from_slice(&frame.payload).map_err(|e| bad(format!("manifest: {e}")))?;
        let files = frame.fds.into_iter().map(MemFile::from_fd).collect::<Result<Vec<_>>>()?;
        GuestMemory::from_manifest(&manifest, files)
    }
}

fn bad(msg: String) -> Error {
    Error::BadManifest(msg)
}

/// The check behind the `transfer_manifest` fuzz target (`fuzz/fuzz_targets/`), also run
/// over its committed corpus by `tests/snapshot_corpora.rs`. Not an API.
pub mod fuzzing {
    use super::super::{Layout, MemFile, PAGE_SIZE};
    use super::{GuestMemory, LayoutManifest, Manifest};

    /// Each fuzz target's name (its directory under `fuzz/corpus/`) and its check.
    pub const TARGETS: &[(&str, crate::snapshot::fuzzing::Check)] = &[("transfer_manifest", manifest)];

    /// The input as the JSON manifest a child receives, decoded as [`GuestMemory::receive`]
    /// does and built over three fresh memfds of 1, 2 and 4 pages: nothing panics; a
    /// decoded manifest encodes and decodes back unchanged; a memory built from it has
    /// exactly the manifest's regions (address, size, and the extents and patch runs of
    /// a layered one); a refusal says what was wrong.
    pub fn manifest(b: &[u8]) {
        let Ok(m) = serde_json::from_slice::<Manifest>(b) else { return };
        let again = serde_json::to_vec(&m).expect("manifests serialize");
        assert_eq!(serde_json::from_slice::<Manifest>(&again).expect("an encoded manifest decodes"), m);
        let files = [1, 2, 4].map(|pages| MemFile::create("fuzz", pages * PAGE_SIZE).expect("a memfd"));
        match GuestMemory::from_manifest(&m, files.into()) {
            Ok(mem) => {
                assert_eq!(mem.regions().len(), m.regions.len());
                for (r, rm) in mem.regions().iter().zip(&m.regions) {
                    assert_eq!((r.guest_addr(), r.size()), (rm.guest_addr, rm.size));
                    match (&*r.layout(), &rm.layout) {
                        (Layout::File(f), LayoutManifest::File { .. }) => assert_eq!(f.size(), rm.size),
                        (Layout::Layers(image), LayoutManifest::Layers { extents, patches }) => {
                            let got: Vec<_> =
                                image.extents.iter().map(|e| (e.offset, e.len, e.file_offset)).collect();
                            let want: Vec<_> =
                                extents.iter().map(|e| (e.offset, e.len, e.file_offset)).collect();
                            assert_eq!(got, want, "the extents built are not the manifest's");
                            let got: Vec<_> = image.patches.iter().map(|p| p.runs().to_vec()).collect();
                            let want: Vec<_> = patches.iter().map(|p| p.runs.clone()).collect();
                            assert_eq!(got, want, "the patches built are not the manifest's");
                        }
                        _ => panic!("a region of another kind than its manifest's"),
                    }
                }
            }
            Err(e) => assert!(!e.to_string().is_empty(), "a manifest refused without a reason"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryOptions, Strategy};

    #[test]
    fn cow_child_travels_and_stays_isolated() {
        let parent = GuestMemory::with_size(64 * PAGE_SIZE, &MemoryOptions::default()).unwrap();
        parent.write(5 * 4096, b"parent").unwrap();
        let (child, _) = parent.clone_with(Strategy::Cow).unwrap();
        child.write(7 * 4096, b"child-dirty").unwrap();
        let (child2, _) = child.clone_with(Strategy::Cow).unwrap(); // two layers now
        let (a, b) = UnixStream::pair().unwrap();
        child2.send(&a).unwrap();
        drop(child2);
        let got = GuestMemory::receive(&b).unwrap();
        let mut buf = [0u8; 11];
        got.read(7 * 4096, &mut buf).unwrap();
        assert_eq!(&buf, b"child-dirty");
        got.read(5 * 4096, &mut buf[..6]).unwrap();
        assert_eq!(&buf[..6], b"parent");
        got.write(5 * 4096, b"XXXXXX").unwrap();
        parent.read(5 * 4096, &mut buf[..6]).unwrap();
        assert_eq!(&buf[..6], b"parent");
    }

    #[test]
    fn many_files_cross_in_one_frame() {
        // More layers than one batch of fds holds: 450 single-file regions.
        let files: Vec<Arc<MemFile>> =
            (0..450).map(|_| Arc::new(MemFile::create("t", PAGE_SIZE).unwrap())).collect();
        let regions = files
            .iter()
            .enumerate()
            .map(|(i, f)| Region::with_file((i * PAGE_SIZE) as u64, f.clone()).unwrap())
            .collect();
        let mem = GuestMemory::from_regions(regions, false).unwrap();
        mem.write(449 * 4096, b"last").unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || mem.send(&a));
        let got = GuestMemory::receive(&b).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(got.regions().len(), 450);
        let mut buf = [0u8; 4];
        got.read(449 * 4096, &mut buf).unwrap();
        assert_eq!(&buf, b"last");
    }

    #[test]
    fn lying_manifests_are_refused() {
        let f = || vec![MemFile::create("t", 4 * PAGE_SIZE).unwrap()];
        let region = |layout| Manifest {
            huge_pages: false,
            regions: vec![RegionManifest { guest_addr: 0, size: 4 * PAGE_SIZE, layout }],
        };
        let ext = |offset, len, fd, file_offset| ExtentManifest { offset, len, fd, file_offset };
        let whole = || vec![ext(0, 4 * PAGE_SIZE, 0, 0)];
        let layers = |extents, patches| LayoutManifest::Layers { extents, patches };
        let patch = |fd, runs| PatchManifest { fd, runs };
        for m in [
            region(LayoutManifest::File { fd: 1 }),
            region(layers(vec![ext(0, 2 * PAGE_SIZE, 0, 0)], vec![])),
            region(layers(vec![ext(0, 4 * PAGE_SIZE, 0, PAGE_SIZE)], vec![])),
            region(layers(vec![ext(PAGE_SIZE, 3 * PAGE_SIZE, 0, 0)], vec![])),
            // Patches: overlapping runs, a run past the region, more bytes than the file.
            region(layers(whole(), vec![patch(0, vec![(0, 2 * PAGE_SIZE), (PAGE_SIZE, 3 * PAGE_SIZE)])])),
            region(layers(whole(), vec![patch(0, vec![(3 * PAGE_SIZE, 5 * PAGE_SIZE)])])),
            region(layers(whole(), vec![patch(1, vec![(0, PAGE_SIZE)])])),
            // An extent whose end in its file is past usize::MAX (panicked: overflow).
            region(layers(vec![ext(0, 4 * PAGE_SIZE, 0, usize::MAX - PAGE_SIZE + 1)], vec![])),
        ] {
            let e = GuestMemory::from_manifest(&m, f()).unwrap_err();
            assert!(matches!(e, Error::BadManifest(_)), "{m:?}: {e}");
        }
    }
}
