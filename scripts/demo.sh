#!/usr/bin/env bash
# qimg demo: build a small qcow2 chain with qimg, let QEMU's tools confirm
# what qimg wrote, and inspect and repair it with qimg; then a week of the
# nightly cron job through a backup repository (a crash, a prune, verify,
# restores compared with QEMU). Everything is written to ./demo/.
#
#   scripts/demo.sh            uses .build/debug/qimg (run `make build` first)
#   QIMG=/path/to/qimg scripts/demo.sh
#   DEMO_DIR=/tmp/d scripts/demo.sh   writes there instead of ./demo/
#
# Exits non-zero when a command fails or a comparison finds a difference.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
QIMG=${QIMG:-.build/debug/qimg}
case $QIMG in /*) ;; *) QIMG=$ROOT/$QIMG ;; esac
if [ ! -x "$QIMG" ]; then
    echo "demo: qimg not found at $QIMG (run 'make build' first)" >&2
    exit 1
fi
for tool in qemu-img qemu-io flock; do
    command -v "$tool" >/dev/null || { echo "demo: $tool not found (run 'make deps')" >&2; exit 1; }
done

DEMO=${DEMO_DIR:-$ROOT/demo}
case $DEMO in /*) ;; *) DEMO=$ROOT/$DEMO ;; esac
rm -rf "$DEMO"
mkdir -p "$DEMO"
cd "$DEMO"
export TZ=UTC LC_ALL=C

failed=()
header() { printf '\n=== %s\n' "$*"; }
# Print a command line, single-quoting arguments that contain spaces.
show() {
    local a line='$'
    for a in "$@"; do
        case $a in *' '*) line+=" '$a'" ;; *) line+=" $a" ;; esac
    done
    printf '%s\n' "$line"
}
# Show a setup command, run it quietly.
setup() { show "$@"; "$@" >/dev/null; }
# Show a qimg command and its output; note a failure and carry on.
qimg() {
    show qimg "$@"
    local rc=0
    "$QIMG" "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "(exit $rc)"
        failed+=("qimg $* (exit $rc)")
    fi
}

header "Create a 64 MiB qcow2 image with qimg"
qimg create -f qcow2 base.qcow2 64M

header "Write patterned data, a zero range, a compressed cluster and a discard with qimg io"
qimg io \
    -c 'write -P 0xaa 0 1M' \
    -c 'write -P 0xbb 1500000 300000' \
    -c 'write -z 4M 1M' \
    -c 'write -c -P 0x99 6M 64k' \
    -c 'write -P 0xcc 8M 128k' \
    -c 'discard 8M 64k' \
    base.qcow2

header "QEMU agrees: qemu-img check and qemu-io read back what qimg wrote"
setup qemu-img check base.qcow2
setup qemu-io -f qcow2 -r -c 'read -P 0xaa 0 1M' -c 'read -P 0x99 6M 64k' -c 'read -P 0 8M 64k' base.qcow2

header "Add a persistent dirty bitmap with qemu-img, and let QEMU record a write in it"
setup qemu-img bitmap --add base.qcow2 since-monday
setup qemu-io -f qcow2 -c 'write -P 0xdd 32M 64k' base.qcow2

header "Create an overlay backed by base.qcow2 with qimg and write to it"
qimg create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
qimg io \
    -c 'write -P 0xee 512k 64k' \
    -c 'write -z 1500000 4096' \
    overlay.qcow2

header "qimg info: the base image (with its bitmap)"
qimg info base.qcow2

header "qimg info --backing-chain --output=json: the overlay and its backing file"
qimg info --backing-chain --output=json overlay.qcow2

header "qimg map: where the overlay's guest data comes from (first 4 MiB; the human form cannot show compressed clusters)"
qimg map --max-length=4M overlay.qcow2

header "qimg map --output=json"
qimg map --output=json overlay.qcow2

header "qimg check"
qimg check base.qcow2
qimg check overlay.qcow2

header "qimg io: verify patterns (through the backing chain too)"
qimg io -c 'read -P 0xaa 0 512k' overlay.qcow2
qimg io -c 'read -P 0xee 512k 64k' overlay.qcow2
qimg io -c 'read -P 0xbb 1504096 295904' overlay.qcow2
qimg io -c 'read -P 0 4M 1M' overlay.qcow2

header "qimg resize: grow the overlay, then check it"
qimg resize overlay.qcow2 +64M
qimg check overlay.qcow2

header "qimg check -r leaks: a leaked cluster (made with a raw edit of a refcount) is repaired"
cp base.qcow2 leaky.qcow2
# Append one cluster to the file and give it refcount 1 in refcount block 0
# (at 0x20000, 16-bit entries): nothing references it, so it is leaked.
n=$(( ($(stat -c %s leaky.qcow2) + 65535) / 65536 ))
truncate -s $(( (n + 1) * 65536 )) leaky.qcow2
printf '\x00\x01' | dd of=leaky.qcow2 bs=1 seek=$((0x20000 + 2 * n)) conv=notrunc status=none
show qimg check leaky.qcow2
rc=0; "$QIMG" check leaky.qcow2 || rc=$?; echo "(exit $rc: 3 means leaks only)"
[ "$rc" -eq 3 ] || failed+=("check of the leaky image: expected exit 3, got $rc")
qimg check -r leaks leaky.qcow2

# ---------------------------------------------------------------------------
# The nightly cron job through a backup repository (Docs/backup.md): a simulated
# week. Each day the guest writes (qemu-io, as a VM would), the day's disk is
# saved aside with qemu-img convert (the oracle), and the cron line runs with
# --time set to that night. Day 4's run is killed mid-backup (SIGKILL); the
# next run recovers. Then a prune, verify, restores and qemu-img compare.
REPO=$DEMO/repo
LOG=$DEMO/backup.log
mkdir -p days
# Compare two images with QEMU's qemu-img compare; a difference fails the demo.
same() {
    show qemu-img compare "$1" "$2"
    if qemu-img compare -q "$1" "$2"; then
        echo "  identical: $3"
    else
        echo "  DIFFERENT: $3"
        failed+=("qemu-img compare $1 $2 ($3)")
    fi
}
# The cron line for night DAY (02:30 UTC, 2026-12-0DAY): one summary line goes to the log.
nightly() {
    qimg backup --repo "$REPO" --bitmap=nightly --full-every 7d --time "2026-12-0$1T02:30:00Z" --log "$LOG" vm.qcow2
    echo "  log: $(tail -n 1 "$LOG")"
}
# The guest's writes of day DAY.
guest_writes() {
    setup qemu-io -f qcow2 -c "write -P 0x$1$1 $(( $1 * 5 ))M 3M" -c "write -z $(( $1 * 7 ))M 256k" -c "discard $(( 40 + $1 ))M 512k" vm.qcow2
}

header "The backup repository: the disk vm.qcow2 (qemu-img create; 2 MiB of data written by qemu-io)"
setup qemu-img create -f qcow2 vm.qcow2 64M
setup qemu-io -f qcow2 -c 'write -P 0x11 0 2M' vm.qcow2
echo "The crontab line (cron's PATH is /usr/bin:/bin: qimg by its full path):"
echo "  30 2 * * * /usr/local/bin/qimg backup --repo /backup/repo --bitmap=nightly --full-every 7d --log /var/log/qimg-backup.log /var/lib/libvirt/images/vm.qcow2"
echo "Here: --repo $REPO, --log $LOG, and --time for each simulated night."

for day in 1 2 3; do
    header "Day $day: the guest writes, the disk is saved aside (days/day$day.qcow2), the nightly run"
    guest_writes "$day"
    setup qemu-img convert -O qcow2 vm.qcow2 "days/day$day.qcow2"
    nightly "$day"
done

header "Day 4: the guest writes; the nightly run is killed (SIGKILL) in the middle of its copy"
guest_writes 4
setup qemu-img convert -O qcow2 vm.qcow2 days/day4.qcow2
# QIMG_FAULTS (debug builds: Sources/QCow2/IO/FaultInjection.swift): the process kills
# itself with SIGKILL at its 6th write, i.e. inside the copy of the point.
show QIMG_FAULTS=write:6:kill qimg backup --repo "$REPO" --bitmap=nightly --full-every 7d --time 2026-12-04T02:30:00Z --log "$LOG" vm.qcow2
rc=0
QIMG_FAULTS=write:6:kill "$QIMG" backup --repo "$REPO" --bitmap=nightly --full-every 7d --time 2026-12-04T02:30:00Z --log "$LOG" vm.qcow2 || rc=$?
if [ "$rc" -eq 137 ]; then
    echo "(killed: exit $rc) What the killed run left in the chain's directory:"
    ls -1 "$REPO/vm.qcow2" | sed 's/^/  /'
else
    echo "(exit $rc: this qimg has no fault injection, a release build: the run was not killed)"
fi
qimg repo list "$REPO"

header "Day 4, later: the next run removes what the killed run left and takes the backup"
nightly 4

for day in 5 6 7; do
    header "Day $day: the guest writes, the disk is saved aside, the nightly run"
    guest_writes "$day"
    setup qemu-img convert -O qcow2 vm.qcow2 "days/day$day.qcow2"
    nightly "$day"
done

header "A busy repository: a second run while another holds the lock (flock) exits 3"
show flock "$REPO/.lock" qimg backup --repo "$REPO" --bitmap=nightly --lock-wait 0 vm.qcow2
rc=0
flock "$REPO/.lock" "$QIMG" backup --repo "$REPO" --bitmap=nightly --lock-wait 0 vm.qcow2 || rc=$?
echo "(exit $rc: 3 means the repository is locked by another run)"
[ "$rc" -eq 3 ] || failed+=("backup of a locked repository: expected exit 3, got $rc")

header "The week's restore points, and the log of the week"
qimg repo list "$REPO"
show cat "$LOG"
cat "$LOG"

header "Every point restores the disk as it was that day (qimg repo restore, qemu-img compare)"
for day in 1 2 3 4 5 6 7; do
    qimg repo restore "$REPO" --at "2026-12-0${day}T23:59:59Z" "restored-day$day.qcow2"
    same "days/day$day.qcow2" "restored-day$day.qcow2" "the newest point of day $day is that day's disk"
    rm -f "restored-day$day.qcow2"
done

header "Prune: keep the 3 newest points; the older ones are merged into them"
qimg repo prune "$REPO" --keep 3
qimg repo list "$REPO"

header "Verify: every file present and clean, every recorded SHA-256 matching"
qimg repo verify "$REPO"

header "Restore after the prune: day 5 (by time) and the newest point, each compared with QEMU"
qimg repo restore "$REPO" --at 2026-12-05T12:00:00Z day5-restored.qcow2
same days/day5.qcow2 day5-restored.qcow2 "the point of day 5, after the prune"
qimg repo restore "$REPO" -O raw newest.raw
same vm.qcow2 newest.raw "the newest point is the disk as it is now"
qimg check day5-restored.qcow2

header "qimg io: a wrong pattern fails with exit 1"
show qimg io -c 'read -P 0x42 0 4096' overlay.qcow2
rc=0
"$QIMG" io -c 'read -P 0x42 0 4096' overlay.qcow2 || rc=$?
echo "(exit $rc)"
[ "$rc" -eq 1 ] || failed+=("wrong-pattern read: expected exit 1, got $rc")

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "demo: ${#failed[@]} command(s) failed:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "demo: all commands succeeded (images are in ./demo/)"
