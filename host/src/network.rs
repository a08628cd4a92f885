//! The `Network` and `Connection` capabilities: a view of the network
//! ([`View`]) served to whoever holds it, and the TCP connections made
//! through it.
//!
//! A view's server revokes the view when it is dropped, that is when the
//! last reference to it is gone: the views made from it and every
//! connection through them end (the socket is shut down, so a holder of
//! a `Connection` reads the end and writes fail). The host keeps the
//! server of the view it was configured with for as long as it runs; a
//! view granted to a child is narrowed for that child alone, so the
//! child's exit revokes it whoever else holds the parent's.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::CapabilityServerSet;
use capsa_schema::capsa_capnp::{byte_sink, connection, net_rules, network, ErrorKind};
use capsa_schema::error::error;
use capsa_schema::stream::{ByteSourceServer, ByteStream};
use ipnet::IpNet;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::netpolicy::{
    canonical, Destination, DestinationError, HostPattern, ResolveError, RuleError, Rules, Seat,
    View,
};

/// How long a connection may take, lookup included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most one read of a connection returns.
const MAX_READ: usize = 256 << 10;

/// Why a connection was not made.
#[derive(Debug, Error)]
pub enum NetError {
    /// A view refused (its rule is in the message).
    #[error("{0}")]
    Denied(String),
    /// The host was neither an address nor a name, or a rule unreadable.
    #[error("{0}")]
    BadRequest(String),
    /// A view's connection limit.
    #[error("{0}")]
    Quota(String),
    /// Nothing answered.
    #[error("{0}")]
    Unreachable(String),
}

impl From<NetError> for capnp::Error {
    fn from(e: NetError) -> capnp::Error {
        let kind = match e {
            NetError::Denied(_) => ErrorKind::Denied,
            NetError::BadRequest(_) => ErrorKind::BadRequest,
            NetError::Quota(_) => ErrorKind::Quota,
            NetError::Unreachable(_) => ErrorKind::Unreachable,
        };
        error(kind, e)
    }
}

impl From<DestinationError> for NetError {
    fn from(e: DestinationError) -> NetError {
        match e {
            DestinationError::Denied(d) => NetError::Denied(d.to_string()),
            DestinationError::BadHost(_) => NetError::BadRequest(e.to_string()),
        }
    }
}

impl From<ResolveError> for NetError {
    fn from(e: ResolveError) -> NetError {
        match e {
            ResolveError::Denied(d) => NetError::Denied(d.to_string()),
            ResolveError::Lookup(_) => NetError::Unreachable(e.to_string()),
        }
    }
}

impl From<RuleError> for NetError {
    fn from(e: RuleError) -> NetError {
        NetError::BadRequest(e.to_string())
    }
}

fn revoked() -> NetError {
    NetError::Denied("this network has been revoked".to_string())
}

/// The addresses `host` stands for in `view`: itself if it is an address
/// the view allows as such, else the allowed addresses of the name.
pub async fn resolve(view: &View, host: &str, port: u16) -> Result<Vec<IpAddr>, NetError> {
    if view.revoked().is_cancelled() {
        return Err(revoked());
    }
    match view.destination(host, port)? {
        Destination::Address(ip) => Ok(vec![ip]),
        Destination::Name(name) => Ok(view.resolve(&name).await?),
    }
}

