#!/bin/bash
# Move the series to another Debian linux-source-6.12 version.
#
# Usage: kernel-patch/rebase.sh VERSION      e.g. 6.12.119-1~deb12u1
#        kernel-patch/rebase.sh --finish     after resolving conflicts by hand
#
# Builds a git tree in which the old base (kernel-patch/BASE) and VERSION are two
# commits, applies the series on the old one and rebases it onto VERSION, so that git
# merges every hunk it can three ways. At a conflict it stops and says where; fix the
# file, `git add -f` it, `git rebase --continue` in that tree, and run --finish. The
# finish rewrites kernel-patch/0001-*.patch... from the rebased commits, records VERSION
# in BASE and the cover letter's "Based on" line. Test before committing:
# kernel-patch/check-series.sh, kernel-patch/build-and-test.sh, qemu-testbed/run.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VMFORK_CACHE:-/var/cache/vmfork}
GIT_ID=(-c user.name="vmfork developers" -c user.email="$(git -C "$HERE" config user.email || echo vmfork@localhost)")
. "$HERE/base.sh"
die() { printf 'rebase: ERROR: %s\n' "$*" >&2; exit 1; }
W=$CACHE/rebase
mkdir -p "$CACHE"

finish() {
	local new
	new=$(cat "$W/.git/vmfork-rebase-to" 2>/dev/null) || die "no rebase in progress in $W"
	[ -d "$W/.git/rebase-merge" ] && die "the rebase in $W is not finished: resolve, git add -f, git rebase --continue"
	local n
	n=$(git -C "$W" rev-list --count onto..series)
	[ "$n" -gt 0 ] || die "no rebased commits on top of $new in $W"
	for p in "$HERE"/[0-9][0-9][0-9][0-9]-*.patch; do
		case "$(basename "$p")" in 0000-*) ;; *) rm -f "$p" ;; esac
	done
	git -C "$W" format-patch -q --abbrev=9 -o "$HERE" onto..series
	local up
	up=$(base_upstream "$W")
	sed -i "s/^Based on Debian's linux-source-6.12 (Linux [0-9.]*)\./Based on Debian's linux-source-6.12 (Linux $up)./" \
		"$HERE/0000-cover-letter.patch"
	sed -i "s/^\([0-9][^#]*\)$/$new/" "$HERE/BASE"
	echo "rebase: $n patches rewritten onto $new (Linux $up); BASE now names it."
	echo "rebase: next: kernel-patch/check-series.sh, then the tests (README.md, \"The kernel base\")."
}

case "${1:-}" in
--finish) finish; exit 0 ;;
"" | -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
esac
NEW=$1
OLD=$(base_wanted)
[ "$NEW" != "$OLD" ] || die "the series is already on $NEW"
base_fetch "$NEW" || die "the package archive has no $BASE_PKG $NEW (it offers: $(base_available | tr '\n' ' '))"
base_fetch "$OLD" || die "the old base $OLD is gone from the archive and from $CACHE/src, so git cannot merge three ways; apply the patches to $NEW with 'git am --reject' and fix the .rej files by hand"

echo "==> tree with $OLD and $NEW as two commits: $W"
rm -rf "$W" "$W.new"
base_tree "$OLD" "$W"
mkdir -p "$W.new"
tar -C "$W.new" -xf "$(base_tarball_path "$NEW")"
find "$W" -mindepth 1 -maxdepth 1 ! -name .git -exec rm -rf {} +
cp -a "$W.new/$BASE_PKG/." "$W/"
rm -rf "$W.new"
git -C "$W" add -A -f >/dev/null
git -C "$W" "${GIT_ID[@]}" commit -q -m "Linux $(base_upstream "$W") (Debian $BASE_PKG $NEW, pristine)"
git -C "$W" tag onto
echo "$NEW" >"$W/.git/vmfork-rebase-to"

echo "==> the series on $OLD"
git -C "$W" checkout -q -b series base
for p in "$HERE"/[0-9][0-9][0-9][0-9]-*.patch; do
	case "$(basename "$p")" in 0000-*) continue ;; esac
	git -C "$W" "${GIT_ID[@]}" am -q --keep-cr "$p" || die "$(basename "$p") does not apply to $OLD: is BASE right?"
done

echo "==> rebasing onto $NEW"
if ! git -C "$W" "${GIT_ID[@]}" rebase -q --onto onto base series; then
	cat >&2 <<EOF

rebase: stopped at a conflict. In $W:
  git status                  # the files with conflict markers
  (edit them) ; git add -f FILE ; git rebase --continue
and when git says the rebase succeeded:
  kernel-patch/rebase.sh --finish
EOF
	exit 1
fi
finish
