# Sourced, not run: where the series' kernel base comes from.
#
# The series is tested on one exact Debian package version of linux-source-6.12, named
# in kernel-patch/BASE. Debian's security archive moves that package every few weeks
# and later drops old versions, so nothing here uses "whatever apt serves today":
# the tarball of the named version is fetched with `apt-get download` into the cache
# (the system's installed linux-source-6.12, whatever its version, is left alone) and
# unpacked into a git tree of its own, one per version.
#
# Callers set HERE (kernel-patch/) and CACHE first. VMFORK_KERNEL_BASE overrides the
# version in BASE, to try the series on another one.

BASE_PKG=linux-source-6.12

# The version the series was last tested on: BASE's first line that is not a comment.
base_file_version() {
	[ -f "$HERE/BASE" ] || { echo "ERROR: $HERE/BASE is missing" >&2; return 1; }
	sed -n '/^[[:space:]]*#/d; /[^[:space:]]/{s/[[:space:]]//g; p; q}' "$HERE/BASE"
}

# The version to build on: BASE's, unless VMFORK_KERNEL_BASE names another.
base_wanted() {
	if [ -n "${VMFORK_KERNEL_BASE:-}" ]; then
		echo "$VMFORK_KERNEL_BASE"
	else
		base_file_version
	fi
}

# Where the wanted version comes from, for messages.
base_origin() {
	if [ -n "${VMFORK_KERNEL_BASE:-}" ]; then
		echo "VMFORK_KERNEL_BASE; kernel-patch/BASE names $(base_file_version)"
	else
		echo "kernel-patch/BASE"
	fi
}

# Every version of the package the archive offers, newest first.
base_available() {
	apt-cache madison "$BASE_PKG" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' |
		sort -u | sort -r -V
}

# The newest version the archive offers (after an `apt-get update` if it knows none).
base_newest() {
	local v
	v=$(base_available | head -1)
	if [ -z "$v" ]; then
		apt-get update -qq >&2 || true
		v=$(base_available | head -1)
	fi
	echo "$v"
}

# Path of the cached tarball of version $1 (may not exist yet).
base_tarball_path() {
	echo "$CACHE/src/$BASE_PKG-$1.tar.xz"
}

