#!/usr/bin/env bash
# Generate valid reference images for qimg's test suite, using qemu-img and
# qemu-io only (plus coreutils/openssl to build deterministic source content).
#
#   Fixtures/generate.sh OUTDIR
#
# Writes the images into OUTDIR, plus
#   OUTDIR/manifest.tsv   NAME<TAB>FORMAT  (qcow2|raw), NAME relative to OUTDIR
#   OUTDIR/commands.txt   every command that was run, grouped per image
# and fails unless `qemu-img check` is clean (exit 0) on every qcow2 file.
# Apart from snapshot timestamps and the absolute backing path of
# chain2-top.qcow2 (which contains OUTDIR) the output is deterministic.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$OUT"
export LC_ALL=C

: > manifest.tsv
: > commands.txt
WORK="$OUT/.work"
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
trap 'echo "generate.sh: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------- helpers --
# Quote one argument for the command log (single quotes only when needed).
quote() {
    case $1 in
        *[!A-Za-z0-9_./=,:+@%-]* | '') printf "'%s'" "${1//\'/\'\\\'\'}" ;;
        *) printf '%s' "$1" ;;
    esac
}
# Log a command (paths shown relative to OUTDIR) and run it quietly.
X() {
    local a line=""
    for a in "$@"; do line+="$(quote "${a//$WORK/\$WORK}") "; done
    printf '%s\n' "${line% }" >> "$OUT/commands.txt"
    "$@" > /dev/null
}
section() { printf '\n## %s\n' "$1" >> "$OUT/commands.txt"; }
add()     { printf '%s\t%s\n' "$1" "$2" >> "$OUT/manifest.tsv"; }
# io IMG 'cmd' 'cmd' ...  -> qemu-io -f qcow2 -c 'cmd' ... IMG
io() {
    local img=$1; shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    X qemu-io -f qcow2 "${args[@]}" "$img"
}
ioraw() {
    local img=$1; shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    X qemu-io -f raw "${args[@]}" "$img"
}
# Standard mixed write set for a cluster size CS on a disk of SIZE bytes:
# aligned and unaligned pattern writes crossing cluster boundaries, a
# one-byte write, an overwrite inside an allocated cluster, write -z on an
# unallocated range, write -z over allocated data (keeps the host cluster on
# v3 = zero cluster with preallocated offset), a partial write -z inside an
# allocated cluster, a discard, and a write ending exactly at the disk end.
std_writes() {
    local img=$1 cs=$2 size=$3
    io "$img" \
        "write -P 0xa1 0 $((cs * 2))" \
        "write -P 0xb2 $((cs * 3 - cs / 4 + 13)) $((cs / 2 + 100))" \
        "write -P 0xc3 $((cs * 5 + 1)) 1" \
        "write -P 0xd4 $((cs * 6 + 511)) $((cs * 3 + 2))" \
        "write -P 0xe5 $((cs + 100)) 200" \
        "write -z $((cs * 10)) $((cs * 2))" \
        "write -P 0xf6 $((cs * 12)) $((cs * 3))" \
        "write -z $((cs * 12)) $cs" \
        "write -z $((cs * 13 + 100)) 300" \
        "discard $((cs * 14)) $cs" \
        "write -P 0x17 $((size - cs / 2 - 7)) $((cs / 2 + 7))"
}

# ------------------------------------------------- deterministic sources --
# text.pat: ~28 KB of decimal numbers (compressible); noise.pat: 256 KiB of
# AES-CTR keystream with a fixed key (incompressible, but reproducible).
section "source patterns (temporary, in \$WORK; used with qemu-io write -s)"
seq 1 6000 > "$WORK/text.pat"
head -c 262144 /dev/zero \
    | openssl enc -aes-128-ctr -K 00112233445566778899aabbccddeeff \
        -iv 00000000000000000000000000000000 > "$WORK/noise.pat"
cat >> commands.txt <<'EOF_LOG'
seq 1 6000 > $WORK/text.pat
head -c 262144 /dev/zero | openssl enc -aes-128-ctr -K 00112233445566778899aabbccddeeff -iv 00000000000000000000000000000000 > $WORK/noise.pat
EOF_LOG

# =========================================================== base formats ==
section "plain.raw  (raw, sparse, 4 MiB)"
X qemu-img create -q -f raw plain.raw 4M
ioraw plain.raw "write -P 0x11 0 65536" "write -P 0x22 70000 5000" \
    "write -P 0x33 1048575 2" "write -P 0x44 4193304 1000"
add plain.raw raw

section "v2.qcow2  (compat=0.10, 64 KiB clusters, 16 MiB)"
X qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 16M
std_writes v2.qcow2 65536 $((16 << 20))
add v2.qcow2 qcow2

# Cluster sizes (all compat=1.1)
for spec in c512:512:64M c4k:4096:64M c64k:65536:16M; do
    IFS=: read -r name cs size <<< "$spec"
    section "$name.qcow2  (compat=1.1, cluster_size=$cs, $size)"
    X qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=$cs "$name.qcow2" "$size"
    std_writes "$name.qcow2" "$cs" $(( ${size%M} << 20 ))
    case $name in
        # a long write spanning many L2 tables (64 entries = 32 KiB each)
        c512) io c512.qcow2 "write -P 0x5c 1000000 300000" ;;
        # one write crossing an L2 table boundary (512 entries = 2 MiB)
        c4k) io c4k.qcow2 "write -P 0x4c $((2 * 1048576 - 3000)) 6000" ;;
    esac
    add "$name.qcow2" qcow2
