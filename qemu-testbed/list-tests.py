#!/usr/bin/env python3
"""Which built test binaries the testbed guest runs, from cargo's JSON messages.

Usage: list-tests.py TESTS_JSON   (the output of `cargo test/bench --no-run
--message-format=json`). Prints one executable a line: "LINUX PATH" for the Linux-guest
suite, "FORK PATH" for the fork test, "CRITERION PATH" for the criterion benches, and a
bare PATH for each memory test suite the guest runs as a whole.
"""
import json
import sys

for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind, name = m["target"]["kind"][0], m["target"]["name"]
        # The corpora test reads fuzz/ from the source tree, which the guest lacks; the
        # VM test suites (vmm, fork, snapshot, remote, control_load, fork_soak) drive the
        # vmfork binary and run on the host, where they are quick; here they would run
        # under nested KVM in TCG. Of them, the fork test that needs reflink
        # runs here too. The Linux-guest suite runs only here (the host cannot boot
        # Linux), on its own. The criterion benches run here with every strategy.
        if kind == "test" and name == "linux_guest":
            print("LINUX " + m["executable"])
        elif kind == "test" and name == "fork":
            print("FORK " + m["executable"])
        elif kind == "bench":
            print("CRITERION " + m["executable"])
        elif kind in ("lib", "test") and name not in (
            "vmm", "snapshot", "remote", "snapshot_corpora", "control_load", "fork_soak"
        ):
            print(m["executable"])
