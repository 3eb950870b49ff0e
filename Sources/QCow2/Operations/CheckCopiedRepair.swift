extension CheckOperation {
    /// Once the refcounts are right, makes the COPIED flags of the active tables follow
    /// them, as qemu-img does: with `all` always, with `leaks` only when nothing else is
    /// left wrong. The corrections are written first (the L1 entries with one write, then
    /// each L2 table once, however many entries of it change and in whatever order the
    /// check met them), then reported in qemu-img's order: each L1 entry, then its
    /// table's entries. Returns the number of entries corrected.
    static func repairCopiedFlags(_ image: QCow2Image, mode: Repair, tx: inout MetadataTransaction,
                                  report: (String) -> Void) throws -> Int {
        let check = try CheckOperation(image, report: { _ in })
        let r = try check.run()
        let otherCorruptions = r.corruptions - check.wrongCopied.count
        let fix = mode == .all || (r.checkErrors == 0 && r.leaks == 0 && otherCorruptions == 0)
        if fix { try writeCopiedFlags(check.wrongCopied, of: image, tx: &tx) }
        for event in check.wrongCopied {
            switch event {
            case .l1(let i, let value, let rc):
                report("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(hex(value ^ L1Entry.copied)) refcount=\(rc)")
            case .l2(_, _, let value, let rc):
                report("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(hex(value ^ L2Entry.copied)) refcount=\(rc)")
            }
        }
        return fix ? check.wrongCopied.count : 0
    }

    /// The corrected entries written: the active L1 table's in one write (flag changes: a
    /// torn write leaves each entry old or new, both valid), then each L2 table's in one.
    private static func writeCopiedFlags(_ events: [WrongCopied], of image: QCow2Image,
                                         tx: inout MetadataTransaction) throws {
        var l1 = image.l1Table
        var l1Changed: ClosedRange<Int>?
        var byTable: [UInt64: [(Int, UInt64)]] = [:]
        for event in events {
            switch event {
            case .l1(let i, let value, _):
                l1[i] = value
                l1Changed = l1Changed.map { min($0.lowerBound, i)...max($0.upperBound, i) } ?? i...i
            case .l2(let offset, let j, let value, _):
                byTable[offset, default: []].append((j, value))
            }
        }
        if let changed = l1Changed { try tx.updateL1(l1, changed: changed.lowerBound..<(changed.upperBound + 1)) }
        let g = image.geometry
        for (offset, entries) in byTable.sorted(by: { $0.key < $1.key }) {
            var table = try image.file.read(count: g.clusterSize, at: offset)
            var lo = Int.max, hi = Int.min
            for (j, value) in entries {
                table.withUnsafeMutableBytes { $0.storeBytes(of: value.bigEndian, toByteOffset: j * g.l2EntrySize, as: UInt64.self) }
                lo = min(lo, j)
                hi = max(hi, j)
            }
            // An existing table: the L1 index only matters for a new one.
            try tx.publishL2(table, l1Index: -1, to: .existing(offset: offset, changed: lo..<(hi + 1)), afterData: false)
        }
    }
}
