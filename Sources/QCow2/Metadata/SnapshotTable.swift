/// The internal snapshot table as a value: its entries, the lookups qemu-img makes, the
/// next ID, and the switch to a new table (written in new clusters, the header's
/// nb_snapshots and snapshots_offset switched with one write, the old table freed last).
public struct SnapshotTable: Sendable {
    public private(set) var entries: [SnapshotEntry]

    /// QEMU's limits: 65536 entries, 64 MiB of table.
    public static let maxEntries = Int(SnapshotEntry.maxSnapshots)

    public init(_ entries: [SnapshotEntry]) { self.entries = entries }

    /// The first snapshot whose ID is `s`, else the first whose name is `s` (how qemu-img
    /// finds the snapshot to apply).
    public func index(idOrName s: String) -> Int? {
        entries.firstIndex { $0.id == s } ?? entries.firstIndex { $0.name == s }
    }

    /// The first snapshot named `name` (how qemu-img finds the snapshot to delete: by
    /// name only).
    public func index(name: String) -> Int? { entries.firstIndex { $0.name == name } }

    /// QEMU's next ID: one more than the largest number any ID starts with (an ID that
    /// does not start with a digit counts as 0).
    public var nextID: String {
        var top: UInt64 = 0
        for e in entries {
            var v: UInt64 = 0
            for c in e.id.utf8.prefix(while: { $0 >= 0x30 && $0 <= 0x39 }) {
                let (m, o1) = v.multipliedReportingOverflow(by: 10)
                let (a, o2) = m.addingReportingOverflow(UInt64(c - 0x30))
                if o1 || o2 { v = .max; break }
                v = a
            }
            top = max(top, v)
        }
        return String(top &+ 1)
    }

    /// Bytes the table takes on disk.
    public var byteSize: UInt64 { entries.reduce(0) { $0 + UInt64($1.paddedSize) } }

    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Int(byteSize))
        for e in entries { e.serialize(into: &out) }
        return out
    }

    /// Why `entry` cannot be added (QEMU's limits), if it cannot.
    func problemAdding(_ entry: SnapshotEntry) -> String? {
        if entries.count >= Self.maxEntries { return "too many snapshots (at most \(Self.maxEntries))" }
        if entry.id.utf8.count > Int(UInt16.max) || entry.name.utf8.count > Int(UInt16.max) {
            return "the snapshot name is too long"
        }
        if byteSize + UInt64(entry.paddedSize) > SnapshotEntry.maxTableBytes { return "the snapshot table would exceed 64 MiB" }
        if entries.contains(where: { $0.id == entry.id }) { return "a snapshot with ID \(entry.id) exists" }
        return nil
    }

    public mutating func append(_ e: SnapshotEntry) { entries.append(e) }
    public mutating func remove(at i: Int) { entries.remove(at: i) }
}

extension MetadataTransaction {
    /// Steps 1-3 for a new snapshot table: clusters allocated (their refcounts made durable
    /// with everything else this transaction allocated), the table written and durable,
    /// then the header switched to it (nb_snapshots and snapshots_offset in one write).
    /// The old table's clusters are queued for step 4 (`finish`). An empty table is
    /// offset 0.
    mutating func publishSnapshotTable(_ table: SnapshotTable) throws {
        let g = image.geometry
        let bytes = table.encoded()
        let n = Int(g.clusters(forBytes: UInt64(bytes.count)))
        let offset = n > 0 ? try allocate(n) : 0
        try commitRefcounts()
        if n > 0 { try writeNew(bytes, at: offset) }
        let old = SnapshotTable(image.snapshots)
        let oldStart = image.header.snapshotsOffset >> UInt64(g.clusterBits)
        let oldCount = image.header.nbSnapshots > 0 ? g.clusters(forBytes: old.byteSize) : 0
        var h = image.header
        h.nbSnapshots = UInt32(table.entries.count)
        h.snapshotsOffset = offset
        try publishHeader(.snapshotTable, of: h)
        image.header.nbSnapshots = h.nbSnapshots
        image.header.snapshotsOffset = offset
        image.snapshots = table.entries
        free((0..<oldCount).map { oldStart + $0 })
    }
}
