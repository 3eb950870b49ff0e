/// What `info` reports about one image (qemu-img's ImageInfo).
public struct ImageInfo: Sendable {
    public struct Snapshot: Sendable {
        public var id: String
        public var name: String
        public var vmStateSize: UInt64
        public var dateSeconds: UInt32
        public var dateNanoseconds: UInt32
        public var vmClockNanoseconds: UInt64
        public var icount: Int64?

        public init(_ e: SnapshotEntry) {
            id = e.id; name = e.name; vmStateSize = e.vmStateSize; dateSeconds = e.dateSeconds
            dateNanoseconds = e.dateNanoseconds; vmClockNanoseconds = e.vmClockNanoseconds; icount = e.icount
        }
    }
    public struct Bitmap: Sendable {
        public var name: String
        public var granularity: UInt64
        /// qemu-img's flag names: "in-use", "auto".
        public var flags: [String]
    }
    public struct QCow2Specific: Sendable {
        public var compat: String
        public var compressionType: String
        public var lazyRefcounts: Bool?
        public var bitmaps: [Bitmap]?
        public var refcountBits: Int
        public var corrupt: Bool?
        public var extendedL2: Bool?
        /// The external data file's name and whether it is raw.
        public var dataFile: String?
        public var dataFileRaw: Bool?
        /// "aes" or "luks", with the LUKS header for the latter.
        public var encryptFormat: String?
        public var luks: LUKSHeader?
    }

    public var filename: String
    public var format: String
    public var virtualSize: UInt64
    public var actualSize: UInt64?
    public var clusterSize: Int?
    public var dirtyFlag: Bool
    public var encrypted = false
    public var backingFilename: String?
    public var fullBackingFilename: String?
    public var backingFilenameFormat: String?
    public var snapshots: [Snapshot]
    public var qcow2: QCow2Specific?

    public init(_ image: any DiskImage) throws {
        filename = image.path
        format = image.formatName
        virtualSize = image.virtualSize
        actualSize = try? image.file.allocatedSize()
        dirtyFlag = false
        snapshots = []
        guard let q = image as? QCow2Image else { return }
        let h = q.header
        clusterSize = q.geometry.clusterSize
        dirtyFlag = h.isDirty
        if let b = q.backingFileName {
            backingFilename = b
            fullBackingFilename = BackingName.fullName(b, relativeTo: q.path)
            backingFilenameFormat = q.backingFormat
        }
        snapshots = q.snapshots.map(Snapshot.init)
        if h.version == 2 {
            qcow2 = QCow2Specific(compat: "0.10", compressionType: q.compressionType.name, refcountBits: q.geometry.refcountBits)
        } else {
            let bitmaps = q.bitmaps.map { e -> Bitmap in
                var flags: [String] = []
                if e.inUse { flags.append("in-use") }
                if e.isAuto { flags.append("auto") }
                return Bitmap(name: e.name, granularity: e.granularity, flags: flags)
            }
            qcow2 = QCow2Specific(compat: "1.1", compressionType: q.compressionType.name,
                                  lazyRefcounts: h.hasLazyRefcounts, bitmaps: bitmaps.isEmpty ? nil : bitmaps,
                                  refcountBits: q.geometry.refcountBits, corrupt: h.isCorrupt,
                                  extendedL2: h.hasExtendedL2)
        }
        qcow2?.dataFile = q.dataFileName
        qcow2?.dataFileRaw = q.hasExternalDataFile ? q.dataFileIsRaw : nil
        encrypted = q.encryption != nil
        qcow2?.encryptFormat = q.encryption?.formatName
        qcow2?.luks = try q.luksHeader()
    }
}
