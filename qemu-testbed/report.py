#!/usr/bin/env python3
"""The testbed's results.json: the guest's bench records plus where they were measured.

Usage: report.py BENCH_JSON RESULTS_JSON ACCELERATOR KERNEL_IMAGE DEGRADED KERNEL_BASE
Reads the JSON `vmfork bench` printed in the guest and writes it to RESULTS_JSON with a
"testbed" object: the accelerator (kvm or tcg), the kernel image's name, the host CPU,
the kernel base and, when DEGRADED is not empty, why the run was degraded.
"""
import json
import sys

data = json.load(open(sys.argv[1]))
host_cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
data["testbed"] = {"accelerator": sys.argv[3], "kernel_image": sys.argv[4], "host_cpu": host_cpu,
                   "kernel_base": sys.argv[6]}
if sys.argv[5]:
    data["testbed"]["degraded"] = sys.argv[5]
json.dump(data, open(sys.argv[2], "w"), indent=2)