done

section "c2m.qcow2  (cluster_size=2M, 64 MiB)"
X qemu-img create -q -f qcow2 -o cluster_size=2M c2m.qcow2 64M
io c2m.qcow2 \
    "write -P 0x21 1000 5000" \
    "write -P 0x22 $((2097152 - 777)) 3000" \
    "write -P 0x23 $((2097152 + 100)) 200" \
    "write -z $((8 << 20)) 2M" \
    "write -P 0x24 $((20 << 20)) 1000" \
    "write -z $((20 << 20)) 2M" \
    "write -P 0x25 $((64 * 1048576 - 4097)) 4097"
add c2m.qcow2 qcow2

# ========================================================= refcount widths ==
for rb in 1 2 4 8 16 32 64; do
    section "rb$rb.qcow2  (refcount_bits=$rb, cluster_size=4k, 16 MiB)"
    X qemu-img create -q -f qcow2 -o refcount_bits=$rb,cluster_size=4096 "rb$rb.qcow2" 16M
    std_writes "rb$rb.qcow2" 4096 $((16 << 20))
    io "rb$rb.qcow2" "write -P 0x$((rb + 10)) 300000 700000"
    add "rb$rb.qcow2" qcow2
done
section "rb64-c512.qcow2  (refcount_bits=64, 512 B clusters: many refcount blocks, refcount table grows past 1 cluster)"
X qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=512 rb64-c512.qcow2 16M
io rb64-c512.qcow2 "write -P 0x64 12345 2500000" "write -z 3000000 4096" "discard 100352 8192"
add rb64-c512.qcow2 qcow2

# ============================================================ extended L2 ==
section "xl2.qcow2  (extended_l2=on, 64 KiB clusters = 32 x 2 KiB subclusters, 16 MiB)"
X qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k xl2.qcow2 16M
io xl2.qcow2 \
    "write -P 0x11 0 4k" \
    "write -P 0x12 62k 2k" \
    "write -P 0x13 5000 1000" \
    "write -P 0x14 70000 3000" \
    "write -z 128k 64k" \
    "write -z 200k 4k" \
    "write -P 0x15 320k 64k" \
    "write -z 320k 2k" \
    "write -z 330000 1000" \
    "write -P 0x16 400k 10k" \
    "write -z 402k 2k" \
    "write -P 0x18 448k 64k" \
    "discard 448k 64k" \
    "write -z 600000 100" \
    "write -P 0x17 $((16 * 1048576 - 3000)) 3000"
add xl2.qcow2 qcow2

section "xl2-c16k.qcow2  (extended_l2=on, 16 KiB clusters = 32 x 512 B subclusters, 8 MiB)"
X qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k xl2-c16k.qcow2 8M
std_writes xl2-c16k.qcow2 16384 $((8 << 20))
io xl2-c16k.qcow2 "write -P 0x31 $((16384 * 20 + 700)) 300" "write -z $((16384 * 20 + 1024)) 1024" \
    "write -P 0x32 $((16384 * 21 + 511)) 2"
