//! The checks behind the fuzz targets in `fuzz/fuzz_targets/`, one function per target.
//!
//! They live in the library (not in the fuzz crate) so that `tests/snapshot_corpora.rs`
//! runs every committed corpus file through exactly the same checks on stable Rust. Each
//! takes arbitrary bytes and panics only when a parser of [`super::format`] breaks a
//! promise: it panicked itself, accepted something it should have refused, or gave back
//! something other than what was encoded. Not an API: only for the fuzzers and that test.

use super::Error;
use super::format::{
    ENTRY_LEN, Entry, FORMAT, HASH_LEN, HASHES_MAGIC, Hashes, INDEX_MAGIC, Index, Kind, MAX_CHUNKS,
    MAX_PARENTS, Manifest, ParentRef, RegionInfo, VERSION, WS_MAGIC, WorkingSet, decode_chunk, encode_chunk,
    is_zero,
};

/// A check: panics when the parser under it breaks a promise.
pub type Check = fn(&[u8]);

/// Each fuzz target's name (its directory under `fuzz/corpus/`) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("snapshot_index", index),
    ("snapshot_index_roundtrip", index_roundtrip),
    ("snapshot_ws", working_set),
    ("snapshot_manifest", manifest),
    ("snapshot_chunk", chunk),
    ("snapshot_hashes", hashes),
];

/// `hashes.bin`: the input is the file, decoded for the count its header claims and for
/// 3 chunks; then, where the body decompresses, the same file with the header's checksum
/// and length made right for it. Whatever is accepted holds exactly that many hashes and
/// encodes back to the same bytes (the encoder is deterministic).
pub fn hashes(b: &[u8]) {
    let mut counts = vec![3u64];
    if b.len() >= 20 && b[..8] == HASHES_MAGIC {
        counts.push(u64::from_le_bytes(b[12..20].try_into().expect("8 bytes")));
    }
    let check = |file: &[u8], n: u64| {
        if let Ok(h) = Hashes::decode(file, n) {
            assert_eq!(h.hashes.len() as u64, n, "decode returned another count");
            assert!(n <= MAX_CHUNKS);
            let again = Hashes::decode(&h.encode(), n).expect("decoded hashes encode again");
            assert_eq!(again, h);
        }
    };
    for &n in &counts {
        check(b, n);
    }
    if b.len() >= 32 && b[..8] == HASHES_MAGIC {
        let n = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
        let Ok(raw) = zstd::bulk::decompress(&b[32..], HASH_LEN << 12) else { return };
        if n > 1 << 12 {
            return;
        }
        let mut fixed = b.to_vec();
        fixed[20..24].copy_from_slice(&crc32c::crc32c(&raw).to_le_bytes());
        fixed[24..28].copy_from_slice(&((b.len() - 32) as u32).to_le_bytes());
        check(&fixed, n);
        // A flipped byte anywhere in a valid file is refused.
        if Hashes::decode(&fixed, n).is_ok() {
            for i in [0, 8, 12, 20, 28] {
                let mut c = fixed.clone();
                c[i] ^= 0x20;
                assert!(Hashes::decode(&c, n).is_err(), "flipped byte {i} accepted");
            }
        }
    }
}

/// Little-endian integers from the front of `b`, zero past its end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// `index.bin`: the input is the file. It is decoded against the count and pack length
/// of the unit tests (3 entries, 4196 bytes), and against the count its header claims
/// with packs of 0 and of 2^64 - 1 bytes. Then, where the body decompresses, the same
/// file with the header's checksum and length made right for it (so that mutations of
/// the compressed entries reach the entries' own checks), with packs of 2^16 and 2^64 - 1
/// bytes. Whatever is accepted must hold `expect` entries that lie within the packs, and
/// must survive encode and decode unchanged.
pub fn index(b: &[u8]) {
    let mut cases = vec![(3, 4196)];
    if b.len() >= 20 && b[..8] == INDEX_MAGIC {
        let n = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
        cases.extend([(n, u64::MAX), (n, 0)]);
    }
    for (expect, data_len) in cases {
        if let Ok(idx) = Index::decode(b, expect, data_len) {
            check_index(&idx, expect, data_len);
        }
    }
    if b.len() >= 32 && b[..8] == INDEX_MAGIC {
        let n = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
        let raw = match zstd::bulk::decompress(&b[32..], ENTRY_LEN << 12) {
            Ok(raw) if n <= 1 << 12 => raw,
            _ => return,
        };
        let mut fixed = b.to_vec();
        fixed[20..24].copy_from_slice(&crc32c::crc32c(&raw).to_le_bytes());
        fixed[24..28].copy_from_slice(&((b.len() - 32) as u32).to_le_bytes());
        for data_len in [1 << 16, u64::MAX] {
            if let Ok(idx) = Index::decode(&fixed, n, data_len) {
                check_index(&idx, n, data_len);
            }
        }
    }
}

