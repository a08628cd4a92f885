//! How much one `ByteSource.read` returns, the same for every source.

/// What a read of `maxBytes` 0 returns at most.
pub const DEFAULT_READ: usize = 64 << 10;

/// The most one read returns for `asked` bytes (0: [`DEFAULT_READ`]) from
/// a source that returns at most `max` at once.
pub fn read_size(asked: u32, max: usize) -> usize {
    match asked {
        0 => DEFAULT_READ.min(max),
        n => usize::try_from(n).unwrap_or(usize::MAX).min(max),
    }
}
