#if canImport(Glibc)
import Glibc
#endif

/// `qemu-img convert`: a new standalone image (or an overlay with -B) holding the
/// source's guest data; zero ranges stay sparse (-S).
public struct ConvertOptions: Sendable {
    public var create = CreateOptions()
    public var compressed = false
    /// How zlib-type compressed clusters are encoded.
    public var zlibEncoder = ZlibEncoder.igzip
    /// -B: the target's backing file (name as stored, format).
    public var backingFile: String?
    public var backingFormat: ImageFormat?
    /// -n: write into an existing target instead of creating it.
    public var skipCreate = false
    public var minSparse: UInt64 = 4096
    /// --bitmaps: copy the source's consistent persistent bitmaps.
    public var copyBitmaps = false
    public var skipBrokenBitmaps = false
    /// Called with the name of each inconsistent bitmap skipped (qemu-img warns).
    public var skippedBitmap: @Sendable (String) -> Void = { _ in }
    /// Make the target durable (fsync, then rename into place, then fsync the directory).
    /// false is qemu-img's `-t unsafe`: the data may still be in the page cache when
    /// the target appears, and a power loss can lose it.
    public var durable = true
    /// Checked between chunks (SIGINT/SIGTERM): true stops the copy; nothing is left behind.
    public var shouldStop: @Sendable () -> Bool = { false }
    public init() {}
}

public enum ConvertOperation {
    public static func run(source: any DiskImage, target path: String, options o: ConvertOptions,
                           progress: ((UInt64, UInt64) -> Void)? = nil) throws {
        // Bitmaps are checked before anything is written.
        var bitmaps: [(BitmapDirectoryEntry, DirtyBitmap)] = []
        if o.copyBitmaps, let q = source as? QCow2Image {
            // qemu-img looks at the bitmaps last first (QEMU lists them in reverse directory
            // order): the first inconsistent one it names, and its warnings, follow that order.
            for e in q.bitmaps.reversed() where e.inUse {
                if o.skipBrokenBitmaps { o.skippedBitmap(e.name); continue }
                throw QCow2Error.bitmapInconsistent(path: q.path, bitmap: e.name)
            }
            for e in q.bitmaps {
                if e.inUse {
                    if o.skipBrokenBitmaps { continue }
                    throw QCow2Error.bitmapInconsistent(path: q.path, bitmap: e.name)
                }
                bitmaps.append((e, try q.loadBitmap(e)))
            }
            if !bitmaps.isEmpty && (o.create.format != .qcow2 || o.create.version < 3) {
                throw QCow2Error.unsupported(path: path, detail: "bitmaps can only be copied into qcow2 version 3 images")
            }
        }
        // A new target is written under a temporary name in the same directory and renamed
        // into place once durable: an interrupted convert never leaves a partial image under
        // the target's name (qemu-img does). -n and non-regular targets (block devices) are
        // written in place.
        var st = stat()
        let exists = Sys.stat(path, &st) == 0
        if exists && (st.st_mode & S_IFMT) == S_IFDIR {
            throw QCow2Error.invalidArgument(path: path, detail: "is a directory")
        }
        let inPlace = o.skipCreate || (exists && (st.st_mode & S_IFMT) != S_IFREG)
        // An existing symlink keeps pointing where it did: the file it names is replaced.
        var final = path
        if !inPlace, Sys.lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFLNK, let real = Sys.realpath(path) {
            final = real
        }
        // The target's backing file, and a refusal to overwrite a file the copy reads.
        var targetBacking: (any DiskImage)?
        if let b = o.backingFile {
            let loc = try BackingName.locate(b, format: o.backingFormat, relativeTo: path)
            targetBacking = try ImageOpener().open(loc.path, format: loc.format)
        }
        if exists { try refuseTargetInChains(path, source: source, backing: targetBacking) }
        // An existing target's permissions (and owner, where allowed) carry over to its replacement.
        var replaced = stat()
        let replacing = !inPlace && Sys.stat(final, &replaced) == 0
        let staged = inPlace ? nil : try StagedFile(final: final)
        defer { staged?.discard() }
        let work = staged?.temporaryPath ?? path
        do {
            try write(source: source, work: work, backing: targetBacking, bitmaps: bitmaps, options: o,
                      keeping: replacing ? replaced : nil, progress: progress)
            try staged?.commit(replacing: true, durable: o.durable)
        } catch let e as QCow2Error where e.path == work && work != path {
            throw e.withPath(path)
        }
    }

