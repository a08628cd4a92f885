//! Telling components, modules and ELF files apart: the detection shared
//! with the agent (`capsa_schema::format`).

pub use capsa_schema::format::{detect, Format, FormatError};
