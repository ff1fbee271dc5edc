//! The on-disk format of a snapshot (documented for users in `docs/snapshot-format.md`).
//!
//! A snapshot is a directory:
//!
//! | file | what |
//! |---|---|
//! | `snapshot.json` | [`Manifest`]: format version, chunk size, codec, guest layout, packs; written last |
//! | `state.json` | the VM's state (vCPUs, devices), as a fork hands it to a child |
//! | `index.bin` | [`Index`]: one 16-byte entry per chunk, zstd-compressed behind a 32-byte header |
//! | `ws.bin` | optional [`WorkingSet`]: chunk indices in first-touch order |
//! | `pack-NNNN.bin` | the chunks' bytes, several MiB per pack, no chunk split across two |
//!
//! Every parser here takes untrusted bytes and returns an error naming the field or
//! chunk at fault; none panics (fuzzed by `fuzz/fuzz_targets/snapshot_*.rs`, see `fuzz/README.md`).

use serde::{Deserialize, Serialize};

use super::Error;

/// `snapshot.json`'s `format` field.
pub const FORMAT: &str = "vmfork-snapshot";
/// The only version this binary reads and writes.
pub const VERSION: u32 = 1;
/// Magic of `index.bin`.
pub const INDEX_MAGIC: [u8; 8] = *b"VMFKIDX1";
/// Magic of `hashes.bin`.
pub const HASHES_MAGIC: [u8; 8] = *b"VMFKHSH1";
/// Most parents a snapshot may reference packs of (a longer chain takes a full snapshot).
pub const MAX_PARENTS: usize = 64;
/// Magic of `ws.bin`.
pub const WS_MAGIC: [u8; 8] = *b"VMFKWS01";
/// Bytes of one index entry.
pub const ENTRY_LEN: usize = 16;
/// Largest index accepted (a 64 GiB guest at 4 KiB chunks).
pub const MAX_CHUNKS: u64 = 16 << 20;

/// How a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// All zero: nothing stored.
    Zero = 0,
    /// Stored as is (zstd would not make it smaller by 5 %).
    Raw = 1,
    /// One zstd frame.
    Zstd = 2,
}

/// One chunk of guest memory in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Offset of the stored bytes in the concatenation of all packs.
    pub offset: u64,
    /// Stored length in bytes (0 for `Zero`).
    pub len: u32,
    /// crc32c of the chunk's uncompressed bytes.
    pub crc: u32,
}

impl Entry {
    /// A zero chunk.
    pub const ZERO: Entry = Entry { kind: Kind::Zero, offset: 0, len: 0, crc: 0 };

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&((self.offset << 4) | self.kind as u64).to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        let word = u64::from_le_bytes(b[0..8].try_into().ok()?);
        let kind = match word & 0xf {
            0 => Kind::Zero,
            1 => Kind::Raw,
            2 => Kind::Zstd,
            _ => return None,
        };
        let len = u32::from_le_bytes(b[8..12].try_into().ok()?);
        let crc = u32::from_le_bytes(b[12..16].try_into().ok()?);
        Some(Entry { kind, offset: word >> 4, len, crc })
    }
}

/// A region of guest-physical memory and where its chunks start in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub guest_addr: u64,
    pub size: u64,
    pub first_chunk: u64,
}

/// `snapshot.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The VM it was taken of.
    pub source_vm: String,
    /// Seconds since the epoch.
    pub created_unix: u64,
    pub page_size: u32,
    pub chunk_size: u32,
    pub codec: String,
    pub level: i32,
    pub regions: Vec<RegionInfo>,
    /// Byte sizes of `pack-0000.bin`, `pack-0001.bin`, ...
    pub packs: Vec<u64>,
    /// crc32c of each whole pack, in the same order: what a pack fetched from an object
    /// store, or kept in the host's pack cache, is checked against.
    #[serde(default)]
    pub pack_crc32c: Vec<u32>,
    /// Whether the packs start with the working set's chunks, in its order.
    #[serde(default)]
    pub working_set_first: bool,
    /// Snapshots whose packs this one's index points into as well (chunks a snapshot
    /// taken with `--parent` found unchanged). The offsets of the index are into the
    /// concatenation of every parent's packs, in this order, and then this snapshot's
    /// own: so a child of this snapshot lists these and then this one, and takes this
    /// one's entries as they are. Oldest first; each names the snapshot that owns the
    /// packs, so a restore reads from at most `parents.len() + 1` places and never walks
    /// a chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<ParentRef>,
}

