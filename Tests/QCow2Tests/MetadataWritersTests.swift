import Foundation
import Testing

/// Issue 12: every write of qcow2 metadata is found from `MetadataTransaction`. The library
/// writes to a file (`….write(`, `….publish(` on a `BlockFile`) only in the transaction and
/// in the places below, each allowed a fixed number of write calls for what it writes; a new
/// write elsewhere, or one more in a listed file, fails until it is routed through the
/// transaction (or listed here with its reason).
@Suite struct MetadataWritersTests {
    static let allowed: [String: (calls: Int, why: String)] = [
        "Metadata/Allocator.swift": (1, "refcount blocks, when the transaction commits refcounts"),
        "Image/QCow2Image+Write.swift": (5, "guest data (step 2)"),
        "Image/QCow2Image+Compressed.swift": (1, "the compressed stream (step 2)"),
        "Image/RawImage.swift": (1, "raw guest data"),
        "Operations/Commit.swift": (2, "guest data into a raw base"),
        "Operations/ZeroExpansion.swift": (1, "zeros written into the clusters of expanded zero entries (step 2)"),
        "Operations/Create.swift": (4, "a new file's first clusters, zero data for preallocation"),
        "Repository/Repository.swift": (1, "the repository's manifest (a JSON file, not an image)"),
    ]

    @Test func metadataIsWrittenOnlyThroughTheTransaction() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources/QCow2")
        let pattern = try NSRegularExpression(pattern: #"(\bf|[fF]ile)\.(write|publish)\("#)
        var found: [String: Int] = [:]
        let files = FileManager.default.enumerator(atPath: root.path)?.compactMap { $0 as? String } ?? []
        #expect(files.contains("Metadata/MetadataTransaction.swift"), "sources not found at \(root.path)")
        for rel in files where rel.hasSuffix(".swift") && !rel.hasPrefix("IO/") && rel != "Metadata/MetadataTransaction.swift" {
            let text = try String(contentsOf: root.appendingPathComponent(rel), encoding: .utf8)
            let n = pattern.numberOfMatches(in: text, range: NSRange(text.startIndex..., in: text))
            if n > 0 { found[rel] = n }
        }
        for (rel, n) in found.sorted(by: { $0.key < $1.key }) {
            let limit = Self.allowed[rel]?.calls ?? 0
            #expect(n <= limit, "\(rel) writes to the file \(n) times outside MetadataTransaction (allowed: \(limit))")
        }
    }
}
