/// Encrypted images and images with an external data file: qimg reads their metadata
/// (info, map, check need no key and no data) and refuses what needs the data it cannot
/// use: encrypted data (no key support) and any write to either kind.
/// External data files are read: each L2 entry's host offset is an offset in the data
/// file (guest offset = host offset for a raw one, which QEMU allocates whole).
public enum QCow2Encryption: Equatable, Sendable {
    /// crypt_method 1, QEMU's legacy AES-CBC.
    case aes
    /// crypt_method 2: the LUKS header in the clusters the extension names.
    case luks(offset: UInt64, length: UInt64)

    /// QEMU's name of the format ("aes", "luks").
    public var formatName: String {
        switch self {
        case .aes: return "aes"
        case .luks: return "luks"
        }
    }
}

/// Autoclear bit 1: the external data file is a valid raw image of the guest disk.
let autoclearRawExternalData: UInt64 = 1 << 1

extension QCow2Image {
    /// What `init` checks of encryption and data file fields (QEMU's open checks).
    static func validateProtection(header h: Header, extensions exts: [HeaderExtension], path: String,
                                   clusterSize: Int, fileSize: UInt64) throws {
        let fde = exts.lazy.compactMap { e -> (UInt64, UInt64)? in
            if case .fullDiskEncryption(let o, let l) = e { return (o, l) }
            return nil
        }.first
        switch h.cryptMethod {
        case 0, 1: break
        case 2:
            guard let (o, l) = fde else {
                throw QCow2Error.malformed(path: path, field: "crypt_method",
                                           detail: "LUKS encryption is set but the full disk encryption header extension is missing")
            }
            guard o % UInt64(clusterSize) == 0, o > 0 else {
                throw QCow2Error.malformed(path: path, field: "encryption header offset", detail: "0x\(hex(o)) is not a multiple of the cluster size")
            }
            guard l >= UInt64(LUKSHeader.size), o <= fileSize, l <= fileSize - o else {
                throw QCow2Error.malformed(path: path, field: "encryption header length", detail: "\(l) bytes at 0x\(hex(o)) do not fit in the file")
            }
        default:
            throw QCow2Error.malformed(path: path, field: "crypt_method", detail: "unknown encryption method \(h.cryptMethod)")
        }
    }

    /// The incompatible bit: guest data lives in an external data file.
    public var hasExternalDataFile: Bool { header.incompatibleFeatures & Features.externalDataFile != 0 }

    /// The image's encryption, if any.
    public var encryption: QCow2Encryption? {
        switch header.cryptMethod {
        case 1: return .aes
        case 2:
            for case .fullDiskEncryption(let o, let l) in extensions { return .luks(offset: o, length: l) }
            return nil
        default: return nil
        }
    }

    /// The external data file's name as stored (nil: the data is in the image file).
    public var dataFileName: String? {
        guard hasExternalDataFile else { return nil }
        for case .externalDataFile(let n) in extensions where !n.isEmpty { return n }
        return nil
    }

    /// Whether the external data file is a raw image of the disk (the autoclear bit).
    public var dataFileIsRaw: Bool {
        hasExternalDataFile && header.autoclearFeatures & autoclearRawExternalData != 0
    }

    /// The LUKS header (metadata only: nothing is decrypted).
    public func luksHeader() throws -> LUKSHeader? {
        guard case .luks(let o, _)? = encryption else { return nil }
        let bytes = try file.read(count: LUKSHeader.size, at: o)
        do { return try LUKSHeader(parsing: ByteReader(bytes)) } catch { throw error.at(path) }
    }

    /// Opens the external data file read-only. Its name is used as it is: QEMU 7.2 opens
    /// a relative name against the working directory, not the image's.
    func openDataFile(forceShare: Bool) throws {
        guard hasExternalDataFile else { return }
        guard let name = dataFileName else {
            throw QCow2Error.unsupported(path: path, detail: "the image needs an external data file and does not name it")
        }
        let f: BlockFile
        do { f = try BlockFile(path: name) } catch let e as QCow2Error {
            throw QCow2Error.backing(path: path, detail: "could not open the external data file '\(name)': \(e.message)")
        }
        try ImageLock.acquire(fd: f.fd, path: name, mode: forceShare ? .none : .read)
        dataFile = f
    }

    /// The refusal of an operation qimg cannot do on this image (nil: it can).
    func protectionRefusal(writing: Bool) -> QCow2Error? {
        if let e = encryption {
            let kind = e == .aes ? "AES, crypt_method 1" : "LUKS"
            return .unsupported(path: path, detail: "encrypted image (\(kind)): qimg has no key support and cannot \(writing ? "write" : "read") its data (info, map and check work)")
        }
        if !writing, hasExternalDataFile, dataFile == nil {
            return .unsupported(path: path, detail: "the external data file is not open")
        }
        if writing, hasExternalDataFile {
            return .unsupported(path: path, detail: "image with an external data file: qimg does not write such images (reads work)")
        }
        return nil
    }
}
