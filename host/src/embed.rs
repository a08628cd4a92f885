//! A host inside another program, for test harnesses: [`start`] runs a host
//! on its own thread and hands out its root Executor as a typed Cap'n Proto
//! client, so a test can `runBytes` without writing a PID0.
//!
//! The host is single-threaded (capnp-rpc is), so it lives on a thread of its
//! own with its own runtime; each [`Embedded::executor`] is a connection to
//! it over an in-memory stream, served exactly as `capsa serve` serves a
//! socket: its own root Executor, its own quotas, and every process it
//! started killed when its last capability is dropped.
//!
//! ```
//! use capsa::client::{self, Spawn};
//! use capsa::embed;
//! use capsa::schema::StdioMode;
//!
//! // A WASI preview 1 program that writes "hi\n" and exits.
//! let program = wat::parse_str(r#"
//!     (module
//!       (import "wasi_snapshot_preview1" "fd_write"
//!         (func $fd_write (param i32 i32 i32 i32) (result i32)))
//!       (memory (export "memory") 1)
//!       (data (i32.const 16) "hi\n")
//!       (func (export "_start")
//!         (i32.store (i32.const 0) (i32.const 16))
//!         (i32.store (i32.const 4) (i32.const 3))
//!         (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
//! "#).unwrap();
//!
//! let host = embed::start(capsa::HostConfig::default()).unwrap();
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! tokio::task::LocalSet::new().block_on(&rt, async {
//!     let executor = host.executor();
//!     // The typed client layer builds the request (`capsa::client`).
//!     let process = Spawn { stdio: StdioMode::Data, ..Spawn::default() }
//!         .start(&executor, &program)
//!         .await
//!         .unwrap();
//!     let output = client::output(&process).await.unwrap();
//!     assert_eq!(output.stdout, b"hi\n");
//!     assert_eq!(output.status, capsa::ExitStatus::Exited(0));
//! });
//! host.shutdown();
//! ```

use std::thread::JoinHandle;

use capsa_schema::capsa_capnp::executor;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

use crate::host::{Host, HostConfig, HostError};
use crate::serve;

/// Bytes buffered in each direction of an in-memory connection.
const BUFFER: usize = 256 * 1024;

/// A host running on its own thread. Dropping it (or [`Embedded::shutdown`])
/// kills every process and stops the thread.
pub struct Embedded {
    connect: Option<mpsc::UnboundedSender<DuplexStream>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts a host with `config` on a new thread.
pub fn start(config: HostConfig) -> Result<Embedded, HostError> {
    let (connect, mut connections) = mpsc::unbounded_channel::<DuplexStream>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("capsa-host".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(HostError::Thread(format!("tokio runtime: {e}"))));
                    return;
                }
            };
            tokio::task::LocalSet::new().block_on(&rt, async move {
                let host = match Host::new(config) {
                    Ok(host) => {
                        let _ = ready_tx.send(Ok(()));
                        host
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(stream) = connections.recv().await {
                    let host = host.clone();
                    tokio::task::spawn_local(async move {
                        if let Err(e) = serve::serve_connection(&host, stream, None, None).await {
                            tracing::debug!("embedded connection ended: {e}");
                        }
                    });
                }
                host.shutdown().await;
                // Let the connections tell their clients.
                for _ in 0..64 {
                    tokio::task::yield_now().await;
                }
            });
        })
        .map_err(|e| HostError::Thread(e.to_string()))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Embedded {
            connect: Some(connect),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(HostError::Thread("it ended while starting".into()))
        }
    }
}

impl Embedded {
    /// A new connection to the host, and its root Executor: nesting level
    /// 1, the host's limits, a live-children quota of its own. A process
    /// started through it is killed when its last `Process` reference is
    /// dropped, and all of them when the host stops.
    ///
    /// The client is a capnp-rpc client, which is not `Send`: call this from
    /// inside a `tokio::task::LocalSet` on any current-thread runtime.
    pub fn executor(&self) -> executor::Client {
        let (ours, theirs) = tokio::io::duplex(BUFFER);
        if let Some(connect) = &self.connect {
            // If the host thread is gone, `theirs` is dropped and the
            // client's calls fail with "disconnected".
            let _ = connect.send(theirs);
        }
        serve::client_over(ours).executor
    }

    /// Kills every process, stops the host and waits for its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.connect.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}