add xl2-c16k.qcow2 qcow2

section "xl2-base.qcow2 + xl2-top.qcow2  (standard base, extended-L2 overlay: partial subclusters over backing data)"
X qemu-img create -q -f qcow2 xl2-base.qcow2 4M
io xl2-base.qcow2 "write -P 0x99 0 1M" "write -P 0x98 3M 256k"
X qemu-img create -q -f qcow2 -o extended_l2=on -b xl2-base.qcow2 -F qcow2 xl2-top.qcow2 4M
io xl2-top.qcow2 \
    "write -P 0x41 3000 1000" \
    "write -z 68k 2k" \
    "write -P 0x42 130000 70000" \
    "write -z 512k 64k" \
    "discard 1M 64k" \
    "write -P 0x43 $((3 * 1048576 - 1000)) 3000"
add xl2-base.qcow2 qcow2
add xl2-top.qcow2 qcow2

# ============================================================ compression ==
section "comp-src.raw  (raw source for the compressed images: text, noise, patterns, zeros; 6 MiB + 1536 B)"
X qemu-img create -q -f raw comp-src.raw 6293504
ioraw comp-src.raw \
    "write -s $WORK/text.pat 0 1M" \
    "write -s $WORK/noise.pat 1M 256k" \
    "write -P 0x5a 1572864 300000" \
    "write -s $WORK/text.pat 3000000 1500000" \
    "write -s $WORK/noise.pat 5000000 70000" \
    "write -P 0x77 $((6293504 - 5000)) 5000"
add comp-src.raw raw

for spec in zlib:zlib:64k zstd:zstd:64k zlib-c512:zlib:512 zstd-c512:zstd:512 zlib-c2m:zlib:2M; do
    IFS=: read -r name ct cs <<< "$spec"
    section "$name.qcow2  (qemu-img convert -c, compression_type=$ct, cluster_size=$cs)"
    X qemu-img convert -c -f raw -O qcow2 -o cluster_size=$cs,compression_type=$ct comp-src.raw "$name.qcow2"
    add "$name.qcow2" qcow2
done

section "comp-rw.qcow2  (compressed image, then partial overwrite of compressed clusters, write -c, write -z, discard)"
X qemu-img convert -c -f raw -O qcow2 comp-src.raw comp-rw.qcow2
io comp-rw.qcow2 \
    "write -P 0x61 100000 1000" \
    "write -z 3M 64k" \
    "write -z 3200000 500" \
    "discard 4M 64k" \
    "write -c -P 0x62 2M 64k" \
    "write -P 0x63 $((6293504 - 100)) 100"
add comp-rw.qcow2 qcow2

section "eof-compressed.qcow2  (write -c only: file ends unaligned inside the last compressed stream's sector/cluster)"
X qemu-img create -q -f qcow2 eof-compressed.qcow2 1M
io eof-compressed.qcow2 \
    "write -c -P 0x71 64k 64k" \
    "write -c -s $WORK/text.pat 0 64k" \
    "write -c -s $WORK/text.pat 192k 64k"
add eof-compressed.qcow2 qcow2

# ================================================== zero clusters / EOF ==
section "zero.qcow2  (v3 zero clusters: plain, with preallocated offset, unmapped, partial; discard)"
X qemu-img create -q -f qcow2 zero.qcow2 4M
io zero.qcow2 \
    "write -P 0x11 0 320k" \
    "write -z 0 64k" \
    "write -z -u 64k 64k" \
    "write -z 130000 1000" \
    "discard 192k 64k" \
    "write -z 1M 128k" \
    "write -z 2M 1000"
add zero.qcow2 qcow2

section "oddsize.qcow2  (virtual size 100000 -> rounded to 100352, last cluster partial)"
X qemu-img create -q -f qcow2 oddsize.qcow2 100000
io oddsize.qcow2 "write -P 0x0d 65000 35352"
add oddsize.qcow2 qcow2

