#!/usr/bin/env python3
"""Malformed image files that a qcow2 reader must reject cleanly.

    python3 Fixtures/malformed.py OUTDIR

Starts from one small qemu-img-created image (4 KiB clusters, 1 MiB disk,
two data clusters and one compressed cluster) and patches bytes.  Every file
is < 200 KiB.  Writes OUTDIR/malformed.tsv:

    NAME<TAB>FORMAT_OPTION<TAB>QEMU_INFO_EXIT<TAB>description

FORMAT_OPTION is `qcow2` (open with an explicit qcow2 format) or `auto`
(format probing).  QEMU_INFO_EXIT is the exit status of
`qemu-img info [-f qcow2] NAME` run in OUTDIR under a 5 s CPU-time limit
(prlimit; 124 = hang: over the limit, 128+N = killed by signal N).  A CPU-time
limit, not a wall-clock one, so that a loaded machine cannot turn a slow run
into a "hang".  Plain `qemu-img info` does not open backing
files, so for the backing cases the description also records the exit status
of `qemu-img info --backing-chain`.
"""
import os
import random
import signal
import struct
import subprocess
import sys

MAGIC = b"QFI\xfb"
EXT_END = 0x00000000
EXT_BACKING_FMT = 0xE2792ACA
EXT_FEATURES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77

# header field offsets / struct formats
F = {
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}


def get(buf, name):
    off, fmt = F[name]
    return struct.unpack_from(fmt, buf, off)[0]


def put(buf, name, value):
    off, fmt = F[name]
    struct.pack_into(fmt, buf, off, value)


def ext(etype, data):
    pad = (-len(data)) % 8
    return struct.pack(">II", etype, len(data)) + data + bytes(pad)


def parse_exts(buf):
    """Extensions of a well-formed v3 header as a list of (type, data)."""
    off = get(buf, "header_length")
    out = []
    while True:
        t, n = struct.unpack_from(">II", buf, off)
        if t == EXT_END:
            return out
        out.append((t, bytes(buf[off + 8:off + 8 + n])))
        off += 8 + n + ((-n) % 8)


class Base:
    def __init__(self, data):
        self.data = bytes(data)
        self.cs = 1 << get(self.data, "cluster_bits")
        self.exts = parse_exts(self.data)

    def copy(self):
        return bytearray(self.data)

    def rebuild(self, buf, exts=None, backing=None, backing_fmt=None, end=True,
                raw_tail=b""):
        """Rewrite cluster 0 of buf: header, extensions, end marker, backing name."""
        exts = list(self.exts if exts is None else exts)
        if backing_fmt is not None:
            exts.insert(0, (EXT_BACKING_FMT, backing_fmt.encode()))
        hl = get(buf, "header_length")
        area = b"".join(ext(t, d) for t, d in exts)
        if end:
            area += bytes(8)
        area += raw_tail
        name_off = hl + len(area)
        if backing is not None:
            name = backing.encode()
            area += name
            put(buf, "backing_file_offset", name_off)
            put(buf, "backing_file_size", len(name))
        else:
            put(buf, "backing_file_offset", 0)
            put(buf, "backing_file_size", 0)
        assert hl + len(area) <= self.cs, "cluster 0 overflow"
        buf[hl:self.cs] = area + bytes(self.cs - hl - len(area))
        return buf


