/// The last compressed cluster a read decoded (raw deflate or one zstd frame), kept so
/// that reading a cluster in pieces decodes it once; the input buffer is reused.
final class DecompressedCluster {
    private var cluster: [UInt8] = []
    private var key: UInt64 = .max
    private var input: [UInt8] = []

    /// Forgets the cluster (a write may have changed it).
    func invalidate() { key = .max }

    /// Decodes the stream of guest cluster `key` (`length` bytes at host `offset`) unless it
    /// is the one already decoded.
    func load(guestCluster key: UInt64, offset: UInt64, length: Int, of image: QCow2Image) throws {
        if self.key == key { return }
        guard try image.map.isInsideFile(offset) else {
            throw QCow2Error.malformed(path: image.path, field: "compressed cluster at guest offset 0x\(hex(key))",
                             detail: "data offset 0x\(hex(offset)) lies beyond the end of the file")
        }
        let cs = image.geometry.clusterSize
        if cluster.count != cs { cluster = [UInt8](repeating: 0, count: cs) }
        if input.count < length { input = [UInt8](repeating: 0, count: length) }
        let f = image.file
        try input.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in
            try f.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<length]), at: offset)
        }
        let type = image.compressionType
        self.key = .max
        let ok = input.withUnsafeBytes { inp in
            cluster.withUnsafeMutableBytes { out in
                Codec.decompress(type, input: UnsafeRawBufferPointer(rebasing: inp[0..<length]), output: out)
            }
        }
        guard ok else {
            throw QCow2Error.malformed(path: image.path, field: "compressed cluster at guest offset 0x\(hex(key))",
                             detail: "\(type.name) data at 0x\(hex(offset)) does not decompress to a full cluster")
        }
        self.key = key
    }

    /// Copies the decoded bytes from `start` (within the cluster) into `part`.
    func copy(from start: Int, into part: UnsafeMutableRawBufferPointer) {
        cluster.withUnsafeBytes { src in
            part.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[start..<(start + part.count)]))
        }
    }
}