/// A snapshot whose packs another snapshot references.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// Where it is: an absolute directory, or `s3://BUCKET/PREFIX` (in the same store).
    pub location: String,
    /// Its own packs' sizes and crc32c checksums, as its manifest has them.
    pub packs: Vec<u64>,
    pub pack_crc32c: Vec<u32>,
}

impl Manifest {
    /// Checks what the rest of the code relies on.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Format { file: "snapshot.json", what });
        if self.format != FORMAT {
            return bad(format!("format is {:?}, not {FORMAT:?}: not a vmfork snapshot", self.format));
        }
        if self.version != VERSION {
            return Err(Error::Version(self.version));
        }
        if self.page_size != 4096 {
            return bad(format!("page_size {} (only 4096 is supported)", self.page_size));
        }
        if !matches!(self.chunk_size, 4096 | 8192) {
            return bad(format!("chunk_size {} (4096 or 8192)", self.chunk_size));
        }
        if self.codec != "zstd" {
            return bad(format!("codec {:?} (only zstd)", self.codec));
        }
        let mut next = 0u64;
        let mut end_addr = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.size % self.chunk_size as u64 != 0 || r.guest_addr % 4096 != 0 {
                return bad(format!(
                    "region {i}: size {:#x} at {:#x} is not whole chunks",
                    r.size, r.guest_addr
                ));
            }
            if r.guest_addr < end_addr || r.first_chunk != next {
                return bad(format!("region {i} overlaps or is out of order"));
            }
            end_addr = r.guest_addr.checked_add(r.size).ok_or_else(|| Error::Format {
                file: "snapshot.json",
                what: format!("region {i} ends past 2^64"),
            })?;
            next += r.size / self.chunk_size as u64;
        }
        if self.regions.is_empty() || next > MAX_CHUNKS {
            return bad(format!("{} regions with {next} chunks", self.regions.len()));
        }
        if !self.pack_crc32c.is_empty() && self.pack_crc32c.len() != self.packs.len() {
            return bad(format!("{} pack checksums for {} packs", self.pack_crc32c.len(), self.packs.len()));
        }
        if self.parents.len() > MAX_PARENTS {
            return bad(format!("{} parents (at most {MAX_PARENTS})", self.parents.len()));
        }
        for (i, p) in self.parents.iter().enumerate() {
            if p.pack_crc32c.len() != p.packs.len() {
                return bad(format!(
                    "parent {i}: {} pack checksums for {} packs",
                    p.pack_crc32c.len(),
                    p.packs.len()
                ));
            }
            let local = p.location.starts_with('/') && !p.location.contains('\0');
            if !(local || p.location.starts_with("s3://")) {
                return bad(format!(
                    "parent {i}: location {:?} is neither an absolute path nor s3://",
                    p.location
                ));
            }
        }
        // `Snapshot::open` adds them up.
        if self.all_packs().try_fold(0u64, |t, p| t.checked_add(p.2)).is_none() {
            return bad("packs: their sizes add up past 2^64".into());
        }
        Ok(())
    }

    /// Every pack the index points into, in the order its offsets count them: each
    /// parent's, then this snapshot's own. Each is `(location, number, size, crc32c)`:
    /// the location is the parent's, `None` for this snapshot; the number is the pack's
    /// in its owner ([`Manifest::pack_name`]); the crc32c is 0 where a manifest has none.
    pub fn all_packs(&self) -> impl Iterator<Item = (Option<&str>, usize, u64, u32)> + '_ {
        let parents = self.parents.iter().flat_map(|p| {
            let at = Some(p.location.as_str());
            p.packs.iter().zip(&p.pack_crc32c).enumerate().map(move |(i, (&s, &c))| (at, i, s, c))
        });
        let crc = |i: usize| self.pack_crc32c.get(i).copied().unwrap_or(0);
        parents.chain(self.packs.iter().enumerate().map(move |(i, &s)| (None, i, s, crc(i))))
    }

    /// Bytes of all parents' packs: where this snapshot's own packs start in the index's
    /// offsets (exact once [`Manifest::validate`] passed).
    pub fn parents_bytes(&self) -> u64 {
        self.parents.iter().flat_map(|p| &p.packs).fold(0u64, |t, &s| t.saturating_add(s))
    }

    /// Chunks in all regions (exact once [`Manifest::validate`] passed; before, a
    /// `chunk_size` of 0 counts none and the sum saturates, rather than panicking).
    pub fn chunks(&self) -> u64 {
        let cs = self.chunk_size as u64;
        self.regions.iter().fold(0u64, |n, r| n.saturating_add(r.size.checked_div(cs).unwrap_or(0)))
    }

    /// Guest bytes in all regions (exact once [`Manifest::validate`] passed; the sum
    /// saturates before).
    pub fn guest_size(&self) -> u64 {
        self.regions.iter().fold(0u64, |n, r| n.saturating_add(r.size))
    }

    /// The file name of pack `i`.
    pub fn pack_name(i: usize) -> String {
        format!("pack-{i:04}.bin")
    }
}

