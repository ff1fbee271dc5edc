#!/bin/bash
# Build a minimal Linux 6.12 (the Debian linux-source-6.12 version named in
# kernel-patch/BASE) with the tmpfs/memfd reflink series and run the
# selftests inside QEMU TCG.  Idempotent: every step is cached under
# $VMFORK_CACHE (default /var/cache/vmfork), keyed by what it depends on.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib/packages.sh
. "$HERE/../scripts/lib/packages.sh"
usage() {
	cat <<'EOF'
Usage: kernel-patch/build-and-test.sh [OPTIONS]
  --debug         build the debug variant (DEBUG_VM, PROVE_LOCKING, ...)
  --kasan         the debug variant plus KASAN
  --pristine      do not apply the series (baseline kernel)
  --tests LIST    space-separated guest tests (default: "selftest fsx"); known:
                  selftest fsx fsx-thp fsx-swap cp-reflink bench bench-sealed
                  fsx-thp: shmem THP forced, 4 MiB files; fsx-swap: zram swap and
                  memory.high of 8 MiB so that bases and clones get swapped
  --fsx-ops N     operations for the randomized checker (default 20000)
  --seed N        seed for the randomized checker (default: the time)
  --mem SIZE      guest memory (default 2G)
  --smp N         guest vCPUs (default 2: the races need two CPUs running at
                  once); the run fails if the guest brings up fewer
  --timeout S     guest timeout in seconds (default 1800)
  --build-only    stop after building the kernel; prints "base: VERSION" and
                  "kernel: IMAGE"
  -h, --help      this text
Environment:
  VMFORK_CACHE          where every step is cached (default /var/cache/vmfork)
  VMFORK_KERNEL_BASE    build on this linux-source-6.12 version instead of BASE's
  VMFORK_EXTRA_CONFIG   one more kernel config fragment (qemu-testbed/run adds its own)
Exit status: 0 when every guest test printed PASS and no oops was seen.
EOF
}
CACHE=${VMFORK_CACHE:-/var/cache/vmfork}
VARIANT=testbed
PRISTINE=0
TESTS="selftest fsx"
FSX_OPS=20000
SEED=""
MEM=2G
SMP=2
BUILD_ONLY=0
TIMEOUT=1800
GIT_ID=(-c user.name="vmfork developers" -c user.email="$(git -C "$HERE" config user.email || echo vmfork@localhost)")

while [ $# -gt 0 ]; do
	case "$1" in
	--debug) VARIANT=debug ;;
	--kasan) VARIANT=kasan ;;
	--pristine) PRISTINE=1 ;;
	--tests) TESTS=$2; shift ;;
	--fsx-ops) FSX_OPS=$2; shift ;;
	--seed) SEED=$2; shift ;;
	--mem) MEM=$2; shift ;;
	--smp) SMP=$2; shift ;;
	--build-only) BUILD_ONLY=1 ;;
	--timeout) TIMEOUT=$2; shift ;;
	-h|--help) usage; exit 0 ;;
	*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done
[ -n "$SEED" ] || SEED=$(date +%s)

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# 1. Packages --------------------------------------------------------------
step "checking Debian packages"
need_packages qemu-system-x86 busybox-static flex bison bc libelf-dev libssl-dev cpio gcc make \
	xz-utils git rsync || exit 1
echo "all present"

# 2. Pristine tree of the base, as a git repository -------------------------
mkdir -p "$CACHE"
# shellcheck source=base.sh
. "$HERE/base.sh"
step "kernel base: $BASE_PKG $(base_wanted) ($(base_origin))"
base_resolve || die "no kernel base to build on"
SRC=$CACHE/linux-$BASE_VERSION
base_tree "$BASE_VERSION" "$SRC"
echo "tree: $SRC (Linux $(base_upstream "$SRC"), Debian $BASE_VERSION)"