def main():
    if len(sys.argv) != 2:
        print("usage: malformed.py OUTDIR", file=sys.stderr)
        sys.exit(2)
    out = os.path.abspath(sys.argv[1])
    os.makedirs(out, exist_ok=True)

    tmp = os.path.join(out, ".malformed-base.qcow2")
    # layout (4 KiB clusters): 0 header, 0x1000 reftable, 0x2000 refblock,
    # 0x3000 L1, 0x4000 L2, 0x5000/0x6000 data, 0x7000 compressed stream
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    tmp, "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8k",
                    "-c", "write -c -P 0x6b 64k 4k", tmp],
                   check=True, stdout=subprocess.DEVNULL)
    with open(tmp, "rb") as f:
        base = Base(f.read())
    os.unlink(tmp)
    # a fresh 64 KiB-cluster image (196624 bytes) for the long-backing-name case
    tmp64 = os.path.join(out, ".malformed-base64.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp64, "1M"], check=True)
    with open(tmp64, "rb") as f:
        base64 = Base(f.read())
    os.unlink(tmp64)

    cs = base.cs
    l1_off = get(base.data, "l1_table_offset")
    l2_off = struct.unpack_from(">Q", base.data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    assert l2_off, "base image has no L2 table"
    comp_idx = (64 * 1024) // cs
    comp_entry = struct.unpack_from(">Q", base.data, l2_off + 8 * comp_idx)[0]
    assert comp_entry & (1 << 62), "expected a compressed L2 entry"

    cases = []  # (name, fmt, description, bytes, backing_case)

    def case(name, fmt, desc, buf, backing_case=False):
        assert len(buf) < 200 * 1024, name
        cases.append((name, fmt, desc, bytes(buf), backing_case))

    def hdr(**fields):
        b = base.copy()
        for k, v in fields.items():
            put(b, k, v)
        return b

    # ---------------------------------------------------- basic header --
    case("empty.qcow2", "qcow2", "empty file", b"")
    case("truncated-header.qcow2", "qcow2", "file ends at byte 50, inside the header",
         base.data[:50])
    b = base.copy(); b[3] = 0xFA
    case("bad-magic.qcow2", "qcow2", "magic QFI\\xfa instead of QFI\\xfb", b)
    case("version1.qcow2", "qcow2", "version 1", hdr(version=1))
    case("version4.qcow2", "qcow2", "version 4", hdr(version=4))
    case("cluster-bits-8.qcow2", "qcow2", "cluster_bits 8 (256 B clusters, below minimum 9)",
         hdr(cluster_bits=8))
    case("cluster-bits-22.qcow2", "qcow2", "cluster_bits 22 (4 MiB, above maximum 21)",
         hdr(cluster_bits=22))
    case("cluster-bits-63.qcow2", "qcow2", "cluster_bits 63 (shift overflow bait)",
         hdr(cluster_bits=63))
    case("size-huge.qcow2", "qcow2", "virtual size 2^63-512 with l1_size 1",
         hdr(size=(1 << 63) - 512))
    case("l1-size-huge.qcow2", "qcow2", "l1_size 0x7fffffff (16 GiB L1 table)",
         hdr(l1_size=0x7FFFFFFF))
    case("l1-size-zero.qcow2", "qcow2", "l1_size 0 for a 1 MiB disk (L1 too small)",
         hdr(l1_size=0))
    case("l1-offset-unaligned.qcow2", "qcow2", "l1_table_offset 0x3200 (not cluster-aligned)",
         hdr(l1_table_offset=l1_off + 0x200))
    case("l1-offset-past-eof.qcow2", "qcow2", "l1_table_offset 1 TiB (past EOF), l1_size 1",
         hdr(l1_table_offset=1 << 40))
    case("refcount-table-clusters-0.qcow2", "qcow2", "refcount_table_clusters 0",
         hdr(refcount_table_clusters=0))
    case("refcount-table-offset-unaligned.qcow2", "qcow2",
         "refcount_table_offset 0x1200 (not cluster-aligned)",
         hdr(refcount_table_offset=get(base.data, "refcount_table_offset") + 0x200))
    case("refcount-order-7.qcow2", "qcow2", "refcount_order 7 (128-bit refcounts)",
         hdr(refcount_order=7))
    case("header-length-100.qcow2", "qcow2", "header_length 100 (< 104)",
         hdr(header_length=100))
    case("header-length-108.qcow2", "qcow2", "header_length 108 (not a multiple of 8)",
         hdr(header_length=108))

    # -------------------------------------------------------- extensions --
    b = base.copy()
    hl = get(b, "header_length")
    # unknown extension claiming 64 KiB of data, starting inside a 4 KiB cluster 0
    b[hl:cs] = struct.pack(">II", 0x12345678, 0x10000) + bytes(cs - hl - 8)
    case("ext-too-long.qcow2", "qcow2",
         "unknown extension len 0x10000 runs past the end of cluster 0", b)
    b = base.copy()
    # one unknown extension that fills cluster 0 exactly; no end marker follows
    n = cs - hl - 8
    b[hl:cs] = struct.pack(">II", 0x12345678, n) + bytes([0x55]) * n
    case("ext-no-end.qcow2", "qcow2",
         "extension list fills cluster 0 with no end marker", b)
    case("incompat-bit5.qcow2", "qcow2", "unknown incompatible feature bit 5",
         hdr(incompatible_features=1 << 5))
    b = hdr(incompatible_features=1 << 5)
    named = bytes([0, 5]) + b"frobnicated clusters".ljust(46, b"\0")
    exts = [(t, d) for t, d in base.exts if t != EXT_FEATURES] + [(EXT_FEATURES, named)]
    case("incompat-bit5-named.qcow2", "qcow2",
         "incompatible bit 5 set, named 'frobnicated clusters' in the feature name table",
         base.rebuild(b, exts=exts))
    case("compression-type-2.qcow2", "qcow2",
         "compression_type 2 with incompatible bit 3 set",
         hdr(compression_type=2, incompatible_features=1 << 3))
    case("compression-type-1-no-bit.qcow2", "qcow2",
         "compression_type 1 (zstd) without incompatible bit 3", hdr(compression_type=1))

    # ---------------------------------------------------------- backing --
    b = base64.copy()
    put(b, "backing_file_offset", 0x300)
    put(b, "backing_file_size", 4096)
    b[0x300:0x1300] = b"a" * 4096
    case("backing-size-4096.qcow2", "qcow2",
         "backing_file_size 4096 (> 1023), name fully inside cluster 0 (64 KiB clusters)", b)
    b = base.copy()
    put(b, "backing_file_offset", 2 * cs + 0x100)   # inside the refcount block cluster
    put(b, "backing_file_size", 8)
    case("backing-outside-cluster0.qcow2", "qcow2",
         "backing_file_offset 0x2100 (outside cluster 0), size 8", b)
    case("loop-a.qcow2", "auto", "backing chain loop loop-a -> loop-b -> loop-a",
         base.rebuild(base.copy(), backing="loop-b.qcow2", backing_fmt="qcow2"), True)
    case("loop-b.qcow2", "qcow2", "backing chain loop loop-b -> loop-a -> loop-b",
         base.rebuild(base.copy(), backing="loop-a.qcow2", backing_fmt="qcow2"), True)
    case("self.qcow2", "auto", "backing file is itself ('self.qcow2')",
         base.rebuild(base.copy(), backing="self.qcow2", backing_fmt="qcow2"), True)
    case("self2.qcow2", "qcow2", "backing file is itself ('./self2.qcow2')",
         base.rebuild(base.copy(), backing="./self2.qcow2", backing_fmt="qcow2"), True)
    case("missing-backing.qcow2", "auto", "backing file 'does-not-exist.qcow2' is missing",
         base.rebuild(base.copy(), backing="does-not-exist.qcow2", backing_fmt="qcow2"), True)

    # ------------------------------------------------ encryption / data file --
    case("crypt-luks-no-fde.qcow2", "qcow2",
         "crypt_method 2 (LUKS) without the FDE header extension", hdr(crypt_method=2))
    case("crypt-aes.qcow2", "qcow2", "crypt_method 1 (legacy AES-CBC)", hdr(crypt_method=1))
    case("external-data-bit.qcow2", "qcow2",
         "incompatible bit 2 (external data file) without a data file name extension",
         hdr(incompatible_features=1 << 2))

    # ------------------------------------------------------ L1/L2 targets --
    b = base.copy()
    cb = get(b, "cluster_bits")
    x = 70 - cb                                      # offset bits below x, nsec above
    bad = (1 << 62) | (3 << x) | (1 << 40)           # byte offset 1 TiB, nsec 3
    struct.pack_into(">Q", b, l2_off + 8 * comp_idx, bad)
    case("compressed-past-eof.qcow2", "qcow2",
         "compressed L2 descriptor for guest 64 KiB points 1 TiB past EOF "
         "(open succeeds; reading that cluster must fail)", b)
    b = base.copy()
    struct.pack_into(">Q", b, l1_off, (1 << 63) | (1 << 40))
    case("l2-past-eof.qcow2", "qcow2",
         "L1[0] points to an L2 table 1 TiB past EOF (open may succeed; reads must fail)", b)

    # ---------------------------------------------------------- snapshots --
    case("snapshots-past-eof.qcow2", "qcow2",
         "nb_snapshots 1, snapshots_offset 1 GiB (past EOF)",
         hdr(nb_snapshots=1, snapshots_offset=1 << 30))
    case("snapshots-huge.qcow2", "qcow2", "nb_snapshots 0xffffffff, snapshots_offset 0x7000",
         hdr(nb_snapshots=0xFFFFFFFF, snapshots_offset=0x7000))

    # ------------------------------------------------------------ bitmaps --
    def bitmaps(payload):
        b = hdr(autoclear_features=1)
        return base.rebuild(b, exts=base.exts + [(EXT_BITMAPS, payload)])

    case("bitmaps-ext-len23.qcow2", "qcow2", "bitmaps extension with length 23 (must be 24)",
         bitmaps(struct.pack(">IIQQ", 1, 0, 32, 0x8000)[:23]))
    case("bitmaps-zero.qcow2", "qcow2", "bitmaps extension with nb_bitmaps 0",
         bitmaps(struct.pack(">IIQQ", 0, 0, 32, 0x8000)))
    case("bitmap-dir-past-eof.qcow2", "qcow2",
         "bitmaps extension: 1 bitmap, directory (32 B) at 1 GiB, past EOF",
         bitmaps(struct.pack(">IIQQ", 1, 0, 32, 1 << 30)))

    # ------------------------------------------------------------ garbage --
    rng = random.Random(20240601)
    case("garbage.qcow2", "auto", "qcow2 magic followed by 4092 seeded random bytes",
         MAGIC + bytes(rng.getrandbits(8) for _ in range(4092)))

    # ------------------------------------------------------------- write --
    for name, _, _, data, _ in cases:
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)

    def qemu_info(name, fmt, chain=False):
        cmd = ["prlimit", "--cpu=5:6", "--core=0", "--", "qemu-img", "info"]
        if chain:
            cmd.append("--backing-chain")
        if fmt == "qcow2":
            cmd += ["-f", "qcow2"]
        cmd.append(name)
        r = subprocess.run(cmd, cwd=out, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        rc = r.returncode
        if rc in (-signal.SIGXCPU, -signal.SIGKILL):
            return 124  # over the CPU-time limit: a hang, as timeout(1) reports it
        return 128 - rc if rc < 0 else rc

    lines = []
    for name, fmt, desc, data, backing_case in cases:
        rc = qemu_info(name, fmt)
        if backing_case:
            desc += "; info --backing-chain exits %d" % qemu_info(name, fmt, chain=True)
        # the file must not have been modified by QEMU
        with open(os.path.join(out, name), "rb") as f:
            if f.read() != data:
                desc += " [qemu-img info modified the file]"
        lines.append("%s\t%s\t%d\t%s\n" % (name, fmt, rc, desc))
    with open(os.path.join(out, "malformed.tsv"), "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
