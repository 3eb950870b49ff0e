import QCow2

/// The one line qimg prints for a library error: the library's message (which never
/// names a flag or a command) and, where the user can do something about it, the qimg
/// flag or command that does it. Commands with their own advice pass it in.
enum ErrorText {
    struct Advice {
        /// For an image another program (not a qimg) holds.
        var inUseByOthers: String?
        /// For a bitmap marked in use.
        var bitmapInconsistent: String?
    }

    static func line(_ e: QCow2Error, advice: Advice = Advice()) -> String {
        let hint: String?
        switch e {
        case .inUse(_, let holder, let readOnlyShareWorks):
            hint = (holder.isQimg ? nil : advice.inUseByOthers) ?? (readOnlyShareWorks ? "use -U for read-only inspection" : nil)
        case .bitmapInconsistent:
            hint = advice.bitmapInconsistent ?? "remove it with 'qimg bitmap --remove'"
        case .bitmapOperation(_, _, _, _, let inconsistent):
            hint = inconsistent != nil ? "use --remove to delete it" : nil
        case .targetExists:
            hint = "use --force to replace it"
        case .needsRepair:
            hint = "repair the image with 'qimg check -r all'"
        case .live(_, .agentUnavailable, _):
            hint = "--freeze needs QEMU started with the guest agent's channel and qemu-ga running in the guest (Docs/live-backup.md)"
        default:
            hint = nil
        }
        return text(e) + (hint.map { "; " + $0 } ?? "")
    }

    /// The error without advice, in qemu-img's words where they differ from the library's
    /// (and with the way to read a file QEMU probes as raw).
    static func text(_ e: QCow2Error) -> String {
        switch e {
        case .foreignFormat(_, let name, probedAsRaw: true):
            return "\(e.path): looks like a fixed-size \(name) (VHD) image, which qimg does not support (qemu-img probes it as raw; -f raw reads it as raw)"
        case .shrinkWouldLoseData:
            return "\(e.path): Use the --shrink option to perform a shrink operation (\(e.message))"
        default:
            return e.description
        }
    }
}
