#!/bin/bash
# Check the series the way a maintainer would: checkpatch --strict on every
# patch, then build the testbed kernel after each patch in turn (bisectable),
# with W=1 on the files the series touches.  Uses the tree and object
# directory that build-and-test.sh set up for the base in kernel-patch/BASE
# (it runs that first if needed). Leaves the source tree with the whole series applied.
#
#   --newest   instead: does the series still apply to, and build on, the newest
#              linux-source-6.12 the package archive offers? (drift, before it
#              reaches users). Exit 0 when it does, or when that is BASE itself.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VMFORK_CACHE:-/var/cache/vmfork}
GIT_ID=(-c user.name="vmfork developers" -c user.email="$(git -C "$HERE" config user.email || echo vmfork@localhost)")
. "$HERE/base.sh"

if [ "${1:-}" = --newest ]; then
	wanted=$(base_wanted)
	newest=$(base_newest)
	[ -n "$newest" ] || { echo "check-series: the archive offers no $BASE_PKG" >&2; exit 1; }
	if [ "$newest" = "$wanted" ]; then
		echo "check-series: the archive's newest $BASE_PKG is $newest, the base in BASE: no drift"
		exit 0
	fi
	echo "check-series: BASE is $wanted; the archive's newest is $newest: applying and building there"
	if VMFORK_KERNEL_BASE=$newest "$HERE/build-and-test.sh" --build-only; then
		echo "check-series: the series applies to and builds on $newest; to move the base: kernel-patch/rebase.sh $newest"
		exit 0
	fi
	echo "check-series: the series does NOT apply to or build on $newest (above); kernel-patch/rebase.sh $newest moves it" >&2
	exit 1
fi
[ $# = 0 ] || { echo "usage: $0 [--newest]" >&2; exit 2; }

BASE_VERSION=$(base_wanted)
SRC=$CACHE/linux-$BASE_VERSION
OUT=$CACHE/build-$BASE_VERSION-testbed
if [ ! -f "$OUT/.config" ]; then
	echo "==> no configured tree for $BASE_VERSION yet: build-and-test.sh --build-only"
	"$HERE/build-and-test.sh" --build-only
fi
echo "==> checking the series on $BASE_PKG $BASE_VERSION (Linux $(base_upstream "$SRC"))"
PATCHES=()
for p in "$HERE"/*.patch; do
	case "$(basename "$p")" in 0000-*) continue ;; esac
	PATCHES+=("$p")
done

fail=0
echo "==> checkpatch --strict"
for p in "${PATCHES[@]}"; do
	# from inside the kernel tree: checkpatch leaves a cache file in $PWD
	out=$(cd "$SRC" && scripts/checkpatch.pl --strict -q "$p" 2>/dev/null || true)
	n=$(printf '%s\n' "$out" | grep -cE '^(ERROR|WARNING|CHECK)' || true)
	echo "  $(basename "$p"): $n remarks"
	[ "$n" = 0 ] || printf '%s\n' "$out" | grep -E '^(ERROR|WARNING|CHECK)' | sed 's/^/    /'
done

echo "==> building after each patch (W=1 on touched mm/ files)"
git -C "$SRC" am --abort >/dev/null 2>&1 || true
git -C "$SRC" checkout -q -f -B series base
rm -f "$SRC/.git/vmfork-series"
for p in "${PATCHES[@]}"; do
	git -C "$SRC" "${GIT_ID[@]}" am -q "$p" || { echo "does not apply: $p"; exit 1; }
	objs=$(git -C "$SRC" show --name-only --format= HEAD | grep -E '^mm/.*\.c$' | sed 's/\.c$/.o/' || true)
	if ! nice -n 10 make -s -C "$SRC" O="$OUT" -j2 bzImage >"$CACHE/check-build.log" 2>&1; then
		echo "  $(basename "$p"): BUILD FAILED"; tail -20 "$CACHE/check-build.log"; fail=1; break
	fi
	w=""
	if [ -n "$objs" ]; then
		for o in $objs; do touch "$SRC/${o%.o}.c"; done
		w=$(nice -n 10 make -s -C "$SRC" O="$OUT" W=1 $objs 2>&1 | grep -E 'warning|error' || true)
	fi
	if [ -n "$w" ]; then
		echo "  $(basename "$p"): builds, W=1 warnings:"; echo "$w" | sed 's/^/    /'; fail=1
	else
		echo "  $(basename "$p"): builds, W=1 clean (${objs:-no mm/ .c files})"
	fi
done
exit $fail
