import Testing
import TestSupport
@testable import QCow2

/// The library's one JSON reader and writer under both rule sets: QEMU's (`json:` backing
/// names, `--image-opts`) and the repository manifest's. Malformed input is a
/// `FormatError`, never a trap; each caller's refusals stay its own.
@Suite struct JSONTests {
    static func parse(_ text: String, _ rules: JSONRules) throws(FormatError) -> JSON {
        try JSON.parse(Array(text.utf8), rules: rules)
    }

    static func refused(_ text: String, _ rules: JSONRules) -> Bool {
        (try? parse(text, rules)) == nil
    }

    /// `n` arrays around a number: n + 1 levels.
    static func nested(_ n: Int) -> String { String(repeating: "[", count: n) + "1" + String(repeating: "]", count: n) }

    @Test func depthIsCapped() throws {
        #expect(try Self.parse(Self.nested(31), .qemu) != .null)
        #expect(Self.refused(Self.nested(32), .qemu))
        #expect(try Self.parse(Self.nested(32), .manifest) != .null)
        #expect(Self.refused(Self.nested(33), .manifest))
        for rules in [JSONRules.qemu, .manifest] {
            #expect(Self.refused(String(repeating: "[", count: 200_000), rules))
            #expect(Self.refused(String(repeating: "{\"a\":", count: 100_000) + "1", rules))
        }
    }

    @Test func everyTruncationIsRefused() {
        let doc = #"{"a": [1, 22, {"b": "x\u00e9\n\ud83d\ude00"}], "c": true, "d": null, "e": false, "f": ""}"#
        let bytes = Array(doc.utf8)
        for rules in [JSONRules.qemu, .manifest] {
            #expect((try? JSON.parse(bytes, rules: rules)) != nil)
            for n in 0..<bytes.count {
                #expect((try? JSON.parse(Array(bytes[..<n]), rules: rules)) == nil, "\(n) bytes: \(doc.prefix(n))")
            }
        }
    }

    static let badStrings = [
        #""\x""#, #""\u12""#, #""\u12g4""#, #""\ud800""#, #""\udc00""#, #""\ud800\u0041""#, #""\ud800x""#,
        #""\"#, "\"a\u{1}b\"", "\"tab\there\"", #""unterminated"#, #"'single'"#,
    ]

    @Test(arguments: badStrings)
    func badEscapesAreRefused(_ s: String) {
        #expect(Self.refused(s, .qemu))
        #expect(Self.refused(s, .manifest))
    }

    /// QEMU refuses \u0000; the manifest reads it back (the writer makes it).
    @Test func nulEscape() throws {
        #expect(Self.refused(#"{"a":"x\u0000"}"#, .qemu))
        #expect(try Self.parse(#"{"a":"x\u0000"}"#, .manifest) == .object([("a", .string("x\u{0}"))]))
    }

    @Test func numbers() throws {
        #expect(try Self.parse("18446744073709551615", .manifest).uint64 == UInt64.max)
        #expect(try Self.parse("007", .manifest).uint64 == 7)
        for t in ["18446744073709551616", "99999999999999999999999", "-1", "1.5", "1e3", "+1", "-", "0x10"] {
            #expect(Self.refused(t, .manifest), "\(t)")
        }
        // QEMU's rules keep any JSON number as its text; only the manifest's read it as UInt64.
        for t in ["123456789012345678901234567890", "-2.5e+3", "1E-400", "-0", "18446744073709551616"] {
            let v = try Self.parse(t, .qemu)
            #expect(v == .number(t) && v.uint64 == nil, "\(t)")
        }
        for t in ["-", "1.", "1e", "1e+", ".5", "--1", "+1"] { #expect(Self.refused(t, .qemu), "\(t)") }
    }

    @Test func duplicateKeys() throws {
        let text = #"{"a": 1, "b": {"c": 2, "c": 3}, "a": 4}"#
        #expect(Self.refused(text, .qemu))
        #expect(Self.refused(#"{"b": {"c": 2, "c": 3}}"#, .qemu))
        let v = try Self.parse(text, .manifest)
        #expect(v["a"]?.uint64 == 1 && v["b"]?["c"]?.uint64 == 2)
    }

    /// QEMU's rules read 64 KiB at most; the manifest's leave the bound to the repository.
    @Test func sizeCap() throws {
        let x = String(repeating: "x", count: 64 * 1024 - 2)
        let exact = "\"" + x + "\""
        #expect(try Self.parse(exact, .qemu) == .string(x))
        let overCapRefused = Self.refused(exact + " ", .qemu)
        #expect(overCapRefused, "64 KiB + 1 byte read under QEMU's rules")
        #expect(try Self.parse(exact + " ", .manifest) == .string(x))
        #expect(try Self.parse("[" + exact + "," + exact + "]", .manifest) == .array([.string(x), .string(x)]))
    }

    /// Bytes that are not UTF-8 keep their PathCodec scalars through the writer and reader,
    /// and a decoded name (`parse(String)`) reads back the bytes it stands for.
    @Test func writerAndReaderAgree() throws {
        let odd = PathCodec.decode([0x61, 0xFF, 0xC3, 0x22, 0x5C])
        let value = JSON.object([
            ("name", .string(odd)), ("nul", .string("a\u{0}\u{1F}\u{7F}é😀\u{10FD41}")), ("n", .uint(UInt64.max)),
            ("list", .array([.uint(0), .null, .bool(true), .bool(false), .object([]), .array([]), .string("")])),
        ])
        for indent in [nil, 2] {
            #expect(try JSON.parse(Array(value.rendered(indent: indent).utf8), rules: .manifest) == value)
        }
        let prefix = Array(#"{"file.filename":""#.utf8), suffix = Array(#""}"#.utf8)
        #expect((try? JSON.parse(prefix + [0x61, 0xFF, 0xC3, 0x22, 0x5C, 0x5C] + suffix, rules: .manifest)) == nil)
        let fixed = prefix + [0x61, 0xFF, 0xC3, 0x5C, 0x22, 0x5C, 0x5C] + suffix
        let expected = JSON.object([("file.filename", .string(PathCodec.decode([0x61, 0xFF, 0xC3, 0x22, 0x5C])))])
        #expect(try JSON.parse(fixed, rules: .manifest) == expected)
        #expect(try JSON.parse(fixed, rules: .qemu) == expected)
        #expect(try JSON.parse(PathCodec.decode(fixed), rules: .qemu) == expected)
    }
}

extension JSONTests {
    /// The text both layouts give, byte for byte (the manifest's format: written by hand).
    @Test func renderedTextIsExact() {
        let value = JSON.object([("a", .uint(1)), ("b", .array([.uint(1), .string("x\"y\\\u{1}é")])),
                                 ("c", .array([.object([("d", .null), ("t", .bool(true))])])), ("e", .object([])), ("f", .array([]))])
        let compact = #"{"a":1,"b":[1,"x\"y\\\u0001é"],"c":[{"d":null,"t":true}],"e":{},"f":[]}"#
        let pretty = """
            {
              "a": 1,
              "b": [1, "x\\"y\\\\\\u0001é"],
              "c": [
                {
                  "d": null,
                  "t": true
                }
              ],
              "e": {},
              "f": []
            }
            """
        #expect(value.rendered(indent: nil) == compact)
        #expect(value.rendered() == pretty)
        #expect(value.renderedBytes(indent: nil) == Array(compact.utf8))
    }
}
