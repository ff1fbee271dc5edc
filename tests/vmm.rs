//! Integration tests of the VMM on this host's KVM. They start real VMs; each skips with a
//! printed reason only where /dev/kvm is absent.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use vmfork::memory::{GuestMemory, MemoryOptions};
use vmfork::vmm::{Report, Vm, VmConfig, Workload};

fn kvm_available(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("SKIP {test}: /dev/kvm is absent on this host");
        false
    }
}

fn memory(mib: usize) -> Arc<GuestMemory> {
    Arc::new(GuestMemory::with_size(mib << 20, &MemoryOptions::default()).unwrap())
}

fn next(rx: &Receiver<Report>) -> Report {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("no guest report within 20 s")
}

#[test]
fn guest_reports_increasing_counter() {
    if !kvm_available("guest_reports_increasing_counter") {
        return;
    }
    let mem = memory(16);
    let cfg = VmConfig {
        workload: Workload::Count { every: 1 << 20 },
        ..Default::default()
    };
    let mut vm = Vm::create(mem, &cfg).unwrap();
    let rx = vm.subscribe();
    let mut last = next(&rx);
    for _ in 0..5 {
        let r = next(&rx);
        assert_eq!(r.counter, last.counter + (1 << 20), "{r} after {last}");
        assert_eq!(r.seq, last.seq + 1);
        last = r;
    }
    vm.stop();
}
