//! The datagram lane: small all-reduce messages as encrypted UDP datagrams, without QUIC.
//!
//! A decode step does two all-reduces per layer of a few KiB each, so their cost is per-message
//! overhead, not bytes. Through quinn a message crosses the runtime, the connection state
//! machine, stream flow control and an acknowledgement in each direction; here it is one
//! `send` per datagram and a receiver polling its own socket. Every pair of ranks that formed a
//! QUIC connection also opens this lane next to it:
//!
//! - Keys come from that connection's TLS 1.3 session (the exporter, RFC 8446 7.5), one per
//!   direction; every datagram is AES-256-GCM with its header as associated data and the
//!   (kind, sequence, fragment) triple as the nonce, so the lane is as authenticated and private
//!   as the QUIC mesh itself. A datagram that fails to open is dropped.
//! - Two connected UDP sockets per peer: `data` (messages) and `ctl` (requests to resend).
//!   Connected sockets take only the peer's datagrams and report a vanished peer (ICMP port
//!   unreachable) as `ECONNREFUSED`, so a dead peer is an error at once, as with QUIC.
//! - Reliability without a sender-side timer: each message has a sequence number per direction
//!   and is kept (sealed) until [`SLOTS`] newer ones were sent. A receiver that has waited
//!   [`Lane::rto`] for a message asks for it again (NACK, with a bitmap of the fragments it
//!   has), backing off to 200 ms; a service thread on the sender answers NACKs even while its
//!   all-reduce thread is busy computing. No congestion control: the lane carries at most
//!   [`MAX_BYTES`] per message (larger ones take the QUIC stream).
//! - A message is cut into datagrams as large as the route's MTU allows (one datagram on
//!   loopback, 1472 bytes on Ethernet, 8972 with jumbo frames), sent with one `sendmmsg`. The
//!   probe checks that a datagram of that size gets through; where it does not, the sender
//!   uses [`MIN_DGRAM`], which fits any IPv6 path.
//! - The lane is used only where both ends saw each other's probe datagrams when the mesh was
//!   built (a firewall or NAT between them leaves that pair on QUIC).

use crate::CollectiveError;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Messages of at most this many bytes take the lane.
pub const MAX_BYTES: usize = 64 * 1024;
/// A datagram that crosses any path: IPv6's minimum MTU less its header and UDP's.
pub const MIN_DGRAM: usize = 1232;
const HEADER: usize = 20;
const TAG: usize = 16;
/// Payload bytes per fragment of a [`MIN_DGRAM`] datagram.
pub const MIN_FRAG: usize = MIN_DGRAM - HEADER - TAG;
/// Largest payload per fragment (a UDP datagram holds at most 65507 bytes over IPv4).
const MAX_FRAG: usize = 65_000;
/// Receive buffers hold any datagram.
const RECV_BUF: usize = 65_536;
/// Messages kept for resending and reassembled ahead, per peer. The all-gather is lock-step
/// (a rank is at most one message ahead of a peer); the ring lets a rank run up to world - 1
/// messages ahead of its successor, so this covers rings of up to 16 ranks.
pub const SLOTS: usize = 16;
const VERSION: u8 = 1;
const MAX_BACKOFF: Duration = Duration::from_millis(200);

const DATA: u8 = 1;
const NACK: u8 = 2;
const PROBE: u8 = 3;
const PROBE_CTL: u8 = 4;
/// A probe as large as the sender's datagrams: does the path carry them unfragmented?
const PROBE_BIG: u8 = 6;
/// Sent on the data socket beside each NACK: if the peer's process is gone, its port answers
/// with ICMP port unreachable and the next receive fails with `ECONNREFUSED` at once.
const PING: u8 = 5;

/// Label of the TLS exporter the lane's keys come from.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tessera-lane-v1";

/// The exporter context for the key of direction `from` -> `to`.
pub fn key_context(from: usize, to: usize) -> [u8; 8] {
    let mut c = [0u8; 8];
    c[..4].copy_from_slice(&(from as u32).to_le_bytes());
    c[4..].copy_from_slice(&(to as u32).to_le_bytes());
    c
}

pub fn aead(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte key"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u8,
    frag: u16,
    nfrag: u16,
    /// Payload bytes of every fragment but the last (the sender's fragment size).
    fsize: u16,
    len: u32,
    seq: u64,
}