section "eof-tail.qcow2  (last data cluster partially beyond EOF: file cut inside it with a raw-mode resize)"
X qemu-img create -q -f qcow2 eof-tail.qcow2 1M
io eof-tail.qcow2 "write -P 0xe1 0 64k" "write -P 0xe2 64k 1000"
# header, reftable, refblock, L1, L2, data0 = clusters 0..5; data1 = 0x60000
X qemu-img resize -q -f raw --shrink eof-tail.qcow2 $((0x60000 + 1000))
add eof-tail.qcow2 qcow2

# ========================================================= backing chains ==
section "chain2-base.qcow2 + chain2-top.qcow2  (2-deep, ABSOLUTE backing path, backing_fmt=qcow2)"
X qemu-img create -q -f qcow2 chain2-base.qcow2 8M
io chain2-base.qcow2 "write -P 0xb1 0 1M" "write -P 0xb2 3000000 700000" "write -P 0xb3 $((8 * 1048576 - 65536)) 65536"
X qemu-img create -q -f qcow2 -b "$OUT/chain2-base.qcow2" -F qcow2 chain2-top.qcow2
io chain2-top.qcow2 \
    "write -P 0xc1 1000 2000" \
    "write -P 0xc2 $((65536 - 300)) 600" \
    "write -z 256k 64k" \
    "write -z 300000 100" \
    "discard 512k 64k" \
    "write -P 0xc3 3100000 10"
add chain2-base.qcow2 qcow2
add chain2-top.qcow2 qcow2

section "rel/base.raw <- rel/mid/mid.qcow2 <- rel/top.qcow2  (3-deep, RELATIVE paths, raw base)"
mkdir -p rel/mid
X qemu-img create -q -f raw rel/base.raw 4M
ioraw rel/base.raw "write -P 0xa0 0 1M" "write -P 0xa5 3M 512k"
# mid's backing '../base.raw' resolves against rel/mid/, not the cwd
X qemu-img create -q -f qcow2 -b ../base.raw -F raw rel/mid/mid.qcow2 4M
io rel/mid/mid.qcow2 "write -P 0xa1 64k 128k" "write -P 0xa2 500000 3000" "write -z 1M 64k"
# top's backing 'mid/mid.qcow2' resolves against rel/
X qemu-img create -q -f qcow2 -b mid/mid.qcow2 -F qcow2 rel/top.qcow2 4M
io rel/top.qcow2 \
    "write -P 0xa3 100000 1000" \
    "write -P 0xa4 499000 2000" \
    "write -z 2M 64k" \
    "discard 3M 64k"
add rel/base.raw raw
add rel/mid/mid.qcow2 qcow2
add rel/top.qcow2 qcow2

section "short-base.raw + short-top.qcow2  (raw backing 700 KiB, overlay 4 MiB: reads past the backing end)"
X qemu-img create -q -f raw short-base.raw 700k
ioraw short-base.raw "write -P 0x51 0 700k"
X qemu-img create -q -f qcow2 -b short-base.raw -F raw short-top.qcow2 4M
io short-top.qcow2 "write -P 0x52 680k 64k" "write -P 0x53 100 100" "write -P 0x54 2M 1000"
add short-base.raw raw
add short-top.qcow2 qcow2

section "shortq-base.qcow2 + shortq-top.qcow2  (qcow2 backing of 1000000 B -> 1000448 B, overlay 2 MiB)"
X qemu-img create -q -f qcow2 shortq-base.qcow2 1000000
io shortq-base.qcow2 "write -P 0x61 0 1000448"
X qemu-img create -q -f qcow2 -b shortq-base.qcow2 -F qcow2 shortq-top.qcow2 2M
io shortq-top.qcow2 "write -P 0x62 990000 20000" "write -P 0x63 1500000 1000"
add shortq-base.qcow2 qcow2
add shortq-top.qcow2 qcow2

section "v2-top.qcow2  (compat=0.10 overlay of v2.qcow2: no zero flag, write -z writes zeros)"
X qemu-img create -q -f qcow2 -o compat=0.10 -b v2.qcow2 -F qcow2 v2-top.qcow2
io v2-top.qcow2 "write -P 0x71 100 1000" "write -z 0 64k" "write -z 20000 100" "discard 128k 64k" \
    "write -P 0x72 $((16 * 1048576 - 70000)) 70000"
