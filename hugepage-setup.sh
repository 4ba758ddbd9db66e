#!/bin/sh
# hugepage-setup.sh - prepare a Linux host for Dioxide (like SPDK's scripts/setup.sh).
# POSIX sh: runs under dash, bash and busybox ash (the HIL guest has only busybox).
# Run "hugepage-setup.sh help" for usage.
set -u

SYSFS_ROOT=${SYSFS_ROOT:-/sys}
DEVFS_ROOT=${DEVFS_ROOT:-/dev}
PROC_ROOT=${PROC_ROOT:-/proc}
STATE_DIR=${DIOXIDE_STATE_DIR:-/run/dioxide}
HUGEMEM=${HUGEMEM:-2048}
PCI_ALLOWED=${PCI_ALLOWED:-${PCI_WHITELIST:-}}
PCI_BLOCKED=${PCI_BLOCKED:-${PCI_BLACKLIST:-}}
TARGET_USER=${TARGET_USER:-}
NVME_CLASS=0x010802
PCI=$SYSFS_ROOT/bus/pci

usage() {
	cat <<EOF
Usage: $(basename "$0") [config|reset|status|cleanup|help]

  config   (default) reserve hugepages, mount hugetlbfs, load vfio-pci and bind every NVMe
           controller (PCI class $NVME_CLASS) to it. A controller whose namespaces are
           mounted, used as swap, or held by LVM/MD/device-mapper is skipped.
  reset    give controllers bound to vfio-pci back to the driver they had before config
           (or to whichever kernel driver claims them). CLEAR_HUGE=yes also frees hugepages.
  status   hugepages per NUMA node and a table of NVMe controllers.
  cleanup  remove stale Dioxide hugepage files (dioxide*) that no process has open.
  help     this text.

Environment:
  HUGEMEM       MB of hugepages to reserve (default 2048); NRHUGE overrides the page count
  HUGENODE      reserve on this NUMA node only (default: let the kernel spread them)
  PCI_ALLOWED   space-separated BDFs to touch (default: all NVMe controllers)
  PCI_BLOCKED   space-separated BDFs never to touch
  TARGET_USER   user who will run Dioxide: gets /dev/vfio/<group> and the hugetlbfs mount,
                and is warned when its memlock limit (ulimit -l) is too small
  SYSFS_ROOT DEVFS_ROOT PROC_ROOT  alternative roots (tests), default /sys /dev /proc
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
err() { printf 'ERROR: %s\n' "$*" >&2; }

# Normalise a BDF to the 0000:00:00.0 form.
full_bdf() {
	case $1 in
	*:*:*) say "$1" ;;
	*) say "0000:$1" ;;
	esac
}

in_list() { # bdf list
	for x in $2; do
		[ "$(full_bdf "$x")" = "$1" ] && return 0
	done
	return 1
}

pci_allowed() {
	if [ -n "$PCI_BLOCKED" ] && in_list "$1" "$PCI_BLOCKED"; then
		say "Skipping denied controller at $1 (PCI_BLOCKED)"
		return 1
	fi
	if [ -n "$PCI_ALLOWED" ] && ! in_list "$1" "$PCI_ALLOWED"; then
		say "Skipping un-allowed controller at $1 (not in PCI_ALLOWED)"
		return 1
	fi
	return 0
}

nvme_controllers() {
	for d in "$PCI"/devices/*; do
		[ -f "$d/class" ] || continue
		[ "$(cat "$d/class")" = "$NVME_CLASS" ] && say "${d##*/}"
	done
}

driver_of() {
	l=$(readlink "$PCI/devices/$1/driver" 2>/dev/null) || return 0
	say "${l##*/}"
}

iommu_group_of() {
	l=$(readlink "$PCI/devices/$1/iommu_group" 2>/dev/null) || return 0
	say "${l##*/}"
}

# Block devices (whole disks) that belong to controller $1.
block_devices_of() {
	for b in "$SYSFS_ROOT"/block/*; do
		[ -e "$b" ] || continue
		name=${b##*/}
		real=$(readlink -f "$b" 2>/dev/null)
		dev=$(readlink -f "$b/device" 2>/dev/null)
		case "$real/ $dev/" in
		*"/$1/"*) say "$name"; continue ;;
		esac
		# Native NVMe multipath: nvmeXn1 lives under nvme-subsysY; the controller has nvmeYcXn1.
		for c in "$PCI/devices/$1"/nvme/nvme*/nvme*c*n*; do
			[ -e "$c" ] || continue
			p=${c##*/}
			[ "${p%%c*}n${p#*c*n}" = "$name" ] && say "$name"
		done
	done | sort -u
}

