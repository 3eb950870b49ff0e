#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Image formats qimg reads.
public enum ImageFormat: String, Sendable, CaseIterable {
    case qcow2
    case raw

    public init(name: String, path: String) throws {
        guard let f = ImageFormat(rawValue: name) else {
            throw QCow2Error.unsupported(path: path, detail: "unknown or unsupported image format '\(name)' (qimg supports qcow2 and raw)")
        }
        self = f
    }
}

/// Opens images and their backing chains.
public struct ImageOpener: Sendable {
    public var cacheBytes: Int = QCow2Image.defaultCacheBytes
    /// Whether to open backing files (false: the top image alone, like qemu-img's -u cases).
    public var openBacking = true
    /// Chains deeper than this are refused (a guard against pathological chains).
    public var maxChainDepth = 4096
    /// Open the top image read-write (backing files are always read-only).
    public var writable = false
    /// Take no locks and respect none (`-U`); only for read-only opens.
    public var forceShare = false
    /// Rebuild the refcounts of a dirty image opened for writing (false: the caller repairs).
    public var repairDirty = true
    /// Open an image marked corrupt for writing (only repairs do that).
    public var allowCorrupt = false
    /// Open an image whose bitmaps cannot be loaded (check reports, repair drops them).
    public var tolerateBrokenBitmaps = false
    /// Open external data files (false: metadata only, as qemu-img info, which shows an
    /// image whose data file is missing).
    public var openDataFiles = true
    /// Receives repair diagnostics (what qemu prints on stderr while repairing).
    public var report: @Sendable (String) -> Void = { _ in }

    public init() {}

    /// The format of the file at `path` as QEMU probes it: the qcow2 magic and a version
    /// of at least 2 (bytes past the end of the file read as zeros), else raw. A file in
    /// another format QEMU recognises (vmdk, vpc, vdi, luks, qcow, qed...) is refused,
    /// never called raw; so is a fixed-size VHD, which QEMU itself probes as raw.
    public static func probe(_ file: BlockFile, path: String) throws -> ImageFormat {
        let size = try file.size()
        guard size > 0 else { return .raw }
        let head = try file.read(count: FormatProbe.headBytes, at: 0)
        let version = head[4..<8].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        if head[0..<4] == [0x51, 0x46, 0x49, 0xFB] && version >= 2 { return .qcow2 }
        if let name = FormatProbe.foreignFormat(head: head, path: path) {
            throw QCow2Error.foreignFormat(path: path, format: name, probedAsRaw: false)
        }
        if try FormatProbe.hasVPCFooter(file, size: size) {
            throw QCow2Error.foreignFormat(path: path, format: "vpc", probedAsRaw: true)
        }
        return .raw
    }

    /// Opens `path` (format given or probed) and, unless disabled, its backing chain.
    public func open(_ path: String, format: ImageFormat? = nil) throws -> any DiskImage {
        var seen: [FileIdentity: String] = [:]
        return try open(path, format: format, depth: 0, seen: &seen)
    }

    private func open(_ path: String, format: ImageFormat?, depth: Int, seen: inout [FileIdentity: String]) throws -> any DiskImage {
        let write = writable && depth == 0
        if write && forceShare {
            throw QCow2Error.invalidArgument(path: path, detail: "force-share (-U) can only be used with read-only images")
        }
        let file = try BlockFile(path: path, writable: write)
        let id = try file.identity()
        if let earlier = seen[id] {
            throw QCow2Error.backing(path: path, detail: "backing chain loop: this file is already in the chain (as '\(earlier)')")
        }
        guard depth <= maxChainDepth else {
            throw QCow2Error.backing(path: path, detail: "backing chain is deeper than \(maxChainDepth) images")
        }
        seen[id] = path
        try ImageLock.acquire(fd: file.fd, path: path, mode: forceShare ? .none : write ? .write : .read)
        let fmt = try format ?? Self.probe(file, path: path)
        switch fmt {
        case .raw:
            return try RawImage(path: path, file: file)
        case .qcow2:
            let img = try QCow2Image(path: path, file: file, cacheBytes: cacheBytes, tolerateBrokenBitmaps: tolerateBrokenBitmaps && depth == 0)
            if openDataFiles || write { try img.openDataFile(forceShare: forceShare) }
            if write, let refusal = img.protectionRefusal(writing: true) { throw refusal }
            if write { try img.enableWriting(repairDirty: repairDirty, allowCorrupt: allowCorrupt, report: report) }
            if openBacking, let name = img.backingFileName {
                var bfmt: ImageFormat?
                if let f = img.backingFormat {
                    do { bfmt = try ImageFormat(name: f, path: path) } catch {
                        throw QCow2Error.backing(path: path, detail: "backing file '\(name)' has unsupported format '\(f)'")
                    }
                }
                let loc = try BackingName.locate(name, format: bfmt, relativeTo: path)
                let full = loc.path
                do {
                    let backing = try open(full, format: loc.format, depth: depth + 1, seen: &seen)
                    if loc.protocolOnly, let raw = backing as? RawImage { raw.formatName = "file" }
                    img.backing = backing
                } catch {
                    if case QCow2Error.io(_, "open", let e)? = error as? QCow2Error {
                        throw QCow2Error.backing(path: path, detail: "could not open backing file '\(full)': \(errnoDescription(e))")
                    }
                    throw error
                }
            }
            return img
        }
    }
}