fn check_index(idx: &Index, expect: u64, data_len: u64) {
    assert_eq!(idx.entries.len() as u64, expect, "decode returned a count other than expected");
    assert!(expect <= MAX_CHUNKS);
    for (i, e) in idx.entries.iter().enumerate() {
        if e.kind != Kind::Zero {
            let end = e.offset.checked_add(e.len as u64);
            assert!(
                e.len > 0 && end.is_some_and(|end| end <= data_len),
                "chunk {i} outside the packs: {e:?}"
            );
        }
    }
    let again = Index::decode(&idx.encode(), expect, data_len).expect("a decoded index encodes again");
    assert_eq!(&again, idx);
}

/// `Index::encode` then `Index::decode`: the input is entries of 17 bytes each (kind
/// byte mod 3, offset u64, len u32, crc u32). Where every entry is representable
/// (offset below 2^60, stored chunks non-empty), decode gives back exactly those
/// entries, and refuses a wrong count and packs one byte too short.
pub fn index_roundtrip(b: &[u8]) {
    let entries: Vec<Entry> = b
        .chunks_exact(17)
        .map(|c| {
            let mut r = Reader(c);
            let kind = [Kind::Zero, Kind::Raw, Kind::Zstd][r.u8() as usize % 3];
            Entry { kind, offset: r.u64(), len: r.u32(), crc: r.u32() }
        })
        .collect();
    let n = entries.len() as u64;
    let mut data_len = Some(0u64);
    let mut in_bounds = true;
    for e in &entries {
        in_bounds &= e.offset < 1 << 60;
        if e.kind != Kind::Zero {
            in_bounds &= e.len > 0;
            let end = e.offset.checked_add(e.len as u64);
            data_len = data_len.zip(end).map(|(a, b)| a.max(b));
        }
    }
    let data_len = data_len.filter(|_| in_bounds);
    let idx = Index { entries };
    let bytes = idx.encode();
    match data_len {
        Some(data_len) => {
            let back = Index::decode(&bytes, n, data_len).expect("an encoded index decodes");
            assert_eq!(back, idx, "the index came back different");
            assert!(Index::decode(&bytes, n + 1, data_len).is_err(), "a wrong count was accepted");
            if idx.entries.iter().any(|e| e.kind != Kind::Zero) {
                assert!(
                    Index::decode(&bytes, n, data_len - 1).is_err(),
                    "a chunk past the packs was accepted"
                );
            }
        }
        None => {
            if let Ok(back) = Index::decode(&bytes, n, u64::MAX) {
                check_index(&back, n, u64::MAX);
            }
        }
    }
}

/// `ws.bin`: the input is the file, decoded for indexes of 0, 8, 2^32 and 2^64 - 1
/// chunks. Whatever is accepted holds only chunks inside the index, as many as the
/// header says, and encodes back to the very same bytes (the format has one encoding).
pub fn working_set(b: &[u8]) {
    for chunks in [0, 8, 1 << 32, u64::MAX] {
        if let Ok(ws) = WorkingSet::decode(b, chunks) {
            assert_eq!(b[..8], WS_MAGIC);
            let n = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
            assert_eq!(ws.chunks.len() as u64, n as u64);
            assert!(ws.chunks.iter().all(|&(c, _)| (c as u64) < chunks), "a chunk past the index");
            assert_eq!(ws.encode(), b, "a working set encodes to other bytes than it was read from");
        }
    }
}

