import QCow2

/// The `encrypt` block of qemu-img info's format-specific data (QCryptoBlockInfo): the
/// format, and for LUKS the header's fields as qemu-img shows them without a key.
enum EncryptInfo {
    static func json(format: String, luks: LUKSHeader?) -> JSONValue {
        var d: [(String, JSONValue)] = [("format", .string(format))]
        guard let l = luks else { return .object(d) }
        d += [("cipher-alg", .string(l.cipherAlgorithm)), ("cipher-mode", .string(l.cipherMode)),
              ("ivgen-alg", .string(l.ivgenAlgorithm))]
        if let h = l.ivgenHash { d.append(("ivgen-hash-alg", .string(h))) }
        d += [("hash-alg", .string(l.hash)), ("payload-offset", .uint(l.payloadOffset)),
              ("master-key-iters", .uint(UInt64(l.masterKeyIterations))), ("uuid", .string(l.uuid))]
        d.append(("slots", .array(l.slots.map { s in
            var o: [(String, JSONValue)] = [("active", .bool(s.active))]
            if s.active { o += [("iters", .uint(UInt64(s.iterations))), ("stripes", .uint(UInt64(s.stripes)))] }
            o.append(("key-offset", .uint(s.keyOffset)))
            return .object(o)
        })))
        return .object(d)
    }
}
