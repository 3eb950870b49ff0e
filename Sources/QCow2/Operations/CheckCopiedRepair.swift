extension CheckOperation {
    /// Once the refcounts are right, makes the COPIED flags of the active tables follow
    /// them, as qemu-img does: with `all` always, with `leaks` only when nothing else is
    /// left wrong; each L1 entry, then its table's entries (one publication per table).
    /// Returns the number of entries corrected.
    static func repairCopiedFlags(_ image: QCow2Image, mode: Repair, tx: inout MetadataTransaction,
                                  report: (String) -> Void) throws -> Int {
        let check = try CheckOperation(image, report: { _ in })
        let r = try check.run()
        let otherCorruptions = r.corruptions - check.wrongCopied.count
        let fix = mode == .all || (r.checkErrors == 0 && r.leaks == 0 && otherCorruptions == 0)
        var table = PendingL2Fix()
        var fixed = 0
        for event in check.wrongCopied {
            switch event {
            case .l1(let i, let value, let rc):
                let line = "OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(hex(value ^ L1Entry.copied)) refcount=\(rc)"
                guard fix else { report("ERROR " + line); continue }
                try table.publish(&tx)
                try tx.publishL1Entry(i, value)
                report("Repairing " + line)
            case .l2(let offset, let j, let value, let rc):
                let line = "OFLAG_COPIED data cluster: l2_entry=\(hex(value ^ L2Entry.copied)) refcount=\(rc)"
                guard fix else { report("ERROR " + line); continue }
                try table.set(j, value, inTableAt: offset, of: image, tx: &tx)
                report("Repairing " + line)
            }
            fixed += 1
        }
        try table.publish(&tx)
        return fixed
    }
}

/// The COPIED corrections gathered for one L2 table, published together.
private struct PendingL2Fix {
    var offset: UInt64 = 0
    var table: [UInt8] = []
    var changed: [Int] = []

    mutating func set(_ j: Int, _ value: UInt64, inTableAt offset: UInt64, of image: QCow2Image,
                      tx: inout MetadataTransaction) throws {
        if offset != self.offset || table.isEmpty {
            try publish(&tx)
            self.offset = offset
            table = try image.file.read(count: image.geometry.clusterSize, at: offset)
        }
        let at = j * image.geometry.l2EntrySize
        table.withUnsafeMutableBytes { $0.storeBytes(of: value.bigEndian, toByteOffset: at, as: UInt64.self) }
        changed.append(j)
    }

    mutating func publish(_ tx: inout MetadataTransaction) throws {
        guard let lo = changed.min(), let hi = changed.max() else { return }
        // An existing table: the L1 index only matters for a new one.
        try tx.publishL2(table, l1Index: -1, to: .existing(offset: offset, changed: lo..<(hi + 1)), afterData: false)
        changed.removeAll()
        table = []
    }
}
