//! Architecture support. Only x86-64 is implemented.

pub mod x86_64;
