/// The LUKS1 header a LUKS-encrypted qcow2 image keeps in its full disk encryption
/// header extension's clusters: what `info` shows of it without a key (QEMU's names:
/// cipher algorithm with its key size, mode, IV generator, hash, key slots).
public struct LUKSHeader: Equatable, Sendable {
    public struct Slot: Equatable, Sendable {
        public var active: Bool
        public var iterations: UInt32
        /// Bytes from the start of the LUKS header.
        public var keyOffset: UInt64
        public var stripes: UInt32
    }

    public static let size = 592
    static let magic: [UInt8] = [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE]
    static let slotActive: UInt32 = 0x00AC_71F3
    static let slotInactive: UInt32 = 0x0000_DEAD
    static let sector: UInt64 = 512

    /// QEMU's name of the cipher with its key size ("aes-256").
    public var cipherAlgorithm: String
    /// ecb, cbc, xts or ctr.
    public var cipherMode: String
    /// plain, plain64 or essiv.
    public var ivgenAlgorithm: String
    /// The hash of an essiv IV generator.
    public var ivgenHash: String?
    public var hash: String
    public var uuid: String
    public var payloadOffset: UInt64
    public var masterKeyIterations: UInt32
    public var slots: [Slot]

    static let hashes: Set<String> = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"]
    static let cipherSizes: [String: [UInt32]] = [
        "aes": [16, 24, 32], "serpent": [16, 24, 32], "twofish": [16, 24, 32], "cast5": [16], "sm4": [16],
    ]

    public init(parsing r: ByteReader) throws(FormatError) {
        guard Array(try r.slice(0, 6, "LUKS magic")) == Self.magic else { throw FormatError("LUKS header", "bad magic") }
        let version = try r.u16(6, "LUKS version")
        guard version == 1 else { throw FormatError("LUKS header", "version \(version) is not supported (LUKS1 only)") }
        func text(_ o: Int, _ n: Int, _ f: String) throws(FormatError) -> String {
            let raw = try r.slice(o, n, f)
            return String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        let cipher = try text(8, 32, "cipher name")
        let modeSpec = try text(40, 32, "cipher mode")
        hash = try text(72, 32, "hash spec")
        guard Self.hashes.contains(hash) else { throw FormatError("LUKS header", "unknown hash '\(hash)'") }
        payloadOffset = UInt64(try r.u32(104, "payload offset")) * Self.sector
        let keyBytes = try r.u32(108, "key bytes")
        masterKeyIterations = try r.u32(164, "master key iterations")
        uuid = try text(168, 40, "uuid")

        // "xts-plain64", "cbc-essiv:sha256": mode, IV generator, its hash.
        let parts = modeSpec.split(separator: "-", maxSplits: 1).map(String.init)
        guard parts.count == 2, ["ecb", "cbc", "xts", "ctr"].contains(parts[0]) else {
            throw FormatError("LUKS header", "unknown cipher mode '\(modeSpec)'")
        }
        cipherMode = parts[0]
        let iv = parts[1].split(separator: ":", maxSplits: 1).map(String.init)
        guard let ivAlg = iv.first, ["plain", "plain64", "essiv"].contains(ivAlg) else {
            throw FormatError("LUKS header", "unknown IV generator in '\(modeSpec)'")
        }
        ivgenAlgorithm = ivAlg
        ivgenHash = iv.count == 2 ? iv[1] : nil
        if ivAlg == "essiv" {
            guard let h = ivgenHash, Self.hashes.contains(h) else { throw FormatError("LUKS header", "essiv needs a known hash") }
        }
        let perCipher = cipherMode == "xts" ? keyBytes / 2 : keyBytes
        guard let sizes = Self.cipherSizes[cipher], sizes.contains(perCipher) else {
            throw FormatError("LUKS header", "unknown cipher '\(cipher)' with \(keyBytes) key bytes")
        }
        cipherAlgorithm = cipher == "sm4" ? cipher : "\(cipher)-\(perCipher * 8)"

        slots = []
        for k in 0..<8 {
            let o = 208 + k * 48
            let state = try r.u32(o, "key slot state")
            guard state == Self.slotActive || state == Self.slotInactive else {
                throw FormatError("LUKS header", "key slot \(k) has an invalid state 0x\(hex(state))")
            }
            slots.append(Slot(active: state == Self.slotActive, iterations: try r.u32(o + 4, "key slot iterations"),
                              keyOffset: UInt64(try r.u32(o + 40, "key slot offset")) * Self.sector,
                              stripes: try r.u32(o + 44, "key slot stripes")))
        }
    }
}
