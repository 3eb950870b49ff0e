import ArgumentParser
import QCow2
#if canImport(Glibc)
import Glibc
#endif

/// `qimg snapshot`: qemu-img's internal snapshot command (list, create, apply, delete).
struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "List, create, apply or delete internal snapshots (qemu-img snapshot).",
        usage: "qimg snapshot [--object OBJECTDEF] [--image-opts] [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILENAME",
        discussion: """
            -l lists the snapshots (the default is to do nothing). -c creates a snapshot of the \
            current disk named SNAPSHOT (names need not be unique; the new ID is one more than the \
            largest). -a reverts the disk to the snapshot with ID SNAPSHOT, else to the first one \
            named SNAPSHOT (refused while the image has persistent bitmaps, as in qemu-img). -d \
            deletes the first snapshot named SNAPSHOT. There is no -f: the format is probed, as in \
            qemu-img. With --image-opts, FILENAME is an option list (driver=qcow2,file.filename=PATH).

            \(ExitStatus.plain)
            """)

    @Flag(name: .customShort("l"), help: "List the snapshots.") var list: Int
    @Option(name: .customShort("c"), parsing: .unconditionalSingleValue, help: ArgumentHelp("Create a snapshot named SNAPSHOT.", valueName: "snapshot"))
    var create: [String] = []
    @Option(name: .customShort("a"), parsing: .unconditionalSingleValue, help: ArgumentHelp("Apply (revert to) SNAPSHOT.", valueName: "snapshot"))
    var apply: [String] = []
    @Option(name: .customShort("d"), parsing: .unconditionalSingleValue, help: ArgumentHelp("Delete SNAPSHOT.", valueName: "snapshot"))
    var delete: [String] = []
    @Option(name: .customLong("object"), parsing: .unconditionalSingleValue, help: ArgumentHelp("A QEMU object definition (accepted; qimg needs none).", valueName: "objectdef"))
    var objects: [String] = []
    @Flag(name: .customLong("image-opts"), help: "FILENAME is an option list, not a file name.") var imageOpts = false
    @OptionGroup var share: ShareOption
    @Flag(name: .customShort("q"), help: "Quiet (accepted; snapshot prints nothing but the list).") var quiet = false
    @Argument(help: "The image file.") var files: [String] = []

    enum Action { case none, list, create(String), apply(String), delete(String) }

    func action() throws -> Action {
        let all: [Action] = [Action](repeating: .list, count: list) + create.map(Action.create)
            + apply.map(Action.apply) + delete.map(Action.delete)
        guard all.count <= 1 else { throw CommandFailure(message: "Cannot mix '-l', '-a', '-c', '-d'") }
        return all.first ?? .none
    }

    func run() throws {
        let action = try action()
        guard files.count == 1 else { throw CommandFailure(message: "Expecting one image file name") }
        if let o = objects.first(where: { $0.isEmpty }) { throw CommandFailure(message: "Invalid object definition '\(o)'") }
        let (path, format) = try imageOpts ? Self.imageOptions(files[0]) : (files[0], nil)
        // The backing chain too, as qemu-img opens it (a missing backing file is an error).
        var opener = ImageOpener()
        opener.forceShare = share.forceShare
        if case .list = action {} else { opener.writable = true }
        let image = try opener.open(path, format: format)
        let q = image as? QCow2Image
        switch action {
        case .none: break
        case .list:
            Output.out(SnapshotList.text((q?.snapshots ?? []).map(ImageInfo.Snapshot.init)))
        case .create(let given):
            // qemu-img keeps 255 bytes of the name.
            let name = Self.truncated(given, bytes: 255)
            try perform("create", given, q) { try SnapshotOperation.create($0, name: name, date: Self.now()) }
        case .apply(let s):
            try perform("apply", s, q) { try SnapshotOperation.apply($0, idOrName: s) }
        case .delete(let s):
            try perform("delete", s, q) { try SnapshotOperation.delete($0, name: s) }
        }
        if opener.writable, let q { try q.flush() }
    }

    /// Runs one action; a failure is qemu-img's line "Could not VERB snapshot 'NAME': why".
    func perform(_ verb: String, _ name: String, _ image: QCow2Image?, _ body: (QCow2Image) throws -> Void) throws {
        func fail(_ why: String) -> CommandFailure { CommandFailure(message: "Could not \(verb) snapshot '\(name)': \(why)") }
        guard let image else {
            throw fail(verb == "apply" ? "Failed to load snapshot: Operation not supported" : verb == "delete" ? "snapshot not found" : "-95 (Operation not supported)")
        }
        do { try body(image) } catch let e as QCow2Error {
            switch e {
            case .snapshotNotFound:
                throw fail(verb == "apply" ? "Failed to load snapshot: No such file or directory" : "snapshot not found")
            case .unsupported(_, let d) where verb == "apply":
                throw fail(d)
            default:
                throw fail(ErrorText.line(e))
            }
        }
    }

    /// The current time as qemu-img records it (microseconds).
    static func now() -> (seconds: UInt32, nanoseconds: UInt32) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return (UInt32(truncatingIfNeeded: ts.tv_sec), UInt32(ts.tv_nsec / 1000) * 1000)
    }

    /// The first `bytes` bytes of `s`, cut back to a whole character.
    static func truncated(_ s: String, bytes: Int) -> String {
        guard s.utf8.count > bytes else { return s }
        var out = ""
        for ch in s.unicodeScalars {
            guard out.utf8.count + String(ch).utf8.count <= bytes else { break }
            out.unicodeScalars.append(ch)
        }
        return out
    }

    /// `--image-opts`: the file name and driver from an option list
    /// (file.filename= or filename=, driver=qcow2|raw).
    static func imageOptions(_ spec: String) throws -> (String, ImageFormat?) {
        let list = try OptionList([spec])
        guard let path = list.value("file.filename") ?? list.value("filename") else {
            throw CommandFailure(message: "A block device must be specified by \"file.filename\" (with --image-opts)")
        }
        guard let d = list.value("driver") else { return (path, nil) }
        return (path, try ImageFormat(name: d, path: path))
    }
}
