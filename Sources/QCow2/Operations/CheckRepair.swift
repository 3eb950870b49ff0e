/// `check -r leaks|all`, as qemu-img repairs: bitmaps first (`all`), then the
/// refcounts (each wrong one set to the counted references, or the whole structure
/// rebuilt when it cannot be trusted), then the COPIED flags, then a second check.
/// Every write goes through `MetadataTransaction`.
extension CheckOperation {
    /// What a repair fixed (qemu-img's leaks-fixed / corruptions-fixed).
    struct Fixed {
        var leaks = 0
        var corruptions = 0
        var any: Bool { leaks > 0 || corruptions > 0 }
    }

    /// `qemu-img check -r leaks|all`: checks, repairs what `mode` allows, then checks
    /// again. Returns the second check's result with the fixed counts filled in.
    /// The image must be open for writing.
    public static func repair(_ image: QCow2Image, mode: Repair, report: @escaping (String) -> Void) throws -> CheckResult {
        var tx = try MetadataTransaction(image)
        var fixed = Fixed()
        if mode == .all { fixed.corruptions += try repairBitmaps(image, report: report) }
        let first = try CheckOperation(image, report: report)
        first.repair = mode
        first.reportCopied = mode == .none
        if mode == .all { first.extendFile = { [tx] in try tx.extendFile(to: $0) } }
        let r1 = try first.run()
        fixed.corruptions += r1.corruptionsFixed
        var refcountsFixed = Fixed()
        if mode != .none && (r1.leaks > 0 || r1.corruptions > 0) {
            refcountsFixed = first.needsRebuild
                ? try rebuildRefcounts(first, r1, mode: mode, tx: &tx, report: report)
                : try correctRefcounts(first, mode: mode, tx: &tx, report: report)
        }
        fixed.leaks += refcountsFixed.leaks
        fixed.corruptions += refcountsFixed.corruptions
        if mode != .none && (refcountsFixed.any || !first.wrongCopied.isEmpty) {
            fixed.corruptions += try repairCopiedFlags(image, mode: mode, tx: &tx, report: report)
        }
        try tx.finish()
        guard fixed.any else { return r1 }
        var r2 = try CheckOperation(image, report: report).run()
        r2.leaksFixed = fixed.leaks
        r2.corruptionsFixed = fixed.corruptions
        return r2
    }

    /// Drops a bitmaps extension that cannot be loaded and bitmaps left in use; returns
    /// the number of corruptions so fixed.
    static func repairBitmaps(_ image: QCow2Image, report: (String) -> Void) throws -> Int {
        var fixes = 0
        if let e = image.bitmapsError {
            report("ERROR bitmaps: \(e.message)")
            report("Repairing bitmaps: dropping the bitmaps extension (its clusters are then leaked and released)")
            try image.dropBitmapsExtension()
            fixes += 1
        }
        let inUse = image.bitmaps.filter(\.inUse)
        if !inUse.isEmpty {
            var freeing: [UInt64] = []
            for b in inUse {
                report("Repairing bitmap '\(b.name)': removing the inconsistent bitmap")
                freeing += (try? image.bitmapClusters(b)) ?? []
            }
            try image.commitBitmapSet(image.bitmaps.filter { !$0.inUse }, freeing: freeing)
            fixes += inUse.count
        }
        return fixes
    }

    /// Sets each wrong refcount to the counted references: leaks always, the rest
    /// with `all` (the stored structure is sound; only its values are wrong).
    static func correctRefcounts(_ first: CheckOperation, mode: Repair, tx: inout MetadataTransaction,
                                 report: (String) -> Void) throws -> Fixed {
        var fixed = Fixed()
        for (c, stored, counted) in first.mismatches {
            let leak = stored > counted
            guard leak || mode == .all else {
                report("ERROR cluster \(c) refcount=\(stored) reference=\(counted)")
                continue
            }
            report("Repairing cluster \(c) refcount=\(stored) reference=\(counted)")
            try tx.correctRefcount(c, to: counted)
            if leak { fixed.leaks += 1 } else { fixed.corruptions += 1 }
        }
        try tx.commitRefcounts()
        return fixed
    }

    /// Replaces a refcount structure that cannot be trusted (QEMU's "Rebuilding refcount
    /// structure"): a new one from the counted references, written durable, the header
    /// switched to it; then the old structure (and what was counted twice) is released
    /// as the leaks a recount finds. Returns what the first check found as fixed.
    static func rebuildRefcounts(_ first: CheckOperation, _ r1: CheckResult, mode: Repair,
                                 tx: inout MetadataTransaction, report: (String) -> Void) throws -> Fixed {
        let image = first.image
        guard mode == .all else {
            report("ERROR need to rebuild refcount structures")
            throw QCow2Error.needsRepair(path: image.path, detail: "Check failed: the refcount structure must be rebuilt")
        }
        report("Rebuilding refcount structure")
        var layout = RefcountRebuild(counted: first.references, geometry: image.geometry,
                                     oldStructure: first.refcountStructureClusters())
        try layout.layOut(path: image.path)
        try tx.rebuildRefcounts(layout)
        let recount = try CheckOperation(image, report: { _ in })
        recount.reportCopied = false
        _ = try recount.run()
        var broken = false
        for (c, stored, counted) in recount.mismatches {
            guard stored > counted else {
                report("ERROR cluster \(c) refcount=\(stored) reference=\(counted)")
                broken = true
                continue
            }
            report("Repairing cluster \(c) refcount=\(stored) reference=\(counted)")
            try tx.correctRefcount(c, to: counted)
        }
        if broken { report("ERROR rebuilt refcount structure is still broken") }
        try tx.commitRefcounts()
        return Fixed(leaks: r1.leaks, corruptions: r1.corruptions - first.wrongCopied.count)
    }
}