# "kind@disk:what" for every reason the disks of controller $1 are in use.
active_uses() {
	for disk in $(block_devices_of "$1"); do
		for part in "$SYSFS_ROOT/block/$disk" "$SYSFS_ROOT/block/$disk/$disk"*; do
			[ -d "$part" ] || continue
			p=${part##*/}
			devno=$(cat "$part/dev" 2>/dev/null || true)
			if [ -n "$devno" ] && [ -r "$PROC_ROOT/self/mountinfo" ] &&
				awk -v d="$devno" '$3 == d { f = 1 } END { exit !f }' "$PROC_ROOT/self/mountinfo"; then
				say "mount@$disk:$p"
			elif awk -v d="/$p" 'substr($1, length($1) - length(d) + 1) == d { f = 1 } END { exit !f }' "$PROC_ROOT/mounts" 2>/dev/null; then
				say "mount@$disk:$p"
			fi
			awk -v d="/$p" 'substr($1, length($1) - length(d) + 1) == d { f = 1 } END { exit !f }' "$PROC_ROOT/swaps" 2>/dev/null &&
				say "swap@$disk:$p"
			for h in "$part"/holders/*; do
				{ [ -e "$h" ] || [ -L "$h" ]; } && say "holder@$disk:${h##*/}"
			done
		done
	done
}

join_lines() { tr '\n' ',' | sed 's/,$//'; }

hugepage_size_kb() {
	awk '/^Hugepagesize:/ { print $2 }' "$PROC_ROOT/meminfo" 2>/dev/null
}

hugetlbfs_mounts() {
	awk '$3 == "hugetlbfs" { print $2 }' "$PROC_ROOT/mounts" 2>/dev/null
}

load_vfio() {
	if [ ! -d "$SYSFS_ROOT/kernel/iommu_groups" ] || [ -z "$(ls "$SYSFS_ROOT/kernel/iommu_groups" 2>/dev/null)" ]; then
		err "no IOMMU groups in $SYSFS_ROOT/kernel/iommu_groups: the IOMMU is off, and vfio-pci needs it."
		err "Enable VT-d / AMD-Vi in the firmware and add to the kernel command line:"
		err "  intel_iommu=on iommu=pt   (Intel)   or   amd_iommu=on iommu=pt   (AMD)"
		err "then reboot. (Debian kernels have no VFIO no-IOMMU mode.)"
		return 1
	fi
	for m in vfio_iommu_type1 vfio-pci; do
		case $m in
		vfio-pci) [ -d "$PCI/drivers/vfio-pci" ] && continue ;;
		vfio_iommu_type1) [ -d "$SYSFS_ROOT/module/vfio_iommu_type1" ] && continue ;;
		esac
		if ! modprobe "$m" 2>/dev/null; then
			err "cannot load kernel module $m (modprobe $m failed)"
			return 1
		fi
	done
	[ -d "$PCI/drivers/vfio-pci" ] || { err "vfio-pci driver did not appear after loading it"; return 1; }
}

# Bind controller $1 to vfio-pci; remember its driver for reset.
bind_vfio() {
	bdf=$1
	cur=$(driver_of "$bdf")
	if [ "$cur" = vfio-pci ]; then
		say "$bdf already bound to vfio-pci"
		return 0
	fi
	mkdir -p "$STATE_DIR" 2>/dev/null && say "${cur:-}" >"$STATE_DIR/$bdf.driver"
	echo vfio-pci >"$PCI/devices/$bdf/driver_override"
	[ -n "$cur" ] && echo "$bdf" >"$PCI/devices/$bdf/driver/unbind"
	echo "$bdf" >"$PCI/drivers_probe" 2>/dev/null
	[ "$(driver_of "$bdf")" = vfio-pci ] || echo "$bdf" >"$PCI/drivers/vfio-pci/bind" 2>/dev/null
	if [ "$(driver_of "$bdf")" != vfio-pci ]; then
		now=$(driver_of "$bdf")
		err "failed to bind $bdf to vfio-pci (its driver now: ${now:-none})"
		return 1
	fi
	say "$bdf (${vendor:-?} ${device:-?}): ${cur:-no driver} -> vfio-pci"
}