impl Header {
    fn write(&self, out: &mut [u8]) {
        out[0] = self.kind;
        out[1] = VERSION;
        out[2..4].copy_from_slice(&self.frag.to_le_bytes());
        out[4..6].copy_from_slice(&self.nfrag.to_le_bytes());
        out[6..8].copy_from_slice(&self.fsize.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..20].copy_from_slice(&self.seq.to_le_bytes());
    }
    fn read(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER + TAG || b[1] != VERSION {
            return None;
        }
        Some(Header {
            kind: b[0],
            frag: u16::from_le_bytes([b[2], b[3]]),
            nfrag: u16::from_le_bytes([b[4], b[5]]),
            fsize: u16::from_le_bytes([b[6], b[7]]),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            seq: u64::from_le_bytes(b[12..20].try_into().unwrap()),
        })
    }
    /// Unique per key: a sequence number is never reused, and within it the kind and fragment
    /// (or, for NACKs and probes, a counter) tell datagrams apart. A resend is the same bytes.
    fn nonce(&self) -> Nonce {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.seq.to_le_bytes());
        n[8..10].copy_from_slice(&self.frag.to_le_bytes());
        n[10] = self.kind;
        Nonce::assume_unique_for_key(n)
    }
}

/// Appends one sealed datagram carrying `payload` to `out`.
fn seal(key: &LessSafeKey, h: Header, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER, 0);
    h.write(&mut out[start..]);
    out.extend_from_slice(payload);
    let (head, body) = out[start..].split_at_mut(HEADER);
    let tag = key
        .seal_in_place_separate_tag(h.nonce(), Aad::from(&*head), body)
        .expect("payload within AES-GCM's limit");
    out.extend_from_slice(tag.as_ref());
}

/// Opens a datagram in place: its header and plaintext, or None if it is not a genuine one.
fn open<'a>(key: &LessSafeKey, dgram: &'a mut [u8]) -> Option<(Header, &'a [u8])> {
    let h = Header::read(dgram)?;
    let (head, body) = dgram.split_at_mut(HEADER);
    let plain = key.open_in_place(h.nonce(), Aad::from(&*head), body).ok()?;
    Some((h, plain))
}

fn frags_for(len: usize, fsize: usize) -> usize {
    len.div_ceil(fsize.max(1)).max(1)
}

/// Both sockets of one peer's lane, bound before the peer's ports are known.
pub struct Sockets {
    data: UdpSocket,
    ctl: UdpSocket,
}

impl Sockets {
    /// Binds both sockets on `ip` (this worker's own address, so the peer sees datagrams come
    /// from the address it knows), falling back to the unspecified address.
    pub fn bind(ip: std::net::IpAddr) -> std::io::Result<Sockets> {
        let one = |ip: std::net::IpAddr| -> std::io::Result<UdpSocket> {
            use socket2::{Domain, Protocol, Socket, Type};
            let addr = SocketAddr::new(ip, 0);
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            let _ = s.set_recv_buffer_size(4 << 20);
            let _ = s.set_send_buffer_size(4 << 20);
            s.bind(&addr.into())?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        };
        let unspecified = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let data = one(ip).or_else(|_| one(unspecified(ip)))?;
        let ctl = one(data.local_addr()?.ip())?;
        Ok(Sockets { data, ctl })
    }

    /// (data port, ctl port), as sent to the peer.
    pub fn ports(&self) -> [u16; 2] {
        [
            self.data.local_addr().map(|a| a.port()).unwrap_or(0),
            self.ctl.local_addr().map(|a| a.port()).unwrap_or(0),
        ]
    }

    /// Connects both sockets to the peer's.
    pub fn connect(&self, peer_ip: std::net::IpAddr, ports: [u16; 2]) -> std::io::Result<()> {
        if ports.contains(&0) {
            return Err(ErrorKind::AddrNotAvailable.into());
        }
        self.data.connect(SocketAddr::new(peer_ip, ports[0]))?;
        self.ctl.connect(SocketAddr::new(peer_ip, ports[1]))
    }

