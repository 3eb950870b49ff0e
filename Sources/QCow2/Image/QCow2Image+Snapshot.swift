/// Reading an internal snapshot in place of the active image (qemu-img's `-l`).
public enum SnapshotLoader {
    /// Which snapshot: `-l ID_OR_NAME` (an ID first, then a name, as qemu-img looks it up),
    /// or `-l snapshot.id=ID,snapshot.name=NAME` (each given one must match).
    public enum Selector: Sendable, Equatable {
        case idOrName(String)
        case fields(id: String?, name: String?)
    }

    /// Makes `image` read the snapshot's guest data: its L1 table replaces the active one in
    /// memory (the file is not touched). The virtual size and the bitmaps stay the active
    /// image's, as in qemu-img. Only for images opened read-only; a raw image has no snapshots.
    /// The messages are qemu-img's (it prefixes them with "Failed to load snapshot: ").
    public static func load(_ selector: Selector, into image: any DiskImage) throws {
        guard let q = image as? QCow2Image else {
            throw QCow2Error.unsupported(path: "", detail: "Block format '\(image.formatName)' used by device '' does not support temporarily loading internal snapshots")
        }
        guard q.allocator == nil else {
            throw QCow2Error.unsupported(path: "", detail: "Cannot load snapshot into an image opened for writing")
        }
        let found: SnapshotEntry?
        switch selector {
        case .idOrName(let s):
            found = SnapshotTable(q.snapshots).index(idOrName: s).map { q.snapshots[$0] }
        case .fields(let id, let name):
            found = find(q.snapshots, id: id, name: name)
        }
        guard let sn = found else { throw QCow2Error.invalidArgument(path: "", detail: "Can't find snapshot") }
        if !q.geometry.isAligned(sn.l1TableOffset) || sn.l1TableOffset >= Geometry.maxHostOffset {
            throw QCow2Error.malformed(path: "", field: "", detail: "Snapshot L1 table offset invalid")
        }
        guard UInt64(sn.l1Size) * 8 <= UInt64(Geometry.maxL1Bytes) else {
            throw QCow2Error.malformed(path: "", field: "", detail: "Snapshot L1 table too large")
        }
        var l1: [UInt64] = []
        if sn.l1Size > 0 {
            let raw = try q.file.read(count: Int(sn.l1Size) * 8, at: sn.l1TableOffset)
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &l1) }
        }
        q.l1Table = l1
    }

    static func find(_ snapshots: [SnapshotEntry], id: String?, name: String?) -> SnapshotEntry? {
        guard id != nil || name != nil else { return nil }
        return snapshots.first { (id == nil || $0.id == id) && (name == nil || $0.name == name) }
    }
}
