//! The all-reduce transport between worker processes: QUIC (quinn) with TLS 1.3.
//!
//! Trust: the coordinator runs a cluster CA ([`ClusterCa`]) and issues each worker that
//! registered with the cluster token a certificate for the worker's own key. A worker's QUIC
//! endpoint accepts only clients with such a certificate and trusts only servers with one, and
//! the first message on every stream proves knowledge of the token again. A process that did not
//! register cannot complete a handshake.
//!
//! Topology: one long-lived connection per pair of ranks (the lower rank dials), one
//! unidirectional stream each way on it. Messages are a u32 length (in f32 values) and the
//! values, little-endian; send and receive buffers are reused, so a warmed-up step does not
//! allocate.
//!
//! Latency: each node owns a single-threaded Tokio runtime ([`Driver`]) for its endpoint, and
//! the thread that runs an all-reduce drives it itself (its `block_on` polls the UDP socket,
//! quinn's endpoint and connection tasks and the stream), so a send or receive does not hop to
//! another thread and back. Between all-reduces a helper thread drives it (keep-alives,
//! acknowledgements, handshakes), and hands it over when an all-reduce asks.

use crate::{CollectiveError, Transport, fast, shm};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Name every worker certificate carries; identity within the mesh is the rank in the hello.
pub const SERVER_NAME: &str = "tessera-worker";
const ALPN: &[u8] = b"tessera-mesh/2";

/// The coordinator's certificate authority for the mesh.
pub struct ClusterCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl ClusterCa {
    pub fn new() -> Result<ClusterCa, rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tessera cluster CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
        Ok(ClusterCa { issuer })
    }

    /// The cluster CA for a given Ed25519 key (PKCS#8): the one every holder of the cluster
    /// secret derives (`tessera_proto::secure`), so the CA outlives a coordinator restart.
    pub fn from_ed25519_key(pkcs8: &[u8]) -> Result<ClusterCa, rcgen::Error> {
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.to_vec()),
            &rcgen::PKCS_ED25519,
        )?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tessera cluster CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key)?;
        Ok(ClusterCa { issuer })
    }

    pub fn ca_der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// Issues a certificate for a worker's ECDSA P-256 public key (the uncompressed point, as
    /// [`generate_key`] returns it).
    pub fn issue(&self, public_key: &[u8], worker_name: &str) -> Result<Vec<u8>, rcgen::Error> {
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(rcgen::Error::CouldNotParseKeyPair);
        }
        let key = P256PublicKey(public_key.to_vec());
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, worker_name);
        Ok(params.signed_by(&key, &self.issuer)?.der().to_vec())
    }
}

/// A worker's QUIC identity: its key (PKCS#8 DER), and once registered its certificate and the
/// cluster CA.
pub struct Identity {
    pub key_pkcs8: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

struct P256PublicKey(Vec<u8>);

impl rcgen::PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A fresh ECDSA P-256 key pair for a worker: (PKCS#8 private key, public key point).
pub fn generate_key() -> Result<(Vec<u8>, Vec<u8>), rcgen::Error> {
    use rcgen::PublicKeyData;
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok((k.serialize_der(), k.der_bytes().to_vec()))
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // A peer that vanishes (killed, cut off) is noticed within seconds, not minutes.
    t.max_idle_timeout(Some(
        Duration::from_secs(5).try_into().expect("valid timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    // A prefill all-reduce moves megabytes at once (512 tokens x 4096 hidden x 4 bytes is
    // 8 MiB); every rank sends before it receives, so a message must fit the peer's window.
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(256 << 20);
    Arc::new(t)
}

fn tls_error(e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Transport {
        peer: usize::MAX,
        msg: format!("TLS setup: {e}"),
    }
}

fn configs(id: &Identity) -> Result<(quinn::ServerConfig, quinn::ClientConfig), CollectiveError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(id.ca_der.clone()))
        .map_err(tls_error)?;
    let roots = Arc::new(roots);
    let chain = vec![CertificateDer::from(id.cert_der.clone())];
    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8.clone()));

    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(tls_error)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key())
        .map_err(tls_error)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_error)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport_config());

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key())
        .map_err(tls_error)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_error)?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport_config());
    Ok((server, client))
}

/// Hello on each stream: mesh id, sender rank, and a proof of the cluster token.
fn hello(mesh_id: u64, rank: u32, proof: &[u8; 32]) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(&mesh_id.to_le_bytes());
    h.extend_from_slice(&rank.to_le_bytes());
    h.extend_from_slice(proof);
    h
}

/// A node's own single-threaded runtime, driven by whichever thread needs it: an all-reduce's
/// thread while it sends and receives (and for [`Driver::LEASE`] after, so the next
/// all-reduce of the same step finds it free), else the helper thread.
pub struct Driver {
    /// Always Some; taken on drop to shut down without blocking (a node may be dropped inside
    /// another runtime's task).
    rt: Option<tokio::runtime::Runtime>,
    lease: Mutex<Lease>,
    changed: Condvar,
    /// Tells the helper thread to stop driving (an all-reduce wants the runtime).
    release: Notify,
}

struct Lease {
    users: usize,
    last_used: Instant,
    stop: bool,
}

impl Driver {
    /// How long after its last use the runtime stays with the all-reduce threads.
    pub const LEASE: Duration = Duration::from_micros(1000);

