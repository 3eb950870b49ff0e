/// Sees the guest data a copy stores as data in its target (normal or compressed clusters),
/// in guest order, with the very bytes handed to the write; ranges left out or written as
/// zeros are not reported. Called on the copy's thread after each successful data write;
/// `bytes` is valid during the call only. A copy without an observer pays nothing.
protocol CopyObserver: AnyObject {
    func wroteData(_ bytes: UnsafeRawBufferPointer, at guest: UInt64) throws
}
