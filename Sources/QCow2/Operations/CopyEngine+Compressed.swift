#if canImport(Glibc)
import Glibc
#endif

/// The compressed copy (`convert -c`, `backup -c`): the source is read on this thread
/// while `CompressionPipeline` compresses the chunks read before on every core; each
/// finished chunk is then written here in guest order, cluster by cluster, as a compressed
/// stream, a normal cluster (a stream that would not be smaller) or, for a zero cluster,
/// nothing (a zero cluster where the target's backing file would show through).
extension CopyEngine {
    mutating func copyCompressed(into q: QCow2Image, _ offset: UInt64, _ length: UInt64, maskZeros: Bool) throws {
        let cs = q.geometry.clusterSize
        if pipeline?.clusterSize != cs || pipeline?.detectZeros != (minSparse > 0) || pipeline?.type != q.compressionType
            || pipeline?.encoder != zlibEncoder {
            pipeline = try CompressionPipeline(type: q.compressionType, encoder: zlibEncoder, clusterSize: cs,
                                               detectZeros: minSparse > 0, path: q.path)
        }
        guard let pipeline else { return }
        let source = self.source
        let stop = shouldStop
        try pipeline.run(offset, min(source.virtualSize, offset + length), beforeRead: {
            if stop() { throw QCow2Error.io(path: q.path, operation: "copy", errno: EINTR) }
        }, read: { buffer, at in
            try source.read(into: buffer, at: at)
        }, write: { chunk in
            try writeChunk(chunk, into: q, maskZeros: maskZeros)
        })
    }

    private mutating func writeChunk(_ chunk: CompressionPipeline.Chunk, into q: QCow2Image, maskZeros: Bool) throws {
        var backingBuf: [UInt8] = []
        // Runs of clusters that compressed are written together (one transaction each).
        var run: [UnsafeRawBufferPointer] = []
        var runStart = 0
        func flushRun() throws {
            guard !run.isEmpty else { return }
            try q.writeCompressed(streams: run, at: chunk.guest + UInt64(runStart * chunk.clusterSize))
            for k in runStart..<(runStart + run.count) { try wrote(chunk.data(k), at: chunk.guest + UInt64(k * chunk.clusterSize)) }
            run.removeAll(keepingCapacity: true)
        }
        for i in 0..<chunk.clusters {
            if let stream = chunk.stream(i) {
                if run.isEmpty { runStart = i }
                run.append(stream)
                continue
            }
            try flushRun()
            let data = chunk.data(i)
            let guest = chunk.guest + UInt64(i * chunk.clusterSize)
            if chunk.isZero(i) {
                guard try maskZeros || backingHasData(guest, data.count, &backingBuf) else { continue }
                try writeZeros(guest, UInt64(data.count))
                copied?.set(guest, UInt64(data.count))
            } else {
                try q.writeCompressed(data, stream: nil, at: guest)
                try wrote(data, at: guest)
            }
        }
        try flushRun()
        bytesDone += UInt64(chunk.count)
        if earlyWriteback && bytesCopied - writebackMark >= Self.writebackInterval {
            writebackMark = bytesCopied
            target.file.startWriteback()
        }
        progress?(bytesDone)
        try throttle()
    }

    /// Bookkeeping after a cluster's data went to the target.
    private mutating func wrote(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws {
        try observer?.wroteData(data, at: guest)
        bytesCopied += UInt64(data.count)
        copied?.set(guest, UInt64(data.count))
    }
}