    /// Payload bytes per fragment that the connected route's MTU carries unfragmented (a
    /// multiple of 4, between [`MIN_FRAG`] and [`MAX_FRAG`]).
    pub fn route_frag(&self) -> usize {
        let fd = self.data.as_raw_fd();
        let v6 = self.data.local_addr().is_ok_and(|a| a.is_ipv6());
        let (level, opt, ip_udp) = if v6 {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU, 48)
        } else {
            (libc::IPPROTO_IP, libc::IP_MTU, 28)
        };
        let mut mtu: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `mtu` and `len` are valid for writes of the sizes given; fd is our socket.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                (&mut mtu as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 || mtu <= 0 {
            return MIN_FRAG;
        }
        let frag = (mtu as usize).saturating_sub(ip_udp + HEADER + TAG) & !3;
        frag.clamp(MIN_FRAG, MAX_FRAG)
    }
}

/// A timeout for a system call (None: none).
pub(crate) fn timespec(t: Option<Duration>) -> Option<libc::timespec> {
    t.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    })
}

/// The pointer a system call takes for [`timespec`]'s result (null: no timeout); valid while
/// `ts` is.
pub(crate) fn timespec_ptr(ts: &Option<libc::timespec>) -> *const libc::timespec {
    ts.as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec)
}

/// Waits until one of `fds` is readable or `timeout` passes (None: forever).
fn wait_readable(fds: &[RawFd], timeout: Option<Duration>) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = timespec(timeout);
    let tsp = timespec_ptr(&ts);
    // SAFETY: `p` is a valid array of p.len() pollfds and `tsp` null or a valid timespec,
    // both alive for the call; ppoll writes only into `revents`.
    unsafe {
        libc::ppoll(
            p.as_mut_ptr(),
            p.len() as libc::nfds_t,
            tsp,
            std::ptr::null(),
        );
    }
}

/// What the probe learnt of one peer's lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Heard {
    /// This end received the peer's probes on both sockets.
    pub both: bool,
    /// ... and its full-size datagram too.
    pub big: bool,
}

impl Heard {
    pub fn byte(self) -> u8 {
        u8::from(self.both) | (u8::from(self.big) << 1)
    }
    pub fn from_byte(b: u8) -> Heard {
        Heard {
            both: b & 1 != 0,
            big: b & 2 != 0,
        }
    }
}

/// Tries the lane with each peer for up to `patience`: small probes on both sockets and a
/// datagram of the route's full size (`frag[p]` payload bytes) on the data socket, each way.
/// Returns what this end heard of each peer (the caller then agrees with the peer over QUIC,
/// since a probe may have reached one end only).
pub fn probe(
    lanes: &[Option<(&Sockets, LessSafeKey, LessSafeKey)>],
    frag: &[usize],
    patience: Duration,
) -> Vec<Heard> {
    let n = lanes.len();
    // Per peer: heard its small data probe, its ctl probe, its big probe.
    let mut heard = vec![[false; 3]; n];
    let mut acked = vec![0u8; n];
    let mut counter = 0u16;
    let mut dgram = Vec::with_capacity(MIN_DGRAM);
    let mut buf = vec![0u8; RECV_BUF];
    let deadline = Instant::now() + patience;
    let summary = |h: [bool; 3]| Heard {
        both: h[0] && h[1],
        big: h[2],
    };
    let done = |heard: &[[bool; 3]], acked: &[u8]| {
        (0..n).all(|p| lanes[p].is_none() || (heard[p] == [true; 3] && acked[p] == 3))
    };
    let send_all = |counter: u16, heard: &[[bool; 3]], dgram: &mut Vec<u8>| {
        for (p, lane) in lanes.iter().enumerate() {
            let Some((s, send_key, _)) = lane else {
                continue;
            };
            let flags = summary(heard[p]).byte();
            let pad = vec![0u8; frag[p]];
            for (kind, sock) in [(PROBE, &s.data), (PROBE_CTL, &s.ctl), (PROBE_BIG, &s.data)] {
                dgram.clear();
                let h = Header {
                    kind,
                    frag: counter,
                    nfrag: 0,
                    fsize: 0,
                    len: 0,
                    seq: 0,
                };
                let body = if kind == PROBE_BIG { &pad[..] } else { &[][..] };
                let mut payload = vec![flags];
                payload.extend_from_slice(body.get(1..).unwrap_or_default());
                seal(send_key, h, &payload, dgram);
                let _ = sock.send(dgram);
            }
        }
    };
    while !done(&heard, &acked) && Instant::now() < deadline && counter < u16::MAX {
        send_all(counter, &heard, &mut dgram);
        counter += 1;
        let round = Instant::now() + Duration::from_millis(2);
        while Instant::now() < round {
            for (p, lane) in lanes.iter().enumerate() {
                let Some((s, _, recv_key)) = lane else {
                    continue;
                };
                for sock in [&s.data, &s.ctl] {
                    while let Ok(len) = sock.recv(&mut buf) {
                        let Some((h, plain)) = open(recv_key, &mut buf[..len]) else {
                            continue;
                        };
                        let i = match h.kind {
                            PROBE if std::ptr::eq(sock, &s.data) => 0,
                            PROBE_CTL if std::ptr::eq(sock, &s.ctl) => 1,
                            PROBE_BIG if std::ptr::eq(sock, &s.data) => 2,
                            _ => continue,
                        };
                        heard[p][i] = true;
                        acked[p] |= plain.first().copied().unwrap_or(0);
                    }
                }
            }
            if done(&heard, &acked) {
                break;
            }
            let fds: Vec<RawFd> = lanes
                .iter()
                .flatten()
                .flat_map(|(s, _, _)| [s.data.as_raw_fd(), s.ctl.as_raw_fd()])
                .collect();
            wait_readable(&fds, Some(round.saturating_duration_since(Instant::now())));
        }
    }
    // One last probe, so a peer that heard us only now learns it too.
    send_all(counter, &heard, &mut dgram);
    heard.iter().map(|&h| summary(h)).collect()
}

