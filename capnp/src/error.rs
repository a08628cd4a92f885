//! The kinds of capsa's exceptions (`ErrorKind` in the schema), written
//! into and read back from an exception's description, the one field of a
//! Cap'n Proto exception a peer can choose.

use crate::capsa_capnp::ErrorKind;

/// Every kind with its name in descriptions, as the schema spells it.
const NAMES: [(ErrorKind, &str); 21] = [
    (ErrorKind::Failed, "failed"),
    (ErrorKind::BadRequest, "badRequest"),
    (ErrorKind::BadPayload, "badPayload"),
    (ErrorKind::Link, "link"),
    (ErrorKind::Quota, "quota"),
    (ErrorKind::HostFull, "hostFull"),
    (ErrorKind::TooLarge, "tooLarge"),
    (ErrorKind::VmDisabled, "vmDisabled"),
    (ErrorKind::Vm, "vm"),
    (ErrorKind::ShuttingDown, "shuttingDown"),
    (ErrorKind::WrongMode, "wrongMode"),
    (ErrorKind::NotFound, "notFound"),
    (ErrorKind::Exists, "exists"),
    (ErrorKind::NotADirectory, "notADirectory"),
    (ErrorKind::IsADirectory, "isADirectory"),
    (ErrorKind::NotEmpty, "notEmpty"),
    (ErrorKind::ReadOnly, "readOnly"),
    (ErrorKind::BadPath, "badPath"),
    (ErrorKind::NoSpace, "noSpace"),
    (ErrorKind::Denied, "denied"),
    (ErrorKind::Unreachable, "unreachable"),
];

/// What capnp-rpc puts in front of an exception that crossed a connection.
const REMOTE: &str = "remote exception: ";

/// The kind's name in descriptions.
pub fn name(kind: ErrorKind) -> &'static str {
    NAMES
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("failed", |(_, n)| n)
}

/// An exception of `kind`. Running out of something the caller may get back
/// later (quotas, the host's guests) is `overloaded`, a host going away
/// `disconnected`, anything else `failed`, as Cap'n Proto defines them.
pub fn error(kind: ErrorKind, message: impl std::fmt::Display) -> capnp::Error {
    let description = format!("{}: {message}", name(kind));
    match kind {
        ErrorKind::Quota | ErrorKind::HostFull => capnp::Error::overloaded(description),
        ErrorKind::ShuttingDown => capnp::Error::disconnected(description),
        _ => capnp::Error::failed(description),
    }
}

/// The kind of a failed filesystem call. `None` for the errors that are
/// not about the path or the space (`EIO`, `EACCES`, ...): those are
/// `failed`.
pub fn io_kind(e: &std::io::Error) -> Option<ErrorKind> {
    use std::io::ErrorKind as Io;
    Some(match e.kind() {
        Io::NotFound => ErrorKind::NotFound,
        Io::AlreadyExists => ErrorKind::Exists,
        Io::NotADirectory => ErrorKind::NotADirectory,
        Io::IsADirectory => ErrorKind::IsADirectory,
        Io::DirectoryNotEmpty => ErrorKind::NotEmpty,
        Io::ReadOnlyFilesystem => ErrorKind::ReadOnly,
        Io::StorageFull | Io::QuotaExceeded | Io::FileTooLarge => ErrorKind::NoSpace,
        Io::InvalidFilename | Io::InvalidInput => ErrorKind::BadPath,
        _ => return None,
    })
}

/// A failed filesystem call on `path` as an exception of its kind.
pub fn io(e: &std::io::Error, path: &str) -> capnp::Error {
    let kind = io_kind(e).unwrap_or(ErrorKind::Failed);
    error(kind, format_args!("{path:?}: {e}"))
}

/// The kind of an exception.
pub fn kind(error: &capnp::Error) -> ErrorKind {
    kind_of(&error.extra)
}

/// The kind named in a description, or in the text of a displayed
/// `capnp::Error` ("Failed: remote exception: quota: ..."); `failed` if it
/// names none.
pub fn kind_of(text: &str) -> ErrorKind {
    let mut rest = text;
    // A displayed capnp::Error starts with its type ("Failed: ").
    for prefix in [
        "Failed: ",
        "Overloaded: ",
        "Disconnected: ",
        "Unimplemented: ",
    ] {
        if let Some(r) = rest.strip_prefix(prefix) {
            rest = r;
            break;
        }
    }
    while let Some(r) = rest.strip_prefix(REMOTE) {
        rest = r;
    }
    let Some((head, _)) = rest.split_once(": ") else {
        return ErrorKind::Failed;
    };
    NAMES
        .iter()
        .find(|(_, n)| *n == head)
        .map_or(ErrorKind::Failed, |(k, _)| *k)
}

/// The message of a description, without the kind and the remote prefixes.
pub fn message_of(text: &str) -> &str {
    let mut rest = text;
    while let Some(r) = rest.strip_prefix(REMOTE) {
        rest = r;
    }
    match rest.split_once(": ") {
        Some((head, message)) if NAMES.iter().any(|(_, n)| *n == head) => message,
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_a_round_trip_and_hops() {
        for (kind, _) in NAMES {
            let e = error(kind, "why: with a colon");
            assert_eq!(super::kind(&e), kind);
            assert_eq!(kind_of(&e.to_string()), kind, "{e}");
            let relayed = format!("{REMOTE}{REMOTE}{}", e.extra);
            assert_eq!(kind_of(&relayed), kind);
            assert_eq!(message_of(&relayed), "why: with a colon");
        }
    }

    #[test]
    fn every_kind_of_the_schema_has_a_name() {
        for n in 0..u16::MAX {
            let Ok(kind) = ErrorKind::try_from(n) else {
                assert_eq!(n as usize, NAMES.len(), "the kinds are numbered densely");
                break;
            };
            assert!(NAMES.iter().any(|(k, _)| *k == kind), "{n} has no name");
        }
    }

    #[test]
    fn text_without_a_kind_is_failed() {
        for text in [
            "",
            "plain",
            "remote exception: no kind here",
            "quota",
            "QUOTA: x",
        ] {
            assert_eq!(kind_of(text), ErrorKind::Failed, "{text:?}");
        }
    }
}
