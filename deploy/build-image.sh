#!/usr/bin/env bash
# Builds the container image pingora-vhost:local without any registry or base image:
# a rootfs made here (the release binary, the shared libraries `ldd` names, a static busybox,
# a non-root user) is imported with `docker import`.
#
#   deploy/build-image.sh            # image pingora-vhost:local
#   IMAGE=my/pv:1 deploy/build-image.sh
#
# Environment:
#   IMAGE   image tag to produce (default pingora-vhost:local)
#   BIN     binary to package (default target/release/pingora-vhost, built when missing or
#           older than src/, Cargo.toml, Cargo.lock)
#   STRIP   1 (default): strip debug info from the packaged copy (≈150 MB -> ≈20 MB; symbol
#           names stay, so backtraces are still readable). 0: package the binary as built.
#
# Runs as root on a fresh Debian machine (installs busybox-static, and cmake/gcc through
# scripts/bootstrap.sh when it has to build). The image is rebuilt only when its content
# changes: the rootfs tarball's sha256 is stored as a label and compared.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${IMAGE:-pingora-vhost:local}"
BIN="${BIN:-$ROOT/target/release/pingora-vhost}"
STRIP="${STRIP:-1}"
APP_UID=10001
APP_GID=10001

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v docker >/dev/null 2>&1 || die "docker not found (Docker Engine is required)"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker daemon (is it running? are you allowed to use it?)"

# --- 1. the binary ----------------------------------------------------------------------------
if [ "$BIN" = "$ROOT/target/release/pingora-vhost" ]; then
  stale=""
  if [ ! -x "$BIN" ]; then
    stale="missing"
  elif [ -n "$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$BIN" -print -quit)" ]; then
    stale="older than the sources"
  fi
  if [ -n "$stale" ]; then
    log "release binary $stale: cargo build --release (takes minutes)"
    "$ROOT/scripts/bootstrap.sh"
    (cd "$ROOT" && cargo build --release --bin pingora-vhost)
  fi
fi
[ -x "$BIN" ] || die "$BIN is not an executable file"

# --- 2. busybox (static) for sh / wget / nslookup / httpd in tests ------------------------------
BUSYBOX=""
for c in /bin/busybox /usr/bin/busybox; do
  if [ -x "$c" ] && ! ldd "$c" >/dev/null 2>&1; then BUSYBOX="$c"; break; fi   # ldd fails on static binaries
done
if [ -z "$BUSYBOX" ]; then
  apt_install busybox-static
  BUSYBOX=/bin/busybox
  ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is not statically linked"
fi

# --- 3. the rootfs ----------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pingora-vhost-image.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
RFS="$WORK/rootfs"
mkdir -p "$RFS"/{bin,etc,data,tmp,etc/pingora-vhost}
chmod 1777 "$RFS/tmp"

if [ "$STRIP" = 1 ] && command -v strip >/dev/null 2>&1; then
  strip --strip-debug -o "$RFS/pingora-vhost" "$BIN"
else
  cp "$BIN" "$RFS/pingora-vhost"
fi
chmod 0755 "$RFS/pingora-vhost"

# Shared libraries and the dynamic loader, at the paths the binary asks for.
copy_lib() {
  local src="$1"
  [ -e "$RFS$src" ] && return 0
  mkdir -p "$RFS$(dirname "$src")"
  cp -L "$src" "$RFS$src"
}
ldd_out="$(ldd "$BIN")" || die "ldd $BIN failed"
if grep -q "not found" <<<"$ldd_out"; then
  die "missing shared libraries: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t' ' ')"
fi
while read -r line; do
  case "$line" in
    *"=> /"*) lib="${line#*=> }"; lib="${lib%% (*}"; copy_lib "$lib" ;;
    /*) lib="${line%% (*}"; copy_lib "$lib" ;;
  esac
done <<<"$ldd_out"
# Name resolution (seeds, backend host names): glibc >= 2.34 has files/dns built in; older
# ones load these modules at run time, so ship them when the host has them.
for m in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
  # awk reads to the end: exiting at the first match would kill ldconfig with SIGPIPE, and
  # under pipefail that failed the whole script now and then.
  p="$(ldconfig -p 2>/dev/null | awk -v m="$m" '!found && $1 == m && /x86-64|aarch64|64bit/ {print $NF; found = 1}')"
  [ -n "$p" ] && [ -e "$p" ] && copy_lib "$p"
done

cp "$BUSYBOX" "$RFS/bin/busybox"
# Every applet as a symlink (sh, wget, nslookup, httpd, timeout, ...).
for a in $("$BUSYBOX" --list); do
  [ -e "$RFS/bin/$a" ] || ln -s busybox "$RFS/bin/$a"
done

cat >"$RFS/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
pingora:x:$APP_UID:$APP_GID:pingora-vhost:/data:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$RFS/etc/group" <<EOF
root:x:0:
pingora:x:$APP_GID:
nogroup:x:65534:
EOF
echo "hosts: files dns" >"$RFS/etc/nsswitch.conf"
# Docker bind-mounts resolv.conf/hosts/hostname over these.
: >"$RFS/etc/resolv.conf"; : >"$RFS/etc/hosts"; : >"$RFS/etc/hostname"
# data_dir lives here (a volume): a new named volume takes this directory's owner.
chown "$APP_UID:$APP_GID" "$RFS/data"
chmod 0700 "$RFS/data"

# --- 4. import ------------------------------------------------------------------------------
# A reproducible tarball (sorted, fixed mtimes, numeric owners), so its hash says whether the
# image already holds exactly this content.
tar --sort=name --mtime=@0 --numeric-owner --format=gnu -C "$RFS" -cf "$WORK/rootfs.tar" .
sum="$(sha256sum "$WORK/rootfs.tar" | cut -c1-64)"
current="$(docker image inspect -f '{{ index .Config.Labels "org.pingora-vhost.rootfs-sha256" }}' "$IMAGE" 2>/dev/null || true)"
if [ "$current" = "$sum" ]; then
  log "$IMAGE is up to date ($(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c1-19))"
  exit 0
fi
old_id="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
version="$("$BIN" --version 2>/dev/null | awk '{print $NF}' || true)"
docker import \
  --change 'ENTRYPOINT ["/pingora-vhost"]' \
  --change 'CMD ["--config", "/etc/pingora-vhost/config.toml"]' \
  --change "USER $APP_UID:$APP_GID" \
  --change 'WORKDIR /data' \
  --change 'EXPOSE 8080 8443 9080 7101 7946/udp' \
  --change 'ENV PATH=/bin' \
  --change "LABEL org.pingora-vhost.rootfs-sha256=$sum" \
  --change "LABEL org.opencontainers.image.title=pingora-vhost org.opencontainers.image.version=${version:-unknown}" \
  --message "pingora-vhost rootfs ${sum:0:12}" \
  "$WORK/rootfs.tar" "$IMAGE" >/dev/null
# The previous build, now untagged, is garbage unless a container still uses it.
if [ -n "$old_id" ]; then docker image rm "$old_id" >/dev/null 2>&1 || true; fi
log "built $IMAGE ($(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c1-19), $(du -m "$WORK/rootfs.tar" | cut -f1) MB)"
