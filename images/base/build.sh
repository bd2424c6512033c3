#!/usr/bin/env bash
# An offline Python 3.11 base image, made without any image registry (HPC centres and these
# build machines reach none): debootstrap Debian bookworm (whose python3 is 3.11) from the
# mirror this machine's apt already uses, copy the host's CA bundle in (so pip inside builds
# trusts the same proxies and indexes as the host), and `docker import` the root filesystem.
#   bash images/base/build.sh [TAG]        (root: debootstrap needs it)
set -euo pipefail
tag=${1:-cubebench/base:bookworm-py3.11}
suite=bookworm

# The Debian mirror of this machine's apt sources: deb822 (*.sources) or one-line format.
mirror_from_apt() {
  local files=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] && files+=("$f")
  done
  ((${#files[@]})) || return 0
  awk -v suite="$suite" '
    /^[[:space:]]*#/ { next }
    /^deb[[:space:]]/ {                       # one-line: deb [opts] URI suite components
      for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { uri = $i; s = $(i + 1); break }
      if (s == suite && uri !~ /security/) { print uri; exit }
      next
    }
    /^URIs:/   { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && uri !~ /security/) { print uri; exit } }
  ' "${files[@]}" 2>/dev/null | head -n 1
}

mirror=${DEBIAN_MIRROR:-$(mirror_from_apt)}
if [[ -z "$mirror" ]]; then
  echo "base-image: no Debian $suite mirror in this machine's apt sources; set DEBIAN_MIRROR" >&2
  exit 2
fi
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "base-image: $tool is not installed" >&2; exit 2; }
done
ca=/etc/ssl/certs/ca-certificates.crt
[[ -f "$ca" ]] || { echo "base-image: no CA bundle at $ca" >&2; exit 2; }

rootfs=$(mktemp -d /tmp/cubebench-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "base-image: debootstrap $suite from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -n 20 "$rootfs.log" >&2
  exit 1
}
rm -f "$rootfs.log"
cp "$ca" "$rootfs/etc/ssl/certs/ca-certificates.crt"
# smaller and reproducible: no package lists, caches or logs
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
python=$(chroot "$rootfs" python3 --version)
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $suite ($python) from $mirror" - "$tag" >/dev/null
echo "base-image: $tag ($python, $(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))"