/// The chunk index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    pub entries: Vec<Entry>,
}

impl Index {
    /// `index.bin`: magic, version u32, entry count u64, crc32c of the raw entries u32,
    /// compressed length u32, padding to 32 bytes; then the entries, zstd-compressed.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            e.encode(&mut raw);
        }
        frame(&INDEX_MAGIC, self.entries.len() as u64, &raw)
    }

    /// Parses `index.bin`, which must hold `expect` entries whose stored bytes lie within
    /// `data_len` bytes of packs.
    pub fn decode(b: &[u8], expect: u64, data_len: u64) -> Result<Index, Error> {
        let bad = |what: String| Error::Format { file: "index.bin", what };
        let raw = unframe(b, &INDEX_MAGIC, "index.bin", expect, ENTRY_LEN)?;
        let mut entries = Vec::with_capacity(expect as usize);
        for (i, e) in raw.chunks_exact(ENTRY_LEN).enumerate() {
            let e = Entry::decode(e).ok_or_else(|| bad(format!("chunk {i}: unknown kind")))?;
            let end = e.offset.checked_add(e.len as u64);
            if e.kind != Kind::Zero && (e.len == 0 || end.is_none_or(|end| end > data_len)) {
                return Err(bad(format!("chunk {i}: {} bytes at {} lie outside the packs", e.len, e.offset)));
            }
            entries.push(e);
        }
        Ok(Index { entries })
    }
}

/// The framing `index.bin` and `hashes.bin` share: `magic`, version u32, record count
/// u64, crc32c of the raw records u32, compressed length u32, padding to 32 bytes; then
/// the records, as one zstd frame that declares its size.
fn frame(magic: &[u8; 8], count: u64, raw: &[u8]) -> Vec<u8> {
    let packed = zstd::bulk::compress(raw, 3).expect("compressing into a Vec cannot fail");
    let mut out = Vec::with_capacity(32 + packed.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(raw).to_le_bytes());
    out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
    out.resize(32, 0);
    out.extend_from_slice(&packed);
    out
}

/// The raw records of a [`frame`]d file `file`, which must hold `expect` records of
/// `record_len` bytes (at most [`MAX_CHUNKS`]) and match its checksum.
fn unframe(
    b: &[u8],
    magic: &[u8; 8],
    file: &'static str,
    expect: u64,
    record_len: usize,
) -> Result<Vec<u8>, Error> {
    let bad = |what: String| Error::Format { file, what };
    if b.len() < 32 || b[..8] != *magic {
        return Err(bad(format!("no header (magic {})", String::from_utf8_lossy(magic))));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let n = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
    let (crc, clen) = (u32_at(20), u32_at(24) as usize);
    if n != expect || n > MAX_CHUNKS {
        return Err(bad(format!("{n} entries, the manifest says {expect}")));
    }
    if b[28..32] != [0; 4] {
        return Err(bad("header padding is not zero".into()));
    }
    if b.len() != 32 + clen {
        return Err(bad(format!("{} bytes of entries, the header says {clen}", b.len() - 32)));
    }
    let raw_len = n as usize * record_len;
    // Refused before `raw_len` bytes are allocated: `frame`'s zstd frame declares its size.
    match zstd::zstd_safe::get_frame_content_size(&b[32..]) {
        Ok(Some(len)) if len == raw_len as u64 => {}
        _ => return Err(bad(format!("entries: the zstd frame does not declare {raw_len} bytes"))),
    }
    let raw = zstd::bulk::decompress(&b[32..], raw_len).map_err(|source| Error::Entries { file, source })?;
    if raw.len() != raw_len || crc32c::crc32c(&raw) != crc {
        return Err(bad("entries do not match their checksum".into()));
    }
    Ok(raw)
}

/// A chunk's content hash: the first 16 bytes of its BLAKE3 digest. Strong enough that
/// two chunks with the same hash are taken to be the same bytes (a snapshot with a parent
/// references the parent's chunk instead of storing its own; the crc32c must agree too).
pub type ChunkHash = [u8; HASH_LEN];

/// Bytes of one [`ChunkHash`].
pub const HASH_LEN: usize = 16;

/// The hash of a chunk that is not all zero (a zero chunk's hash is all zero bytes).
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    let d = blake3::hash(data);
    d.as_bytes()[..HASH_LEN].try_into().expect("a BLAKE3 digest is 32 bytes")
}

