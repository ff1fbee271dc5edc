//! Every file of the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! check its fuzz target runs (the `fuzzing` module of the parser's owner:
//! `vmfork::snapshot`, `api`, `memory::transfer`, `fork`, `units`, `wire`), on stable Rust:
//! crashes the fuzzers once found stay fixed, and a deleted or emptied corpus fails here.
//!
//! `cargo test --test snapshot_corpora -- --ignored write_seeds` (re)writes the seed
//! files (`seed-*`): real encoded files made with the format's own encoders, and a few
//! hand-made edge cases.

use std::path::{Path, PathBuf};

use vmfork::snapshot::format::{
    Entry, HASHES_MAGIC, Hashes, INDEX_MAGIC, Index, Kind, MAX_CHUNKS, Manifest, ParentRef, RegionInfo,
    WS_MAGIC, WorkingSet, chunk_hash, encode_chunk,
};
use vmfork::snapshot::fuzzing::Check;

/// Every fuzz target: its name (its directory under `fuzz/corpus/`) and its check.
fn targets() -> Vec<(&'static str, Check)> {
    [
        vmfork::snapshot::fuzzing::TARGETS,
        vmfork::api::fuzzing::TARGETS,
        vmfork::memory::transfer::fuzzing::TARGETS,
        vmfork::fork::fuzzing::TARGETS,
        vmfork::units::fuzzing::TARGETS,
        vmfork::wire::fuzzing::TARGETS,
    ]
    .concat()
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

#[test]
fn every_corpus_file_passes_its_check() {
    let root = corpus_dir();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e} (the fuzz corpora are missing)", root.display()))
        .map(|d| d.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let targets = targets();
    let mut known: Vec<String> = targets.iter().map(|t| t.0.to_string()).collect();
    known.sort();
    assert_eq!(names, known, "fuzz/corpus/ should hold one directory per fuzz target");
    for &(target, check) in &targets {
        let dir = root.join(target);
        let mut files = 0;
        for f in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = f.expect("a directory entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(panic) = std::panic::catch_unwind(|| check(&bytes)) {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("?");
                panic!("{}: {what}", path.display());
            }
            files += 1;
        }
        assert!(files > 0, "{} is empty", dir.display());
    }
}

fn manifest(regions: Vec<RegionInfo>, chunk_size: u32, packs: Vec<u64>) -> Manifest {
    Manifest {
        format: "vmfork-snapshot".into(),
        version: 1,
        source_vm: "vm1".into(),
        created_unix: 1_760_000_000,
        page_size: 4096,
        chunk_size,
        codec: "zstd".into(),
        level: 1,
        regions,
        packs,
        pack_crc32c: Vec::new(),
        working_set_first: false,
        parents: Vec::new(),
    }
}

/// A page of text (compresses), one of noise (stays raw) and one of zeros.
fn pages(size: usize) -> [Vec<u8>; 3] {
    let text: Vec<u8> = (0..size).map(|i| b"vmfork snapshot "[i % 16]).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    [text, noise, vec![0; size]]
}

