#if canImport(Glibc)
import Glibc
#endif

/// A qcow2 file in a chain directory of a repository that the manifest does not list as a
/// point. qimg removes only its own leftovers (`isLeftover`): the point file of a backup
/// killed before the manifest recorded it, and the files an unfinished prune expired
/// (its journal names them). Every other one is an orphan: kept, listed, and damage for
/// `repo verify` (a person lost or moved a file, copied one in, or the manifest forgot it).
public struct UnlistedFile: Equatable, Sendable {
    public enum Reason: Equatable, Sendable {
        /// Named `<time>-<id>.qcow2` with an id the manifest's counter never gave out, the
        /// only such file of its chain, a full or on the chain's newest point, and (when the
        /// image is known) the image holds no bitmap of it: a run that never recorded it.
        case killedBackup
        /// An expired point of the unfinished prune whose journal names it.
        case expiredByPrune
        /// Its backing file is not there.
        case parentMissing(String)
        /// Its backing file is there but is not a listed point (an orphan itself, or unlisted).
        case parentNotListed(String)
        /// A full, or an incremental on a listed point, that the manifest does not list.
        case notListed
        /// In a directory that is no chain of the manifest.
        case unknownChain(String)
        /// Beside the manifest, in no chain directory (`chain` is empty).
        case outsideChains
        /// Not a qcow2 image qimg can open.
        case unreadable(String)
    }

    public var chain: String
    /// Relative to the repository directory (CHAIN/FILE; FILE for `outsideChains`).
    public var file: String
    public var reason: Reason

    /// A file qimg made and removes (the next backup; an expired one: the next prune too).
    public var isLeftover: Bool { reason == .killedBackup || reason == .expiredByPrune }

    public var detail: String {
        switch reason {
        case .killedBackup: return "the file of a backup killed before the manifest recorded it: the next backup removes it"
        case .expiredByPrune: return "expired by an unfinished prune: the next prune or backup removes it"
        case .parentMissing(let b): return "parent \(b) missing"
        case .parentNotListed(let b): return "parent \(b) is not a restore point"
        case .notListed: return "not listed in the manifest"
        case .unknownChain(let c): return "not listed in the manifest (no chain '\(c)')"
        case .outsideChains: return "not in a chain directory"
        case .unreadable(let why): return "cannot be opened: \(why)"
        }
    }
}

extension Repository {
    /// The unlisted files of every chain directory, by directory name and file name, then
    /// those beside the manifest (`chain`: of that chain's directory only).
    /// `imageHasBitmap(id)`: whether the backed-up image holds the job's bitmap of point
    /// `id` (a run that completed: its file is no leftover).
    public func unlistedFiles(chain: String? = nil, imageHasBitmap: (String) -> Bool = { _ in false }) -> [UnlistedFile] {
        if let chain { return unlistedFiles(inChain: chain, entries: Self.entries(file(chain)), imageHasBitmap: imageHasBitmap) }
        let top = Self.entries(path).sorted().filter { !$0.hasPrefix(".") && !Self.isTemporary($0) }
        return top.filter { isDirectory(file($0)) }.flatMap { unlistedFiles(inChain: $0, entries: Self.entries(file($0)), imageHasBitmap: imageHasBitmap) }
            + top.filter { isQCow2File(file($0)) }.map { UnlistedFile(chain: "", file: $0, reason: .outsideChains) }
    }

