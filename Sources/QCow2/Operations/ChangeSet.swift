/// What an incremental backup copies, and what happens to those changes once the copy
/// is safe: the seam between the copy and where the changes are recorded. Today a
/// persistent dirty bitmap of the source image (`PersistentBitmapChanges`); an NBD
/// `qemu:dirty-bitmap` context or a QMP backup job plug in here without touching the
/// copy.
public protocol ChangeSet {
    /// The changed guest ranges, in order.
    func forEachChangedRange(_ body: (UInt64, UInt64) -> Void)
    /// The copy of every change is durable: release them all.
    func consumed() throws
    /// The copy stopped part way and what it holds (`copied`, at any granularity) is
    /// durable: release the changes it covers wholly, keep the rest.
    func partlyConsumed(_ copied: DirtyBitmap) throws
}

/// The changes a persistent bitmap of a qcow2 image records. Releasing them clears bits
/// in place (`QCow2Image.lowerBitmapInPlace`): no cluster is allocated or freed, so a
/// crash while releasing leaks nothing and leaves some bits set (copied again next time).
public final class PersistentBitmapChanges: ChangeSet {
    public let image: QCow2Image
    public let name: String
    private let bitmap: DirtyBitmap

    /// The bitmap `name` of `image`, which must be consistent.
    public init(_ image: QCow2Image, bitmap name: String) throws {
        self.image = image
        self.name = name
        self.bitmap = try image.consistentBitmap(name).1
    }

    public func forEachChangedRange(_ body: (UInt64, UInt64) -> Void) {
        bitmap.forEachDirtyExtent(body)
    }

    public func consumed() throws {
        try Self.lower(image, bitmap: name, to: DirtyBitmap(granularity: bitmap.granularity, size: image.virtualSize))
    }

    public func partlyConsumed(_ copied: DirtyBitmap) throws {
        // Re-read: only bits still set can be cleared (the in-place lowering needs a subset).
        var (_, bm) = try image.consistentBitmap(name)
        var clear: [(UInt64, UInt64)] = []
        bm.forEachDirtyExtent { start, length in
            var g = start
            while g < start + length {
                let end = min(g + bm.granularity, image.virtualSize)
                var covered = true
                var p = g
                while p < end { if !copied.test(p) { covered = false; break }; p += copied.granularity }
                if covered { clear.append((g, end - g)) }
                g += bm.granularity
            }
        }
        for (a, n) in clear { bm.reset(a, n) }
        try Self.lower(image, bitmap: name, to: bm)
    }

    /// Starts recording changes from now on into bitmap `name` of `image` (after a full
    /// backup): the bitmap is emptied in place, or created when missing.
    public static func restart(_ image: QCow2Image, bitmap name: String) throws {
        if let e = image.bitmaps.first(where: { $0.name == name }) {
            try lower(image, bitmap: name, to: DirtyBitmap(granularity: e.granularity, size: image.virtualSize))
        } else {
            try image.applyBitmapActions([.add(granularity: nil, disabled: false)], to: name)
        }
        // A live run's hold bitmap: its bits are in the full backup too.
        try HeldBitmapChanges.dropHold(image, bitmap: name)
    }

    /// Lowers bitmap `name` to `lowered` in place where possible, else with the ordered
    /// commit of a new bitmap.
    static func lower(_ q: QCow2Image, bitmap name: String, to lowered: DirtyBitmap) throws {
        if try q.lowerBitmapInPlace(name, to: lowered) { return }
        try q.applyBitmapActions([.clear, .merge(source: name)], to: name, mergeSource: { _ in lowered })
    }
}
