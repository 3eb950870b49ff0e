#!/usr/bin/env python3
"""Crafted metadata corruptions for qimg's `check` tests.

    python3 Fixtures/corrupt.py OUTDIR

Creates a small clean qcow2 with qemu-img/qemu-io, then copies it and patches
bytes (locations found by parsing the header, L1, L2 and refcount structures
here).  Writes OUTDIR/corrupt.tsv: NAME<TAB>QEMU_CHECK_EXIT_CODE, where the
code is what `qemu-img check -f qcow2 NAME` really returned.
"""
import os
import shutil
import signal
import struct
import subprocess
import sys

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


class Image:
    """Just enough qcow2 parsing to locate and patch metadata."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())
        d = self.data
        if d[:4] != b"QFI\xfb":
            raise ValueError("not qcow2")
        self.version = struct.unpack_from(">I", d, 4)[0]
        self.cluster_bits = struct.unpack_from(">I", d, 20)[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size = struct.unpack_from(">I", d, 36)[0]
        self.l1_offset = struct.unpack_from(">Q", d, 40)[0]
        self.rt_offset = struct.unpack_from(">Q", d, 48)[0]
        self.rt_clusters = struct.unpack_from(">I", d, 56)[0]
        self.refcount_order = 4
        incompat = 0
        if self.version >= 3:
            incompat = struct.unpack_from(">Q", d, 72)[0]
            self.refcount_order = struct.unpack_from(">I", d, 96)[0]
        if incompat & 0x10:
            raise ValueError("extended L2 not handled here")
        self.rbits = 1 << self.refcount_order

    # -- raw access (reads past EOF are zero) --
    def u64(self, off):
        b = bytes(self.data[off:off + 8]).ljust(8, b"\0")
        return struct.unpack(">Q", b)[0]

    def put_u64(self, off, v):
        if len(self.data) < off + 8:
            self.data.extend(bytes(off + 8 - len(self.data)))
        struct.pack_into(">Q", self.data, off, v)

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.data)

    # -- mapping --
    def l1_entry_off(self, i):
        return self.l1_offset + 8 * i

    def l2_entries(self):
        """Yield (l1_index, l2_index, file offset of L2 entry, entry)."""
        for i in range(self.l1_size):
            l1e = self.u64(self.l1_entry_off(i))
            l2 = l1e & OFFSET_MASK
            if not l2:
                continue
            for j in range(self.cs // 8):
                off = l2 + 8 * j
                e = self.u64(off)
                if e:
                    yield i, j, off, e

    # -- refcounts --
    def _refcount_loc(self, cluster):
        per_block = self.cs * 8 // self.rbits
        ti, bi = divmod(cluster, per_block)
        if ti >= self.rt_clusters * self.cs // 8:
            raise IndexError("cluster outside refcount table")
        block = self.u64(self.rt_offset + 8 * ti) & ~0x1FF
        if not block:
            raise IndexError("no refcount block")
        return block, bi

    def refcount(self, cluster):
        block, bi = self._refcount_loc(cluster)
        if self.rbits >= 8:
            n = self.rbits // 8
            b = bytes(self.data[block + bi * n:block + bi * n + n]).ljust(n, b"\0")
            return int.from_bytes(b, "big")
        byte = self.data[block + bi * self.rbits // 8]
        shift = (bi * self.rbits) % 8
        return (byte >> shift) & ((1 << self.rbits) - 1)

    def set_refcount(self, cluster, value):
        block, bi = self._refcount_loc(cluster)
        if self.rbits >= 8:
            n = self.rbits // 8
            self.data[block + bi * n:block + bi * n + n] = value.to_bytes(n, "big")
            return
        pos = block + bi * self.rbits // 8
        shift = (bi * self.rbits) % 8
        mask = ((1 << self.rbits) - 1) << shift
        self.data[pos] = (self.data[pos] & ~mask) | ((value << shift) & mask)


def normal_data_entries(img):
    """Standard, allocated, non-zero-flag L2 entries."""
    out = []
    for i, j, off, e in img.l2_entries():
        if e & COMPRESSED or e & 1:
            continue
        if e & OFFSET_MASK:
            out.append((i, j, off, e))
    return out


def main():
    if len(sys.argv) != 2:
        print("usage: corrupt.py OUTDIR", file=sys.stderr)
        sys.exit(2)
    out = os.path.abspath(sys.argv[1])
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, ".corrupt-base.qcow2")

    # Clean base: 64 KiB clusters, 16-bit refcounts, 4 MiB disk.
    # Clusters: 0 header, 1 reftable, 2 refblock, 3 L1, 4 L2, then data.
    # The discard frees a data cluster in the middle of the file (refcount 0).
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    run("qemu-io", "-f", "qcow2",
        "-c", "write -P 0x11 0 64k",
        "-c", "write -P 0x22 64k 64k",
        "-c", "write -P 0x33 128k 64k",
        "-c", "write -P 0x44 1M 1000",
        "-c", "discard 64k 64k",
        base)
    rc = subprocess.run(["qemu-img", "check", "-f", "qcow2", base],
                        stdout=subprocess.DEVNULL).returncode
    if rc != 0:
        sys.exit("corrupt.py: base image is not clean (check exit %d)" % rc)

    ref = Image(base)
    data = normal_data_entries(ref)
    assert len(data) >= 3, data
    nclusters = (len(ref.data) + ref.cs - 1) // ref.cs
    free = [c for c in range(1, nclusters) if ref.refcount(c) == 0]
    assert free, "expected a freed cluster inside the file"
    first_l1 = ref.u64(ref.l1_entry_off(0))

    cases = []

    def make(name, patch):
        img = Image(base)
        patch(img)
        path = os.path.join(out, name)
        img.save(path)
        if img.data == ref.data:
            sys.exit("corrupt.py: %s is unchanged" % name)
        cases.append(name)

    # 1. refcount 1 on a free cluster (inside the file) -> leak only
    make("leak.qcow2", lambda im: im.set_refcount(free[0], 1))

    # 2. a used data cluster's refcount set to 0 -> corruption
    _, _, _, e0 = data[0]
    make("refcount-low.qcow2",
         lambda im: im.set_refcount((e0 & OFFSET_MASK) >> im.cluster_bits, 0))

    # 3. L2 entry's host offset made unaligned (+0x200)
    _, _, off1, e1 = data[1]
    make("l2-misaligned.qcow2", lambda im: im.put_u64(off1, e1 + 0x200))

    # 4. L1 entry pointing to an L2 table 1 TiB past EOF (COPIED kept)
    make("l1-past-eof.qcow2",
         lambda im: im.put_u64(im.l1_entry_off(0), COPIED | (1 << 40)))

    # 5. COPIED cleared on an L2 entry whose cluster has refcount 1
    _, _, off2, e2 = data[-1]
    assert ref.refcount((e2 & OFFSET_MASK) >> ref.cluster_bits) == 1
    make("copied-flag.qcow2", lambda im: im.put_u64(off2, e2 & ~COPIED))

    # 6. reserved bit 1 set in an L2 entry (bits 1-8 and 56-61 are reserved)
    make("l2-reserved.qcow2", lambda im: im.put_u64(off1, e1 | 0x2))

    # 7. COPIED cleared on the L1 entry and on an L2 entry, plus a leak: -r leaks
    #    fixes the leak and then (nothing else being wrong) the COPIED flags, L1 first
    def copied_and_leak(im):
        im.put_u64(im.l1_entry_off(0), first_l1 & ~COPIED)
        im.put_u64(off2, e2 & ~COPIED)
        im.set_refcount(free[0], 1)
    make("copied-and-leak.qcow2", copied_and_leak)

    # 8. COPIED cleared on the L1 entry, and two L2 entries sharing one cluster of
    #    refcount 1 (a corruption -r leaks does not fix): -r leaks leaves the flags
    def copied_and_shared(im):
        im.put_u64(im.l1_entry_off(0), first_l1 & ~COPIED)
        im.put_u64(off1, e0)
    make("copied-and-shared.qcow2", copied_and_shared)

    assert first_l1 & COPIED
    os.unlink(base)

    lines = []
    for name in cases:
        # A 10 s CPU-time limit (not wall-clock: a loaded machine must not turn a slow
        # check into a "hang", exit 124).
        r = subprocess.run(["prlimit", "--cpu=10:11", "--core=0", "--", "qemu-img", "check", "-f", "qcow2", name],
                           cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines.append("%s\t%d\n" % (name, 124 if r.returncode in (-signal.SIGXCPU, -signal.SIGKILL) else r.returncode))
    with open(os.path.join(out, "corrupt.tsv"), "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
