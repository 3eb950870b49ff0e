import ArgumentParser
import QCow2

/// --lock-wait SECONDS: how long a repository command waits for another run's lock before
/// it exits 3 (lock held). The default suits cron: a job started while the last one still
/// runs waits for it instead of failing; 0 does not wait.
struct LockWaitOption: ParsableArguments {
    static let defaultSeconds: Double = 300

    @Option(name: .customLong("lock-wait"), help: ArgumentHelp(
        "Wait up to this many seconds for another run's repository lock, then exit 3 (default \(Int(defaultSeconds)); 0: do not wait).",
        valueName: "seconds"))
    var seconds: Double?

    var wait: Double { seconds ?? Self.defaultSeconds }

    func validate() throws {
        if let s = seconds, !(s >= 0 && s <= 86_400 * 7) {
            throw ValidationError("--lock-wait must be a number of seconds from 0 to 604800")
        }
    }

    /// Runs `body` with the repository lock wait set, and says how long it waited when the
    /// lock stayed held.
    func apply<T>(_ body: () throws -> T) throws -> T {
        do {
            return try Repository.$lockWait.withValue(wait, operation: body)
        } catch QCow2Error.repositoryLocked(let path) {
            let waited = wait == 0 ? "(--lock-wait 0: not waiting)" : "(waited \(Human.format("%g", wait)) s, --lock-wait)"
            throw CommandFailure(message: ErrorText.line(.repositoryLocked(path: path)) + " " + waited, exitCode: RepoExit.locked)
        }
    }
}
