/// What a prune's merge copies, read from the point files' cluster maps (each file alone):
/// per guest range, the topmost layer that allocates it decides where its content is.
enum PruneCost {
    /// The guest bytes whose topmost allocation among `layers` (top first) is data (not
    /// a zero cluster) in a layer at index `from` or below it.
    static func dataBytes(_ layers: [QCow2Image], from: Int) throws -> UInt64 {
        guard let top = layers.first else { return 0 }
        var total: UInt64 = 0
        var pos: UInt64 = 0
        while pos < top.virtualSize {
            var length = top.virtualSize - pos
            var holder: (index: Int, data: Bool)?
            scan: for (i, layer) in layers.enumerated() where pos < layer.virtualSize {
                let e = try layer.layerExtent(at: pos, maxLength: length)
                length = min(length, e.length)
                switch e.descriptor {
                case .normal, .compressed: holder = (i, true); break scan
                case .zero: holder = (i, false); break scan
                case .unallocated: continue
                }
            }
            guard length > 0 else { break }
            if let h = holder, h.data, h.index >= from { total += length }
            pos += length
        }
        return total
    }
}
