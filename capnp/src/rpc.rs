//! Settings of the RPC connections every side makes.

use capnp::capability::Promise;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{Connection, FlowController, IncomingMessage, OutgoingMessage, VatNetwork};

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

/// A two-party network whose outgoing messages start with at most
/// [`FIRST_SEGMENT_WORDS`]: what the host (under its flow control), the
/// guests and the agent serve on.
pub struct SmallFirstSegments<N>(pub N);

impl<N: VatNetwork<Side>> VatNetwork<Side> for SmallFirstSegments<N> {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn Connection<Side>>> {
        let inner = self.0.connect(host_id)?;
        Some(Box::new(SmallConnection(inner)))
    }

    fn accept(&mut self) -> Promise<Box<dyn Connection<Side>>, capnp::Error> {
        let accepted = self.0.accept();
        Promise::from_future(async move {
            Ok(Box::new(SmallConnection(accepted.await?)) as Box<dyn Connection<Side>>)
        })
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), capnp::Error> {
        self.0.drive_until_shutdown()
    }
}

struct SmallConnection(Box<dyn Connection<Side>>);

impl Connection<Side> for SmallConnection {
    fn get_peer_vat_id(&self) -> Side {
        self.0.get_peer_vat_id()
    }

    fn new_outgoing_message(&mut self, first_segment_word_size: u32) -> Box<dyn OutgoingMessage> {
        self.0
            .new_outgoing_message(first_segment_word_size.min(FIRST_SEGMENT_WORDS))
    }

    fn receive_incoming_message(
        &mut self,
    ) -> Promise<Option<Box<dyn IncomingMessage>>, capnp::Error> {
        self.0.receive_incoming_message()
    }

    fn new_stream(&mut self) -> (Box<dyn FlowController>, Promise<(), capnp::Error>) {
        self.0.new_stream()
    }

    fn shutdown(&mut self, result: capnp::Result<()>) -> Promise<(), capnp::Error> {
        self.0.shutdown(result)
    }
}