# 3. Apply the series -------------------------------------------------------
shopt -s nullglob
PATCHES=()
if [ "$PRISTINE" = 0 ]; then
	for p in "$HERE"/*.patch; do
		case "$(basename "$p")" in 0000-*) continue ;; esac
		PATCHES+=("$p")
	done
fi
CONFIGS=("$HERE/config/testbed.config")
# Callers (qemu-testbed/run) may add a fragment of their own needs.
[ -n "${VMFORK_EXTRA_CONFIG:-}" ] && CONFIGS+=("$VMFORK_EXTRA_CONFIG")
case "$VARIANT" in
debug) CONFIGS+=("$HERE/config/debug.config") ;;
kasan) CONFIGS+=("$HERE/config/debug.config" "$HERE/config/kasan.config") ;;
esac
# The cache key: the base version, the patches and the config.
SERIES_HASH=$( (echo "base=$BASE_VERSION pristine=$PRISTINE"; for p in "${PATCHES[@]}"; do cat "$p"; done) | sha256sum | cut -c1-16)
KEY=$( (echo "$SERIES_HASH $VARIANT"; cat "${CONFIGS[@]}") | sha256sum | cut -c1-16)

step "applying ${#PATCHES[@]} patches to $BASE_VERSION (series $SERIES_HASH)"
applied=$(cat "$SRC/.git/vmfork-series" 2>/dev/null || true)
if [ "$applied" = "$SERIES_HASH" ] && git -C "$SRC" diff --quiet HEAD; then
	echo "already applied"
else
	base_apply_series "${PATCHES[@]}" || exit 1
	echo "$SERIES_HASH" >"$SRC/.git/vmfork-series"
fi

# 4. Configure and build ---------------------------------------------------
OUT=$CACHE/build-$BASE_VERSION-$VARIANT
IMG=$CACHE/images/bzImage-$KEY
mkdir -p "$CACHE/images" "$OUT"
if [ -f "$IMG" ]; then
	step "kernel cached: $IMG"
else
	CFG_HASH=$(cat "${CONFIGS[@]}" | sha256sum | cut -c1-16)
	if [ "$(cat "$OUT/.vmfork-config" 2>/dev/null)" != "$CFG_HASH" ]; then
		step "configuring $VARIANT (tinyconfig + $(basename -a "${CONFIGS[@]}" | tr '\n' ' '))"
		make -s -C "$SRC" O="$OUT" tinyconfig >/dev/null
		"$SRC/scripts/kconfig/merge_config.sh" -m -O "$OUT" "$OUT/.config" "${CONFIGS[@]}" >/dev/null
		make -s -C "$SRC" O="$OUT" olddefconfig
		(grep -h '^CONFIG_' "${CONFIGS[@]}" || true) | cut -d= -f1 | while read -r c; do
			grep -q "^$c=" "$OUT/.config" || echo "warning: $c did not stick in .config"
		done
		echo "$CFG_HASH" >"$OUT/.vmfork-config"
	fi
	step "building bzImage ($VARIANT) in $OUT, log $OUT/build.log"
	start=$(date +%s)
	if ! nice -n 10 make -C "$SRC" O="$OUT" -j2 bzImage >"$OUT/build.log" 2>&1; then
		grep -E 'error|Error' "$OUT/build.log" | head -30 >&2
		die "kernel build failed (see $OUT/build.log)"
	fi
	grep -E 'warning:' "$OUT/build.log" | head -20 || true
	echo "built in $(( $(date +%s) - start )) s"
	cp "$OUT/arch/x86/boot/bzImage" "$IMG"
fi
[ "$BASE_FALLBACK" = 1 ] && echo "WARNING: built on $BASE_VERSION, not on $BASE_WANTED ($(base_origin)), which the archive does not have; the series is tested on $(base_file_version)"
[ "$BUILD_ONLY" = 1 ] && { echo "base: $BASE_VERSION"; echo "kernel: $IMG"; exit 0; }

# 5. Guest programs, linked statically against this tree's UAPI headers ----
step "building guest test programs"
HDR=$CACHE/headers-$SERIES_HASH
if [ ! -d "$HDR/include" ]; then
	make -s -C "$SRC" O="$OUT" headers_install INSTALL_HDR_PATH="$HDR" >/dev/null
fi
BIN=$CACHE/guest-bin-$SERIES_HASH
mkdir -p "$BIN"
TSRC=$SRC/tools/testing/selftests/mm
for t in memfd_reflink memfd_reflink_fsx; do
	if [ -f "$TSRC/$t.c" ]; then
		gcc -static -O2 -Wall -Wextra -isystem "$HDR/include" -o "$BIN/$t" "$TSRC/$t.c"
	else
		rm -f "$BIN/$t"
		echo "note: $t.c not in the tree (pristine kernel?): guest will report it missing"
	fi
done

# 6. initramfs ---------------------------------------------------------------
step "packing initramfs"
ROOT=$(mktemp -d "$CACHE/initramfs.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,proc,sys,dev,tmp,mnt,usr/bin}
cp /bin/busybox "$ROOT/bin/busybox"
for a in sh mount mkdir cat echo dmesg grep reboot sleep ls free cp uname date sync head tail \
	mkswap swapon swapoff tr cmp umount pidof cut; do
	ln -sf busybox "$ROOT/bin/$a"
done
cp "$BIN"/* "$ROOT/bin/" 2>/dev/null || true
# GNU cp for the cp --reflink=always test, with the libraries it needs
cp /bin/cp "$ROOT/usr/bin/gnucp"
for lib in $(ldd /bin/cp | grep -o '/[^ ]*'); do
	mkdir -p "$ROOT$(dirname "$lib")"
	cp -L "$lib" "$ROOT$lib"
done
cat >"$ROOT/init" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
echo "VMFORK-BOOTED \$(uname -r)"
echo "VMFORK-CLOCK \$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)"
echo "VMFORK-CPUS \$(grep -c '^processor' /proc/cpuinfo) online (\$(cat /sys/devices/system/cpu/online 2>/dev/null)), asked for $SMP"
dmesg | grep -m1 'KernelAddressSanitizer initialized' | sed 's/^/VMFORK-DEBUG kasan: /'
if [ -r /proc/lockdep_stats ]; then
	echo "VMFORK-DEBUG lockdep: \$(grep 'lock-classes' /proc/lockdep_stats | tr -s ' ')"
fi
run() {
	name=\$1; shift
	if [ ! -x "/bin/\$1" ]; then
		echo "VMFORK-TEST \$name: FAIL (program \$1 missing)"
		return
	fi
	echo "VMFORK-TEST \$name: START"
	shmem0=\$(grep '^Shmem:' /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
	if "\$@"; then
		# everything the test created is closed: clones, bases and
		# hidden bases must all be gone (extents are put from a work item)
		for i in 1 2 3 4 5 6 7 8 9 10; do
			sleep 2
			shmem1=\$(grep '^Shmem:' /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
			[ "\$shmem1" -gt \$((shmem0 + 1024)) ] || break
		done
		if [ "\$shmem1" -gt \$((shmem0 + 1024)) ]; then
			echo "VMFORK-TEST \$name: FAIL (Shmem \${shmem0} kB before, \${shmem1} kB after: leak; inode-nr \$(cat /proc/sys/fs/inode-nr))"
		else
			echo "VMFORK-TEST \$name: PASS (Shmem \${shmem0} kB before, \${shmem1} kB after)"
		fi
	else
		echo "VMFORK-TEST \$name: FAIL (exit \$?)"
	fi
}
for t in $TESTS; do
	case \$t in
	selftest) run selftest memfd_reflink ;;
	fsx) run fsx memfd_reflink_fsx -n $FSX_OPS -s $SEED ;;
	fsx-thp)
		echo force > /sys/kernel/mm/transparent_hugepage/shmem_enabled
		run fsx-thp memfd_reflink_fsx -n $FSX_OPS -s $SEED -p 1024 -c 1000
		echo "VMFORK-INFO thp: \$(grep -E 'ShmemHugePages' /proc/meminfo)"
		echo never > /sys/kernel/mm/transparent_hugepage/shmem_enabled ;;
	fsx-swap)
		echo 256M > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null &&
			swapon /dev/zram0 || echo "VMFORK-INFO no zram swap"
		mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup &&
			echo +memory > /sys/fs/cgroup/cgroup.subtree_control &&
			mkdir -p /sys/fs/cgroup/fsx && echo 8M > /sys/fs/cgroup/fsx/memory.high &&
			echo \$\$ > /sys/fs/cgroup/fsx/cgroup.procs || echo "VMFORK-INFO no memcg"
		# every 30 s: swap left, memcg over-high events, what the checker waits on
		( while sleep 30; do
			p=\$(pidof memfd_reflink_fsx)
			echo "VMFORK-MON \$(grep -E '^(SwapFree|Shmem):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')memcg current \$(cat /sys/fs/cgroup/fsx/memory.current) swap \$(cat /sys/fs/cgroup/fsx/memory.swap.current) \$(grep -E '^(high|max|oom) ' /sys/fs/cgroup/fsx/memory.events | tr '\n' ' ')fsx state \$(cut -d' ' -f3 /proc/\$p/stat 2>/dev/null) wchan \$(cat /proc/\$p/wchan 2>/dev/null)"
		  done ) &
		mon=\$!
		run fsx-swap memfd_reflink_fsx -n $FSX_OPS -s $SEED -p 512 -c 500
		kill \$mon
		echo \$\$ > /sys/fs/cgroup/cgroup.procs
		echo "VMFORK-INFO swap: memcg swap peak \$(cat /sys/fs/cgroup/fsx/memory.swap.peak 2>/dev/null) bytes, zram mm_stat \$(cat /sys/block/zram0/mm_stat 2>/dev/null)" ;;
	bench) run bench memfd_reflink -b ;;
	bench-sealed) run bench-sealed memfd_reflink -s ;;
	cp-reflink)
		# GNU cp --reflink=always must work on tmpfs -o reflink, and fail
		# without the option (so it really cloned instead of copying)
		mkdir -p /mnt/r /mnt/n
		mount -t tmpfs -o reflink r /mnt/r && mount -t tmpfs n /mnt/n
		head -c 4194304 /dev/urandom > /mnt/r/a && cp /mnt/r/a /mnt/n/a
		echo "VMFORK-TEST cp-reflink: START"
		if /usr/bin/gnucp --reflink=always /mnt/r/a /mnt/r/b &&
		   cmp /mnt/r/a /mnt/r/b &&
		   ! /usr/bin/gnucp --reflink=always /mnt/n/a /mnt/n/b 2>/dev/null; then
			echo "VMFORK-TEST cp-reflink: PASS"
		else
			echo "VMFORK-TEST cp-reflink: FAIL"
		fi
		umount /mnt/r /mnt/n ;;
	*) echo "VMFORK-TEST \$t: FAIL (unknown test)" ;;
	esac
done
echo "VMFORK-CLOCK at end: \$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)"
echo "VMFORK-DMESG-BEGIN"
dmesg | grep -E 'BUG|WARNING|Oops|lockdep|KASAN|circular|possible recursive|INFO:' || true
echo "VMFORK-DMESG-END"
echo "VMFORK-DONE"
sync
reboot -f
EOF
chmod +x "$ROOT/init"
INITRD=$CACHE/initramfs-$KEY.cpio.gz
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1 >"$INITRD")

# 7. Boot under TCG --------------------------------------------------------
LOG=$CACHE/guest-$VARIANT.log
step "booting $IMG under QEMU TCG (-m $MEM -smp $SMP), serial log $LOG"
start=$(date +%s)
set +e
# A private name, so that a broad "pkill qemu" elsewhere on a shared
# machine does not take this run down with it.
mkdir -p "$CACHE/bin"
ln -sf "$(command -v qemu-system-x86_64)" "$CACHE/bin/vmfork-kernel-tcg"
timeout "$TIMEOUT" "$CACHE/bin/vmfork-kernel-tcg" -accel tcg -cpu max -m "$MEM" -smp "$SMP" \
	-nographic -no-reboot -nodefaults -serial stdio -nic none \
	-kernel "$IMG" -initrd "$INITRD" \
	-append "console=ttyS0 panic=-1 oops=panic quiet loglevel=4 kvm-amd.nested=1" \
	</dev/null 2>&1 | tee "$LOG"
qrc=${PIPESTATUS[0]}
set -e
echo "guest ran $(( $(date +%s) - start )) s, qemu exit $qrc"

# 8. Verdict -------------------------------------------------------------
step "results"
fail=0
if grep -qE 'Kernel panic|Oops|BUG:|general protection fault|KASAN:|WARNING:.*at ' "$LOG"; then
	echo "GUEST KERNEL ERROR (oops text follows):"
	grep -E -A25 'Kernel panic|Oops|BUG:|general protection fault|KASAN:|WARNING:.*at ' "$LOG" | head -80
	fail=1
fi
if grep -q 'possible circular locking\|possible recursive locking\|inconsistent lock state' "$LOG"; then
	echo "LOCKDEP SPLAT in guest log"
	fail=1
fi
cpus=$(sed -n 's/^VMFORK-CPUS \([0-9]*\) online.*/\1/p' "$LOG" | tr -d '\r')
if [ "${cpus:-0}" -lt "$SMP" ]; then
	echo "FAIL cpus: the guest brought up ${cpus:-no} CPUs of the $SMP asked for (CONFIG_SMP and CONFIG_ACPI in config/testbed.config?)"
	fail=1
fi
for t in $TESTS; do
	if grep -q "VMFORK-TEST $t: PASS" "$LOG"; then
		echo "PASS $t"
	else
		echo "FAIL $t: $(grep "VMFORK-TEST $t:" "$LOG" | tail -1)"
		fail=1
	fi
done
grep -q VMFORK-DONE "$LOG" || { echo "guest did not finish (timeout ${TIMEOUT}s or crash)"; fail=1; }
[ "$fail" = 0 ] && echo "ALL PASSED ($VARIANT, base $BASE_VERSION, seed $SEED, $SMP vCPUs)" || echo "FAILED ($VARIANT, base $BASE_VERSION, seed $SEED, $SMP vCPUs)"
exit $fail