/// The most datagrams one message is cut into (see the assertion on [`MIN_FRAG`]).
const MAX_FRAGS: usize = 64;

/// Sends datagrams (at most [`MAX_FRAGS`]) with as few system calls as `sendmmsg` allows,
/// waiting for room in the socket buffer if it is full. Nothing is allocated: it runs for
/// every message.
fn send_batch(
    sock: &UdpSocket,
    dgrams: &[&[u8]],
    peer: usize,
    timeout: Duration,
) -> Result<(), CollectiveError> {
    let n = dgrams.len();
    assert!(n <= MAX_FRAGS, "{n} datagrams in one batch");
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_FRAGS];
    // SAFETY: an all-zero mmsghdr is valid (no address, no control data).
    let mut msgs: [libc::mmsghdr; MAX_FRAGS] = unsafe { std::mem::zeroed() };
    for (i, d) in dgrams.iter().enumerate() {
        iov[i] = libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        };
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let msgs = &mut msgs[..n];
    let t0 = Instant::now();
    let mut done = 0;
    while done < msgs.len() {
        // SAFETY: `msgs[done..]` are valid mmsghdrs whose iovecs point into `dgrams`, all alive
        // for the call; the socket is connected, so no address is needed.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[done..].as_mut_ptr(),
                (msgs.len() - done) as libc::c_uint,
                0,
            )
        };
        if r > 0 {
            done += r as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::WouldBlock && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_micros(50));
        } else if e.kind() != ErrorKind::Interrupted {
            return Err(io_err(peer, "lane send", e));
        }
    }
    Ok(())
}

/// One message sent to a peer, sealed, kept for resending.
#[derive(Default)]
struct Sent {
    seq: u64,
    bytes: Vec<u8>,
    /// End of each fragment's datagram in `bytes`.
    ends: Vec<usize>,
}

impl Sent {
    fn datagram(&self, frag: usize) -> &[u8] {
        let start = if frag == 0 { 0 } else { self.ends[frag - 1] };
        &self.bytes[start..self.ends[frag]]
    }
}

/// What the service thread needs of one peer's lane.
struct Shared {
    data: Arc<UdpSocket>,
    ctl: Arc<UdpSocket>,
    /// The peer's key (it seals NACKs with it).
    recv_key: LessSafeKey,
    sent: Mutex<Vec<Sent>>,
}

/// A message being reassembled.
#[derive(Default)]
struct Slot {
    seq: u64,
    have: u64,
    len: usize,
    fsize: usize,
    buf: Vec<u8>,
}

/// Counters of one rank's lanes since the mesh was built.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LaneStats {
    pub messages: u64,
    pub nacks_sent: u64,
    /// Datagrams that failed to open (forged, corrupted or stale).
    pub rejected: u64,
}

