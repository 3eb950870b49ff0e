/// What is at a guest offset in one layer of a chain, and for how many bytes.
public struct LayerExtent: Equatable, Sendable {
    public var length: UInt64
    public var descriptor: ClusterDescriptor
    public init(length: UInt64, descriptor: ClusterDescriptor) {
        self.length = length
        self.descriptor = descriptor
    }
}

/// The images commands consume: a `BlockSource` (size, reads, what each range holds,
/// through the backing chain) with its host file, its format and one layer's extent query.
public protocol DiskImage: BlockSource {
    var formatName: String { get }
    var file: BlockFile { get }
    /// The next image in the backing chain, if any.
    var backing: (any DiskImage)? { get }
    /// Status of the run starting at `offset` in this layer only (length ≥ 1,
    /// at most `maxLength`, never past `virtualSize`).
    func layerExtent(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent
}

extension DiskImage {
    /// Reads from the backing image, as zeros where there is none or past its end.
    func readBacking(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let b = backing, offset < b.virtualSize else {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let avail = b.virtualSize - offset
        if UInt64(buffer.count) <= avail {
            try b.read(into: buffer, at: offset)
        } else {
            let n = Int(avail)
            try b.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset)
            UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }
}

extension DiskImage {
    /// The layer of this image's chain (itself first) that is the file `id`, with its depth.
    func layer(withIdentity id: FileIdentity) throws -> (layer: any DiskImage, depth: Int)? {
        var layer: (any DiskImage)? = self
        var depth = 0
        while let l = layer {
            if try l.file.identity() == id { return (l, depth) }
            layer = l.backing
            depth += 1
        }
        return nil
    }
}
