//! Raw RPC traffic of a peer that misbehaves on purpose, for the tests of
//! the host's flow control: the `faulty` guest writes it onto its stdout,
//! the socket tests onto a `capsa serve` connection.

use std::io::{self, Write};

use capnp::traits::HasTypeId;
use capnp_rpc::rpc_capnp::message;

use crate::capsa_capnp::executor;

/// Writes one RPC message built by `fill` onto `out`.
fn send(out: &mut impl Write, fill: impl FnOnce(message::Builder<'_>)) -> io::Result<()> {
    let mut m = capnp::message::Builder::new_default();
    fill(m.init_root());
    capnp::serialize::write_message(out, &m).map_err(io::Error::other)
}

/// What follows each call of a flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Its `Finish`.
    Each,
    /// Nothing: the call stays open.
    Never,
    /// A `Finish` for a question never asked, as if to wind a count of
    /// open calls down.
    Bogus,
}

/// Writes `count` `Bootstrap` messages, each followed as `finish` says.
/// Each answer holds a capability, so unlike an `echo` it stays in the
/// other side's tables until its `Finish`.
pub fn bootstrap_flood(out: &mut impl Write, count: u32, finish: Finish) -> io::Result<()> {
    for question in 0..count {
        send(out, |m| m.init_bootstrap().set_question_id(question))?;
        follow(out, question, finish)?;
    }
    out.flush()
}

fn follow(out: &mut impl Write, question: u32, finish: Finish) -> io::Result<()> {
    match finish {
        Finish::Each => send(out, |m| m.init_finish().set_question_id(question)),
        Finish::Bogus => send(out, |m| {
            m.init_finish().set_question_id(u32::MAX - question)
        }),
        Finish::Never => Ok(()),
    }
}

/// Writes a `Bootstrap` and then `count` `echo` calls of `bytes` bytes
/// each, pipelined on the bootstrap's answer, each followed as `finish`
/// says. Reads nothing: the replies pile up on the other side unless it
/// holds back.
pub fn echo_flood(
    out: &mut impl Write,
    count: u32,
    bytes: usize,
    finish: Finish,
) -> io::Result<()> {
    let text = "x".repeat(bytes);
    send(out, |m| m.init_bootstrap().set_question_id(0))?;
    for question in 1..=count {
        send(out, |m| {
            let mut call = m.init_call();
            call.set_question_id(question);
            call.set_interface_id(<executor::Client as HasTypeId>::TYPE_ID);
            call.set_method_id(1);
            call.reborrow()
                .init_target()
                .init_promised_answer()
                .set_question_id(0);
            call.init_params()
                .init_content()
                .init_as::<executor::echo_params::Builder<'_>>()
                .set_message(text.as_str());
        })?;
        follow(out, question, finish)?;
    }
    out.flush()
}