    fn start() -> std::io::Result<Arc<Driver>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let d = Arc::new(Driver {
            rt: Some(rt),
            lease: Mutex::new(Lease {
                users: 0,
                last_used: Instant::now() - Self::LEASE,
                stop: false,
            }),
            changed: Condvar::new(),
            release: Notify::new(),
        });
        let weak = Arc::downgrade(&d);
        std::thread::Builder::new()
            .name("tessera-quic".into())
            .spawn(move || Driver::idle_loop(weak))?;
        Ok(d)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime until drop")
    }

    fn idle_loop(weak: std::sync::Weak<Driver>) {
        loop {
            let Some(d) = weak.upgrade() else { return };
            {
                let mut l = d.lease.lock().unwrap();
                loop {
                    if l.stop {
                        return;
                    }
                    let idle = l.last_used.elapsed();
                    if l.users == 0 && idle >= Self::LEASE {
                        break;
                    }
                    let wait = if l.users > 0 {
                        Self::LEASE
                    } else {
                        Self::LEASE - idle
                    };
                    l = d.changed.wait_timeout(l, wait).unwrap().0;
                }
            }
            d.rt().block_on(async {
                tokio::select! {
                    _ = d.release.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            });
        }
    }

    /// Runs `f` to completion on this runtime, driving it from the calling thread (which must
    /// not be a Tokio worker).
    pub fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        {
            let mut l = self.lease.lock().unwrap();
            l.users += 1;
        }
        self.release.notify_one();
        let out = self.rt().block_on(f);
        let mut l = self.lease.lock().unwrap();
        l.users -= 1;
        l.last_used = Instant::now();
        out
    }

    fn stop(&self) {
        self.lease.lock().unwrap().stop = true;
        self.changed.notify_all();
        self.release.notify_one();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type Pending = Arc<(Mutex<HashMap<(u64, u32), (Connection, RecvStream)>>, Notify)>;

/// A worker's QUIC endpoint. Bound at start-up (so its address can be registered); it serves
/// once [`QuicNode::set_identity`] has installed the certificate the coordinator issued.
pub struct QuicNode {
    endpoint: Endpoint,
    client: Mutex<Option<quinn::ClientConfig>>,
    proof: [u8; 32],
    pending: Pending,
    driver: Arc<Driver>,
    accept_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Whether meshes built from now on try the datagram lane (see [`QuicNode::set_lanes`]).
    lanes_on: std::sync::atomic::AtomicBool,
    /// Whether they try shared memory with peers on this machine ([`QuicNode::set_shm`]).
    shm_on: std::sync::atomic::AtomicBool,
}

impl QuicNode {
    /// Binds a UDP socket. `proof` is derived from the cluster token (see `token_proof`).
    pub fn bind(addr: SocketAddr, proof: [u8; 32]) -> std::io::Result<QuicNode> {
        // A prefill all-reduce arrives as a burst of hundreds of datagrams while the receiving
        // process is busy computing; with the default 208 KiB socket buffer the kernel drops
        // them, and QUIC's loss recovery backs off for seconds. Ask for 8 MiB (the kernel caps
        // it at net.core.rmem_max / wmem_max).
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        let _ = sock.set_recv_buffer_size(8 << 20);
        let _ = sock.set_send_buffer_size(8 << 20);
        if addr.is_ipv6() {
            let _ = sock.set_only_v6(false);
        }
        sock.bind(&addr.into())?;
        let driver = Driver::start()?;
        let _in_rt = driver.rt().enter();
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            sock.into(),
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(QuicNode {
            endpoint,
            client: Mutex::new(None),
            proof,
            pending: Arc::new((Mutex::new(HashMap::new()), Notify::new())),
            driver,
            accept_task: Mutex::new(None),
            lanes_on: lanes_enabled().into(),
            shm_on: (lanes_enabled() && std::env::var("TESSERA_SHM").map_or(true, |v| v != "0"))
                .into(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Turns the shared-memory lane ([`shm`]) on or off for meshes built from now on (on by
    /// default, off where TESSERA_SHM=0 or TESSERA_LANE=0). A pair on one machine uses it only
    /// if both ends have it on; it carries the messages the datagram lane would.
    pub fn set_shm(&self, on: bool) {
        self.shm_on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns the datagram lane on or off for meshes built from now on (on by default, off where
    /// TESSERA_LANE=0). A pair uses it only if both ends have it on.
    pub fn set_lanes(&self, on: bool) {
        self.lanes_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`QuicNode::set_identity`] has run.
    pub fn has_identity(&self) -> bool {
        self.client.lock().unwrap().is_some()
    }

    /// Installs the registered identity and starts accepting peers.
    pub fn set_identity(&self, id: &Identity) -> Result<(), CollectiveError> {
        let (server, client) = configs(id)?;
        self.endpoint.set_server_config(Some(server));
        *self.client.lock().unwrap() = Some(client);
        let endpoint = self.endpoint.clone();
        let pending = self.pending.clone();
        let proof = self.proof;
        let task = self.driver.rt().spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let pending = pending.clone();
                tokio::spawn(async move {
                    match accept_peer(incoming, &proof).await {
                        Ok((mesh, rank, conn, recv)) => {
                            pending.0.lock().unwrap().insert((mesh, rank), (conn, recv));
                            pending.1.notify_waiters();
                        }
                        Err(e) => tracing::warn!("refused a QUIC peer: {e}"),
                    }
                });
            }
        });
        if let Some(old) = self.accept_task.lock().unwrap().replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// Connects this rank to every peer of mesh `mesh_id` (`peers[r]` is rank r's address).
    /// Must be called from a thread that is not a Tokio worker (it blocks).
    pub fn connect_mesh(
        &self,
        mesh_id: u64,
        rank: usize,
        peers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<QuicTransport, CollectiveError> {
        let client = self
            .client
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| tls_error("no identity installed"))?;
        let world = peers.len();
        let mut sends: Vec<Option<SendStream>> = (0..world).map(|_| None).collect();
        let mut recvs: Vec<Option<RecvStream>> = (0..world).map(|_| None).collect();
        let mut conns: Vec<Option<Connection>> = (0..world).map(|_| None).collect();
        let my_hello = hello(mesh_id, rank as u32, &self.proof);
        // The datagram lane's sockets, one pair per peer, on this worker's own address.
        let use_lanes = self.lanes_on.load(std::sync::atomic::Ordering::Relaxed);
        let sockets: Vec<Option<fast::Sockets>> = (0..world)
            .map(|p| {
                (use_lanes && p != rank)
                    .then(|| fast::Sockets::bind(peers[rank].ip()).ok())
                    .flatten()
            })
            .collect();
        self.driver.run(async {
            tokio::time::timeout(timeout, async {
                for (peer, addr) in peers.iter().enumerate().filter(|(p, _)| *p > rank) {
                    let err = |e: &dyn std::fmt::Display| CollectiveError::Transport {
                        peer,
                        msg: format!("connecting to {addr}: {e}"),
                    };
                    // A handshake that times out (the link to the peer is down, say while the
                    // mesh is rebuilt through a stall) is tried again until `timeout` runs
                    // out; any other failure (refused, not trusted) ends the join at once.
                    let conn = loop {
                        let connecting = self
                            .endpoint
                            .connect_with(client.clone(), *addr, SERVER_NAME)
                            .map_err(|e| err(&e))?;
                        match connecting.await {
                            Ok(conn) => break conn,
                            Err(quinn::ConnectionError::TimedOut) => {
                                tracing::debug!(peer, "handshake timed out; dialling again");
                            }
                            Err(e) => return Err(err(&e)),
                        }
                    };
                    let mut send = conn.open_uni().await.map_err(|e| err(&e))?;
                    send.write_all(&my_hello).await.map_err(|e| err(&e))?;
                    let mut recv = conn.accept_uni().await.map_err(|e| err(&e))?;
                    let (m, r) = read_hello(&mut recv, &self.proof)
                        .await
                        .map_err(|e| err(&e))?;
                    if m != mesh_id || r as usize != peer {
                        return Err(err(&format!("peer answered as rank {r} of mesh {m}")));
                    }
                    sends[peer] = Some(send);
                    recvs[peer] = Some(recv);
                    conns[peer] = Some(conn);
                }
                for peer in (0..rank).rev() {
                    let (conn, recv) = loop {
                        let notified = self.pending.1.notified();
                        if let Some(x) = self
                            .pending
                            .0
                            .lock()
                            .unwrap()
                            .remove(&(mesh_id, peer as u32))
                        {
                            break x;
                        }
                        notified.await;
                    };
                    let err = |e: &dyn std::fmt::Display| CollectiveError::Transport {
                        peer,
                        msg: format!("answering: {e}"),
                    };
                    let mut send = conn.open_uni().await.map_err(|e| err(&e))?;
                    send.write_all(&my_hello).await.map_err(|e| err(&e))?;
                    sends[peer] = Some(send);
                    recvs[peer] = Some(recv);
                    conns[peer] = Some(conn);
                }
                Ok(())
            })
            .await
            .map_err(|_| {
                // Named by the first peer it has no connection with.
                let peer = (0..world)
                    .find(|&p| p != rank && sends[p].is_none())
                    .unwrap_or(usize::MAX);
                CollectiveError::Transport {
                    peer,
                    msg: format!("mesh {mesh_id} not complete after {timeout:?}"),
                }
            })?
        })?;
        let lanes = self.open_lanes(
            rank, peers, sockets, &mut sends, &mut recvs, &conns, timeout,
        )?;
        let shm = self.open_shm(rank, world, &mut sends, &mut recvs, timeout)?;
        // Stale half-open entries of older meshes are of no use any more.
        self.pending
            .0
            .lock()
            .unwrap()
            .retain(|(m, _), _| *m > mesh_id);
        let all_lanes = lanes
            .as_ref()
            .is_some_and(|l| l.lanes.iter().flatten().count() == world - 1);
        let mut t = QuicTransport {
            rank,
            world,
            sends,
            recvs,
            conns,
            lanes,
            shm,
            driver: self.driver.clone(),
            buf: Vec::new(),
            timeout: Duration::from_secs(10),
            spin: Duration::from_micros(
                std::env::var("TESSERA_SPIN_US")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000),
            ),
            piece: None,
            cancel: None,
        };
        // Large all-reduces go over the lanes in pieces only if every rank can: agree. A
        // one-value all-gather costs about a one-way latency: the fastest of 8 (the first ones
        // also wait for ranks that are still setting up) tells this rank's round trip.
        if world > 1 {
            let (mut enc, mut scratch) = (Vec::new(), Vec::new());
            let mut fastest = Duration::MAX;
            for _ in 0..8 {
                let t0 = Instant::now();
                crate::all_gather_sum(
                    &mut t,
                    &mut [0.0],
                    crate::Wire::F32,
                    &mut enc,
                    &mut scratch,
                )?;
                fastest = fastest.min(t0.elapsed());
            }
            let mut votes = [f32::from(u8::from(all_lanes && fastest * 2 <= BULK_RTT))];
            crate::all_gather_sum(&mut t, &mut votes, crate::Wire::F32, &mut enc, &mut scratch)?;
            if votes[0] == world as f32 {
                t.piece = Some(fast::MAX_BYTES / 4);
            }
            tracing::info!(
                mesh = mesh_id,
                rank,
                lane_peers = t.lane_peers(),
                shm_peers = t.shm_peers(),
                one_value_all_gather_us = fastest.as_micros() as u64,
                pieces = ?t.piece,
                "all-reduce mesh built"
            );
            // The counters start with the mesh's first all-reduce.
            t.each_lane()
                .for_each(|l| l.stats = fast::LaneStats::default());
            t.shm
                .iter_mut()
                .flatten()
                .for_each(|l| l.stats = shm::ShmStats::default());
        }
        Ok(t)
    }
}

/// Large all-reduces take the lanes, 64 KiB at a time in lock-step, only where every round trip
/// (twice the fastest one-value all-gather when the mesh is built) is this short: there that
/// window still moves half a gigabit per second or more; on longer links QUIC's congestion
/// control fills the pipe better.
const BULK_RTT: Duration = Duration::from_millis(1);

impl QuicNode {
    /// Sets up the datagram lane ([`fast`]) beside each peer's QUIC connection: ports over the
    /// streams, keys from the TLS session, probes both ways, and agreement on which pairs use
    /// it. A pair whose probes do not get through stays on QUIC.
    #[allow(clippy::too_many_arguments)]
    fn open_lanes(
        &self,
        rank: usize,
        peers: &[SocketAddr],
        sockets: Vec<Option<fast::Sockets>>,
        sends: &mut [Option<SendStream>],
        recvs: &mut [Option<RecvStream>],
        conns: &[Option<Connection>],
        timeout: Duration,
    ) -> Result<Option<fast::Lanes>, CollectiveError> {
        let world = peers.len();
        let others = || (0..world).filter(move |&p| p != rank);
        let stream_err = |peer: usize, e: &dyn std::fmt::Display| CollectiveError::Transport {
            peer,
            msg: format!("setting up the datagram lane: {e}"),
        };
        // Ports (0, 0 where this end has no lane) over the authenticated streams.
        let theirs = self.swap(sends, recvs, rank, timeout, |p| {
            let ports = sockets[p].as_ref().map_or([0, 0], |s| s.ports());
            let [a, b] = ports.map(u16::to_le_bytes);
            [a[0], a[1], b[0], b[1]]
        })?;
        let their_ports: Vec<[u16; 2]> = theirs
            .iter()
            .map(|b| {
                [
                    u16::from_le_bytes([b[0], b[1]]),
                    u16::from_le_bytes([b[2], b[3]]),
                ]
            })
            .collect();
        let mut keys: Vec<Option<([u8; 32], [u8; 32])>> = vec![None; world];
        let mut sockets = sockets;
        for p in others() {
            let (Some(s), Some(conn)) = (&sockets[p], &conns[p]) else {
                continue;
            };
            let (mut send, mut recv) = ([0u8; 32], [0u8; 32]);
            let exported = conn
                .export_keying_material(
                    &mut send,
                    fast::EXPORTER_LABEL,
                    &fast::key_context(rank, p),
                )
                .and_then(|_| {
                    conn.export_keying_material(
                        &mut recv,
                        fast::EXPORTER_LABEL,
                        &fast::key_context(p, rank),
                    )
                });
            if exported.is_ok() && s.connect(peers[p].ip(), their_ports[p]).is_ok() {
                keys[p] = Some((send, recv));
            } else {
                sockets[p] = None;
            }
        }
        let probing: Vec<_> = (0..world)
            .map(|p| {
                let (s, k) = (sockets[p].as_ref()?, keys[p]?);
                Some((s, fast::aead(&k.0), fast::aead(&k.1)))
            })
            .collect();
        let route_frag: Vec<usize> = sockets
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.route_frag()))
            .collect();
        let heard = fast::probe(&probing, &route_frag, Duration::from_millis(500));
        drop(probing);
        // Both ends must have heard each other; agree over the streams. Full-size datagrams go
        // where the peer received our full-size probe.
        let theirs = self.swap(sends, recvs, rank, timeout, |p| [heard[p].byte()])?;
        let theirs: Vec<fast::Heard> = theirs
            .iter()
            .map(|b| fast::Heard::from_byte(b[0]))
            .collect();
        let agreed: Vec<bool> = (0..world)
            .map(|p| p != rank && heard[p].both && theirs[p].both)
            .collect();
        let frag: Vec<usize> = (0..world)
            .map(|p| {
                if theirs[p].big {
                    route_frag[p]
                } else {
                    fast::MIN_FRAG
                }
            })
            .collect();
        if !agreed.iter().any(|&a| a) {
            return Ok(None);
        }
        for p in 0..world {
            if !agreed[p] {
                sockets[p] = None;
                keys[p] = None;
            }
        }
        // A resend is asked for after 3 round trips (at least 5 ms).
        let rtt = others()
            .filter_map(|p| conns[p].as_ref().map(|c| c.rtt()))
            .max()
            .unwrap_or_default();
        let rto = (rtt * 3).max(Duration::from_millis(5));
        let lanes = fast::Lanes::start(sockets, keys, &frag, rto, rtt)
            .map_err(|e| stream_err(usize::MAX, &e))?;
        Ok(Some(lanes))
    }
}

impl QuicNode {
    /// Offers every higher rank shared memory over the pair's authenticated stream and takes
    /// the lower ranks' offers (see [`shm`]): an offer, an answer, and the offering side's
    /// word that it holds the link too, so that both ends agree.
    fn open_shm(
        &self,
        rank: usize,
        world: usize,
        sends: &mut [Option<SendStream>],
        recvs: &mut [Option<RecvStream>],
        timeout: Duration,
    ) -> Result<Vec<Option<shm::Link>>, CollectiveError> {
        let mut links: Vec<Option<shm::Link>> = (0..world).map(|_| None).collect();
        if world < 2 {
            return Ok(links);
        }
        let on = self.shm_on.load(std::sync::atomic::Ordering::Relaxed);
        let mut offers: Vec<Option<shm::Offer>> = (0..world).map(|_| None).collect();
        let mut msgs = vec![[0u8; shm::OFFER_LEN]; world];
        for p in (rank + 1..world).filter(|_| on) {
            match shm::Offer::create() {
                Ok((o, m)) => {
                    offers[p] = Some(o);
                    msgs[p] = m;
                }
                Err(e) => {
                    tracing::debug!("no shared memory for rank {p}: {e}");
                    break;
                }
            }
        }
        let theirs = self.swap(sends, recvs, rank, timeout, |p| msgs[p])?;
        let mut answers = vec![[0u8; shm::ANSWER_LEN]; world];
        for p in (0..rank).filter(|_| on) {
            let (link, answer) = shm::accept(&theirs[p]);
            links[p] = link;
            answers[p] = answer;
        }
        let theirs = self.swap(sends, recvs, rank, timeout, |p| answers[p])?;
        for p in rank + 1..world {
            if let Some(o) = offers[p].take() {
                links[p] = o.finish(&theirs[p]);
            }
        }
        let held: Vec<[u8; 1]> = (0..world).map(|p| [u8::from(links[p].is_some())]).collect();
        let theirs = self.swap(sends, recvs, rank, timeout, |p| held[p])?;
        for p in 0..rank {
            if theirs[p][0] != 1 {
                links[p] = None;
            }
        }
        Ok(links)
    }

    /// Sends every peer `mine(peer)` on its stream, then reads as many bytes from each: what
    /// each peer sent this rank (the entry of this rank itself stays zero).
    fn swap<const N: usize>(
        &self,
        sends: &mut [Option<SendStream>],
        recvs: &mut [Option<RecvStream>],
        rank: usize,
        timeout: Duration,
        mine: impl Fn(usize) -> [u8; N],
    ) -> Result<Vec<[u8; N]>, CollectiveError> {
        let world = sends.len();
        let err = |peer: usize, e: &dyn std::fmt::Display| CollectiveError::Transport {
            peer,
            msg: format!("setting up the datagram lane: {e}"),
        };
        let mut theirs = vec![[0u8; N]; world];
        self.driver.run(async {
            tokio::time::timeout(timeout, async {
                for p in (0..world).filter(|&p| p != rank) {
                    let send = sends[p].as_mut().expect("a stream per peer");
                    send.write_all(&mine(p)).await.map_err(|e| err(p, &e))?;
                }
                for p in (0..world).filter(|&p| p != rank) {
                    let recv = recvs[p].as_mut().expect("a stream per peer");
                    recv.read_exact(&mut theirs[p])
                        .await
                        .map_err(|e| err(p, &e))?;
                }
                Ok::<_, CollectiveError>(())
            })
            .await
            .map_err(|_| err(usize::MAX, &"timed out"))?
        })?;
        Ok(theirs)
    }
}

/// The datagram lane is on unless TESSERA_LANE=0 (then every message takes QUIC).
fn lanes_enabled() -> bool {
    std::env::var("TESSERA_LANE").map_or(true, |v| v != "0")
}

impl Drop for QuicNode {
    fn drop(&mut self) {
        if let Some(t) = self.accept_task.lock().unwrap().take() {
            t.abort();
        }
        self.endpoint.close(0u32.into(), b"bye");
        self.driver.stop();
    }
}

/// sha256 of the cluster token with a domain prefix: what peers show each other.
pub fn token_proof(token: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"tessera-mesh-v1:");
    h.update(token.as_bytes());
    h.finalize().into()
}

async fn read_hello(recv: &mut RecvStream, proof: &[u8; 32]) -> Result<(u64, u32), String> {
    let mut h = [0u8; 44];
    recv.read_exact(&mut h)
        .await
        .map_err(|e| format!("reading hello: {e}"))?;
    // Compare without an early exit.
    let diff = h[12..44]
        .iter()
        .zip(proof)
        .fold(0u8, |a, (x, y)| a | (x ^ y));
    if diff != 0 {
        return Err("wrong cluster token".into());
    }
    Ok((
        u64::from_le_bytes(h[0..8].try_into().unwrap()),
        u32::from_le_bytes(h[8..12].try_into().unwrap()),
    ))
}

async fn accept_peer(
    incoming: quinn::Incoming,
    proof: &[u8; 32],
) -> Result<(u64, u32, Connection, RecvStream), String> {
    let conn = incoming.await.map_err(|e| format!("handshake: {e}"))?;
    let mut recv = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
        .await
        .map_err(|_| "no hello".to_string())?
        .map_err(|e| format!("stream: {e}"))?;
    let (mesh, rank) = read_hello(&mut recv, proof)
        .await
        .inspect_err(|_| conn.close(1u32.into(), b"refused"))?;
    Ok((mesh, rank, conn, recv))
}

/// The [`Transport`] over a mesh of QUIC streams.
pub struct QuicTransport {
    rank: usize,
    world: usize,
    sends: Vec<Option<SendStream>>,
    recvs: Vec<Option<RecvStream>>,
    conns: Vec<Option<Connection>>,
    /// Messages of at most [`fast::MAX_BYTES`] go by datagram to the peers that have a lane.
    lanes: Option<fast::Lanes>,
    /// ... or through shared memory to the peers on this machine that have one (first).
    shm: Vec<Option<shm::Link>>,
    driver: Arc<Driver>,
    buf: Vec<u8>,
    /// Longest wait for a peer's message before the all-reduce fails.
    pub timeout: Duration,
    /// Large all-reduces in pieces of this many values over the lanes (see [`BULK_RTT`]).
    piece: Option<usize>,
    /// How long a receive polls the socket without sleeping before it blocks: 1 ms unless
    /// TESSERA_SPIN_US says otherwise (0 where workers share cores, as `tessera run` sets
    /// when it starts more worker threads than there are cores).
    pub spin: Duration,
    /// Where set, a receive gives up when its step is cancelled.
    cancel: Option<Arc<crate::Cancel>>,
}

impl QuicTransport {
    /// Receives give up with [`CollectiveError::Cancelled`] when `cancel` calls their step off.
    pub fn set_cancel(&mut self, cancel: Arc<crate::Cancel>) {
        self.cancel = Some(cancel);
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.cancelled())
    }

    /// The datagram lane to `peer` if it has one and `len` f32 values fit it.
    fn lane(&mut self, peer: usize, len: usize) -> Option<&mut fast::Lane> {
        if len * 4 > fast::MAX_BYTES {
            return None;
        }
        self.lanes.as_mut()?.lanes.get_mut(peer)?.as_mut()
    }

    /// The shared-memory lane to `peer` if it has one and `len` f32 values fit it.
    fn shm_link(&mut self, peer: usize, len: usize) -> Option<&mut shm::Link> {
        if len * 4 > shm::MAX_BYTES {
            return None;
        }
        self.shm.get_mut(peer)?.as_mut()
    }

    /// How many peers this rank reaches through shared memory.
    pub fn shm_peers(&self) -> usize {
        self.shm.iter().flatten().count()
    }

    /// Counters of the shared-memory lanes.
    pub fn shm_stats(&self) -> shm::ShmStats {
        self.shm
            .iter()
            .flatten()
            .fold(shm::ShmStats::default(), |a, l| shm::ShmStats {
                sent: a.sent + l.stats.sent,
                received: a.received + l.stats.received,
                slept: a.slept + l.stats.slept,
            })
    }

    /// How many peers this rank reaches over a datagram lane (the rest over QUIC alone).
    pub fn lane_peers(&self) -> usize {
        self.lanes
            .as_ref()
            .map_or(0, |l| l.lanes.iter().flatten().count())
    }

    /// Counters of the datagram lanes (messages, resend requests, rejected datagrams).
    pub fn lane_stats(&self) -> fast::LaneStats {
        self.lanes.as_ref().map(|l| l.stats()).unwrap_or_default()
    }

    /// Tests: cut messages into datagrams of `bytes` payload (at least [`fast::MIN_FRAG`]), as
    /// on a path with a small MTU.
    #[doc(hidden)]
    pub fn set_lane_frag(&mut self, bytes: usize) {
        self.each_lane()
            .for_each(|l| l.frag = bytes.max(fast::MIN_FRAG) & !3);
    }

    /// Tests: make the lanes drop or corrupt every k-th first transmission.
    #[doc(hidden)]
    pub fn set_lane_loss(&mut self, every: u64) {
        self.each_lane().for_each(|l| l.lossy = every);
    }

    fn each_lane(&mut self) -> impl Iterator<Item = &mut fast::Lane> {
        self.lanes
            .iter_mut()
            .flat_map(|l| l.lanes.iter_mut().flatten())
    }
}

impl Transport for QuicTransport {
    fn piece_len(&self) -> Option<usize> {
        self.piece
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<(), CollectiveError> {
        let timeout = self.timeout;
        if let Some(l) = self.shm_link(peer, data.len()) {
            return l.send(peer, data, timeout);
        }
        if let Some(lane) = self.lane(peer, data.len()) {
            return lane.send(data, timeout);
        }
        self.buf.clear();
        self.buf
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        for x in data {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
        let stream = self.sends[peer]
            .as_mut()
            .ok_or(CollectiveError::PeerGone { peer })?;
        let buf = &self.buf;
        let timeout = self.timeout;
        self.driver.run(async {
            let write = async {
                stream.write_all(buf).await?;
                // Let the connection's task put the data on the wire now: the next message may
                // take the datagram lane, and then nothing would drive this runtime for a while.
                tokio::task::yield_now().await;
                Ok::<_, quinn::WriteError>(())
            };
            match tokio::time::timeout(timeout, write).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(CollectiveError::Transport {
                    peer,
                    msg: format!("send: {e}"),
                }),
                Err(_) => Err(CollectiveError::Transport {
                    peer,
                    msg: format!("send timed out after {timeout:?}"),
                }),
            }
        })
    }
    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<(), CollectiveError> {
        let r = self.recv_from(peer, out);
        // A wait cut short by a cancelled step says so, not that the peer went away.
        match r {
            Err(_) if self.cancelled() => Err(CollectiveError::Cancelled),
            r => r,
        }
    }
}

impl QuicTransport {
    fn recv_from(&mut self, peer: usize, out: &mut [f32]) -> Result<(), CollectiveError> {
        let (spin, timeout) = (self.spin, self.timeout);
        let conn = self.conns[peer].clone();
        let cancel = self.cancel.clone();
        let cancelled = move || cancel.as_ref().is_some_and(|c| c.cancelled());
        let alive = || conn.as_ref().is_some_and(|c| c.close_reason().is_none()) && !cancelled();
        if let Some(l) = self.shm_link(peer, out.len()) {
            return l.recv(peer, out, spin, timeout, &alive);
        }
        if let Some(lane) = self.lane(peer, out.len()) {
            return lane.recv(out, spin, timeout, &alive);
        }
        let stream = self.recvs[peer]
            .as_mut()
            .ok_or(CollectiveError::PeerGone { peer })?;
        let timeout = self.timeout;
        let spin = self.spin;
        self.buf.resize(4 + out.len() * 4, 0);
        let buf = &mut self.buf;
        self.driver.run(async {
            let read = async {
                stream.read_exact(&mut buf[..4]).await?;
                let n = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
                if n != out.len() {
                    return Ok(Some(n));
                }
                stream.read_exact(&mut buf[4..]).await?;
                Ok::<_, quinn::ReadExactError>(None)
            };
            // Busy-poll the socket for a while before sleeping in epoll: waking an idle
            // (virtual) CPU costs tens of microseconds, about a decode all-reduce's worth.
            let spinning = async {
                let t0 = Instant::now();
                while t0.elapsed() < spin {
                    tokio::task::yield_now().await;
                }
                std::future::pending::<()>().await
            };
            // Looks for a cancelled step every 10 ms.
            let called_off = async {
                while !cancelled() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            // None: called off.
            let read = async {
                tokio::select! {
                    biased;
                    r = read => Some(r),
                    _ = spinning => unreachable!("spinning never ends"),
                    _ = called_off => None,
                }
            };
            match tokio::time::timeout(timeout, read)
                .await
                .map(|r| r.ok_or(()))
            {
                Ok(Err(())) => Err(CollectiveError::Cancelled),
                Ok(Ok(Ok(None))) => Ok(()),
                Ok(Ok(Ok(Some(n)))) => Err(CollectiveError::SizeMismatch {
                    peer,
                    got: n,
                    want: out.len(),
                }),
                Ok(Ok(Err(quinn::ReadExactError::FinishedEarly(_)))) => {
                    Err(CollectiveError::PeerGone { peer })
                }
                Ok(Ok(Err(e))) => Err(CollectiveError::Transport {
                    peer,
                    msg: format!("receive: {e}"),
                }),
                Err(_) => Err(CollectiveError::Transport {
                    peer,
                    msg: format!("no data for {timeout:?}"),
                }),
            }
        })?;
        for (o, b) in out.iter_mut().zip(self.buf[4..].chunks_exact(4)) {
            *o = f32::from_le_bytes(b.try_into().unwrap());
        }
        Ok(())
    }
}

/// A mesh of `world` QUIC endpoints on loopback in this process, with a throwaway CA and
/// token: real sockets, TLS and streams, for measuring the collective alone
/// (`tessera bench --collective --in-process`) and for tests. The transports work while the
/// returned nodes are kept.
#[allow(clippy::type_complexity)]
pub fn local_mesh(
    world: usize,
) -> Result<(Vec<Arc<QuicNode>>, Vec<QuicTransport>), CollectiveError> {
    let ca = ClusterCa::new().map_err(tls_error)?;
    let nodes: Vec<Arc<QuicNode>> = (0..world)
        .map(|_| local_node(&ca, "local"))
        .collect::<Result<_, _>>()?;
    let transports = connect_local(&nodes, 1)
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok((nodes, transports))
}

fn local_node(ca: &ClusterCa, token: &str) -> Result<Arc<QuicNode>, CollectiveError> {
    let n = QuicNode::bind(
        "127.0.0.1:0".parse().expect("an address"),
        token_proof(token),
    )
    .map_err(tls_error)?;
    let (key, spki) = generate_key().map_err(tls_error)?;
    let cert = ca.issue(&spki, "local").map_err(tls_error)?;
    n.set_identity(&Identity {
        key_pkcs8: key,
        cert_der: cert,
        ca_der: ca.ca_der(),
    })?;
    Ok(Arc::new(n))
}

fn connect_local(
    nodes: &[Arc<QuicNode>],
    mesh: u64,
) -> Vec<Result<QuicTransport, CollectiveError>> {
    let addrs: Vec<SocketAddr> = nodes
        .iter()
        .map(|n| n.local_addr().expect("a bound node"))
        .collect();
    let hs: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(r, n)| {
            let (n, addrs) = (n.clone(), addrs.clone());
            std::thread::spawn(move || n.connect_mesh(mesh, r, &addrs, Duration::from_secs(5)))
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("connect thread"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Algorithm, Collective, Mesh};

    struct Group {
        nodes: Vec<Arc<QuicNode>>,
        ca: ClusterCa,
    }

    fn node(ca: &ClusterCa, token: &str) -> Arc<QuicNode> {
        local_node(ca, token).unwrap()
    }

    /// Nodes of one process, kept off shared memory (these tests are about the network paths;
    /// see `shm_group`).
    fn group(n: usize) -> Group {
        let g = shm_group(n);
        g.nodes.iter().for_each(|n| n.set_shm(false));
        g
    }

    fn shm_group(n: usize) -> Group {
        let ca = ClusterCa::new().unwrap();
        let nodes = (0..n).map(|_| node(&ca, "secret")).collect();
        Group { nodes, ca }
    }

    #[test]
    fn ranks_on_one_machine_all_reduce_through_shared_memory() {
        let g = shm_group(3);
        g.nodes[2].set_shm(false);
        let hs: Vec<_> = connect(&g.nodes, 1)
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let t = t.unwrap();
                    let peers = t.shm_peers();
                    let mut mesh = Mesh::new(t);
                    let mut last = Vec::new();
                    for round in 0..20 {
                        // A decode-sized all-gather, a ring whose chunks fit a slot, and one
                        // in pieces or on QUIC.
                        for len in [1usize, 576, 20_000, 100_000] {
                            last = check_reduce(&mut mesh, len + round);
                        }
                    }
                    let stats = mesh.transport_mut().shm_stats();
                    (mesh.rank(), peers, stats, last, mesh)
                })
            })
            .collect();
        let results: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for (rank, peers, stats, last, _) in &results {
            assert_eq!(last, &results[0].3, "ranks hold identical bits");
            // Ranks 0 and 1 share memory; rank 2 turned it off and reaches both otherwise.
            let want = usize::from(*rank < 2);
            assert_eq!(*peers, want, "rank {rank}");
            if want == 1 {
                assert!(stats.sent >= 40 && stats.received >= 40, "{stats:?}");
            } else {
                assert_eq!(stats.sent + stats.received, 0);
            }
        }
        // What one of the pair sent through the ring, the other took out of it.
        let (a, b) = (results[0].2, results[1].2);
        assert_eq!((a.sent, a.received), (b.received, b.sent));
    }

    fn connect(nodes: &[Arc<QuicNode>], mesh: u64) -> Vec<Result<QuicTransport, CollectiveError>> {
        connect_local(nodes, mesh)
    }

    #[test]
    fn quic_all_reduce_is_exact_on_2_3_4_endpoints() {
        for world in [2, 3, 4] {
            let g = group(world);
            let ts = connect(&g.nodes, 1);
            for algo in [Algorithm::AllGather, Algorithm::Ring] {
                let hs: Vec<_> = connect(&g.nodes, 10 + algo as u64)
                    .into_iter()
                    .map(|t| {
                        std::thread::spawn(move || {
                            let mut mesh = Mesh::new(t.unwrap());
                            mesh.ring_threshold = if algo == Algorithm::Ring {
                                0
                            } else {
                                usize::MAX
                            };
                            let r = mesh.rank();
                            let mut out = Vec::new();
                            for len in [1usize, 576, 5000, 300_000] {
                                let mut buf: Vec<f32> =
                                    (0..len).map(|i| (i * 3 + r * 100) as f32).collect();
                                mesh.all_reduce_sum(&mut buf).unwrap();
                                out.push(buf);
                            }
                            let mut f: Vec<f32> =
                                (0..999).map(|i| ((i + r) as f32 * 0.3).sin()).collect();
                            mesh.all_reduce_sum(&mut f).unwrap();
                            // Kept alive until every rank is done: closing a connection drops
                            // what it still had in flight to a slower peer.
                            (out, f, mesh)
                        })
                    })
                    .collect();
                let results: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
                let rank_sum: usize = (0..world).map(|r| r * 100).sum();
                for (ints, floats, _) in &results {
                    for buf in ints {
                        for (i, x) in buf.iter().enumerate() {
                            assert_eq!(*x, (i * 3 * world + rank_sum) as f32);
                        }
                    }
                    for (i, x) in floats.iter().enumerate() {
                        let want: f64 = (0..world)
                            .map(|r| ((i + r) as f32 * 0.3).sin() as f64)
                            .sum();
                        assert!((*x as f64 - want).abs() < 1e-6, "{x} vs {want}");
                    }
                    assert_eq!(floats, &results[0].1, "ranks hold identical bits");
                }
            }
            drop(ts);
            drop(g);
        }
    }

    /// Integers, so every summation order is exact: rank r's value i is i*3 + r*100.
    fn check_reduce(mesh: &mut Mesh<QuicTransport>, len: usize) -> Vec<f32> {
        let (r, world) = (mesh.rank(), mesh.world());
        let mut buf: Vec<f32> = (0..len).map(|i| (i * 3 + r * 100) as f32).collect();
        mesh.all_reduce_sum(&mut buf).unwrap();
        let rank_sum: usize = (0..world).map(|r| r * 100).sum();
        for (i, x) in buf.iter().enumerate() {
            assert_eq!(
                *x,
                (i * 3 * world + rank_sum) as f32,
                "len {len}, value {i}"
            );
        }
        buf
    }

    #[test]
    fn the_datagram_lane_recovers_lost_and_corrupted_datagrams() {
        let g = group(3);
        let hs: Vec<_> = connect(&g.nodes, 1)
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let mut t = t.unwrap();
                    assert_eq!(t.lane_peers(), 2, "both peers over the lane");
                    // Every 3rd first transmission lost (odd messages) or corrupted (even),
                    // and datagrams as small as on any path (loopback would carry 64 KiB).
                    t.set_lane_loss(3);
                    t.set_lane_frag(fast::MIN_FRAG);
                    let mut mesh = Mesh::new(t);
                    let mut last = Vec::new();
                    for round in 0..40 {
                        // All-gathers of 1 value, a decode-sized vector (2 datagrams) and 17
                        // datagrams; a ring whose chunks fit the lane, and one in pieces.
                        for len in [1usize, 576, 5000, 20_000, 100_000] {
                            last = check_reduce(&mut mesh, len + round);
                        }
                    }
                    let stats = mesh.transport_mut().lane_stats();
                    let pieces = mesh.transport_mut().piece_len().is_some();
                    (last, stats, pieces, mesh)
                })
            })
            .collect();
        let results: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for (last, stats, pieces, _) in &results {
            assert_eq!(last, &results[0].0, "ranks hold identical bits");
            // 40 rounds x (3 all-gathers x 2 peers + 4 ring steps to the successor, for
            // 20_000 values in one piece and, where loopback answered fast enough for pieces
            // (a loaded machine may not), for 100_000 in three).
            let want = if *pieces { 6 + 4 + 12 } else { 6 + 4 };
            assert_eq!(stats.messages, 40 * want, "pieces: {pieces}");
            assert!(stats.nacks_sent > 0, "{stats:?}");
            assert!(
                stats.rejected > 0,
                "corrupted datagrams were dropped: {stats:?}"
            );
        }
    }

    #[test]
    fn a_pair_without_the_lane_on_both_ends_stays_on_quic() {
        let g = group(3);
        g.nodes[2].set_lanes(false);
        let hs: Vec<_> = connect(&g.nodes, 1)
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let t = t.unwrap();
                    let lanes = t.lane_peers();
                    let mut mesh = Mesh::new(t);
                    for len in [1usize, 576, 5000] {
                        check_reduce(&mut mesh, len);
                    }
                    (mesh.rank(), lanes, mesh.transport_mut().lane_stats(), mesh)
                })
            })
            .collect();
        // Every rank done before any mesh is dropped: closing cuts a slower peer's last message.
        let results: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for (rank, lanes, stats, _) in &results {
            let (rank, lanes) = (*rank, *lanes);
            // Ranks 0 and 1 reach each other over the lane, rank 2 over QUIC only.
            let want = if rank == 2 { 0 } else { 1 };
            assert_eq!(lanes, want, "rank {rank}");
            assert_eq!(stats.messages, 3 * want as u64, "rank {rank}");
        }
    }

    #[test]
    fn unregistered_or_wrong_token_peers_are_refused() {
        let g = group(2);
        // A node whose certificate comes from another CA: the TLS handshake fails.
        let other_ca = ClusterCa::new().unwrap();
        let stranger = node(&other_ca, "secret");
        let res = connect(&[g.nodes[0].clone(), stranger], 1);
        assert!(res.iter().any(|r| r.is_err()), "a stranger joined the mesh");
        // Right CA, wrong token: the hello is refused.
        let impostor = node(&g.ca, "not-the-secret");
        let res = connect(&[g.nodes[0].clone(), impostor], 2);
        assert!(
            res.iter().all(|r| r.is_err()),
            "an impostor joined the mesh"
        );
        // The legitimate pair still forms a mesh afterwards.
        assert!(connect(&g.nodes, 3).into_iter().all(|r| r.is_ok()));
    }

    /// A receive waiting for a peer that never sends (it is alive, its step was never sent
    /// to it) stops soon after its step is cancelled, on shared memory, the datagram lane and
    /// the QUIC stream alike; the transport's own timeout is 10 s.
    #[test]
    fn a_cancelled_step_stops_waiting_on_every_path() {
        for path in ["shm", "lane", "quic"] {
            let g = match path {
                "shm" => shm_group(2),
                _ => group(2),
            };
            if path == "quic" {
                g.nodes.iter().for_each(|n| n.set_lanes(false));
            }
            let mut ts: Vec<_> = connect(&g.nodes, 1)
                .into_iter()
                .map(|t| t.unwrap())
                .collect();
            let silent = ts.pop().unwrap();
            let mut t = ts.pop().unwrap();
            match path {
                "shm" => assert_eq!(t.shm_peers(), 1),
                "lane" => assert_eq!((t.shm_peers(), t.lane_peers()), (0, 1)),
                _ => assert_eq!((t.shm_peers(), t.lane_peers()), (0, 0)),
            }
            let cancel = Arc::new(crate::Cancel::default());
            t.set_cancel(cancel.clone());
            let ticket = cancel.ticket();
            cancel.start(ticket);
            let h = std::thread::spawn(move || {
                let mut mesh = Mesh::new(t);
                let mut buf = vec![1.0f32; 576];
                let r = mesh.all_reduce_sum(&mut buf);
                (r, std::time::Instant::now())
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(!h.is_finished(), "{path}: the all-reduce did not wait");
            let called = std::time::Instant::now();
            cancel.cancel_through(ticket);
            let (r, done) = h.join().unwrap();
            assert!(
                matches!(r, Err(CollectiveError::Cancelled)),
                "{path}: {r:?}"
            );
            let took = done - called;
            assert!(
                took < Duration::from_secs(1),
                "{path}: stopped after {took:?}"
            );
            // The next step is not called off.
            let next = cancel.ticket();
            cancel.start(next);
            assert!(!cancel.cancelled());
            drop(silent);
        }
    }

    #[test]
    fn a_peer_that_disconnects_mid_reduce_is_an_error_not_a_hang() {
        let g = group(3);
        let mut ts: Vec<_> = connect(&g.nodes, 1)
            .into_iter()
            .map(|t| t.unwrap())
            .collect();
        let gone = ts.pop().unwrap();
        let gone_node = g.nodes[2].clone();
        let started = std::time::Instant::now();
        let hs: Vec<_> = ts
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let mut mesh = Mesh::new(t);
                    let mut buf = vec![1.0f32; 64];
                    mesh.all_reduce_sum(&mut buf)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        drop(gone);
        gone_node.endpoint.close(0u32.into(), b"killed");
        for h in hs {
            assert!(h.join().unwrap().is_err());
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "took {:?}",
            started.elapsed()
        );
    }
}