    /// Refuses a target that is a file of the source's chain or of the target's backing chain.
    static func refuseTargetInChains(_ target: String, source: any DiskImage, backing: (any DiskImage)?) throws {
        guard let id = try? BlockFile(path: target).identity() else { return }
        for (chain, role) in [(Optional(source), "the source image or in its backing chain"), (backing, "the output's backing file or in its backing chain")] {
            if let (l, _) = try chain?.layer(withIdentity: id) {
                throw QCow2Error.invalidArgument(path: target, detail: "the output is \(role) ('\(l.path)'); it cannot be overwritten by the copy")
            }
        }
    }

    /// Creates (unless -n) and fills `work`, and makes it durable when asked.
    static func write(source: any DiskImage, work: String, backing: (any DiskImage)?, bitmaps: [(BitmapDirectoryEntry, DirtyBitmap)],
                      options o: ConvertOptions, keeping replaced: stat?, progress: ((UInt64, UInt64) -> Void)?) throws {
        if !o.skipCreate {
            var c = o.create
            c.size = source.virtualSize
            c.backingFile = o.backingFile
            c.backingFormat = o.backingFormat?.rawValue
            try ImageCreator.create(work, options: c, filledThenSynced: true)
        }
        var settings = CopySettings()
        settings.compressed = o.compressed
        settings.zlibEncoder = o.zlibEncoder
        settings.minSparse = o.minSparse
        settings.durable = o.durable
        settings.shouldStop = o.shouldStop
        var copy = try TargetCopy(source: source, work: work, format: o.skipCreate ? nil : o.create.format,
                                  targetBacking: backing, settings: settings, keeping: replaced)
        // An existing target (-n) is overwritten entirely (zeros written as zeros).
        let plan = o.skipCreate ? Plan(data: [(0, source.virtualSize)], zero: [])
            : try Plan.make(source: source, backing: backing, minSparse: o.minSparse, unit: copy.unit)
        // With a backing file, zeros must be written: they hide what it holds.
        try copy.run(plan, maskZeros: o.skipCreate || backing != nil, progress: progress)
        try copy.finish { q in
            for (e, bm) in bitmaps {
                try q.applyBitmapActions([.add(granularity: e.granularity, disabled: !e.isAuto)], to: e.name)
                try q.applyBitmapActions([.merge(source: e.name)], to: e.name, mergeSource: { _ in bm })
            }
        }
    }
}

/// What convert writes, as qemu-img decides it: `data` is read from the source and written
/// (its zero runs left out, or written as zeros over a backing file), `zero` is written as
/// zeros without reading; the rest stays unallocated. Ranges are whole target units (the
/// last one may end at the end of the disk), sorted, disjoint.
struct Plan {
    var data: [(UInt64, UInt64)]
    var zero: [(UInt64, UInt64)]

    /// Both lists merged in guest order (true: data).
    var inOrder: [(UInt64, UInt64, Bool)] {
        (data.map { ($0.0, $0.1, true) } + zero.map { ($0.0, $0.1, false) }).sorted { $0.0 < $1.0 }
    }

