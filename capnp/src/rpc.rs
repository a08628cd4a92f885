//! Settings of the RPC connections every side makes.

/// The first segment, in words, of a message sent on an RPC connection.
///
/// capnp-rpc 0.27 asks for 1,024 words (8 KiB, zeroed) for every call it
/// sends, whatever its size hint says. A guest keeps the heap it once used
/// (linear memory never shrinks), so each call it ever had in flight left
/// 8 KiB resident: eight concurrent calls, 64 KiB per idle guest. 128
/// words (1 KiB) hold a call with small parameters; a larger message
/// takes a second segment (a blob is never split), which costs an
/// allocation and not a copy.
pub const FIRST_SEGMENT_WORDS: u32 = 128;
