/// The changes of bitmap NAME together with the hold bitmap a live run left beside it
/// (`qimg-hold:NAME`: a push or fleecing run moves NAME's bits there in its transaction, and
/// a QEMU that stops mid-run stores it in the image). An offline incremental copies both.
/// Once the copy is durable NAME is cleared (in place, as `PersistentBitmapChanges` does)
/// and only then is the hold removed (one directory switch): a crash between the two leaves
/// the hold's bits set, copied again by the next run, never lost.
public final class HeldBitmapChanges: ChangeSet {
    let own: PersistentBitmapChanges
    let held: PersistentBitmapChanges

    init(own: PersistentBitmapChanges, held: PersistentBitmapChanges) {
        self.own = own
        self.held = held
    }

    /// The changes bitmap `name` of `image` stands for: with its hold bitmap when the image
    /// has one (which must be consistent too).
    public static func of(_ image: QCow2Image, bitmap name: String) throws -> any ChangeSet {
        let own = try PersistentBitmapChanges(image, bitmap: name)
        guard hasHold(image, bitmap: name) else { return own }
        return HeldBitmapChanges(own: own, held: try PersistentBitmapChanges(image, bitmap: LiveNames.hold(name)))
    }

    public func forEachChangedRange(_ body: (UInt64, UInt64) -> Void) {
        var ranges: [(UInt64, UInt64)] = []
        own.forEachChangedRange { ranges.append(($0, $1)) }
        held.forEachChangedRange { ranges.append(($0, $1)) }
        // The two may differ in granularity: one ordered list without overlaps.
        for (a, n) in CopyEngine.normalize(ranges, unit: 1, size: own.image.virtualSize) { body(a, n) }
    }

    public func consumed() throws {
        try own.consumed()
        try Self.dropHold(own.image, bitmap: own.name)
    }

    public func partlyConsumed(_ copied: DirtyBitmap) throws {
        try own.partlyConsumed(copied)
        try held.partlyConsumed(copied)
    }

    static func hasHold(_ image: QCow2Image, bitmap name: String) -> Bool {
        image.bitmaps.contains { $0.name == LiveNames.hold(name) }
    }

    /// Removes bitmap `name`'s hold bitmap, if the image has one; called once NAME records
    /// only what came after a durable backup (cleared, or restarted after a full one).
    static func dropHold(_ image: QCow2Image, bitmap name: String) throws {
        guard hasHold(image, bitmap: name) else { return }
        try image.applyBitmapActions([.remove], to: LiveNames.hold(name))
    }
}
