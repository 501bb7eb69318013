#!/usr/bin/env bash
# Runs one command inside a throw-away qemu VM that has soft-RoCE (rdma_rxe), for the RDMA
# tests on machines without RDMA hardware or an RDMA-capable host kernel.
#
#   scripts/softroce/run-in-vm.sh [--] CMD [ARGS...]
#
# The VM boots Debian's own kernel (whatever `linux-image-amd64` depends on; it ships
# rdma_rxe), fetched with `apt-get download` and unpacked with `dpkg-deb -x` — nothing is
# installed on the host. A busybox initramfs loads the modules, mounts the host's root
# read-only over 9p under a tmpfs overlay (the guest may write anywhere; nothing comes
# back), creates `rxe0` on a dummy interface (10.77.0.1/24) and runs CMD in the current
# directory with the current PATH/HOME/CARGO*/RUST*/SLIPSTREAM*/CI. CMD's output streams
# to stdout; the script exits with CMD's status (254 if the VM died or timed out).
# TCG emulation (KVM does not boot on these hosts); a command takes ~6 s of VM overhead.
#
# Environment: VM_CACHE (kernel + initramfs cache; default target/softroce-vm),
# VM_MEM (MiB, 2048), VM_SMP (nproc), VM_TIMEOUT (s, 1800), VM_KPKG (kernel package;
# default: resolved from linux-image-amd64), VM_VERBOSE=1 (kernel messages), VM_RW (host
# directories, space-separated, mounted writable at the same path: results come back).
# The command sees RXE_DEV, RXE_IP and RXE_GID (index of the RoCE v2 IPv4-mapped GID).
#
# Host packages (scripts/softroce/setup.sh installs them): qemu-system-x86 busybox-static
# cpio iproute2 rdma-core ibverbs-providers libibverbs1 librdmacm1 (the guest uses the
# host's user space, including the rxe provider library).
# Pitfalls found on the way are in docs/rdma.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${VM_CACHE:-$ROOT/target/softroce-vm}"
MEM="${VM_MEM:-2048}"
SMP="${VM_SMP:-$(nproc)}"
TIMEOUT="${VM_TIMEOUT:-1800}"
FORMAT=v3

