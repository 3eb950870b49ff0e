/// Recognises, by their magic, the image formats QEMU reads and qimg does not, so that
/// probing never calls such a file raw (QEMU's probes: the first 2 KiB of the file,
/// bytes past its end reading as zeros; the highest score wins, raw scoring lowest).
enum FormatProbe {
    /// How many bytes QEMU's probes look at.
    static let headBytes = 2048

    /// The name QEMU gives the format of a file starting with `head` (`headBytes` bytes,
    /// zero-padded) and named `path`, if it is one qimg does not read; nil for qcow2/raw.
    static func foreignFormat(head: [UInt8], path: String) -> String? {
        func at(_ offset: Int, _ s: String) -> Bool {
            let b = Array(s.utf8)
            return offset + b.count <= head.count && Array(head[offset..<offset + b.count]) == b
        }
        func be32(_ o: Int) -> UInt32 { head[o..<o + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        func le32(_ o: Int) -> UInt32 { head[o..<o + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        guard head.count >= headBytes else { return nil }
        // Score 100: one magic each, mutually exclusive.
        if head[0..<4] == [0x51, 0x46, 0x49, 0xFB] && be32(4) == 1 { return "qcow" }
        if at(0, "QED\0") { return "qed" }
        if at(0, "KDMV") || at(0, "COWD") || isVMDKDescriptor(head) { return "vmdk" }
        if at(0, "conectix") { return "vpc" }
        if le32(0x40) == 0xBEDA_107F { return "vdi" }
        if at(0, "vhdxfile") { return "vhdx" }
        if head[0..<6] == [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE] && head[6] == 0 && head[7] == 1 { return "luks" }
        if (at(0, "WithoutFreeSpace") || at(0, "WithouFreSpacExt")) && le32(16) == 2 { return "parallels" }
        if at(0, "Bochs Virtual HD Image\0") && at(32, "Redolog\0") && at(48, "Growing\0")
            && (le32(64) == 0x0002_0000 || le32(64) == 0x0001_0000) { return "bochs" }
        // Score 2 (still above raw): cloop's shell header, dmg by its file name.
        if at(0, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n") { return "cloop" }
        if path.count > 4 && path.hasSuffix(".dmg") { return "dmg" }
        return nil
    }

    /// A VMDK text descriptor as QEMU recognises one: comment lines and lines of spaces,
    /// then "version=1", "version=2" or "version=3" ending the line.
    static func isVMDKDescriptor(_ b: [UInt8]) -> Bool {
        let nl = UInt8(ascii: "\n"), cr = UInt8(ascii: "\r"), space = UInt8(ascii: " ")
        var p = 0
        while p < b.count {
            if b[p] == UInt8(ascii: "#") {
                while p < b.count && b[p] != nl { p += 1 }
                p += 1
                continue
            }
            if b[p] == space {
                while p < b.count && b[p] == space { p += 1 }
                if p < b.count && b[p] == cr { p += 1 }
                guard p < b.count, b[p] == nl else { return false }
                p += 1
                continue
            }
            let line = b[p...]
            for v in ["1", "2", "3"] {
                for end in ["\n", "\r\n"] where line.starts(with: Array("version=\(v)\(end)".utf8)) { return true }
            }
            return false
        }
        return false
    }

    /// A fixed-size VHD: no header, only the "conectix" footer in the last 512 bytes.
    /// QEMU probes it as raw; qimg refuses to guess (-f raw reads it as raw).
    static func hasVPCFooter(_ file: BlockFile, size: UInt64) throws -> Bool {
        guard size >= 512 else { return false }
        return try file.read(count: 8, at: size - 512) == Array("conectix".utf8)
    }
}
