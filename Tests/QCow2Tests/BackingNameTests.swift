import Testing
import TestSupport
@testable import QCow2

/// The `json:` backing name parser (issue 13 item 12): the shapes qimg follows, and
/// malformed or hostile text that must end in an error, never a trap or a hang.
@Suite struct BackingNameTests {
    @Test func followedShapes() throws {
        let nested = try BackingName.locate(#"json:{"driver":"qcow2","file":{"driver":"file","filename":"b.qcow2"}}"#,
                                            format: nil, relativeTo: "dir/top.qcow2")
        #expect(nested == BackingLocation(path: "b.qcow2", format: .qcow2))
        let dotted = try BackingName.locate(#"json:{"file.filename":"/x/b.raw","driver":"raw"}"#, format: nil, relativeTo: "d/t")
        #expect(dotted == BackingLocation(path: "/x/b.raw", format: .raw))
        let file = try BackingName.locate(#"json:{"driver":"file","filename":"b"}"#, format: nil, relativeTo: "d/t")
        #expect(file == BackingLocation(path: "b", format: .raw, protocolOnly: true))
        // The overlay's backing format wins over the json's driver, as in QEMU.
        let fmt = try BackingName.locate(#"json:{"driver":"raw","file":{"filename":"b"}}"#, format: .qcow2, relativeTo: "d/t")
        #expect(fmt == BackingLocation(path: "b", format: .qcow2))
        #expect(try BackingName.locate("file:b", format: nil, relativeTo: "d/t") == BackingLocation(path: "b", format: nil))
        #expect(try BackingName.locate("b", format: nil, relativeTo: "d/t") == BackingLocation(path: "d/b", format: nil))
        let escaped = try BackingName.locate(#"json:{"file.filename":"a\u00e9\"\\\/\ud83d\ude00"}"#, format: nil, relativeTo: "t")
        #expect(escaped.path == "aé\"\\/😀")
    }

    static let malformed: [String] = [
        "", "{", "}", "[", "{\"a\"", "{\"a\":", "{\"a\":}", "{\"a\" 1}", "{,}", "{\"a\":1,}", "[1,]", "{\"a\":1 \"b\":2}",
        "{'a':1}", "{\"a\":tru}", "{\"a\":nul}", "{\"a\":-}", "{\"a\":1.}", "{\"a\":1e}", "{\"a\":01x}",
        "{\"a\":\"\\x\"}", "{\"a\":\"\\u12\"}", "{\"a\":\"\\ud800\"}", "{\"a\":\"\\udc00\"}", "{\"a\":\"\\ud800\\u0041\"}",
        "{\"a\":\"\\u0000\"}", "{\"a\":\"\u{1}\"}", "{\"a\":\"unterminated", "{\"a\":1}x", "{\"a\":1,\"a\":2}",
        "{\"file\":{\"filename\":\"b\"},\"file.filename\":\"c\"}", "{\"file.filename\":[\"b\"]}", "{\"file.filename\":1}",
        "{\"driver\":\"vmdk\",\"file.filename\":\"b\"}", "{\"driver\":\"qcow2\"}", "{\"filename\":\"b\"}",
        "{\"driver\":\"file\"}", "{\"driver\":\"qcow2\",\"file.driver\":\"nbd\",\"file.filename\":\"b\"}",
        "{\"driver\":\"qcow2\",\"file.filename\":\"b\",\"backing\":null}", "[]", "1", "\"s\"", "null",
        String(repeating: "[", count: 100_000), String(repeating: "{\"a\":", count: 50_000) + "1",
        "{\"a\":\"" + String(repeating: "x", count: 70_000) + "\"}",
    ]

    @Test(arguments: malformed)
    func malformedRefused(_ text: String) {
        #expect(throws: QCow2Error.self) { try BackingName.locate("json:" + text, format: nil, relativeTo: "t") }
    }

    /// Seeded mutations of followed shapes: every result is a location or a QCow2Error.
    @Test func mutationsNeverTrap() {
        let seeds = [#"{"driver":"qcow2","file":{"driver":"file","filename":"b.qcow2"}}"#,
                     #"{"file.filename":"a\"b\\c\u0041","driver":"raw"}"#, #"{"a":[1,-2.5e+3,true,false,null,{}]}"#]
        let alphabet = Array(#"{}[]:,"\ -+.eE0123456789abfnrtu"#.utf8) + [0, 0x7F, 0xC3, 0xFF]
        var rng = SeededRNG(state: 13)
        var accepted = 0
        for _ in 0..<20_000 {
            var b = Array(seeds[Int(rng.next() % UInt64(seeds.count))].utf8)
            for _ in 0...(rng.next() % 4) {
                let at = Int(rng.next() % UInt64(b.count + 1))
                switch rng.next() % 3 {
                case 0: b.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: at)
                case 1: if at < b.count { b.remove(at: at) }
                default: if at < b.count { b[at] = alphabet[Int(rng.next() % UInt64(alphabet.count))] }
                }
            }
            if (try? BackingName.locate("json:" + String(decoding: b, as: UTF8.self), format: nil, relativeTo: "t")) != nil {
                accepted += 1
            }
        }
        #expect(accepted > 0 && accepted < 20_000)
    }
}
