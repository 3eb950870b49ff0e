#if canImport(Glibc)
import Glibc
#endif

/// `REPO/qimg-repository.id`: the repository id a second time, beside the manifest, so that
/// a manifest rebuilt after it was lost keeps the id, and with it the image's bitmaps
/// (`NAME@<id>.<point>`): the next backup continues the chain and removes the old bitmap.
enum RepositoryID {
    static let fileName = "qimg-repository.id"
    /// Longer files are not an id file of ours.
    static let maxBytes = 64

    /// Lower-case hexadecimal, not empty.
    static func isValid(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= maxBytes && id.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }

    /// The id the file holds; nil when it is missing, unreadable or not an id.
    static func read(_ path: String) -> String? {
        guard let f = try? BlockFile(path: path), let size = try? f.size(), size <= UInt64(maxBytes) + 1,
              let bytes = try? f.read(count: Int(size), at: 0) else { return nil }
        var text = String(decoding: bytes, as: UTF8.self)
        if text.hasSuffix("\n") { text.removeLast() }
        return isValid(text) ? text : nil
    }

    static func write(_ id: String, to path: String) throws {
        try Repository.writeAtomically(id + "\n", to: path, mode: 0o600)
    }
}