check_group() { # bdf
	grp=$(iommu_group_of "$1")
	[ -n "$grp" ] || { warn "$1 has no IOMMU group"; return 0; }
	others=""
	for o in "$SYSFS_ROOT/kernel/iommu_groups/$grp/devices"/*; do
		[ -e "$o" ] || continue
		[ "${o##*/}" = "$1" ] || others="$others ${o##*/}"
	done
	[ -z "$others" ] || warn "IOMMU group $grp of $1 also holds:$others; every device of the group must be bound to vfio-pci (or no driver) before Dioxide can open it"
	node=$DEVFS_ROOT/vfio/$grp
	if [ -n "$TARGET_USER" ]; then
		if [ -e "$node" ]; then chown "$TARGET_USER" "$node" && say "$node now owned by $TARGET_USER"; else warn "$node missing, cannot give it to $TARGET_USER"; fi
	fi
}

reserve_hugepages() {
	size=$(hugepage_size_kb)
	[ -n "$size" ] || { err "no hugepage support (Hugepagesize missing in $PROC_ROOT/meminfo)"; return 1; }
	want=${NRHUGE:-$(((HUGEMEM * 1024 + size - 1) / size))}
	if [ -n "${HUGENODE:-}" ]; then
		f=$SYSFS_ROOT/devices/system/node/node$HUGENODE/hugepages/hugepages-${size}kB/nr_hugepages
	else
		f=$PROC_ROOT/sys/vm/nr_hugepages
	fi
	have=$(cat "$f" 2>/dev/null || echo 0)
	if [ "$have" -lt "$want" ]; then
		echo "$want" >"$f" || { err "cannot write $f"; return 1; }
		have=$(cat "$f")
	fi
	if [ "$have" -lt "$want" ]; then
		warn "requested $want hugepages of ${size} kB (HUGEMEM=${HUGEMEM} MB) but only $have could be reserved: memory is fragmented or short; reserve them early (kernel command line hugepages=$want) or lower HUGEMEM"
	else
		say "hugepages: $have x ${size} kB reserved${HUGENODE:+ on node $HUGENODE} (asked $want)"
	fi
	mnt=$(hugetlbfs_mounts | head -n 1)
	if [ -z "$mnt" ]; then
		mnt=$DEVFS_ROOT/hugepages
		mkdir -p "$mnt" && mount -t hugetlbfs nodev "$mnt" || { err "cannot mount hugetlbfs on $mnt"; return 1; }
		say "mounted hugetlbfs on $mnt"
	fi
	if [ -n "$TARGET_USER" ]; then
		chown "$TARGET_USER" "$mnt" && say "$mnt now owned by $TARGET_USER"
		check_memlock
	fi
}

check_memlock() {
	need_kb=$((HUGEMEM * 1024))
	lim=$(su -s /bin/sh "$TARGET_USER" -c 'ulimit -l' 2>/dev/null) || { warn "cannot read the memlock limit of $TARGET_USER"; return 0; }
	if [ "$lim" != unlimited ] && [ "$lim" -lt "$need_kb" ]; then
		warn "$TARGET_USER may lock only $lim kB (ulimit -l) but DMA memory of $need_kb kB (HUGEMEM) is pinned by VFIO: add '$TARGET_USER - memlock unlimited' to /etc/security/limits.conf (or LimitMEMLOCK=infinity for a service) and log in again"
	fi
}

do_config() {
	reserve_hugepages || return 1
	load_vfio || return 1
	rc=0 n=0
	for bdf in $(nvme_controllers); do
		vendor=$(cut -c3- "$PCI/devices/$bdf/vendor") device=$(cut -c3- "$PCI/devices/$bdf/device")
		pci_allowed "$bdf" || continue
		n=$((n + 1))
		uses=$(active_uses "$bdf" | join_lines)
		if [ -n "$uses" ]; then
			say "$bdf ($vendor $device): Active devices: $uses, so not binding PCI dev"
			continue
		fi
		bind_vfio "$bdf" || { rc=1; continue; }
		check_group "$bdf"
	done
	[ "$n" -gt 0 ] || say "no NVMe controller to bind (class $NVME_CLASS)"
	return $rc
}

