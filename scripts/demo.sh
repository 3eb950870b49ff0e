#!/usr/bin/env bash
# qimg demo: build a small qcow2 chain with qimg, let QEMU's tools confirm
# what qimg wrote, and inspect and repair it with qimg. Everything is
# written to ./demo/.
#
#   scripts/demo.sh            uses .build/debug/qimg (run `make build` first)
#   QIMG=/path/to/qimg scripts/demo.sh
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
QIMG=${QIMG:-.build/debug/qimg}
case $QIMG in /*) ;; *) QIMG=$ROOT/$QIMG ;; esac
if [ ! -x "$QIMG" ]; then
    echo "demo: qimg not found at $QIMG (run 'make build' first)" >&2
    exit 1
fi
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "demo: $tool not found (run 'make deps')" >&2; exit 1; }
done

DEMO=$ROOT/demo
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

header "The nightly backup job: a full backup with a bitmap, then incremental backups"
mkdir -p backups
qimg backup --sync=full --bitmap=nightly base.qcow2 backups/0-full.qcow2
prev=backups/0-full.qcow2
for day in 1 2 3; do
    header "Day $day: the VM writes, then the incremental backup copies only what changed"
    qimg io -c "write -P 0x1$day $((day * 3))M 200k" -c "write -z $((day * 5))M 64k" -c "discard $((20 + day))M 1M" base.qcow2
    qimg bitmap --dump base.qcow2 nightly
    qimg backup --sync=incremental --bitmap=nightly -b "$(basename "$prev")" -F qcow2 base.qcow2 "backups/$day-inc.qcow2"
    show qemu-img map --output=json "backups/$day-inc.qcow2" "| grep depth 0  (what this backup holds)"
    qemu-img map --output=json "backups/$day-inc.qcow2" | grep '"depth": 0' || true
    prev=backups/$day-inc.qcow2
done

header "Restore the newest backup (the whole chain) into one image, and verify it"
qimg convert -O qcow2 backups/3-inc.qcow2 restored.qcow2
qimg compare base.qcow2 restored.qcow2
qimg check restored.qcow2
qimg info --backing-chain backups/3-inc.qcow2

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