/// `snapshot.json`: the input is parsed as JSON (as `Snapshot::open` does) and, in any
/// case, also read as a binary description of a manifest (see [`manifest_from_bytes`]),
/// which reaches `validate`'s arithmetic with hostile numbers far more often than JSON.
/// No manifest makes `validate`, `chunks` or `guest_size` panic, and one that validates
/// has regions in order, whole chunks, at most [`MAX_CHUNKS`] of them, and packs whose
/// sizes add up.
pub fn manifest(b: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<Manifest>(b) {
        check_manifest(&m);
        let json = serde_json::to_vec(&m).expect("manifests serialize");
        let again: Manifest = serde_json::from_slice(&json).expect("a serialized manifest parses");
        assert_eq!(serde_json::to_vec(&again).expect("manifests serialize"), json);
    }
    check_manifest(&manifest_from_bytes(b));
}

/// A manifest from bytes: a selector byte (bits 0-1: chunk size 4096, 8192, 0 or a u32
/// that follows; bit 2: regions placed one after the other, with `first_chunk` counted,
/// rather than taken as they are; bit 3: page size a u32 that follows rather than 4096),
/// a region count and a pack count (each mod 16), then per region three u64 (guest
/// address or gap, size, first chunk) and per pack a u64; then a parent count (mod 128,
/// past [`super::format::MAX_PARENTS`]) and per parent a selector byte (bits 0-2: its
/// pack count; bit 3: one checksum short; bit 4: an `s3://` location rather than a
/// relative path; bit 5: an absolute path) and per pack a u64 (input that ends early
/// has no parents, as the older corpus files).
pub fn manifest_from_bytes(b: &[u8]) -> Manifest {
    let mut r = Reader(b);
    let sel = r.u8();
    let chunk_size = match sel & 3 {
        0 => 4096,
        1 => 8192,
        2 => 0,
        _ => r.u32(),
    };
    let page_size = if sel & 8 != 0 { r.u32() } else { 4096 };
    let (nregions, npacks) = (r.u8() % 16, r.u8() % 16);
    let (mut end, mut first) = (0u64, 0u64);
    let regions = (0..nregions)
        .map(|_| {
            let (a, size, f) = (r.u64(), r.u64(), r.u64());
            let region = if sel & 4 != 0 {
                let guest_addr = end.wrapping_add(a);
                RegionInfo { guest_addr, size, first_chunk: first }
            } else {
                RegionInfo { guest_addr: a, size, first_chunk: f }
            };
            end = region.guest_addr.wrapping_add(size);
            first = first.wrapping_add(size.checked_div(chunk_size as u64).unwrap_or(0));
            region
        })
        .collect();
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        source_vm: "fuzz".into(),
        created_unix: 0,
        page_size,
        chunk_size,
        codec: "zstd".into(),
        level: 1,
        regions,
        packs: (0..npacks).map(|_| r.u64()).collect(),
        pack_crc32c: Vec::new(),
        working_set_first: false,
        parents: (0..r.u8() % 128)
            .map(|_| {
                let sel = r.u8();
                let packs: Vec<u64> = (0..sel & 7).map(|_| r.u64()).collect();
                let crcs = (packs.len() - usize::from(sel & 8 != 0 && !packs.is_empty())) as u32;
                let location = match (sel & 16 != 0, sel & 32 != 0) {
                    (true, _) => "s3://bucket/parent".to_string(),
                    (false, true) => "/snapshots/parent".to_string(),
                    (false, false) => "parent".to_string(),
                };
                ParentRef { location, packs, pack_crc32c: (0..crcs).collect() }
            })
            .collect(),
    }
}

fn check_manifest(m: &Manifest) {
    let valid = m.validate();
    let (chunks, size) = (m.chunks(), m.guest_size());
    if let Err(e) = &valid {
        assert!(matches!(e, Error::Format { file: "snapshot.json", .. } | Error::Version(_)), "{e}");
        return;
    }
    assert!(matches!(m.chunk_size, 4096 | 8192) && m.page_size == 4096);
    assert!(!m.regions.is_empty() && chunks <= MAX_CHUNKS, "{chunks} chunks");
    let cs = m.chunk_size as u64;
    assert_eq!(chunks.checked_mul(cs), Some(size), "chunks and guest size disagree");
    let (mut next, mut end) = (0u64, 0u64);
    for r in &m.regions {
        assert!(r.size > 0 && r.size % cs == 0 && r.guest_addr % 4096 == 0);
        assert!(r.guest_addr >= end && r.first_chunk == next, "regions out of order: {:?}", m.regions);
        end = r.guest_addr.checked_add(r.size).expect("a region ends within 2^64");
        next += r.size / cs;
    }
    assert_eq!(next, chunks);
    // What `Snapshot::open` adds up: the parents' packs, then its own.
    assert!(m.parents.len() <= MAX_PARENTS, "{} parents", m.parents.len());
    let mut total = 0u64;
    for p in &m.parents {
        assert_eq!(p.packs.len(), p.pack_crc32c.len(), "a parent's packs lack checksums");
        assert!(p.location.starts_with('/') || p.location.starts_with("s3://"), "{:?}", p.location);
        for &size in &p.packs {
            total = total.checked_add(size).expect("pack sizes add up within 2^64");
        }
    }
    assert_eq!(total, m.parents_bytes());
    for &p in &m.packs {
        total = total.checked_add(p).expect("pack sizes add up within 2^64");
    }
    assert_eq!(m.all_packs().count(), m.packs.len() + m.parents.iter().map(|p| p.packs.len()).sum::<usize>());
}