# Make sure the tarball of version $1 is in the cache. Returns 1, saying nothing, when
# the archive does not have that version (the caller decides what to do then).
base_fetch() {
	local ver=$1 tar dir
	tar=$(base_tarball_path "$ver")
	[ -f "$tar" ] && return 0
	mkdir -p "$CACHE/src"
	# The installed package, if it is exactly that version, saves a download.
	if [ "$(dpkg-query -W -f='${Version}' "$BASE_PKG" 2>/dev/null)" = "$ver" ] &&
		[ -f "/usr/src/$BASE_PKG.tar.xz" ]; then
		cp "/usr/src/$BASE_PKG.tar.xz" "$tar.tmp" && mv "$tar.tmp" "$tar"
		return 0
	fi
	base_available | grep -qxF "$ver" || {
		apt-get update -qq >&2 || true
		base_available | grep -qxF "$ver" || return 1
	}
	dir=$(mktemp -d "$CACHE/src/dl.XXXXXX")
	# apt drops privileges to _apt for downloads: let it write here.
	chmod 0777 "$dir"
	if ! (cd "$dir" && apt-get download -q "$BASE_PKG=$ver" >"$dir/log" 2>&1); then
		cat "$dir/log" >&2
		rm -rf "$dir"
		return 1
	fi
	dpkg-deb -x "$dir"/*.deb "$dir/x"
	mv "$dir/x/usr/src/$BASE_PKG.tar.xz" "$tar"
	rm -rf "$dir"
}

# Unpack version $1 into a git tree $2 whose tag "base" is the pristine source.
base_tree() {
	local ver=$1 src=$2 up
	if git -C "$src" rev-parse -q --verify refs/tags/base >/dev/null 2>&1; then
		return 0
	fi
	rm -rf "$src" "$src.tmp"
	mkdir -p "$src.tmp"
	tar -C "$src.tmp" -xf "$(base_tarball_path "$ver")"
	mv "$src.tmp/$BASE_PKG" "$src"
	rmdir "$src.tmp"
	up=$(base_upstream "$src")
	git -C "$src" init -q
	# Debian's .gitignore ignores the whole top level: force-add.
	git -C "$src" add -A -f >/dev/null
	git -C "$src" "${GIT_ID[@]}" commit -q -m "Linux $up (Debian $BASE_PKG $ver, pristine)"
	git -C "$src" tag base
}

# The upstream version (e.g. 6.12.118) of the kernel tree $1, from its Makefile.
base_upstream() {
	awk '/^VERSION =/ { v = $3 } /^PATCHLEVEL =/ { p = $3 } /^SUBLEVEL =/ { s = $3 }
	     END { print v "." p "." s }' "$1/Makefile"
}

# Resolve the base for a build: sets BASE_VERSION (what is used), BASE_WANTED (what BASE
# names) and BASE_FALLBACK (1 when the archive lacked BASE and the newest is used).
base_resolve() {
	BASE_WANTED=$(base_wanted) || return 1
	[ -n "$BASE_WANTED" ] || { echo "ERROR: $HERE/BASE names no version" >&2; return 1; }
	BASE_VERSION=$BASE_WANTED
	BASE_FALLBACK=0
	if base_fetch "$BASE_WANTED"; then
		return 0
	fi
	BASE_VERSION=$(base_newest)
	[ -n "$BASE_VERSION" ] || {
		echo "ERROR: the package archive offers no $BASE_PKG at all (is apt configured?)" >&2
		return 1
	}
	BASE_FALLBACK=1
	cat >&2 <<EOF

################################################################################
WARNING: the package archive does not have the kernel base that was asked for.
  asked for:             $BASE_PKG $BASE_WANTED ($(base_origin))
  the series is tested:  $BASE_PKG $(base_file_version) (kernel-patch/BASE)
  the archive's newest:  $BASE_PKG $BASE_VERSION
Trying the series on $BASE_VERSION instead. If that is not the version in BASE, it
is untested there: if it applies and the tests pass, move the base
(kernel-patch/README.md, "The kernel base").
################################################################################

EOF
	base_fetch "$BASE_VERSION" || {
		echo "ERROR: could not download $BASE_PKG $BASE_VERSION either" >&2
		return 1
	}
}

# Apply the patches "$@" to the tree $SRC (branch "series" from tag "base"), stopping at
# the first that does not apply with an error that says which, where and what to do.
base_apply_series() {
	local p log=$CACHE/am.log files
	git -C "$SRC" am --abort >/dev/null 2>&1 || true
	git -C "$SRC" checkout -q -f -B series base
	for p in "$@"; do
		echo "  $(basename "$p")"
		if ! git -C "$SRC" "${GIT_ID[@]}" am -q --keep-cr "$p" >"$log" 2>&1; then
			git -C "$SRC" am --abort >/dev/null 2>&1 || true
			files=$(sed -n 's/^error: patch failed: //p; s/^error: \(.*\): does not exist in index$/\1 (missing)/p' "$log" |
				sort -u | tr '\n' ' ')
			cat >&2 <<EOF

ERROR: the reflink series does not apply to $BASE_PKG $BASE_VERSION (Linux $(base_upstream "$SRC")).
  first failing patch: $(basename "$p")
  where:               ${files:-see $log}
  the series was last tested on $(base_file_version) (kernel-patch/BASE).
What to do: rebase the series onto $BASE_VERSION and re-test it there:
  kernel-patch/rebase.sh $BASE_VERSION
resolves what git can by three-way merge, stops at each conflict for you to fix,
rewrites kernel-patch/*.patch and BASE; then run kernel-patch/check-series.sh and
qemu-testbed/run. (git's own words: $log)
EOF
			return 1
		fi
	done
}
