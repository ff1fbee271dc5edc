//! Assembles the built-in guest (src/vmm/guest/guest.S) into a flat binary with GNU as
//! and objcopy (binutils). The result is included by src/vmm/guest/mod.rs.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (vmfork needs GNU binutils: `as` and `objcopy`)")
    });
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let src = "src/vmm/guest/guest.S";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("guest.o");
    let bin = out.join("guest.bin");
    run(Command::new("as").args(["--64", "-o"]).arg(&obj).arg(src));
    run(Command::new("objcopy").args(["-O", "binary", "-j", ".text"]).arg(&obj).arg(&bin));
}
