//! Arbitrary bytes as the stream a client sends to a host's root Executor
//! (what `capsa serve` does with a connection, over an in-memory pipe): the
//! host never panics, ends the connection when the client does, and keeps
//! no process of it.
#![no_main]

use capsa::{Host, HostConfig};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    static HOST: std::cell::OnceCell<Host> = const { std::cell::OnceCell::new() };
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|runtime| {
        let local = tokio::task::LocalSet::new();
        local.block_on(runtime, async {
            let host = HOST.with(|h| {
                h.get_or_init(|| Host::new(HostConfig::default()).expect("a host"))
                    .clone()
            });
            if let Err(e) = capsa_tests::feed_connection(&host, data).await {
                panic!("{e}");
            }
            assert_eq!(host.live_guests(), 0, "a process outlived its connection");
        });
    });
});