    /// Without a backing file for the target: the source's data, through its chain (all of
    /// the disk with -S 0). With one (-B): only what the source's top layer holds, its data,
    /// and its zeros as zeros (as data with -S 0), except past the end of the backing file,
    /// which reads as zeros there. Where the top layer leaves a range to its own backing
    /// file, qemu-img assumes it reads the same as the target's backing file, and loses the
    /// data of the layers in between when it does not (-B naming a lower layer of the
    /// chain): unless the two are the same file, such ranges are compared here and copied
    /// where they differ.
    static func make(source: any DiskImage, backing: (any DiskImage)?, minSparse: UInt64, unit: UInt64) throws -> Plan {
        let size = source.virtualSize
        guard let backing else {
            let data = minSparse == 0 ? [(UInt64(0), size)] : try CopyEngine.nonZeroRanges(source)
            return Plan(data: CopyEngine.normalize(data, unit: unit, size: size), zero: [])
        }
        let sameBacking = try source.backing.map { try $0.file.identity() == backing.file.identity() } ?? false
        var data: [(UInt64, UInt64)] = []
        var zero: [(UInt64, UInt64)] = []
        var inherited: [(UInt64, UInt64)] = []
        let status = BlockStatus(source)
        var pos: UInt64 = 0
        while pos < size {
            let s = try status.layerStatus(source, at: pos, bytes: size - pos)
            let len = s.length > 0 ? min(s.length, size - pos) : size - pos
            if s.zero || s.length == 0 {
                let end = min(pos + len, max(pos, backing.virtualSize))
                if end > pos {
                    if minSparse == 0 { data.append((pos, end - pos)) } else { zero.append((pos, end - pos)) }
                }
            } else if s.data {
                data.append((pos, len))
            } else if !sameBacking {
                inherited.append((pos, len))
            }
            pos += len
        }
        data += try differing(source, backing, inherited, unit: unit)
        // Zeros go in whole units; a unit they share with anything else is copied instead.
        var whole: [(UInt64, UInt64)] = []
        for (a, n) in CopyEngine.normalize(zero, unit: 1, size: size) {
            let s = (a + unit - 1) / unit * unit
            let e = a + n == size ? size : (a + n) / unit * unit
            if s < e {
                whole.append((s, e - s))
                if a < s { data.append((a, s - a)) }
                if e < a + n { data.append((e, a + n - e)) }
            } else {
                data.append((a, n))
            }
        }
        data = CopyEngine.normalize(data, unit: unit, size: size)
        return Plan(data: data, zero: subtract(whole, data))
    }

    /// The units of `ranges` where `source` reads differently from `backing` (which reads
    /// as zeros past its end).
    static func differing(_ source: any DiskImage, _ backing: any DiskImage, _ ranges: [(UInt64, UInt64)], unit: UInt64) throws -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        let chunk = max(unit, 2 << 20) / unit * unit
        var a = [UInt8](repeating: 0, count: Int(chunk))
        var b = [UInt8](repeating: 0, count: Int(chunk))
        for (start, length) in CopyEngine.normalize(ranges, unit: unit, size: source.virtualSize) {
            var pos = start
            while pos < start + length {
                let n = Int(min(chunk, start + length - pos))
                let inBacking = Int(min(UInt64(n), backing.virtualSize > pos ? backing.virtualSize - pos : 0))
                try a.withUnsafeMutableBytes { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
                for i in inBacking..<n { b[i] = 0 }
                if inBacking > 0 {
                    try b.withUnsafeMutableBytes { try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<inBacking]), at: pos) }
                }
                var u = 0
                while u < n {
                    let len = min(Int(unit), n - u)
                    let same = a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in
                        guard let x = pa.baseAddress, let y = pb.baseAddress else { return true }
                        return memcmp(x + u, y + u, len) == 0
                    } }
                    if !same { out.append((pos + UInt64(u), UInt64(len))) }
                    u += len
                }
                pos += UInt64(n)
            }
        }
        return out
    }

    /// `ranges` without what `cut` covers (both sorted and disjoint).
    static func subtract(_ ranges: [(UInt64, UInt64)], _ cut: [(UInt64, UInt64)]) -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        for (a, n) in ranges {
            var s = a
            let e = a + n
            for (c, m) in cut where c < e && c + m > s {
                if c > s { out.append((s, c - s)) }
                s = max(s, c + m)
            }
            if s < e { out.append((s, e - s)) }
        }
        return out
    }
}
