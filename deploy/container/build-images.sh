#!/usr/bin/env bash
# Build radflag's container images with podman, without any container registry:
#   1. a Debian base image debootstrapped from THIS machine's apt mirror (read from its apt
#      configuration, never hard-coded) and imported with `podman import`;
#   2. radflag (deploy/Containerfile), PostgreSQL and Orthanc (deploy/compose/*.Containerfile)
#      on that base. pip inside the build uses this machine's pip configuration: its index,
#      extra indexes and find-links (local directories are bind-mounted read-only, not copied)
#      and its CA bundle (passed as a build secret).
# Images are written in docker format: the OCI format has no HEALTHCHECK.
# Usage: deploy/container/build-images.sh [--target cpu|cuda] [--rebuild-base]
# Environment: RADFLAG_IMAGE_PREFIX (default localhost/radflag), RADFLAG_BASE_TAG,
#   PIP (the pip whose configuration is read; default "python3 -m pip").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deploy="$(dirname "$here")"
repo="$(dirname "$deploy")"
target=cpu
rebuild_base=0
base_only=0
while (($#)); do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --base-only) base_only=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
prefix="${RADFLAG_IMAGE_PREFIX:-localhost/radflag}"
# One build at a time (CI starts one early in the background; the test's own call waits for it
# and then only hits podman's layer cache).
exec 9>"${RADFLAG_BUILD_LOCK:-/var/tmp/radflag-build-images.lock}"
flock 9
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

. /etc/os-release
codename="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
arch="$(dpkg --print-architecture)"
base="${RADFLAG_BASE_TAG:-$prefix-base:$codename}"

# The mirror that serves "<codename>/main" for our architecture, as apt itself resolved it
# from /etc/apt/sources.list{,.d/*}; falls back to parsing the source files directly.
apt_mirror() {
  local m
  m="$(apt-cache policy 2>/dev/null \
       | awk -v s="$codename/main" -v a="$arch" '$3 == s && $4 == a {print $2; exit}')"
  if [[ -z "$m" ]]; then
    m="$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
           /etc/apt/sources.list.d/*.list 2>/dev/null \
         | grep -v -- '-security' | sed -E 's/^URIs:[[:space:]]*//; s/^deb (\[[^]]*\] )?//' \
         | awk '{print $1; exit}')"
  fi
  [[ -n "$m" ]] || { echo "no apt mirror for $codename found in /etc/apt" >&2; exit 1; }
  echo "$m"
}

# apt's own proxy setting, if any, for debootstrap and apt inside the builds.
apt_proxy() { apt-config dump 2>/dev/null | sed -nE 's/^Acquire::http::Proxy "(.+)";$/\1/p' | head -1; }

build_base() {
  local mirror root proxy
  mirror="$(apt_mirror)"
  proxy="$(apt_proxy)"
  root="$(mktemp -d /var/tmp/radflag-rootfs.XXXXXX)"
  trap 'rm -rf "$root"' RETURN
  echo "debootstrap $codename from $mirror"
  http_proxy="${proxy:-${http_proxy:-}}" debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates,tini "$codename" "$root" "$mirror" >/dev/null
  # The same mirror for apt-get inside later builds; no caches or docs in the image.
  printf 'deb %s %s main\n' "$mirror" "$codename" >"$root/etc/apt/sources.list"
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
    >"$root/etc/dpkg/dpkg.cfg.d/radflag-nodoc"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$root/etc/apt/apt.conf.d/90radflag"
  [[ -n "$proxy" ]] && printf 'Acquire::http::Proxy "%s";\n' "$proxy" >>"$root/etc/apt/apt.conf.d/90radflag"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  echo "imported $base"
}

# pip settings of this machine: `pip config list` plus PIP_* from the environment (which win).
pip_setting() {
  local key="$1" env="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')" v
  v="${!env:-}"
  if [[ -z "$v" ]]; then
    # shellcheck disable=SC2086
    v="$(${PIP:-python3 -m pip} config list 2>/dev/null \
         | sed -nE "s/^(global|install|:env:)\.$key='(.*)'$/\2/p" | tail -1)"
  fi
  echo "$v"
}

# Every local directory among the pip locations is bind-mounted read-only at the same path.
pip_volumes() {
  local loc path
  for loc in "$@"; do
    path="${loc#file://}"
    [[ "$path" == /* && -e "$path" ]] || continue
    [[ -d "$path" ]] || path="$(dirname "$path")"
    # a file:// simple index links to ../../files: mount its parent
    [[ "$(basename "$path")" == simple ]] && path="$(dirname "$path")"
    echo "--volume=$path:$path:ro"
  done | sort -u
}

if ((rebuild_base)) || ! podman image exists "$base"; then
  build_base
fi
((base_only)) && exit 0

index_url="$(pip_setting index-url)"
extra_index_url="$(pip_setting extra-index-url)"
find_links="$(pip_setting find-links)"
cert="$(pip_setting cert)"
# shellcheck disable=SC2086
mapfile -t volumes < <(pip_volumes $index_url $extra_index_url $find_links)
build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "PIP_INDEX_URL=$index_url"
            --build-arg "PIP_EXTRA_INDEX_URL=$extra_index_url" --build-arg "PIP_FIND_LINKS=$find_links")
secrets=()
[[ -n "$cert" && -f "$cert" ]] && secrets=(--secret "id=pip_cert,src=$cert")

podman build --format docker "${build_args[@]}" "${volumes[@]}" "${secrets[@]}" --target "$target" \
  -f "$deploy/Containerfile" -t "$prefix:$target" "$repo"
for svc in postgres orthanc; do
  podman build --format docker --build-arg "BASE_IMAGE=$base" -f "$deploy/compose/$svc.Containerfile" \
    -t "$prefix-$svc:latest" "$deploy/compose"
done
podman images --filter "reference=$prefix*"