/// The all-reduce thread's end of one peer's lane.
pub struct Lane {
    peer: usize,
    shared: Arc<Shared>,
    send_key: LessSafeKey,
    next_send: u64,
    next_recv: u64,
    slots: Vec<Slot>,
    /// A fragment's plaintext before sealing (and a NACK's datagram).
    plain: Vec<u8>,
    /// Receives land here; [`RECV_BUF`] long from the start.
    rbuf: Vec<u8>,
    /// Payload bytes per datagram this end sends.
    pub(crate) frag: usize,
    /// How long a receive waits before it asks for a resend (doubling up to 200 ms).
    pub rto: Duration,
    pub stats: LaneStats,
    /// Tests: drop (odd sequence) or corrupt (even) every k-th first transmission.
    #[doc(hidden)]
    pub lossy: u64,
}

fn peer_gone(peer: usize) -> CollectiveError {
    CollectiveError::PeerGone { peer }
}

fn io_err(peer: usize, what: &str, e: std::io::Error) -> CollectiveError {
    if e.kind() == ErrorKind::ConnectionRefused {
        return peer_gone(peer);
    }
    CollectiveError::Transport {
        peer,
        msg: format!("{what}: {e}"),
    }
}

impl Lane {
    /// Sends `data` as message number `next_send + 1`.
    pub fn send(&mut self, data: &[f32], timeout: Duration) -> Result<(), CollectiveError> {
        let len = data.len() * 4;
        debug_assert!(len <= MAX_BYTES);
        self.next_send += 1;
        let seq = self.next_send;
        let fsize = self.frag;
        let nfrag = frags_for(len, fsize);
        let mut sent = self.shared.sent.lock().unwrap();
        let msg = &mut sent[seq as usize % SLOTS];
        msg.seq = seq;
        msg.bytes.clear();
        msg.ends.clear();
        let plain = &mut self.plain;
        for f in 0..nfrag {
            let vals =
                &data[(f * fsize / 4).min(data.len())..((f + 1) * fsize / 4).min(data.len())];
            plain.clear();
            for x in vals {
                plain.extend_from_slice(&x.to_le_bytes());
            }
            let h = Header {
                kind: DATA,
                frag: f as u16,
                nfrag: nfrag as u16,
                fsize: fsize as u16,
                len: len as u32,
                seq,
            };
            seal(&self.send_key, h, plain, &mut msg.bytes);
            msg.ends.push(msg.bytes.len());
        }
        let mut corrupt = Vec::new();
        let mut dgrams: [&[u8]; MAX_FRAGS] = [&[]; MAX_FRAGS];
        let mut n = 0;
        for f in 0..nfrag {
            let d = msg.datagram(f);
            if self.lossy > 0 && (seq * 7 + f as u64).is_multiple_of(self.lossy) {
                if seq.is_multiple_of(2) {
                    let mut bad = d.to_vec();
                    bad[HEADER] ^= 1;
                    corrupt.push(bad);
                }
                continue;
            }
            dgrams[n] = d;
            n += 1;
        }
        for d in &corrupt {
            dgrams[n] = d;
            n += 1;
        }
        send_batch(&self.shared.data, &dgrams[..n], self.peer, timeout)?;
        self.stats.messages += 1;
        Ok(())
    }