/// `hashes.bin`: each chunk's [`ChunkHash`], in chunk order; what a later snapshot taken
/// with this one as its parent compares its chunks against, without reading this
/// snapshot's packs. A restore never reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hashes {
    pub hashes: Vec<ChunkHash>,
}

impl Hashes {
    /// Framed as `index.bin` is (magic `VMFKHSH1`), records of 16 bytes.
    pub fn encode(&self) -> Vec<u8> {
        frame(&HASHES_MAGIC, self.hashes.len() as u64, self.hashes.as_flattened())
    }

    /// Parses `hashes.bin` for an index of `expect` chunks.
    pub fn decode(b: &[u8], expect: u64) -> Result<Hashes, Error> {
        let raw = unframe(b, &HASHES_MAGIC, "hashes.bin", expect, HASH_LEN)?;
        let hashes = raw.chunks_exact(HASH_LEN).map(|h| h.try_into().expect("16 bytes")).collect();
        Ok(Hashes { hashes })
    }
}

/// The chunks a restored VM touched first, in that order, with microseconds since its
/// resume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pub chunks: Vec<(u32, u32)>,
}

impl WorkingSet {
    /// `ws.bin`: magic, count u32, crc32c of the pairs u32, then (chunk u32, µs u32) pairs.
    pub fn encode(&self) -> Vec<u8> {
        let mut pairs = Vec::with_capacity(self.chunks.len() * 8);
        for &(c, us) in &self.chunks {
            pairs.extend_from_slice(&c.to_le_bytes());
            pairs.extend_from_slice(&us.to_le_bytes());
        }
        let mut out = WS_MAGIC.to_vec();
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&pairs).to_le_bytes());
        out.extend_from_slice(&pairs);
        out
    }

    /// Parses `ws.bin` for an index of `chunks` entries.
    pub fn decode(b: &[u8], chunks: u64) -> Result<WorkingSet, Error> {
        let bad = |what: String| Error::Format { file: "ws.bin", what };
        if b.len() < 16 || b[..8] != WS_MAGIC {
            return Err(bad("no working-set header (magic VMFKWS01)".into()));
        }
        let n = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        let pairs = &b[16..];
        if pairs.len() != n.saturating_mul(8) || crc32c::crc32c(pairs) != crc {
            return Err(bad(format!("{} bytes for {n} entries, or a bad checksum", pairs.len())));
        }
        let mut out = Vec::with_capacity(n);
        for p in pairs.chunks_exact(8) {
            let c = u32::from_le_bytes(p[0..4].try_into().expect("4 bytes"));
            if c as u64 >= chunks {
                return Err(bad(format!("chunk {c} is past the index's {chunks}")));
            }
            out.push((c, u32::from_le_bytes(p[4..8].try_into().expect("4 bytes"))));
        }
        Ok(WorkingSet { chunks: out })
    }
}

/// Compresses one chunk: its entry (with `offset` still 0) and the bytes to store.
pub fn encode_chunk(
    data: &[u8],
    compressor: &mut zstd::bulk::Compressor<'_>,
    out: &mut Vec<u8>,
) -> std::io::Result<Entry> {
    out.clear();
    if is_zero(data) {
        return Ok(Entry::ZERO);
    }
    let crc = crc32c::crc32c(data);
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    compressor.compress_to_buffer(data, out)?;
    // Not worth a decode: keep it raw.
    if out.len() * 20 > data.len() * 19 {
        out.clear();
        out.extend_from_slice(data);
        return Ok(Entry { kind: Kind::Raw, offset: 0, len: data.len() as u32, crc });
    }
    Ok(Entry { kind: Kind::Zstd, offset: 0, len: out.len() as u32, crc })
}