/// A TCP connection to `host`:`port` through `view`, with its seat in the
/// view's limits: every rule checked before lookup, the classes of the
/// addresses after, and the address actually connected once more.
pub async fn connect(
    view: &Arc<View>,
    host: &str,
    port: u16,
) -> Result<(TcpStream, Seat), NetError> {
    let seat = view.seat().map_err(|d| NetError::Quota(d.to_string()))?;
    let attempt = async {
        let addresses = resolve(view, host, port).await?;
        let mut last = None;
        for ip in addresses {
            match TcpStream::connect(SocketAddr::new(ip, port)).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(format!("{ip}:{port}: {e}")),
            }
        }
        Err(NetError::Unreachable(format!(
            "{host}:{port}: {}",
            last.unwrap_or_else(|| "no address".to_string())
        )))
    };
    let stream = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, attempt) => r.map_err(|_| {
            NetError::Unreachable(format!(
                "{host}:{port} did not answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })??,
        () = view.revoked().cancelled() => return Err(revoked()),
    };
    let peer = stream
        .peer_addr()
        .map_err(|e| NetError::Unreachable(format!("{host}:{port}: {e}")))?;
    view.check_class(canonical(peer.ip()), Some(host))
        .map_err(|d| NetError::Denied(d.to_string()))?;
    Ok((stream, seat))
}

/// Every name, address, port and address class: a view made with these
/// rules narrows nothing but has a revocation of its own.
pub fn unrestricted() -> Rules {
    Rules {
        hosts: vec![HostPattern::Any],
        ranges: vec![IpNet::V4(Default::default()), IpNet::V6(Default::default())],
        allow_private: true,
        allow_loopback: true,
        allow_link_local: true,
        ..Rules::default()
    }
}

/// The servers of this host's Network views, to tell a view of this host
/// from one served elsewhere.
pub type Networks = Rc<RefCell<CapabilityServerSet<NetworkImpl, network::Client>>>;

/// A view of the network, as a capability.
pub struct NetworkImpl {
    view: Arc<View>,
    networks: Networks,
}

impl NetworkImpl {
    /// Serves `view`; dropping the last reference revokes it.
    pub fn client(view: Arc<View>, networks: &Networks) -> network::Client {
        networks.borrow_mut().new_client(NetworkImpl {
            view,
            networks: networks.clone(),
        })
    }

    /// The view of a Network capability of this host, if it is one (a
    /// promise is waited for, at most [`CONNECT_TIMEOUT`]).
    pub async fn local_view(networks: &Networks, client: &network::Client) -> Option<Arc<View>> {
        tokio::time::timeout(CONNECT_TIMEOUT, client.client.when_resolved())
            .await
            .ok()?
            .ok()?;
        let resolved: network::Client = capnp::capability::get_resolved_cap(client.clone()).await;
        let server = networks.borrow().get_local_server_of_resolved(&resolved);
        server.map(|s| s.view.clone())
    }

    /// A Network for a child and the view its wasi:sockets go through: a
    /// view of this host narrowed by nothing but revoked when the child's
    /// references go; a Network from elsewhere as it is, with no view
    /// (its sockets stay closed: the checks need a view of this host).
    pub async fn for_child(
        networks: &Networks,
        given: network::Client,
    ) -> (Option<network::Client>, Option<Arc<View>>) {
        match Self::local_view(networks, &given).await {
            Some(view) => match view.restrict(unrestricted()) {
                Ok(child) => (Some(Self::client(child.clone(), networks)), Some(child)),
                Err(_) => (Some(given), None),
            },
            None => (Some(given), None),
        }
    }
}

impl Drop for NetworkImpl {
    fn drop(&mut self) {
        self.view.revoke();
    }
}

/// Reads the schema's `NetRules`.
pub fn read_rules(rules: net_rules::Reader<'_>) -> Result<Rules, NetError> {
    let text = |t: capnp::text::Reader<'_>| -> Result<String, NetError> {
        t.to_string()
            .map_err(|_| NetError::BadRequest("a rule is not UTF-8".to_string()))
    };
    let capnp_err = |e: capnp::Error| NetError::BadRequest(e.to_string());
    let mut out = Rules {
        allow_private: rules.get_allow_private(),
        allow_loopback: rules.get_allow_loopback(),
        allow_link_local: rules.get_allow_link_local(),
        max_connections: rules.get_max_connections(),
        ..Rules::default()
    };
    for h in rules.get_hosts().map_err(capnp_err)?.iter() {
        out.hosts
            .push(HostPattern::parse(&text(h.map_err(capnp_err)?)?)?);
    }
    for r in rules.get_ranges().map_err(capnp_err)?.iter() {
        out.ranges.push(crate::netpolicy::parse_range(&text(
            r.map_err(capnp_err)?,
        )?)?);
    }
    for p in rules.get_ports().map_err(capnp_err)?.iter() {
        let (first, last) = (p.get_first(), p.get_last());
        out.ports.push((first, last.max(first)));
    }
    for pin in rules.get_pins().map_err(capnp_err)?.iter() {
        let name = text(pin.get_host().map_err(capnp_err)?)?;
        let list = pin.get_addresses().map_err(capnp_err)?;
        let mut addresses = Vec::new();
        for a in list.iter() {
            let a = text(a.map_err(capnp_err)?)?;
            addresses.push(a.parse().map_err(|_| RuleError::BadAddress(a.clone()))?);
        }
        // Bounds the number of addresses.
        out.add_pin(&name, addresses)?;
    }
    out.check_sizes()?;
    Ok(out)
}

fn port_of(port: u16) -> Result<u16, NetError> {
    match port {
        0 => Err(NetError::BadRequest("port 0 is no destination".to_string())),
        p => Ok(p),
    }
}

impl network::Server for NetworkImpl {
    async fn connect(
        self: Rc<Self>,
        params: network::ConnectParams,
        mut results: network::ConnectResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let host = p
            .get_host()?
            .to_string()
            .map_err(|_| error(ErrorKind::BadRequest, "the host is not UTF-8"))?;
        let port = port_of(p.get_port())?;
        let (stream, seat) = connect(&self.view, &host, port).await?;
        results.get().set_connection(ConnectionImpl::client(
            stream,
            seat,
            self.view.revoked().clone(),
        )?);
        Ok(())
    }

    async fn resolve(
        self: Rc<Self>,
        params: network::ResolveParams,
        mut results: network::ResolveResults,
    ) -> Result<(), capnp::Error> {
        let host = params
            .get()?
            .get_host()?
            .to_string()
            .map_err(|_| error(ErrorKind::BadRequest, "the host is not UTF-8"))?;
        let addresses = tokio::time::timeout(CONNECT_TIMEOUT, resolve(&self.view, &host, 1))
            .await
            .map_err(|_| {
                NetError::Unreachable(format!(
                    "looking up {host:?} took longer than {} s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })??;
        let mut list = results.get().init_addresses(addresses.len() as u32);
        for (i, a) in addresses.iter().enumerate() {
            list.set(i as u32, a.to_string());
        }
        Ok(())
    }

    async fn restrict(
        self: Rc<Self>,
        params: network::RestrictParams,
        mut results: network::RestrictResults,
    ) -> Result<(), capnp::Error> {
        if self.view.revoked().is_cancelled() {
            return Err(revoked().into());
        }
        let rules = read_rules(params.get()?.get_rules()?)?;
        let child = self
            .view
            .restrict(rules)
            .map_err(|d| NetError::Denied(d.to_string()))?;
        results
            .get()
            .set_network(NetworkImpl::client(child, &self.networks));
        Ok(())
    }
}

/// Ends a connection when its view is revoked: shuts the socket down
/// through a duplicate of it, so whoever holds either half sees the end.
struct Revocation {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _seat: Seat,
}

impl Drop for Revocation {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Both halves of a TCP connection.
pub struct ConnectionImpl {
    input: capsa_schema::capsa_capnp::byte_source::Client,
    output: byte_sink::Client,
    local: String,
    peer: String,
}

impl ConnectionImpl {
    /// Serves `stream`, ended when `revoked` is cancelled; `seat` is
    /// given back when the connection is closed.
    pub fn client(
        stream: TcpStream,
        seat: Seat,
        revoked: CancellationToken,
    ) -> capnp::Result<connection::Client> {
        let local = stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let std = stream
            .into_std()
            .map_err(|e| error(ErrorKind::Failed, format_args!("connection: {e}")))?;
        let shutdown = std
            .try_clone()
            .map_err(|e| error(ErrorKind::Failed, format_args!("connection: {e}")))?;
        let stream = TcpStream::from_std(std)
            .map_err(|e| error(ErrorKind::Failed, format_args!("connection: {e}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::task::spawn_local(async move {
            tokio::select! {
                () = revoked.cancelled() => {
                    let _ = shutdown.shutdown(std::net::Shutdown::Both);
                }
                _ = stopped => {}
            }
        });
        let guard = Rc::new(Revocation {
            stop: Some(stop),
            _seat: seat,
        });
        let (read, write) = stream.into_split();
        let input = ByteSourceServer::client(TcpInput {
            read: tokio::sync::Mutex::new(read),
            _guard: guard.clone(),
        });
        let output = capnp_rpc::new_client(TcpOutput {
            write: tokio::sync::Mutex::new(Some(write)),
            _guard: guard,
        });
        Ok(capnp_rpc::new_client(ConnectionImpl {
            input,
            output,
            local,
            peer,
        }))
    }
}

impl connection::Server for ConnectionImpl {
    async fn input(
        self: Rc<Self>,
        _: connection::InputParams,
        mut results: connection::InputResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_source(self.input.clone());
        Ok(())
    }

    async fn output(
        self: Rc<Self>,
        _: connection::OutputParams,
        mut results: connection::OutputResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_sink(self.output.clone());
        Ok(())
    }

    async fn addresses(
        self: Rc<Self>,
        _: connection::AddressesParams,
        mut results: connection::AddressesResults,
    ) -> Result<(), capnp::Error> {
        let mut r = results.get();
        r.set_local(&self.local);
        r.set_peer(&self.peer);
        Ok(())
    }
}

/// What the peer sends.
struct TcpInput {
    read: tokio::sync::Mutex<OwnedReadHalf>,
    _guard: Rc<Revocation>,
}

impl ByteStream for TcpInput {
    const MAX_READ: usize = MAX_READ;
    type Chunk = Vec<u8>;

    async fn read(&self, max: usize) -> capnp::Result<(Vec<u8>, bool)> {
        let mut buf = vec![0; max.min(MAX_READ)];
        let n = self.read.lock().await.read(&mut buf).await.map_err(|e| {
            error(
                ErrorKind::Failed,
                format_args!("reading the connection: {e}"),
            )
        })?;
        buf.truncate(n);
        Ok((buf, n == 0))
    }
}

/// What goes to the peer.
struct TcpOutput {
    write: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    _guard: Rc<Revocation>,
}

impl byte_sink::Server for TcpOutput {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut write = self.write.lock().await;
        let Some(half) = write.as_mut() else {
            return Err(error(
                ErrorKind::Failed,
                "the connection's output is closed",
            ));
        };
        half.write_all(data)
            .await
            .map_err(|e| capnp::Error::disconnected(format!("writing the connection: {e}")))
    }

    async fn close(
        self: Rc<Self>,
        _: byte_sink::CloseParams,
        _: byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        let mut write = self.write.lock().await;
        if let Some(mut half) = write.take() {
            // Ends this side only: the peer reads the end and may answer.
            let _ = half.shutdown().await;
            // Dropping an owned write half shuts its direction down too.
        }
        Ok(())
    }
}
