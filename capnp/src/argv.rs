//! The argument vector of a `runBytes` child: `Options.name` as argv[0],
//! then `args`. Shared by every side that runs programs, so a program sees
//! the same argv as a WASM guest and as an ELF executable in a microVM.

/// argv[0] of a child whose caller gave no name.
///
/// Only multi-call programs act on argv[0], and busybox, the one a guest is
/// most likely to carry, reads this name as "run the applet named by
/// argv[1]": `args = ["echo", "hi"]` runs `echo hi`. Any other program only
/// shows it in its messages.
pub const DEFAULT_ARGV0: &str = "busybox";

/// argv[0] of a child whose caller named it `name` (empty for no name).
/// Never empty: a multi-call binary given an empty argv[0] finds no applet.
pub fn argv0(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_ARGV0
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_argv0_and_no_name_is_the_default() {
        assert_eq!(argv0("my-tool"), "my-tool");
        assert_eq!(argv0(""), DEFAULT_ARGV0);
    }
}