do_reset() {
	rc=0
	for bdf in $(nvme_controllers); do
		pci_allowed "$bdf" || continue
		[ "$(driver_of "$bdf")" = vfio-pci ] || continue
		orig=$(cat "$STATE_DIR/$bdf.driver" 2>/dev/null || true)
		echo "" >"$PCI/devices/$bdf/driver_override"
		echo "$bdf" >"$PCI/devices/$bdf/driver/unbind"
		if [ -n "$orig" ] && [ -d "$PCI/drivers/$orig" ]; then
			echo "$bdf" >"$PCI/drivers/$orig/bind" 2>/dev/null
		else
			echo "$bdf" >"$PCI/drivers_probe" 2>/dev/null
		fi
		now=$(driver_of "$bdf")
		rm -f "$STATE_DIR/$bdf.driver"
		if [ -n "$orig" ] && [ "$now" != "$orig" ]; then
			err "$bdf: vfio-pci -> ${now:-no driver}, expected $orig"
			rc=1
		else
			say "$bdf: vfio-pci -> ${now:-no driver}"
		fi
	done
	if [ "${CLEAR_HUGE:-no}" = yes ]; then
		echo 0 >"$PROC_ROOT/sys/vm/nr_hugepages" && say "hugepages released"
	fi
	return $rc
}

do_status() {
	say "Hugepages"
	printf '%-8s %10s %8s / %6s\n' node hugesize free total
	found=0
	for n in "$SYSFS_ROOT"/devices/system/node/node*; do
		[ -d "$n/hugepages" ] || continue
		for h in "$n"/hugepages/hugepages-*; do
			[ -d "$h" ] || continue
			found=1
			printf '%-8s %10s %8s / %6s\n' "${n##*/}" "${h##*hugepages-}" "$(cat "$h/free_hugepages")" "$(cat "$h/nr_hugepages")"
		done
	done
	if [ $found = 0 ]; then
		for h in "$SYSFS_ROOT"/kernel/mm/hugepages/hugepages-*; do
			[ -d "$h" ] || continue
			printf '%-8s %10s %8s / %6s\n' - "${h##*hugepages-}" "$(cat "$h/free_hugepages")" "$(cat "$h/nr_hugepages")"
		done
	fi
	say ""
	say "NVMe devices"
	fmt='%-5s %-13s %-6s %-6s %-4s %-10s %-11s %s\n'
	# shellcheck disable=SC2059
	printf "$fmt" Type BDF Vendor Device NUMA Driver IOMMU-group Block-devices
	for bdf in $(nvme_controllers); do
		d=$PCI/devices/$bdf
		blk=$(block_devices_of "$bdf" | join_lines)
		# shellcheck disable=SC2059
		printf "$fmt" NVMe "$bdf" "$(cut -c3- "$d/vendor")" "$(cut -c3- "$d/device")" "$(cat "$d/numa_node" 2>/dev/null || echo -)" \
			"$(driver_of "$bdf" | grep . || echo -)" "$(iommu_group_of "$bdf" | grep . || echo -)" "${blk:--}"
	done
}

# Open or mapped by a live process? (fd links and maps of every process)
in_use() {
	for l in "$PROC_ROOT"/[0-9]*/fd/*; do
		[ "$(readlink "$l" 2>/dev/null)" = "$1" ] && return 0
	done
	grep -qsF -- "$1" "$PROC_ROOT"/[0-9]*/maps
}

do_cleanup() {
	n=0
	for mnt in $(hugetlbfs_mounts); do
		for f in "$mnt"/dioxide*; do
			[ -e "$f" ] || continue
			if in_use "$f"; then
				say "in use, kept: $f"
				continue
			fi
			rm -f -- "$f" && say "removed stale $f" && n=$((n + 1))
		done
	done
	say "cleanup: $n stale hugepage file(s) removed"
}

mode=${1:-config}
case $mode in
config | reset | cleanup)
	if [ "$(id -u)" != 0 ] && [ "${DIOXIDE_SETUP_NOROOT:-}" != 1 ]; then
		err "$mode needs root (run it with sudo)"
		exit 1
	fi
	"do_$mode"
	;;
status) do_status ;;
help | -h | --help) usage ;;
*)
	usage >&2
	exit 2
	;;
esac