    /// `entries`: the names in chain `name`'s directory.
    private func unlistedFiles(inChain name: String, entries: [String], imageHasBitmap: (String) -> Bool) -> [UnlistedFile] {
        let listed = manifest.chain(name)?.points ?? []
        let known = listedFiles(chain: name)
        let expired = Set(pruneJournal?.chain == name ? pruneJournal?.expired ?? [] : [])
        let files = entries.sorted().filter { f in
            !known.contains("\(name)/\(f)") && !Self.isTemporary(f) && isQCow2File(file("\(name)/\(f)"))
        }
        // A killed run leaves one file of a number the manifest's counter had not reached.
        let fresh = files.filter { f in RepositoryManifest.pointName(f).map { $0.number >= manifest.nextPoint } ?? false }
        return files.map { f in
            let rel = "\(name)/\(f)"
            if expired.contains(rel) { return UnlistedFile(chain: name, file: rel, reason: .expiredByPrune) }
            let q: QCow2Image
            do { q = try PointDigest.openAlone(file(rel)) } catch {
                return UnlistedFile(chain: name, file: rel, reason: .unreadable((error as? QCow2Error)?.message ?? "\(error)"))
            }
            let backing = q.backingFileName
            let newest = listed.last.map { String($0.file.split(separator: "/").last ?? "") }
            if fresh == [f], backing == nil || backing == newest, let n = RepositoryManifest.pointName(f)?.number,
               !imageHasBitmap(RepositoryBackup.pointID(n)) {
                return UnlistedFile(chain: name, file: rel, reason: .killedBackup)
            }
            let unknown = manifest.chain(name) == nil
            guard let b = backing else { return UnlistedFile(chain: name, file: rel, reason: unknown ? .unknownChain(name) : .notListed) }
            var st = stat()
            guard Sys.stat(BackingName.fullName(b, relativeTo: file(rel)), &st) == 0 else {
                return UnlistedFile(chain: name, file: rel, reason: .parentMissing(b))
            }
            if unknown { return UnlistedFile(chain: name, file: rel, reason: .unknownChain(name)) }
            return UnlistedFile(chain: name, file: rel, reason: known.contains("\(name)/\(b)") ? .notListed : .parentNotListed(b))
        }
    }

    /// The files chain `name`'s points are in, and those their unfinished merges still read.
    func listedFiles(chain name: String) -> Set<String> {
        Set((manifest.chain(name)?.points ?? []).flatMap { [$0.file] + ($0.merge?.files ?? []) })
    }

    /// Removes what earlier runs of qimg left in chain `name`: the files an unfinished prune
    /// expired, the temporary files of earlier versions' prunes, and, when the image is known
    /// (`imageHasBitmap`), the point file of a killed backup (`UnlistedFile.Reason`); never
    /// any other file. Call with the exclusive lock, after `finishMerges`. Returns the
    /// relative names removed.
    @discardableResult
    public func removeLeftovers(chain name: String, imageHasBitmap: ((String) -> Bool)?) -> [String] {
        let entries = Self.entries(file(name))
        let old = entries.filter { $0.hasSuffix(".qcow2" + RepositoryPrune.oldReplacementSuffix) }.map { "\(name)/\($0)" }
        let leftovers = unlistedFiles(inChain: name, entries: entries, imageHasBitmap: imageHasBitmap ?? { _ in false })
            .filter { $0.reason == .expiredByPrune || ($0.reason == .killedBackup && imageHasBitmap != nil) }
        return remove(old + leftovers.map(\.file))
    }

    /// Removes the given files (relative names) that are there; a directory fsync after.
    /// Returns the names removed.
    func remove(_ files: [String]) -> [String] {
        let removed = files.filter { Sys.unlink(file($0)) == 0 }
        if let first = removed.first { try? StagedFile.syncDirectory(of: file(first)) }
        return removed
    }

    static func isTemporary(_ name: String) -> Bool {
        name.hasSuffix(StagedFile.temporarySuffix) || name.hasSuffix(".qcow2" + RepositoryPrune.oldReplacementSuffix)
    }

    private func isDirectory(_ p: String) -> Bool {
        var st = stat()
        return Sys.lstat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// A regular file named `*.qcow2` or starting with qcow2's magic.
    private func isQCow2File(_ p: String) -> Bool {
        var st = stat()
        guard Sys.lstat(p, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return false }
        if p.hasSuffix(".qcow2") { return true }
        guard let f = try? BlockFile(path: p), let magic = try? f.read(count: 4, at: 0) else { return false }
        return magic == [0x51, 0x46, 0x49, 0xFB]
    }
}