[ "${1:-}" = "--" ] && shift
[ $# -ge 1 ] || { echo "usage: $0 [--] CMD [ARGS...]" >&2; exit 2; }
log() { echo "[softroce-vm] $*" >&2; }
for b in qemu-system-x86_64 busybox cpio dpkg-deb apt-get; do
  command -v "$b" >/dev/null || { log "missing host tool $b: run scripts/softroce/setup.sh"; exit 2; }
done

kernel_package() {
  if [ -n "${VM_KPKG:-}" ]; then echo "$VM_KPKG"; return; fi
  # The meta-package depends on the current ABI's image package: use that one.
  local p
  p="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
  if [ -z "$p" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    p="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
  fi
  [ -n "$p" ] || { log "cannot resolve linux-image-amd64's kernel package (set VM_KPKG)"; exit 2; }
  echo "$p"
}

# Modules to load (their dependencies are added from modules.dep, in order).
ROOT_MODS="virtio_pci 9pnet_virtio 9p overlay dummy rdma_rxe ib_uverbs rdma_ucm crc32_generic"

prepare() {
  local kpkg="$1"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"; flock 9
  if [ -f "$CACHE/ready" ] && [ "$(cat "$CACHE/ready")" = "$kpkg $FORMAT" ]; then flock -u 9; return 0; fi
  log "preparing $kpkg + initramfs in $CACHE (once)"
  local tmp="$CACHE/build.$$"; rm -rf "$tmp"; mkdir -p "$tmp" "$CACHE/debs"
  if ! ls "$CACHE/debs/${kpkg}"_*.deb >/dev/null 2>&1; then
    ( cd "$CACHE/debs" && { apt-get download "$kpkg" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get download "$kpkg" >/dev/null; }; } ) ||
      { log "apt-get download $kpkg failed"; exit 2; }
  fi
  dpkg-deb -x "$(ls "$CACHE/debs/${kpkg}"_*.deb | tail -1)" "$tmp/kroot"
  local kver; kver="$(ls "$tmp/kroot/lib/modules")"
  # The .deb carries no modules.dep (its postinst makes it); busybox's depmod can.
  busybox depmod -b "$tmp/kroot" "$kver"
  local mdir="$tmp/kroot/lib/modules/$kver"
  declare -A path_of seen
  local line name
  while IFS= read -r line; do
    name="$(basename "${line%%:*}" .ko)"; name="${name%.ko.xz}"; name="${name%.ko.zst}"
    path_of[$name]="${line%%:*}"; path_of[${name//-/_}]="${line%%:*}"
  done < "$mdir/modules.dep"
  local order=()
  visit() {
    local p="$1" d
    [ -n "${seen[$p]:-}" ] && return 0
    seen[$p]=1
    for d in $(grep -m1 "^$p:" "$mdir/modules.dep" | cut -d: -f2); do visit "$d"; done
    order+=("$p")
  }
  for name in $ROOT_MODS; do
    if [ -n "${path_of[$name]:-}" ]; then visit "${path_of[$name]}"; else log "module $name not found (built in?)"; fi
  done
  local ir="$tmp/ir"
  mkdir -p "$ir"/{bin,dev,proc,sys,lower,newroot,ovl,mods}
  cp "$(command -v busybox)" "$ir/bin/busybox"
  : > "$ir/mods/load.list"
  for p in "${order[@]}"; do
    case "$p" in
      *.ko.xz) xz -dc "$mdir/$p" > "$ir/mods/$(basename "$p" .xz)" ;;
      *.ko.zst) zstd -qdc "$mdir/$p" > "$ir/mods/$(basename "$p" .zst)" ;;
      *) cp "$mdir/$p" "$ir/mods/" ;;
    esac
    local ko; ko="$(basename "$p")"; ko="${ko%.xz}"; ko="${ko%.zst}"
    # dummy.ko makes dummy0 unless told not to.
    case "$ko" in dummy.ko) echo "dummy.ko numdummies=0" ;; *) echo "$ko" ;; esac >> "$ir/mods/load.list"
  done
  cat > "$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
while read m args; do insmod /mods/$m $args 2>/dev/null || echo "init: insmod $m failed" >/dev/console; done < /mods/load.list
for x in $(cat /proc/cmdline); do case "$x" in vmjob=*) JOB="${x#vmjob=}";; vmsetup=*) SETUP="${x#vmsetup=}";; esac; done
fail() { echo "init: $*" >/dev/console; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower || fail "mount hostroot"
mount -t tmpfs -o mode=755 tmpfs /ovl; mkdir -p /ovl/upper /ovl/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/ovl/upper,workdir=/ovl/work /newroot || fail "mount overlay"
mount --move /proc /newroot/proc; mount --move /sys /newroot/sys; mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mkdir -p /newroot$JOB
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 jobdir /newroot$JOB || fail "mount jobdir"
i=0
for d in $(cat /newroot$JOB/rw.list 2>/dev/null); do
  mkdir -p /newroot$d
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 rw$i /newroot$d || echo "init: mount $d failed" >/dev/console
  i=$((i+1))
done
chroot /newroot /bin/bash "$SETUP" "$JOB"
sync; poweroff -f
INIT
  chmod +x "$ir/init"
  ( cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1 ) > "$tmp/initramfs.cpio.gz"
  cat > "$tmp/guest-setup.sh" <<'SETUP'
#!/bin/bash
# Inside the VM, chrooted into the overlay of the host's root.
JOB="$1"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "[vm] $*"; }
die() { say "setup failed: $*"; echo 254 > "$JOB/rc"; exit 254; }
ip link set lo up
hostname softroce; echo "127.0.1.1 softroce" >> /etc/hosts
gid_index() {
  local f i
  for f in /sys/class/infiniband/$1/ports/1/gids/*; do
    i=${f##*/}
    case "$(cat "$f" 2>/dev/null)" in 0000:0000:0000:0000:0000:ffff:*)
      [ "$(cat /sys/class/infiniband/$1/ports/1/gid_attrs/types/$i 2>/dev/null)" = "RoCE v2" ] && { echo "$i"; return 0; } ;;
    esac
  done
  return 1
}
# rxe on a dummy netdev: processes in the VM talk RC verbs and rdma_cm over it (rxe
# short-circuits traffic to its own address). `lo` does not work with rdma_cm.
ip link add rxedum0 type dummy || die "dummy"
ip addr add 10.77.0.1/24 dev rxedum0
ip link set rxedum0 up
rdma link add rxe0 type rxe netdev rxedum0 || die "rdma link add"
n=0; until RXE_GID=$(gid_index rxe0); do n=$((n+1)); [ $n -gt 200 ] && die "no RoCE v2 GID on rxe0"; sleep 0.05; done
export RXE_DEV=rxe0 RXE_IP=10.77.0.1 RXE_GID
ulimit -l unlimited
say "rxe0 ready on 10.77.0.1 (GID index $RXE_GID), uptime $(cut -d' ' -f1 /proc/uptime)s"
if [ -e "$JOB/notty" ]; then bash "$JOB/cmd.sh" </dev/null 2>&1 | cat; rc=${PIPESTATUS[0]}
else bash "$JOB/cmd.sh" </dev/null; rc=$?; fi
say "command exited $rc, uptime $(cut -d' ' -f1 /proc/uptime)s"
echo "$rc" > "$JOB/rc"
SETUP
  chmod +x "$tmp/guest-setup.sh"
  rm -rf "$CACHE/kernel"; mkdir -p "$CACHE/kernel"
  cp "$tmp"/kroot/boot/vmlinuz-* "$CACHE/kernel/vmlinuz"
  mv "$tmp/initramfs.cpio.gz" "$tmp/guest-setup.sh" "$CACHE/kernel/"
  echo "$kver" > "$CACHE/kernel/kver"
  rm -rf "$tmp"
  echo "$kpkg $FORMAT" > "$CACHE/ready"
  flock -u 9
}

