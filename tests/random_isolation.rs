//! Randomized isolation check: writes, reads, clones, materializations and drops across a
//! tree of memories, every read compared with a plain in-memory model. Seeded and
//! reproducible: `VMFORK_SEED=<n> cargo test --test random_isolation`; the seed is printed
//! first, so a failure's output always carries it.

use vmfork::memory::{GuestMemory, MemoryOptions, PAGE_SIZE, Strategy};

const PAGES: usize = 48;
const MAX_LIVE: usize = 10;

/// xorshift64*: small, seedable, good enough to drive a test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Live {
    mem: GuestMemory,
    model: Vec<u8>,
    name: String,
}

fn run(ops: usize) {
    let seed = std::env::var("VMFORK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("random isolation: seed {seed} ({ops} ops); rerun with VMFORK_SEED={seed}");
    let mut rng = Rng(seed);
    let strategies: Vec<Strategy> = Strategy::CONCRETE
        .into_iter()
        .filter(|&s| s != Strategy::Reflink || vmfork::memory::reflink::probe().is_ok())
        .collect();
    let size = PAGES * PAGE_SIZE;
    let mut live = vec![Live {
        mem: GuestMemory::with_size(size, &MemoryOptions::default()).unwrap(),
        model: vec![0; size],
        name: "root".into(),
    }];
    let mut buf = vec![0u8; 3 * PAGE_SIZE];
    for op in 0..ops {
        let i = rng.below(live.len());
        match rng.below(100) {
            0..=49 => {
                // Write a random run, sometimes crossing pages.
                let max = if rng.below(4) == 0 { 2 * PAGE_SIZE } else { 64 };
                let len = 1 + rng.below(max);
                let at = rng.below(size - len);
                let byte = rng.next() as u8;
                buf[..len].fill(byte);
                live[i].mem.write(at as u64, &buf[..len]).unwrap();
                live[i].model[at..at + len].fill(byte);
            }
            50..=79 => {
                let len = 1 + rng.below(2 * PAGE_SIZE);
                let at = rng.below(size - len);
                live[i].mem.read(at as u64, &mut buf[..len]).unwrap();
                if buf[..len] != live[i].model[at..at + len] {
                    let first = (0..len).find(|&k| buf[k] != live[i].model[at + k]).unwrap();
                    panic!(
                        "seed {seed}, op {op}: {} differs from the model at byte {:#x} (page {}): got {:#x}, want {:#x}",
                        live[i].name,
                        at + first,
                        (at + first) / PAGE_SIZE,
                        buf[first],
                        live[i].model[at + first]
                    );
                }
            }
            80..=91 if live.len() < MAX_LIVE => {
                let s = strategies[rng.below(strategies.len())];
                let mem = if s == Strategy::Cow && rng.below(2) == 0 {
                    // As a fork makes it: frozen here, mapped by whoever receives it.
                    let frozen = live[i].mem.freeze_detached().unwrap();
                    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
                    frozen.send(&a).unwrap();
                    drop(frozen);
                    GuestMemory::receive(&b).unwrap()
                } else {
                    live[i].mem.clone_with(s).unwrap().0
                };
                let name = format!("{}>{}#{op}", live[i].name, s);
                let model = live[i].model.clone();
                live.push(Live { mem, model, name });
            }
            92..=95 => live[i].mem.materialize().unwrap(),
            _ if live.len() > 1 => {
                live.swap_remove(i);
            }
            _ => {}
        }
    }
    // Full comparison of every survivor at the end.
    for l in &live {
        let mut all = vec![0u8; size];
        l.mem.read(0, &mut all).unwrap();
        assert!(all == l.model, "seed {seed}: {} differs from the model at the end", l.name);
    }
}

#[test]
fn random_isolation_bounded() {
    run(20_000);
}

#[test]
#[ignore = "long: a million operations; run with --ignored"]
fn random_isolation_million() {
    run(1_000_000);
}
