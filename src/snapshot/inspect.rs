//! What `vmfork snapshot` and `vmfork snapshot inspect` print for people (`--json` prints
//! the same facts as data).

use std::fmt::Write;

use super::format::Kind;
use super::{Snapshot, StatsReport, Summary};
use crate::units::human_bytes;

impl std::fmt::Display for Summary {
    /// One line: what was stored, how small, and what it cost the VM.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nonzero = self.guest_bytes - self.zero_chunks * (self.guest_bytes / self.chunks.max(1));
        write!(
            f,
            "{}: {} guest, {} of {} chunks zero, {} stored for {} not zero (ratio {:.1}); VM paused {:.2} ms, written in {:.2} s ({:.0} MiB/s of guest memory)",
            self.dir.display(),
            human_bytes(self.guest_bytes),
            self.zero_chunks,
            self.chunks,
            human_bytes(self.stored_bytes),
            human_bytes(nonzero),
            self.ratio,
            self.pause_ns as f64 / 1e6,
            self.write_secs,
            self.guest_bytes as f64 / (1 << 20) as f64 / self.write_secs.max(1e-9),
        )?;
        if let Some(p) = &self.parent {
            write!(
                f,
                "; {} chunks unchanged since parent {p} referenced, {} new",
                self.parent_chunks,
                human_bytes(self.new_bytes)
            )?;
        }
        Ok(())
    }
}

/// A snapshot's index and working set, and what a restore of it did (`stats`, from the
/// restored VM `vm`), as lines to read.
pub fn describe(snap: &Snapshot, restore: Option<(&str, &StatsReport)>) -> String {
    let m = &snap.manifest;
    let idx = &snap.index.entries;
    let count = |k| idx.iter().filter(|e| e.kind == k).count();
    let stored: u64 = idx.iter().map(|e| e.len as u64).sum();
    let nonzero = (idx.len() - count(Kind::Zero)) as u64 * m.chunk_size as u64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "snapshot   {} ({} version {}), of VM {}",
        snap.dir.display(),
        m.format,
        m.version,
        m.source_vm
    );
    let _ = writeln!(
        s,
        "guest      {} in {} region(s); chunks of {}, {} level {}",
        human_bytes(m.guest_size()),
        m.regions.len(),
        human_bytes(m.chunk_size as u64),
        m.codec,
        m.level
    );
    let _ = writeln!(
        s,
        "chunks     {}: {} zero, {} zstd, {} raw",
        idx.len(),
        count(Kind::Zero),
        count(Kind::Zstd),
        count(Kind::Raw)
    );
    let ratio = if stored == 0 { 0.0 } else { nonzero as f64 / stored as f64 };
    let _ = writeln!(
        s,
        "stored     {} in {} pack(s) for {} not zero (ratio {ratio:.1})",
        human_bytes(stored),
        m.packs.len(),
        human_bytes(nonzero)
    );
    if !m.parents.is_empty() {
        let base = m.parents_bytes();
        let inherited: Vec<_> = idx.iter().filter(|e| e.kind != Kind::Zero && e.offset < base).collect();
        let _ = writeln!(
            s,
            "parents    {} chunks ({}) in the packs of {} parent(s); {} in its own",
            inherited.len(),
            human_bytes(inherited.iter().map(|e| e.len as u64).sum()),
            m.parents.len(),
            human_bytes(m.packs.iter().sum())
        );
        for p in m.parents.iter().rev() {
            let _ = writeln!(s, "  parent   {} ({} packs)", p.location, p.packs.len());
        }
    }
    match &snap.working_set {
        Some(ws) => {
            let span = ws.chunks.iter().map(|c| c.1).max().unwrap_or(0);
            let _ = writeln!(
                s,
                "working set {} chunks ({}) touched over {:.1} ms{}",
                ws.chunks.len(),
                human_bytes(ws.chunks.len() as u64 * m.chunk_size as u64),
                span as f64 / 1e3,
                if m.working_set_first { ", stored first in the packs" } else { "" }
            );
        }
        None => {
            let _ = writeln!(s, "working set none recorded (vmfork snapshot record-ws DIR --from VM)");
        }
    }
    if let Some((vm, r)) = restore {
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} µs"));
        let share = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0} %", v * 100.0));
        let _ = writeln!(s, "restore of VM {vm} ({})", if r.eager { "eager" } else { "lazy" });
        let _ = writeln!(
            s,
            "  faults   {} decoded, {} zero; {} chunks prefetched; {} decoded in all",
            r.decoded_faults,
            r.zero_faults,
            r.prefetched_chunks,
            human_bytes(r.bytes_decoded)
        );
        let _ = writeln!(
            s,
            "  service  p50 {}, p99 {} per decoded fault",
            us(r.fault_p50_us),
            us(r.fault_p99_us)
        );
        if let Some(remote) = &r.remote {
            let _ = writeln!(
                s,
                "  store    {}: {} requests, {} fetched, {} packs from the host's cache",
                remote.location,
                remote.requests,
                human_bytes(remote.bytes_fetched),
                remote.pack_cache_hits
            );
        }
        if r.prefetch_planned > 0 {
            // Prefetched pages take no faults, so their use is not seen: what shows is how
            // much came ahead of the guest and what the working set missed.
            let _ = writeln!(
                s,
                "  prefetch {} of {} working-set chunks placed ahead of the guest; {} demand faults outside the working set",
                r.prefetched_chunks, r.prefetch_planned, r.misses
            );
        } else if r.ws_precision.is_some() {
            let _ = writeln!(
                s,
                "  working set vs this run's touches: precision {}, recall {} (not prefetched)",
                share(r.ws_precision),
                share(r.ws_recall)
            );
        }
    }
    s
}