prepare "$(kernel_package)"

mkdir -p "$CACHE/jobs"
JOB="$(mktemp -d "$CACHE/jobs/job.XXXXXX")"
trap 'rm -rf "$JOB"' EXIT
{
  echo "#!/bin/bash"
  printf 'cd %q || exit 253\n' "$PWD"
  [ -t 1 ] || echo "export NO_COLOR=1 CARGO_TERM_COLOR=never TERM=dumb"
  for v in PATH HOME USER LANG LC_ALL TERM CI $(compgen -e | grep -E '^(CARGO|RUST|SLIPSTREAM)' || true); do
    [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf '%q ' "$@"; echo
} > "$JOB/cmd.sh"
[ -t 1 ] || touch "$JOB/notty"
RWARGS=()
: > "$JOB/rw.list"
i=0
for d in ${VM_RW:-}; do
  d="$(cd "$d" && pwd)"
  echo "$d" >> "$JOB/rw.list"
  RWARGS+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none,multidevs=remap")
  i=$((i+1))
done
LOGLVL="quiet loglevel=1"; [ "${VM_VERBOSE:-0}" = 1 ] && LOGLVL="loglevel=7"
T0=$(date +%s.%N)
set +e
timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$SMP" \
  -nodefaults -no-user-config -display none -no-reboot \
  -chardev stdio,id=con,signal=off -serial chardev:con \
  -kernel "$CACHE/kernel/vmlinuz" -initrd "$CACHE/kernel/initramfs.cpio.gz" \
  -append "console=ttyS0 $LOGLVL panic=-1 mitigations=off vmjob=$JOB vmsetup=$CACHE/kernel/guest-setup.sh" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$JOB,mount_tag=jobdir,security_model=none" \
  "${RWARGS[@]}" \
  -nic none </dev/null | tr -d '\r' | grep --line-buffered -v '^\[ *[0-9.]*\] reboot: Power down$'
qrc=${PIPESTATUS[0]}
set -e
if [ -s "$JOB/rc" ]; then rc=$(cat "$JOB/rc"); else log "the VM reported no exit status (qemu $qrc)"; rc=254; fi
log "exit status $rc, VM wall time $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$T0}")s"
exit "$rc"