#[test]
#[ignore = "writes the seed corpora into fuzz/corpus/"]
fn write_seeds() {
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = Vec::new();

    // index.bin: the unit tests' three entries, an empty one, and one as `take` writes.
    let three = Index {
        entries: vec![
            Entry::ZERO,
            Entry { kind: Kind::Zstd, offset: 0, len: 100, crc: 7 },
            Entry { kind: Kind::Raw, offset: 100, len: 4096, crc: 9 },
        ],
    };
    seeds.push(("snapshot_index", "seed-three", three.encode()));
    seeds.push(("snapshot_index", "seed-empty", Index { entries: vec![] }.encode()));
    let mut comp = zstd::bulk::Compressor::new(1).unwrap();
    let (mut entries, mut offset, mut buf) = (Vec::new(), 0u64, Vec::new());
    for i in 0..64 {
        let e = encode_chunk(&pages(8192)[i % 3], &mut comp, &mut buf).unwrap();
        entries.push(Entry { offset: if e.kind == Kind::Zero { 0 } else { offset }, ..e });
        offset += buf.len() as u64;
    }
    let real = Index { entries: entries.clone() };
    seeds.push(("snapshot_index", "seed-real-64", real.encode()));
    // A header claiming the most entries allowed over a tiny body, and one claiming more.
    for (name, n) in [("seed-max-count", MAX_CHUNKS), ("seed-too-many", u64::MAX)] {
        let mut b = INDEX_MAGIC.to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&9u32.to_le_bytes());
        b.resize(32, 0);
        b.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0, 0]);
        seeds.push(("snapshot_index", name, b));
    }

    // Index round trips: records of kind, offset, len, crc.
    let records = |entries: &[Entry]| {
        let mut b = Vec::new();
        for e in entries {
            b.push(e.kind as u8);
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
            b.extend_from_slice(&e.crc.to_le_bytes());
        }
        b
    };
    seeds.push(("snapshot_index_roundtrip", "seed-three", records(&three.entries)));
    seeds.push(("snapshot_index_roundtrip", "seed-real-64", records(&entries)));
    let edge = [
        Entry { kind: Kind::Raw, offset: (1 << 60) - 1, len: 1, crc: u32::MAX },
        Entry { kind: Kind::Zstd, offset: u64::MAX - 10, len: u32::MAX, crc: 0 },
        Entry { kind: Kind::Raw, offset: 1 << 60, len: 1, crc: 0 },
        Entry { kind: Kind::Zstd, offset: 5, len: 0, crc: 0 },
    ];
    for (i, e) in edge.iter().enumerate() {
        seeds.push((
            "snapshot_index_roundtrip",
            ["seed-edge-0", "seed-edge-1", "seed-edge-2", "seed-edge-3"][i],
            records(&[*e]),
        ));
    }

    // ws.bin.
    let ws = WorkingSet { chunks: vec![(3, 0), (1, 20), (7, 99)] };
    seeds.push(("snapshot_ws", "seed-three", ws.encode()));
    seeds.push(("snapshot_ws", "seed-empty", WorkingSet::default().encode()));
    let big = WorkingSet { chunks: (0..200).map(|i| ((i * 7919) % 4096, i * 150)).collect() };
    seeds.push(("snapshot_ws", "seed-real-200", big.encode()));
    let mut lying = WS_MAGIC.to_vec();
    lying.extend_from_slice(&u32::MAX.to_le_bytes());
    lying.extend_from_slice(&[0; 12]);
    seeds.push(("snapshot_ws", "seed-count-max", lying));

    // hashes.bin: three, none, and as `take` writes them for the 64 chunks above.
    let three = Hashes { hashes: vec![[0; 16], chunk_hash(b"a"), chunk_hash(b"b")] };
    seeds.push(("snapshot_hashes", "seed-three", three.encode()));
    seeds.push(("snapshot_hashes", "seed-empty", Hashes { hashes: vec![] }.encode()));
    let real: Vec<[u8; 16]> =
        (0..64).map(|i| if i % 3 == 2 { [0; 16] } else { chunk_hash(&pages(8192)[i % 3]) }).collect();
    seeds.push(("snapshot_hashes", "seed-real-64", Hashes { hashes: real }.encode()));
    let mut b = HASHES_MAGIC.to_vec();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&MAX_CHUNKS.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&9u32.to_le_bytes());
    b.resize(32, 0);
    b.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0, 0]);
    seeds.push(("snapshot_hashes", "seed-max-count", b));

    // snapshot.json, pretty as `take` writes it, and edge cases.
    let json = |m: &Manifest| serde_json::to_vec_pretty(m).unwrap();
    let one = manifest(
        vec![RegionInfo { guest_addr: 0, size: 256 << 20, first_chunk: 0 }],
        8192,
        vec![4 << 20, 1234],
    );
    seeds.push(("snapshot_manifest", "seed-real", json(&one)));
    let two = manifest(
        vec![
            RegionInfo { guest_addr: 0, size: 3 << 30, first_chunk: 0 },
            RegionInfo { guest_addr: 4 << 30, size: 1 << 30, first_chunk: (3 << 30) / 4096 },
        ],
        4096,
        vec![4 << 20; 3],
    );
    seeds.push(("snapshot_manifest", "seed-two-regions", json(&two)));
    let mut child = one.clone();
    child.pack_crc32c = vec![1, 2];
    child.parents = vec![
        ParentRef { location: "/snapshots/a".into(), packs: vec![4 << 20, 99], pack_crc32c: vec![3, 4] },
        ParentRef { location: "s3://bucket/fleet/b".into(), packs: vec![77], pack_crc32c: vec![5] },
    ];
    seeds.push(("snapshot_manifest", "seed-parents", json(&child)));
    let overflow = manifest(
        vec![
            RegionInfo { guest_addr: 0, size: 1 << 63, first_chunk: 0 },
            RegionInfo { guest_addr: 1 << 63, size: (1 << 63) - 4096, first_chunk: 1 << 51 },
        ],
        4096,
        vec![u64::MAX, 1],
    );
    seeds.push(("snapshot_manifest", "seed-huge", json(&overflow)));
    seeds.push(("snapshot_manifest", "seed-not-json", b"\x05\x02\x01 not json at all".to_vec()));
    let mut zero_cs = String::from_utf8(json(&one)).unwrap();
    zero_cs = zero_cs.replace("\"chunk_size\": 8192", "\"chunk_size\": 0");
    seeds.push(("snapshot_manifest", "seed-chunk-size-0", zero_cs.into_bytes()));

    // Chunks: flags, len, crc, stored bytes.
    let chunk = |flags: u8, e: &Entry, stored: &[u8]| {
        let mut b = vec![flags];
        b.extend_from_slice(&e.len.to_le_bytes());
        b.extend_from_slice(&e.crc.to_le_bytes());
        b.extend_from_slice(stored);
        b
    };
    for (size, big) in [(4096, 0u8), (8192, 4)] {
        for (i, page) in pages(size).iter().enumerate() {
            let e = encode_chunk(page, &mut comp, &mut buf).unwrap();
            let name = ["seed-zstd-", "seed-raw-", "seed-zero-"][i];
            let name: &'static str = format!("{name}{size}").leak();
            seeds.push(("snapshot_chunk", name, chunk(e.kind as u8 | big, &e, &buf)));
        }
    }
    let short = zstd::bulk::compress(b"vmfork snapshot vmfork snapshot", 1).unwrap();
    seeds.push(("snapshot_chunk", "seed-short-zstd", chunk(2 | 0x80, &Entry::ZERO, &short)));

    // Frames: one of each kind as sent, cut short, and with lying headers.
    let frame = |kind: u32, fds: u32, len: u64, payload: &[u8]| {
        let mut b = kind.to_le_bytes().to_vec();
        b.extend(fds.to_le_bytes());
        b.extend(len.to_le_bytes());
        b.extend_from_slice(payload);
        b
    };
    let ready = br#"{"ok":true,"error":null,"pid":42,"steps":{"started_ns":1000,"hello_ns":1100,"memory_ns":1200,"restored_ns":1300,"running_ns":1400,"first_report_ns":2000}}"#;
    let manifest =
        br#"{"huge_pages":false,"regions":[{"guest_addr":0,"size":4096,"layout":{"kind":"file","fd":0}}]}"#;
    let ranges = b"[[140737488355328,4096]]";
    seeds.push(("wire_frame", "seed-hello", frame(1, 0, 2, b"{}")));
    seeds.push(("wire_frame", "seed-manifest", frame(2, 1, manifest.len() as u64, manifest)));
    seeds.push(("wire_frame", "seed-hand-back", frame(3, 1, ranges.len() as u64, ranges)));
    seeds.push(("wire_frame", "seed-ready", frame(4, 0, ready.len() as u64, ready)));
    seeds.push(("wire_frame", "seed-ready-then-more", [frame(4, 0, 2, b"{}"), frame(4, 0, 0, b"")].concat()));
    seeds.push(("wire_frame", "seed-truncated", frame(4, 0, ready.len() as u64, &ready[..20])));
    seeds.push(("wire_frame", "seed-short-header", frame(1, 0, 0, b"")[..9].to_vec()));
    seeds.push(("wire_frame", "seed-oversize", frame(2, 0, u64::MAX, b"")));
    seeds.push(("wire_frame", "seed-too-many-fds", frame(3, u32::MAX, 0, b"")));
    seeds.push(("wire_frame", "seed-unknown-kind", frame(0x4b464d56, 0, 0, b"")));

    let root = corpus_dir();
    for (target, name, bytes) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
