/// A raw image: guest offset == file offset.
public final class RawImage: DiskImage {
    public let path: String
    public let file: BlockFile
    public private(set) var virtualSize: UInt64
    /// "raw", or "file" for a file QEMU opens with its protocol driver alone (a json: backing name).
    public internal(set) var formatName = "raw"
    public var backing: (any DiskImage)? { nil }

    public init(path: String, file: BlockFile) throws {
        self.path = path
        self.file = file
        // QEMU sizes raw images in whole 512-byte sectors; the tail reads as zeros.
        self.virtualSize = (try file.size() + 511) & ~UInt64(511)
    }

    public func layerExtent(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent {
        guard offset < virtualSize, maxLength > 0 else {
            throw QCow2Error.invalidArgument(path: path, detail: "extent query at \(offset) is outside the image")
        }
        return LayerExtent(length: min(maxLength, virtualSize - offset), descriptor: .normal(host: offset))
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        try file.read(into: buffer, at: offset)
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, data.count)
        try file.write(data, at: offset)
    }
}
