#!/bin/sh
# The testbed guest's /init (qemu-testbed/run packs it into the initramfs): runs the suites
# and prints the VMFORK-* markers that run parses, so their wording and order matter.
# Only busybox applets are there: run links the ones used here.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
export PATH=/bin HOME=/tmp RUST_BACKTRACE=1
# What run chose on the host: SHELL_MODE, ONLY, LINUX_TESTS, BENCH_ARGS, CRITERION_*.
# shellcheck source=/dev/null
. /params
# Loopback, for the tests that talk TCP to themselves (the bench's delay proxy).
ip link set lo up
echo "VMFORK-BOOTED $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
# Each suite's verdict says how long it took (the guest's clock: TCG time).
suite_start() { SUITE_T0=$(date +%s); echo "VMFORK-SUITE $1: START"; }
suite_end() { echo "VMFORK-SUITE $1: $2 in $(($(date +%s) - SUITE_T0)) s"; }
if [ "$SHELL_MODE" = 1 ]; then exec /bin/sh; fi
# Without nested virtualization the VM suites cannot run here: they skip, each saying
# why, instead of failing, and the report says the run was degraded.
LINUX_REQUIRED=VMFORK_LINUX_REQUIRED=1
if [ ! -e /dev/kvm ]; then
    echo "VMFORK-DEGRADED no /dev/kvm in the testbed guest (the host gives it no nested virtualization): VM tests and the Linux-guest suite skip, the vm, fork and linux benches record why"
    LINUX_REQUIRED=VMFORK_LINUX_OPTIONAL=1
fi
for t in /tests/*; do
    [ -e "$t" ] || continue
    name=$(basename "$t" | sed 's/-[0-9a-f]*$//')
    suite_start "$name"
    if "$t" --test-threads=1 2>&1; then
        suite_end "$name" PASS
    else
        suite_end "$name" FAIL
    fi
done
# KVM's trace: on a shutdown intercept (a triple fault) KVM reinitializes the vCPU before
# vmfork sees the exit, so the guest's real rip and the exit's details are only in the
# kvm_exit tracepoint. An instance of its own keeps every shutdown exit of the run; the
# main buffer keeps the last exits and injected exceptions of every VM, printed (and
# cleared) when a suite fails.
T=/sys/kernel/tracing
kvm_trace_start() {
    [ -e /dev/kvm ] || return 0
    [ -e $T/events ] || mount -t tracefs nodev $T 2>/dev/null
    if [ ! -e $T/events/kvm/kvm_exit/enable ]; then
        echo "VMFORK-KVM-TRACE unavailable: no kvm tracepoints in tracefs"; T=; return 0
    fi
    shutdown=127  # SVM_EXIT_SHUTDOWN; VMX calls a triple fault exit reason 2
    grep -qw vmx /proc/cpuinfo && shutdown=2
    mkdir -p $T/instances/shutdowns
    echo "exit_reason == $shutdown" >$T/instances/shutdowns/events/kvm/kvm_exit/filter
    echo 1 >$T/instances/shutdowns/events/kvm/kvm_exit/enable
    echo 4096 >$T/buffer_size_kb
    for e in kvm_exit kvm_inj_exception kvm_userspace_exit kvm_nested_vmexit; do
        echo 1 >$T/events/kvm/$e/enable 2>/dev/null
    done
}
kvm_trace_dump() {
    [ -n "$T" ] && [ -e $T/trace ] || return 0
    echo 0 >$T/tracing_on
    echo "VMFORK-KVM-TRACE-BEGIN $1 (the last KVM events before the failure)"
    tail -n 120 $T/trace
    echo "VMFORK-KVM-TRACE-END"
    echo >$T/trace
    echo 1 >$T/tracing_on
}
kvm_trace_start
# The suites whose VMs run under nested KVM in TCG, where guests now and then die of a
# triple fault with or without a fork (README, "Limits"): a failed run is run once more,
# and the report says so.
with_retry() {
    suite=$1; shift
    suite_start "$suite"
    if "$@"; then
        suite_end "$suite" PASS
    else
        kvm_trace_dump "$suite"
        echo "VMFORK-RETRY $suite: the first run failed (above); running it once more"
        if "$@"; then suite_end "$suite" PASS; else kvm_trace_dump "$suite"; suite_end "$suite" FAIL; fi
    fi
}
# The fork test that needs reflink, with it required: here every strategy must fork.
fork_all() {
    VMFORK_BIN=/bin/vmfork VMFORK_REFLINK_REQUIRED=1 /extra/fork --test-threads=1 \
        every_strategy_forks_a_running_vm_into_an_independent_one 2>&1
}
[ -n "$ONLY" ] || with_retry fork-all-strategies fork_all
# Boots Debian's kernel under nested KVM and forks it with every strategy.
# LINUX_TESTS, BENCH_ARGS and CRITERION_ARGS are lists of words: split on purpose.
# shellcheck disable=SC2086
linux_guest() {
    env "$LINUX_REQUIRED" VMFORK_BIN=/bin/vmfork VMFORK_LINUX_KERNEL=/linux/vmlinuz \
        VMFORK_LINUX_INITRD=/linux/initramfs.cpio.gz VMFORK_LINUX_VMLINUX=/linux/vmlinux \
        VMFORK_REFLINK_REQUIRED=1 /linux/linux_guest --test-threads=1 --nocapture $LINUX_TESTS 2>&1
}
[ "$ONLY" = bench ] || with_retry linux-guest linux_guest
if [ "$ONLY" != linux-guest ]; then
    suite_start bench
    # shellcheck disable=SC2086
    if VMFORK_LINUX_KERNEL=/linux/vmlinuz VMFORK_LINUX_INITRD=/linux/initramfs.cpio.gz \
        vmfork bench $BENCH_ARGS --json /results/bench.json; then
        echo "VMFORK-JSON-BEGIN"; cat /results/bench.json; echo; echo "VMFORK-JSON-END"
        suite_end bench PASS
    else
        suite_end bench FAIL
    fi
fi
if [ -z "$ONLY" ]; then
    suite_start criterion
    echo "VMFORK-CRITERION-BEGIN"
    # In /tmp: criterion writes its results under the working directory.
    # shellcheck disable=SC2086
    if (cd /tmp && VMFORK_BENCH_SIZES=$CRITERION_SIZES VMFORK_BENCH_TOUCH_SIZE=$CRITERION_TOUCH \
        VMFORK_BENCH_HUGE=1 /extra/criterion-clone --bench $CRITERION_ARGS 2>&1); then
        echo "VMFORK-CRITERION-END"; suite_end criterion PASS
    else
        echo "VMFORK-CRITERION-END"; suite_end criterion FAIL
    fi
fi
if [ -n "$T" ] && [ -e $T/instances/shutdowns/trace ]; then
    # Every triple fault of the run, whether or not its suite passed in the end.
    grep -v '^#' $T/instances/shutdowns/trace | sed 's/^/VMFORK-SHUTDOWN-EXIT /'
    echo "VMFORK-SHUTDOWN-EXITS $(grep -vc '^#' $T/instances/shutdowns/trace)"
fi
echo "VMFORK-DMESG-BEGIN"
dmesg | grep -E 'BUG|WARNING|Oops|lockdep|KASAN|circular|INFO:' || true
echo "VMFORK-DMESG-END"
echo "VMFORK-DONE"
sync
reboot -f