    /// Receives message number `next_recv + 1` into `out` (whose length it must have).
    /// Busy-polls for `spin`, then sleeps in the kernel; asks for resends after `rto`; fails
    /// after `timeout`, or as soon as `alive` says the peer's connection is gone.
    pub fn recv(
        &mut self,
        out: &mut [f32],
        spin: Duration,
        timeout: Duration,
        alive: &dyn Fn() -> bool,
    ) -> Result<(), CollectiveError> {
        let seq = self.next_recv + 1;
        let t0 = Instant::now();
        let mut backoff = self.rto;
        let mut next_nack = t0 + backoff;
        let mut nacks = 0u16;
        // Always RECV_BUF long: nothing to clear or grow per message.
        let mut buf = std::mem::take(&mut self.rbuf);
        let r = loop {
            let slot = &self.slots[seq as usize % SLOTS];
            if slot.seq == seq && slot.have == full_mask(frags_for(slot.len, slot.fsize)) {
                if slot.len != out.len() * 4 {
                    break Err(CollectiveError::SizeMismatch {
                        peer: self.peer,
                        got: slot.len / 4,
                        want: out.len(),
                    });
                }
                for (o, b) in out.iter_mut().zip(slot.buf.chunks_exact(4)) {
                    *o = f32::from_le_bytes(b.try_into().unwrap());
                }
                self.next_recv = seq;
                break Ok(());
            }
            match self.shared.data.recv(&mut buf) {
                Ok(n) => {
                    self.accept(&mut buf[..n], seq);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => break Err(io_err(self.peer, "lane receive", e)),
            }
            let now = Instant::now();
            if now >= next_nack {
                if !alive() {
                    break Err(peer_gone(self.peer));
                }
                if now - t0 >= timeout {
                    break Err(CollectiveError::Transport {
                        peer: self.peer,
                        msg: format!("no data for {timeout:?}"),
                    });
                }
                self.nack(seq, nacks);
                nacks = nacks.saturating_add(1);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                next_nack = now + backoff;
            }
            if now - t0 < spin {
                std::hint::spin_loop();
                continue;
            }
            wait_readable(
                &[self.shared.data.as_raw_fd()],
                Some(next_nack.saturating_duration_since(now)),
            );
        };
        self.rbuf = buf;
        r
    }

    /// Files one datagram received while waiting for message `want`.
    fn accept(&mut self, dgram: &mut [u8], want: u64) {
        let Some((h, plain)) = open(&self.shared.recv_key, dgram) else {
            self.stats.rejected += 1;
            return;
        };
        let len = h.len as usize;
        let (frag, nfrag, fsize) = (h.frag as usize, h.nfrag as usize, h.fsize as usize);
        let expect = if frag + 1 == nfrag {
            len.saturating_sub(frag * fsize)
        } else {
            fsize
        };
        // Probes left over from the handshake, duplicates and anything malformed are dropped.
        if h.kind != DATA
            || len > MAX_BYTES
            || !fsize.is_multiple_of(4)
            || fsize < MIN_FRAG
            || nfrag != frags_for(len, fsize)
            || frag >= nfrag
            || plain.len() != expect
            || h.seq < want
            || h.seq >= want + SLOTS as u64
        {
            return;
        }
        let slot = &mut self.slots[h.seq as usize % SLOTS];
        if slot.seq != h.seq {
            slot.seq = h.seq;
            slot.have = 0;
            slot.len = len;
            slot.fsize = fsize;
            slot.buf.resize(len, 0);
        } else if slot.len != len || slot.fsize != fsize {
            return;
        }
        slot.buf[frag * fsize..frag * fsize + plain.len()].copy_from_slice(plain);
        slot.have |= 1 << frag;
    }

    /// Asks the peer to resend what is missing of message `seq`.
    fn nack(&mut self, seq: u64, counter: u16) {
        let buf = &mut self.plain;
        let slot = &self.slots[seq as usize % SLOTS];
        let have = if slot.seq == seq { slot.have } else { 0 };
        buf.clear();
        let h = Header {
            kind: NACK,
            frag: counter,
            nfrag: 0,
            fsize: 0,
            len: 0,
            seq,
        };
        seal(&self.send_key, h, &have.to_le_bytes(), buf);
        let _ = self.shared.ctl.send(buf);
        buf.clear();
        seal(&self.send_key, Header { kind: PING, ..h }, &[], buf);
        let _ = self.shared.data.send(buf);
        self.stats.nacks_sent += 1;
    }
}

fn full_mask(nfrag: usize) -> u64 {
    if nfrag >= 64 {
        u64::MAX
    } else {
        (1u64 << nfrag) - 1
    }
}

const _: () = assert!(
    MAX_BYTES.div_ceil(MIN_FRAG) < 64,
    "a fragment bitmap fits a u64"
);
const _: () = assert!(
    MIN_FRAG.is_multiple_of(4),
    "fragments hold whole f32 values"
);

/// The lanes of one rank, and the thread that answers its peers' NACKs.
pub struct Lanes {
    pub lanes: Vec<Option<Lane>>,
    /// The longest round trip to a peer when the mesh was built (QUIC's estimate).
    pub rtt: Duration,
    wake: UnixDatagram,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lanes {
    /// Builds the lanes the probe agreed on: `keys[p]` is (this rank -> p, p -> this rank).
    /// `frag[p]` is the payload per datagram to send to p.
    pub fn start(
        sockets: Vec<Option<Sockets>>,
        keys: Vec<Option<([u8; 32], [u8; 32])>>,
        frag: &[usize],
        rto: Duration,
        rtt: Duration,
    ) -> std::io::Result<Lanes> {
        let mut lanes = Vec::new();
        let mut shared = Vec::new();
        for (p, (s, k)) in sockets.into_iter().zip(keys).enumerate() {
            let (Some(s), Some((send, recv))) = (s, k) else {
                lanes.push(None);
                continue;
            };
            let sh = Arc::new(Shared {
                data: Arc::new(s.data),
                ctl: Arc::new(s.ctl),
                recv_key: aead(&recv),
                sent: Mutex::new((0..SLOTS).map(|_| Sent::default()).collect()),
            });
            shared.push((p, sh.clone()));
            lanes.push(Some(Lane {
                peer: p,
                shared: sh,
                send_key: aead(&send),
                next_send: 0,
                next_recv: 0,
                slots: (0..SLOTS).map(|_| Slot::default()).collect(),
                plain: Vec::with_capacity(MIN_DGRAM),
                rbuf: vec![0; RECV_BUF],
                frag: frag[p],
                rto,
                stats: LaneStats::default(),
                lossy: 0,
            }));
        }
        let (wake, wake_rx) = UnixDatagram::pair()?;
        let thread = std::thread::Builder::new()
            .name("tessera-lane".into())
            .spawn(move || serve_nacks(shared, wake_rx))?;
        Ok(Lanes {
            lanes,
            rtt,
            wake,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> LaneStats {
        self.lanes
            .iter()
            .flatten()
            .fold(LaneStats::default(), |a, l| LaneStats {
                messages: a.messages + l.stats.messages,
                nacks_sent: a.nacks_sent + l.stats.nacks_sent,
                rejected: a.rejected + l.stats.rejected,
            })
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        let _ = self.wake.send(&[0]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The service thread: resends what peers ask for until `wake` says stop.
fn serve_nacks(peers: Vec<(usize, Arc<Shared>)>, wake: UnixDatagram) {
    let mut fds: Vec<RawFd> = peers.iter().map(|(_, s)| s.ctl.as_raw_fd()).collect();
    fds.push(wake.as_raw_fd());
    let mut buf = vec![0u8; RECV_BUF];
    let _ = wake.set_nonblocking(true);
    loop {
        wait_readable(&fds, None);
        if wake.recv(&mut [0u8; 1]).is_ok() {
            return;
        }
        for (p, s) in &peers {
            while let Ok(n) = s.ctl.recv(&mut buf) {
                let Some((h, plain)) = open(&s.recv_key, &mut buf[..n]) else {
                    continue;
                };
                if h.kind != NACK || plain.len() != 8 {
                    continue;
                }
                let have = u64::from_le_bytes(plain.try_into().unwrap());
                let sent = s.sent.lock().unwrap();
                let msg = &sent[h.seq as usize % SLOTS];
                if msg.seq != h.seq {
                    // Not sent yet (the peer is ahead of us), or so old it was overwritten,
                    // which the all-gather's lock-step rules out.
                    if msg.seq > h.seq {
                        tracing::warn!(
                            peer = p,
                            seq = h.seq,
                            "lane: asked for a message no longer kept"
                        );
                    }
                    continue;
                }
                let missing: Vec<&[u8]> = (0..msg.ends.len())
                    .filter(|f| have & (1 << f) == 0)
                    .map(|f| msg.datagram(f))
                    .collect();
                let _ = send_batch(&s.data, &missing, *p, Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_open_only_with_their_key_and_header() {
        let k1 = aead(&[1; 32]);
        let k2 = aead(&[2; 32]);
        let h = Header {
            kind: DATA,
            frag: 1,
            nfrag: 2,
            fsize: 1196,
            len: 2000,
            seq: 9,
        };
        let mut d = Vec::new();
        seal(&k1, h, b"payload", &mut d);
        assert!(!d.windows(7).any(|w| w == b"payload"), "sealed, not plain");
        let mut copy = d.clone();
        let (got, plain) = open(&k1, &mut copy).unwrap();
        assert_eq!((got, plain), (h, &b"payload"[..]));
        assert!(open(&k2, &mut d.clone()).is_none(), "wrong key");
        let mut forged = d.clone();
        forged[12] ^= 1; // the sequence number, in the associated data
        assert!(open(&k1, &mut forged).is_none(), "tampered header");
        assert!(open(&k1, &mut d[..10].to_vec()).is_none(), "truncated");
    }
}
