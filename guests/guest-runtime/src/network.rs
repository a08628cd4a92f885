//! The guest's two-party network, sending calls in small first segments.

use capnp::capability::Promise;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, Connection, FlowController, IncomingMessage, OutgoingMessage};
use capsa_schema::rpc::FIRST_SEGMENT_WORDS;
use futures::io::AsyncRead;
use futures::TryFutureExt;

/// A [`twoparty::VatNetwork`] whose outgoing messages start with at most
/// [`FIRST_SEGMENT_WORDS`]: see there for why.
pub(crate) struct Network<R: AsyncRead + Unpin + 'static>(pub(crate) twoparty::VatNetwork<R>);

impl<R: AsyncRead + Unpin + 'static> capnp_rpc::VatNetwork<Side> for Network<R> {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn Connection<Side>>> {
        let inner = self.0.connect(host_id)?;
        Some(Box::new(SmallFirstSegments(inner)))
    }

    fn accept(&mut self) -> Promise<Box<dyn Connection<Side>>, capnp::Error> {
        Promise::from_future(
            self.0
                .accept()
                .map_ok(|inner| Box::new(SmallFirstSegments(inner)) as Box<dyn Connection<Side>>),
        )
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), capnp::Error> {
        self.0.drive_until_shutdown()
    }
}

struct SmallFirstSegments(Box<dyn Connection<Side>>);

impl Connection<Side> for SmallFirstSegments {
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
