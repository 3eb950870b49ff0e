import Foundation
import Testing
import TestSupport

/// Images in formats qemu-img reads and qimg does not (issue 13 item 11): a probing
/// command refuses them with one line naming the format QEMU detects, exit 1 (compare
/// keeps its exit 2 for errors), the file untouched; with -f raw they read as raw,
/// exactly as `qemu-img info -f raw` shows them.

struct ForeignImage: Sendable, CustomTestStringConvertible {
    var name: String
    var format: String
    var create: [String]
    var testDescription: String { name }
}

let foreignImages: [ForeignImage] = [
    ForeignImage(name: "a.vmdk", format: "vmdk", create: ["create", "-q", "-f", "vmdk", "a.vmdk", "1M"]),
    ForeignImage(name: "flat.vmdk", format: "vmdk",
                 create: ["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1M"]),
    ForeignImage(name: "a.vpc", format: "vpc", create: ["create", "-q", "-f", "vpc", "a.vpc", "1M"]),
    ForeignImage(name: "a.vdi", format: "vdi", create: ["create", "-q", "-f", "vdi", "a.vdi", "1M"]),
    ForeignImage(name: "a.qed", format: "qed", create: ["create", "-q", "-f", "qed", "a.qed", "1M"]),
    ForeignImage(name: "a.qcow", format: "qcow", create: ["create", "-q", "-f", "qcow", "a.qcow", "1M"]),
    ForeignImage(name: "a.vhdx", format: "vhdx", create: ["create", "-q", "-f", "vhdx", "a.vhdx", "1M"]),
    ForeignImage(name: "a.parallels", format: "parallels", create: ["create", "-q", "-f", "parallels", "a.parallels", "1M"]),
    ForeignImage(name: "a.luks", format: "luks",
                 create: ["create", "-q", "-f", "luks", "--object", "secret,id=s0,data=x", "-o", "key-secret=s0", "a.luks", "1M"]),
]

@Suite struct ForeignFormatTests {
    @Test(.requiresQEMU, arguments: foreignImages)
    func probingRefusesForeignFormat(_ img: ForeignImage) throws {
        let dir = try Paths.newScratch("foreign")
        try Runner.qemuImgKeySetup(img.create, in: dir)
        // The reference: qemu-img probes the format named.
        let qemu = try Runner.qemuImg(["info", img.name], cwd: dir)
        #expect(qemu.status == 0 && qemu.out.contains("file format: \(img.format)\n"), "\(qemu.summary): \(qemu.out)")
        let path = dir + "/" + img.name
        let before = try FileState(path)
        let expected = "qimg: \(img.name): image format '\(img.format)' is not supported by qimg (qemu-img reads it)"
        let commands: [([String], Int32)] = [
            (["info", img.name], 1), (["info", "--output=json", img.name], 1), (["map", img.name], 1),
            (["check", img.name], 1), (["convert", "-O", "qcow2", img.name, "out.qcow2"], 1),
            (["compare", img.name, img.name], 2),
        ]
        for (args, code) in commands {
            let r = try Qimg.run(args, cwd: dir)
            let label = "qimg " + args.joined(separator: " ")
            expectCleanFailure(label, r, exitCode: code)
            #expect(r.stderrLines == [expected], "\(label): \(r.err)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir + "/out.qcow2"), "convert created its target")
        #expect(try FileState(path) == before, "a refused command changed \(img.name)")
        // -f raw reads the file as raw, as qemu-img does.
        for extra in [[], ["--output=json"]] {
            let (q, m) = try runBoth(["info", "-f", "raw"] + extra + [img.name], cwd: dir)
            expectSameExit("info -f raw \(extra)", qemu: q, qimg: m)
            expectSameStdout("info -f raw \(extra)", qemu: q, qimg: m)
        }
    }

    /// A backing file whose format the overlay does not record is probed too.
    @Test(.requiresQEMU) func probedBackingFileRefused() throws {
        let dir = try Paths.newScratch("foreign-backing")
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "vmdk", "b.vmdk", "1M"], in: dir)
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.vmdk", "-F", "vmdk", "top.qcow2"], in: dir)
        // Drop the backing format extension (type 0 ends the extension list).
        var d = try Data(contentsOf: URL(fileURLWithPath: dir + "/top.qcow2"))
        let magic = Data([0xE2, 0x79, 0x2A, 0xCA])
        let at = try #require(d.range(of: magic, in: 0..<65536))
        d.replaceSubrange(at, with: Data(count: 4))
        try d.write(to: URL(fileURLWithPath: dir + "/top.qcow2"))
        let q = try Runner.qemuImg(["info", "--backing-chain", "top.qcow2"], cwd: dir)
        #expect(q.out.contains("file format: vmdk\n") && !q.out.contains("backing file format"), "\(q.out)")
        for args in [["info", "--backing-chain", "top.qcow2"], ["map", "top.qcow2"]] {
            let r = try Qimg.run(args, cwd: dir)
            expectCleanFailure("qimg " + args.joined(separator: " "), r, exitCode: 1)
            #expect(r.stderrLines == ["qimg: b.vmdk: image format 'vmdk' is not supported by qimg (qemu-img reads it)"], "\(r.err)")
        }
    }

    /// A fixed-size VHD has only a footer; qemu-img probes it as raw, qimg refuses to
    /// guess (its virtual size would include the footer) and -f raw reads it as raw.
    @Test(.requiresQEMU) func fixedVHDNeedsExplicitRaw() throws {
        let dir = try Paths.newScratch("foreign-vhd")
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", "f.vpc", "1M"], in: dir)
        let r = try Qimg.run(["info", "f.vpc"], cwd: dir)
        expectCleanFailure("qimg info f.vpc", r, exitCode: 1)
        // The advice naming the flag is the CLI's (the library's message names none).
        #expect(r.stderrLines == ["qimg: f.vpc: looks like a fixed-size vpc (VHD) image, which qimg does not support (qemu-img probes it as raw; -f raw reads it as raw)"], "\(r.err)")
        let cmp = try Qimg.run(["compare", "f.vpc", "f.vpc"], cwd: dir)
        #expect(cmp.status == 2 && cmp.stderrLines == r.stderrLines, "compare: \(cmp.status) \(cmp.err)")
        let (q, m) = try runBoth(["info", "-f", "raw", "f.vpc"], cwd: dir)
        expectSameExit("info -f raw", qemu: q, qimg: m)
        expectSameStdout("info -f raw", qemu: q, qimg: m)
    }

    /// Files QEMU's probes do not claim stay raw, as in qemu-img.
    @Test(.requiresQEMU) func nearMissesStayRaw() throws {
        let dir = try Paths.newScratch("foreign-raw")
        let files: [String: [UInt8]] = [
            "luks2.img": Array("LUKS".utf8) + [0xBA, 0xBE, 0, 2],
            "blankline.img": Array("# Disk DescriptorFile\n\nversion=1\n".utf8),
            "version4.img": Array("version=4\n".utf8),
        ]
        for (name, bytes) in files {
            try Data(bytes + [UInt8](repeating: 0, count: 4096)).write(to: URL(fileURLWithPath: dir + "/" + name))
            let (q, m) = try runBoth(["info", name], cwd: dir)
            #expect(q.out.contains("file format: raw\n"), "\(name): \(q.out)")
            expectSameExit("info \(name)", qemu: q, qimg: m)
            expectSameStdout("info \(name)", qemu: q, qimg: m)
        }
    }
}