/// Decodes the stored bytes of chunk `chunk` (entry `e`) into `out` (one chunk long) and
/// checks them against the entry's checksum.
pub fn decode_chunk(
    chunk: u64,
    e: &Entry,
    stored: &[u8],
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    out: &mut [u8],
) -> Result<(), Error> {
    let corrupt = |what: String| Error::CorruptChunk { chunk, what };
    match e.kind {
        Kind::Zero => out.fill(0),
        Kind::Raw => {
            if stored.len() != out.len() {
                return Err(corrupt(format!("{} raw bytes for a {}-byte chunk", stored.len(), out.len())));
            }
            out.copy_from_slice(stored);
        }
        Kind::Zstd => {
            let n = decompressor
                .decompress_to_buffer(stored, out)
                .map_err(|source| Error::CorruptFrame { chunk, source })?;
            if n != out.len() {
                return Err(corrupt(format!("decodes to {n} bytes, not {}", out.len())));
            }
        }
    }
    if e.kind != Kind::Zero && crc32c::crc32c(out) != e.crc {
        return Err(corrupt("its bytes do not match their checksum".into()));
    }
    Ok(())
}

/// Whether every byte is zero (a word at a time).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any initialized bytes are valid u64s; align_to puts only whole aligned
        // words in the middle slice.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().fold(0, |a, &w| a | w) == 0 && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_a_flipped_byte_is_refused() {
        let entries = vec![
            Entry::ZERO,
            Entry { kind: Kind::Zstd, offset: 0, len: 100, crc: 7 },
            Entry { kind: Kind::Raw, offset: 100, len: 4096, crc: 9 },
        ];
        let idx = Index { entries };
        let b = idx.encode();
        assert_eq!(Index::decode(&b, 3, 4196).unwrap(), idx);
        assert!(Index::decode(&b, 4, 4196).is_err(), "wrong count accepted");
        assert!(Index::decode(&b, 3, 4000).is_err(), "chunk past the packs accepted");
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Index::decode(&c, 3, 4196).is_err(), "flipped byte {i} accepted");
        }
        assert!(Index::decode(&b[..b.len() - 1], 3, 4196).is_err());
    }

    #[test]
    fn chunks_round_trip_and_corruption_is_named() {
        let mut comp = zstd::bulk::Compressor::new(1).unwrap();
        let mut dec = zstd::bulk::Decompressor::new().unwrap();
        let text: Vec<u8> = (0..8192u32).map(|i| b"vmfork snapshot "[i as usize % 16]).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut out = Vec::new();
        for (data, kind) in [(&text, Kind::Zstd), (&noise, Kind::Raw), (&vec![0u8; 8192], Kind::Zero)] {
            let e = encode_chunk(data, &mut comp, &mut out).unwrap();
            assert_eq!(e.kind, kind);
            let mut back = vec![1u8; 8192];
            decode_chunk(5, &e, &out, &mut dec, &mut back).unwrap();
            assert_eq!(&back, data);
            if kind != Kind::Zero {
                let mut bad = out.clone();
                let mid = bad.len() / 2;
                bad[mid] ^= 1;
                let err = decode_chunk(5, &e, &bad, &mut dec, &mut back).unwrap_err();
                assert!(err.to_string().contains("chunk 5"), "{err}");
            }
        }
    }

    fn manifest(chunk_size: u32, regions: &[(u64, u64, u64)], packs: Vec<u64>) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            source_vm: "vm".into(),
            created_unix: 0,
            page_size: 4096,
            chunk_size,
            codec: "zstd".into(),
            level: 1,
            regions: regions
                .iter()
                .map(|&(guest_addr, size, first_chunk)| RegionInfo { guest_addr, size, first_chunk })
                .collect(),
            packs,
            pack_crc32c: vec![],
            working_set_first: false,
            parents: vec![],
        }
    }

    /// fuzz/corpus/snapshot_manifest/seed-chunk-size-0: `chunks` divided by zero.
    #[test]
    fn chunks_and_guest_size_of_an_unvalidated_manifest_do_not_panic() {
        let m = manifest(0, &[(0, 8192, 0)], vec![]);
        assert!(m.validate().is_err());
        assert_eq!((m.chunks(), m.guest_size()), (0, 8192));
        let m = manifest(4096, &[(0, 1 << 63, 0), (0, 1 << 63, 0)], vec![]);
        assert!(m.validate().is_err());
        assert_eq!((m.chunks(), m.guest_size()), (1 << 52, u64::MAX));
    }

    #[test]
    fn packs_adding_up_past_2_64_are_refused() {
        let m = manifest(4096, &[(0, 8192, 0)], vec![u64::MAX, 1]);
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("packs"), "{err}");
        assert!(manifest(4096, &[(0, 8192, 0)], vec![u64::MAX - 1, 1]).validate().is_ok());
    }

    /// fuzz/corpus/snapshot_index/seed-max-count: a 41-byte file claiming MAX_CHUNKS
    /// entries made zstd reserve 256 MiB before it failed.
    #[test]
    fn an_index_frame_not_declaring_the_entries_size_is_refused_before_decoding() {
        let header = |n: u64, body: &[u8]| {
            let mut b = INDEX_MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&crc32c::crc32c(&[]).to_le_bytes());
            b.extend_from_slice(&(body.len() as u32).to_le_bytes());
            b.resize(32, 0);
            b.extend_from_slice(body);
            b
        };
        let empty = zstd::bulk::compress(&[], 3).unwrap();
        assert_eq!(Index::decode(&header(0, &empty), 0, 0).unwrap(), Index { entries: vec![] });
        let err = Index::decode(&header(MAX_CHUNKS, &empty), MAX_CHUNKS, 0).unwrap_err().to_string();
        assert!(err.contains("does not declare 268435456 bytes"), "{err}");
        // A frame without a content size (a streaming encoder's) is refused too.
        let raw = [0u8; 16];
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        let body = enc.finish().unwrap();
        let mut b = header(1, &body);
        b[20..24].copy_from_slice(&crc32c::crc32c(&raw).to_le_bytes());
        assert!(Index::decode(&b, 1, 0).unwrap_err().to_string().contains("does not declare 16 bytes"));
    }

    #[test]
    fn chunk_hashes_round_trip_and_a_flipped_byte_is_refused() {
        let h = Hashes { hashes: vec![[0; HASH_LEN], chunk_hash(b"one"), chunk_hash(b"two")] };
        assert_ne!(h.hashes[1], h.hashes[2]);
        let b = h.encode();
        assert_eq!(Hashes::decode(&b, 3).unwrap(), h);
        assert!(Hashes::decode(&b, 2).is_err(), "wrong count accepted");
        assert!(Index::decode(&b, 3, 0).is_err(), "a hashes file read as an index");
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Hashes::decode(&c, 3).is_err(), "flipped byte {i} accepted");
        }
    }

    #[test]
    fn parents_are_bounded_and_their_packs_come_first() {
        let parent = |loc: &str, packs: Vec<u64>| ParentRef {
            location: loc.into(),
            pack_crc32c: packs.iter().map(|&p| p as u32).collect(),
            packs,
        };
        let mut m = manifest(4096, &[(0, 8192, 0)], vec![5]);
        m.pack_crc32c = vec![55];
        m.parents = vec![parent("/snaps/a", vec![10, 20]), parent("s3://bucket/b", vec![30])];
        m.validate().unwrap();
        assert_eq!(m.parents_bytes(), 60);
        let all: Vec<_> = m.all_packs().collect();
        assert_eq!(
            all,
            [
                (Some("/snaps/a"), 0, 10, 10),
                (Some("/snaps/a"), 1, 20, 20),
                (Some("s3://bucket/b"), 0, 30, 30),
                (None, 0, 5, 55)
            ]
        );
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap().parents, m.parents);
        let mut bad = m.clone();
        bad.parents[0].pack_crc32c.pop();
        assert!(bad.validate().unwrap_err().to_string().contains("parent 0"));
        let mut bad = m.clone();
        bad.parents[1].location = "relative/dir".into();
        assert!(bad.validate().unwrap_err().to_string().contains("neither an absolute path nor s3://"));
        let mut bad = m.clone();
        bad.parents = vec![parent("/p", vec![1]); MAX_PARENTS + 1];
        assert!(bad.validate().is_err());
        let mut bad = m;
        bad.parents = vec![parent("/p", vec![u64::MAX])];
        assert!(bad.validate().unwrap_err().to_string().contains("past 2^64"));
        // Without parents the manifest is written as before.
        assert!(
            !serde_json::to_string(&manifest(4096, &[(0, 8192, 0)], vec![])).unwrap().contains("parents")
        );
    }

    #[test]
    fn a_working_set_round_trips_and_is_bounded_by_the_index() {
        let ws = WorkingSet { chunks: vec![(3, 0), (1, 20), (7, 99)] };
        let b = ws.encode();
        assert_eq!(WorkingSet::decode(&b, 8).unwrap(), ws);
        assert!(WorkingSet::decode(&b, 7).is_err());
        assert!(WorkingSet::decode(&b[..b.len() - 2], 8).is_err());
    }
}
