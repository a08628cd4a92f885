//! What `runBytes` and `Program.run` carry, read and checked once for every
//! implementation (the capsa host and the microVM agent), so the same
//! request is refused the same way whoever serves it.
//!
//! Arguments and environment become a program's C strings (WASI's
//! `args_get` and `environ_get`, `execve`'s argv and envp): each must be
//! UTF-8 and free of NUL bytes, which would silently cut it short; an
//! environment variable's name must be non-empty and free of `=`.

use crate::capsa_capnp::env_var;
use crate::error::error;
use crate::ErrorKind;

fn invalid(what: String) -> capnp::Error {
    error(ErrorKind::BadRequest, what)
}

/// One string of the request, checked.
fn text(reader: capnp::text::Reader<'_>, what: impl Fn() -> String) -> capnp::Result<String> {
    let s = reader
        .to_str()
        .map_err(|_| invalid(format!("{} is not valid UTF-8", what())))?;
    if s.contains('\0') {
        return Err(invalid(format!("{} contains a NUL byte", what())));
    }
    Ok(s.to_string())
}

/// The arguments after `argv[0]`.
pub fn args(list: capnp::text_list::Reader<'_>) -> capnp::Result<Vec<String>> {
    list.iter()
        .enumerate()
        .map(|(i, arg)| text(arg?, || format!("argument {i}")))
        .collect()
}

/// The whole environment, as name and value pairs.
pub fn env(
    list: capnp::struct_list::Reader<'_, env_var::Owned>,
) -> capnp::Result<Vec<(String, String)>> {
    list.iter()
        .enumerate()
        .map(|(i, var)| {
            let name = text(var.get_name()?, || {
                format!("environment variable {i}'s name")
            })?;
            if name.is_empty() || name.contains('=') {
                return Err(invalid(format!(
                    "environment variable name {name:?} is empty or contains '='"
                )));
            }
            let value = text(var.get_value()?, || format!("environment variable {name}"))?;
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capsa_capnp::executor;

    type Parsed = (
        capnp::Result<Vec<String>>,
        capnp::Result<Vec<(String, String)>>,
    );

    /// Builds a runBytes request with `args` and `env` and reads them back.
    fn parsed(args_in: &[&[u8]], env_in: &[(&[u8], &[u8])]) -> Parsed {
        let mut message = capnp::message::Builder::new_default();
        let mut p = message.init_root::<executor::run_bytes_params::Builder<'_>>();
        let mut a = p.reborrow().init_args(args_in.len() as u32);
        for (i, arg) in args_in.iter().enumerate() {
            a.set(i as u32, capnp::text::Reader::from(*arg));
        }
        let mut e = p.reborrow().init_env(env_in.len() as u32);
        for (i, (name, value)) in env_in.iter().enumerate() {
            let mut var = e.reborrow().get(i as u32);
            var.set_name(capnp::text::Reader::from(*name));
            var.set_value(capnp::text::Reader::from(*value));
        }
        let r = p.into_reader();
        (args(r.get_args().unwrap()), env(r.get_env().unwrap()))
    }

    fn message(r: capnp::Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().extra
    }

    #[test]
    fn good_requests_read_back_whole() {
        let (a, e) = parsed(&[b"-c", b"echo hi"], &[(b"HOME", b"/"), (b"EMPTY", b"")]);
        assert_eq!(a.unwrap(), ["-c", "echo hi"]);
        assert_eq!(
            e.unwrap(),
            [("HOME".into(), "/".into()), ("EMPTY".into(), String::new())]
        );
    }

    #[test]
    fn nul_bytes_bad_utf8_and_bad_names_are_refused_by_kind() {
        let (a, _) = parsed(&[b"ok", b"cut\0short"], &[]);
        let m = message(a);
        assert!(
            m.starts_with("badRequest: argument 1 contains a NUL"),
            "{m}"
        );
        let (a, _) = parsed(&[b"\xff"], &[]);
        assert!(message(a).contains("argument 0 is not valid UTF-8"));
        for (name, value, want) in [
            (&b"A\0B"[..], &b"v"[..], "variable 0's name contains a NUL"),
            (b"A", b"v\0", "variable A contains a NUL"),
            (b"", b"v", "is empty or contains '='"),
            (b"A=B", b"v", "is empty or contains '='"),
            (b"A", b"\xfe", "variable A is not valid UTF-8"),
        ] {
            let (_, e) = parsed(&[], &[(name, value)]);
            let m = message(e);
            assert!(m.contains(want), "{m}");
            assert!(m.starts_with("badRequest: "), "{m}");
        }
    }
}
