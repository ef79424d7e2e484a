#!/bin/sh
# Boot a throw-away systemd: run as PID 1 of fresh namespaces, e.g.
#   unshare --pid --fork --mount --uts --ipc --cgroup --propagation private boot.sh SCRATCH SRC NAME
# from a process already moved into cgroups of its own (see box.py).
#
# The root is an overlay of the machine's / with a tmpfs upper layer (inside this mount namespace
# only), so nothing of the machine is ever written; SRC is bind-mounted read-only at /src. The host's
# enabled services are masked so that the box boots to multi-user.target in well under a second.
set -eu
scratch=$1
src=$2
name=$3

mount -t tmpfs -o mode=0700 "box-$name" "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "box-$name" "$scratch/root"
r=$scratch/root

mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
# The box shares the kernel and the network namespace: its systemd must not change the host's
# kernel settings (PID 1 raises limits, systemd-sysctl applies sysctl.d) nor trigger SysRq.
for p in sys sysrq-trigger; do
    [ -e "$r/proc/$p" ] || continue
    mount --bind "$r/proc/$p" "$r/proc/$p"
    mount -o remount,bind,ro "$r/proc/$p"
done
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec cgroup "$r/sys/fs/cgroup"
mkdir "$r/sys/fs/cgroup/systemd" "$r/sys/fs/cgroup/unified"
mount -t cgroup -o none,name=systemd,xattr cgroup "$r/sys/fs/cgroup/systemd"
mount -t cgroup2 -o nsdelegate cgroup2 "$r/sys/fs/cgroup/unified"

mount -t tmpfs -o mode=0755,nosuid dev "$r/dev"
for node in null zero full random urandom tty; do
    touch "$r/dev/$node"
    mount --bind "/dev/$node" "$r/dev/$node"
done
mkdir "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$r/dev/shm"
ln -s /proc/self/fd "$r/dev/fd"
ln -s /proc/self/fd/0 "$r/dev/stdin"
ln -s /proc/self/fd/1 "$r/dev/stdout"
ln -s /proc/self/fd/2 "$r/dev/stderr"

mount -t tmpfs -o mode=0755,nosuid,nodev run "$r/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$r/tmp"
mkdir -p "$r/src"
mount --bind "$src" "$r/src"
mount -o remount,bind,ro "$r/src"

# Only systemd's own units: mask whatever the machine has enabled, the console login, and what
# would reach out of the box (network and clock set-up, kernel modules, sysctls, binfmt, audit).
for link in "$r"/etc/systemd/system/*.wants/*; do
    [ -e "$link" ] || [ -L "$link" ] || continue
    ln -sfn /dev/null "$r/etc/systemd/system/${link##*/}"
done
for unit in console-getty.service getty@.service systemd-networkd.service systemd-resolved.service \
            systemd-timesyncd.service systemd-sysctl.service systemd-modules-load.service \
            systemd-binfmt.service proc-sys-fs-binfmt_misc.automount systemd-journald-audit.socket; do
    ln -sfn /dev/null "$r/etc/systemd/system/$unit"
done
echo "$name" > "$r/etc/hostname"

cd "$r"
mkdir -p .old-root
pivot_root . .old-root
cd /
umount -l /.old-root
rmdir /.old-root
exec /usr/bin/env -i container="nio-logd-test" /lib/systemd/systemd --system --unit=multi-user.target
