/// The header cluster in memory: the fixed header, the extension list, the backing file
/// name, and how cluster 0 is laid out when it is rewritten. It never writes: a header
/// field reaches the disk through `MetadataTransaction.publishHeader(_:of:)` (a typed
/// `HeaderField`), the whole cluster through `MetadataTransaction.rewriteHeaderCluster`.
final class HeaderStore {
    let path: String
    let file: BlockFile
    let geometry: Geometry
    var header: Header
    var extensions: [HeaderExtension]
    /// The backing file name as stored in the image.
    var backingFileName: String?
    /// The backing format from the header extension, if any.
    let backingFormat: String?
    let featureNames: [FeatureName]
    let compressionType: CompressionType

    init(path: String, file: BlockFile, geometry: Geometry, header: Header, extensions: [HeaderExtension],
         backingFileName: String?, backingFormat: String?, featureNames: [FeatureName], compressionType: CompressionType) {
        self.path = path
        self.file = file
        self.geometry = geometry
        self.header = header
        self.extensions = extensions
        self.backingFileName = backingFileName
        self.backingFormat = backingFormat
        self.featureNames = featureNames
        self.compressionType = compressionType
    }

    /// Offset in the file of the payload of the first extension of `type`, as cluster 0
    /// holds it on disk (a layout another writer chose may differ from ours).
    func extensionPayloadOffset(_ type: UInt32) throws -> Int? {
        let c0 = ByteReader(try file.read(count: geometry.clusterSize, at: 0))
        var off = header.length
        let end = header.backingFileOffset != 0 ? Int(header.backingFileOffset) : geometry.clusterSize
        while off + 8 <= end {
            let t = try c0.u32(off, "extension type")
            let len = Int(try c0.u32(off + 4, "extension length"))
            if t == 0 { return nil }
            if t == type { return off + 8 }
            off += 8 + ((len + 7) & ~7)
        }
        return nil
    }

    /// Cluster 0 with `backingName` (nil: no backing file) placed right after the end
    /// marker, as QEMU lays it out, and the header with its backing file fields set;
    /// throws when it does not fit in one cluster.
    func layout(_ h: Header, extensions exts: [HeaderExtension], backingName: String?) throws -> ([UInt8], Header) {
        var h = h
        h.backingFileOffset = 0
        h.backingFileSize = 0
        var bytes: [UInt8] = []
        h.serialize(into: &bytes)
        HeaderExtension.serialize(exts, into: &bytes)
        if let b = backingName {
            let name = PathCodec.encode(b)
            h.backingFileOffset = UInt64(bytes.count)
            h.backingFileSize = UInt32(name.count)
            bytes += name
            var again: [UInt8] = []
            h.serialize(into: &again)
            bytes.replaceSubrange(0..<again.count, with: again)
        }
        guard bytes.count <= geometry.clusterSize else {
            throw QCow2Error.unsupported(path: path, detail: "the header does not fit in one cluster")
        }
        bytes += [UInt8](repeating: 0, count: geometry.clusterSize - bytes.count)
        return (bytes, h)
    }
}