/// One chunk: a flags byte (bits 0-1: kind, mod 3; bit 2: 8192-byte chunks rather than
/// 4096), the entry's len u32 and crc u32, then the stored bytes. `decode_chunk` must
/// agree with an independent decode (the stored bytes as they are for `Raw`, one zstd
/// decompression for `Zstd`): it succeeds exactly when that gives a whole chunk whose
/// crc32c is the entry's, and then gives those bytes. The stored bytes, repeated to a
/// chunk's length, also go through `encode_chunk` and back (at every alignment of the
/// source when bit 7 of the flags is set; `is_zero` is checked at every alignment always).
pub fn chunk(b: &[u8]) {
    let mut r = Reader(b);
    let flags = r.u8();
    let kind = [Kind::Zero, Kind::Raw, Kind::Zstd][(flags & 3) as usize % 3];
    let size = if flags & 4 != 0 { 8192 } else { 4096 };
    let (len, crc) = (r.u32(), r.u32());
    let stored = r.0;
    let mut dec = zstd::bulk::Decompressor::new().expect("a zstd context");

    let expected: Option<Vec<u8>> = match kind {
        Kind::Zero => Some(vec![0; size]),
        Kind::Raw => (stored.len() == size).then(|| stored.to_vec()),
        Kind::Zstd => zstd::bulk::Decompressor::new()
            .expect("a zstd context")
            .decompress(stored, size)
            .ok()
            .filter(|d| d.len() == size),
    };
    let right_crc = expected.as_deref().map(crc32c::crc32c);
    for crc in [crc, right_crc.unwrap_or(crc)] {
        let e = Entry { kind, offset: 0, len, crc };
        let mut out = vec![0xa5; size];
        match decode_chunk(9, &e, stored, &mut dec, &mut out) {
            Ok(()) => {
                let want = expected.as_deref().expect("decode_chunk accepted what does not decode");
                assert_eq!(out, want, "decode_chunk gave other bytes than a plain decode");
                if kind != Kind::Zero {
                    assert_eq!(crc32c::crc32c(&out), e.crc, "decode_chunk accepted a wrong checksum");
                }
            }
            Err(Error::CorruptChunk { chunk: 9, .. } | Error::CorruptFrame { chunk: 9, .. }) => {
                assert!(
                    kind != Kind::Zero && (expected.is_none() || right_crc != Some(crc)),
                    "decode_chunk refused a good chunk"
                );
            }
            Err(e) => panic!("decode_chunk failed without naming the chunk: {e}"),
        }
    }

    // Encode and decode again.
    let mut data = vec![0u8; size + 8];
    if !stored.is_empty() {
        for (d, s) in data.iter_mut().zip(stored.iter().cycle()) {
            *d = *s;
        }
    }
    let mut comp = zstd::bulk::Compressor::new(1).expect("a zstd context");
    let mut buf = Vec::new();
    for shift in 0..8 {
        let src = &data[shift..shift + size];
        assert_eq!(is_zero(src), src.iter().all(|&x| x == 0), "is_zero is wrong at shift {shift}");
        if shift > 0 && flags & 0x80 == 0 {
            continue;
        }
        let e = encode_chunk(src, &mut comp, &mut buf).expect("a chunk compresses");
        assert!(e.kind == Kind::Zero || e.len as usize == buf.len());
        let mut out = vec![0xa5; size];
        decode_chunk(1, &e, &buf, &mut dec, &mut out).expect("an encoded chunk decodes");
        assert_eq!(out, src, "a chunk came back different");
    }
}