add v2-top.qcow2 qcow2

# ============================================== snapshots / bitmaps / misc ==
section "snap.qcow2  (two internal snapshots; writes after each -> shared and unshared clusters)"
X qemu-img create -q -f qcow2 snap.qcow2 16M
io snap.qcow2 "write -P 0x11 0 200k" "write -P 0x12 $((1048576 + 100)) 70000" "write -P 0x13 4M 64k"
X qemu-img snapshot -c s1 snap.qcow2
io snap.qcow2 "write -P 0x21 50000 30000" "write -z 1M 64k" "discard 128k 64k" "write -P 0x22 8M 64k"
X qemu-img snapshot -c s2 snap.qcow2
io snap.qcow2 "write -P 0x31 0 1000" "write -P 0x32 8M 100"
add snap.qcow2 qcow2

section "snap-rb2.qcow2  (refcount_bits=2 with a snapshot: refcount 2 in 2-bit entries)"
X qemu-img create -q -f qcow2 -o refcount_bits=2,cluster_size=4k snap-rb2.qcow2 4M
io snap-rb2.qcow2 "write -P 0x41 0 40000" "write -P 0x42 1M 8k"
X qemu-img snapshot -c base snap-rb2.qcow2
io snap-rb2.qcow2 "write -P 0x43 5000 5000" "write -P 0x44 2M 4k"
add snap-rb2.qcow2 qcow2

section "bitmaps.qcow2  (persistent bitmaps: 'enabled' (auto), 'frozen' (-g 4k, disabled after first writes), 'off' (--add --disable))"
X qemu-img create -q -f qcow2 bitmaps.qcow2 16M
X qemu-img bitmap --add bitmaps.qcow2 enabled
X qemu-img bitmap --add -g 4096 bitmaps.qcow2 frozen
X qemu-img bitmap --add --disable bitmaps.qcow2 off
io bitmaps.qcow2 "write -P 0x11 0 100k" "write -P 0x12 $((3 * 1048576 + 5)) 5000"
X qemu-img bitmap --disable bitmaps.qcow2 frozen
io bitmaps.qcow2 "write -P 0x13 8M 64k" "write -z 10M 64k" "write -P 0x14 $((16 * 1048576 - 512)) 512"
add bitmaps.qcow2 qcow2

section "lazy.qcow2  (lazy_refcounts=on, cleanly closed)"
X qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 8M
std_writes lazy.qcow2 65536 $((8 << 20))
add lazy.qcow2 qcow2

section "prealloc-metadata.qcow2  (preallocation=metadata, 8 MiB, then some writes)"
X qemu-img create -q -f qcow2 -o preallocation=metadata prealloc-metadata.qcow2 8M
io prealloc-metadata.qcow2 "write -P 0x81 1000 100000" "write -z 1M 64k" "write -P 0x82 $((8 * 1048576 - 10)) 10"
add prealloc-metadata.qcow2 qcow2

section "prealloc-full.qcow2  (preallocation=full, 2 MiB, then some writes)"
X qemu-img create -q -f qcow2 -o preallocation=full prealloc-full.qcow2 2M
io prealloc-full.qcow2 "write -P 0x91 70000 5000" "write -z 512k 64k"
add prealloc-full.qcow2 qcow2

# ================================================================= check ==
# Every qcow2 file this script creates is listed in the manifest (backing
# files included), so only those are checked; other files in OUTDIR (e.g. from
# corrupt.py / malformed.py) are left alone.
section "check: qemu-img check -f qcow2 on every qcow2 in manifest.tsv must exit 0"
fail=0
while IFS=$'\t' read -r f fmt; do
    [ "$fmt" = qcow2 ] || continue
    if ! msg=$(qemu-img check -f qcow2 "$f" 2>&1); then
        echo "generate.sh: qemu-img check failed on $f:" >&2
        echo "$msg" >&2
        fail=1
    fi
done < manifest.tsv
[ "$fail" -eq 0 ]
echo "qemu-img check -f qcow2 NAME   # for every qcow2 line of manifest.tsv; all must exit 0" >> commands.txt
