//! The shared-memory lane: all-reduce messages between two ranks on the same machine through
//! a mapping both processes hold, as NCCL does between the GPUs of one node.
//!
//! Two workers of one machine (the embedded `tessera run`, or several workers of a big box)
//! otherwise pay for every decode all-reduce a UDP round through the kernel and AES-GCM both
//! ways: a few microseconds each, 61 of them per token for SmolLM2. Here a message is a copy
//! into the peer's ring and one release store.
//!
//! - Set up over the authenticated QUIC stream of the pair: the lower rank creates a file in
//!   `/dev/shm` under a random name (`O_EXCL`, mode 0600), writes a random secret into it and
//!   offers name, secret, its process id and its PID and network namespaces; the higher rank
//!   takes it only if both namespaces are its own (workers in separate containers, or in the
//!   emulated network's namespaces, stay on the network), the file opens and holds the secret,
//!   and it can watch the offering process (`pidfd_open`). It answers with its own process id,
//!   then the file is unlinked: nothing is left behind, and no other process can join.
//! - Per direction a ring of [`SLOTS`] messages of at most [`MAX_BYTES`]: the sender copies a
//!   message into the next slot and publishes it by a release store of the sequence number;
//!   the receiver copies it out and releases the slot. The receiver polls for the spin time,
//!   yields its core for [`YIELD`], then sleeps on a futex in the shared mapping, which the
//!   sender wakes.
//! - A dead peer is seen through its pidfd (readable once the process has exited, reaped or
//!   not) and reported as [`CollectiveError::PeerGone`], as the datagram lane reports it.
//! - The data never leaves the machine and the file is readable by this user only (who can
//!   read the processes' memory anyway): no encryption is needed.

use crate::CollectiveError;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

/// Messages of at most this many bytes take the shared-memory lane (as the datagram lane).
pub const MAX_BYTES: usize = crate::fast::MAX_BYTES;
/// Messages a sender may run ahead of its receiver (the ring all-reduce runs up to world - 1).
pub const SLOTS: usize = 16;
/// After its spin, a receive yields its core this long before it sleeps on the futex: where
/// workers share cores (no spin), the peer it waits for is often runnable on this very core,
/// and a sleep would cost a wake-up on top (4 workers on 2 cores: decode 120-134 -> 186-192
/// tok/s on SmolLM2).
const YIELD: Duration = Duration::from_micros(200);
const MAGIC: u64 = 0x7465_7373_6572_6131; // "tessera1"
const PAGE: usize = 4096;
/// Bytes of one slot: its length word on a line of its own, then the payload.
const SLOT: usize = 64 + MAX_BYTES;
/// Bytes of one direction: control lines, then the slots.
const DIR: usize = 128 + SLOTS * SLOT;
/// The file: a header page, then the two directions (lower rank to higher, then back).
const FILE_LEN: usize = PAGE + 2 * DIR;
/// Offsets inside a direction: what the receiver has been sent, whether it sleeps on it; on
/// another line, what it has taken (so the sender may reuse a slot).
const SEQ: usize = 0;
const SLEEPING: usize = 4;
const TAKEN: usize = 64;

/// What the lower rank offers the higher one over their authenticated stream.
pub const OFFER_LEN: usize = 1 + 16 + 32 + 8 + 8 + 4;
/// The higher rank's answer: taken or not, and its process id.
pub const ANSWER_LEN: usize = 1 + 4;

fn shm_path(name: &[u8; 16]) -> PathBuf {
    let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/dev/shm/tessera-{hex}"))
}

/// The inode of one of this process's namespaces (`pid` or `net`), 0 where unknown.
fn namespace(kind: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/ns/{kind}")).map_or(0, |m| m.ino())
}

fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain system call; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process behind `fd` has exited.
fn exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// A shared mapping of the whole file (memmap2 unmaps it on drop).
struct Map(MmapRaw);

impl Map {
    fn new(file: &File) -> std::io::Result<Map> {
        MmapOptions::new().len(FILE_LEN).map_raw(file).map(Map)
    }
    fn ptr(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn atomic(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at.is_multiple_of(4) && at + 4 <= FILE_LEN);
        // SAFETY: inside the mapping and aligned (the mapping is page-aligned); the mapping
        // lives as long as `self`.
        unsafe { &*(self.ptr().add(at) as *const AtomicU32) }
    }
}

/// A file offered to a higher rank, until it answers.
pub struct Offer {
    path: PathBuf,
    map: Option<Map>,
}

impl Offer {
    /// Creates the file and the message that offers it.
    pub fn create() -> std::io::Result<(Offer, [u8; OFFER_LEN])> {
        use ring::rand::SecureRandom;
        let rng = ring::rand::SystemRandom::new();
        let mut name = [0u8; 16];
        let mut secret = [0u8; 32];
        rng.fill(&mut name)
            .and_then(|_| rng.fill(&mut secret))
            .map_err(|_| std::io::Error::other("no randomness"))?;
        let path = shm_path(&name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // Every page reserved now: a page of a full tmpfs first touched later would kill
        // the process (SIGBUS) instead of failing here.
        // SAFETY: a plain system call on our own descriptor.
        let reserved = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, FILE_LEN as i64) };
        let made = if reserved == 0 {
            Map::new(&file)
        } else {
            Err(std::io::Error::from_raw_os_error(reserved))
        };
        let map = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        drop(file);
        // SAFETY: the header page is ours until the offer is sent.
        unsafe {
            std::ptr::copy_nonoverlapping(MAGIC.to_le_bytes().as_ptr(), map.ptr(), 8);
            std::ptr::copy_nonoverlapping(secret.as_ptr(), map.ptr().add(8), 32);
        }
        let mut msg = [0u8; OFFER_LEN];
        msg[0] = 1;
        msg[1..17].copy_from_slice(&name);
        msg[17..49].copy_from_slice(&secret);
        msg[49..57].copy_from_slice(&namespace("pid").to_le_bytes());
        msg[57..65].copy_from_slice(&namespace("net").to_le_bytes());
        msg[65..69].copy_from_slice(&std::process::id().to_le_bytes());
        Ok((
            Offer {
                path,
                map: Some(map),
            },
            msg,
        ))
    }

    /// The peer's answer: the link if it took the file. The file is unlinked either way.
    pub fn finish(mut self, answer: &[u8; ANSWER_LEN]) -> Option<Link> {
        let _ = std::fs::remove_file(&self.path);
        if answer[0] != 1 {
            return None;
        }
        let pid = u32::from_le_bytes(answer[1..5].try_into().unwrap());
        let peer = pidfd(pid)?;
        Some(Link::new(self.map.take()?, true, peer))
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The higher rank's side of an offer: the link and the answer to send, or `None` (and a
/// refusal) where the offer cannot be taken.
pub fn accept(offer: &[u8; OFFER_LEN]) -> (Option<Link>, [u8; ANSWER_LEN]) {
    let mut answer = [0u8; ANSWER_LEN];
    let link = (|| {
        if offer[0] != 1 {
            return None;
        }
        let ns = |r: std::ops::Range<usize>| u64::from_le_bytes(offer[r].try_into().unwrap());
        let (pid_ns, net_ns) = (ns(49..57), ns(57..65));
        if pid_ns == 0 || pid_ns != namespace("pid") || net_ns == 0 || net_ns != namespace("net") {
            return None;
        }
        let name: [u8; 16] = offer[1..17].try_into().unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(shm_path(&name))
            .ok()?;
        if file.metadata().ok()?.len() != FILE_LEN as u64 {
            return None;
        }
        let map = Map::new(&file).ok()?;
        let mut head = [0u8; 40];
        // SAFETY: the header page of a mapping of FILE_LEN bytes.
        unsafe { std::ptr::copy_nonoverlapping(map.ptr(), head.as_mut_ptr(), 40) };
        if head[..8] != MAGIC.to_le_bytes() || head[8..40] != offer[17..49] {
            return None;
        }
        let pid = u32::from_le_bytes(offer[65..69].try_into().unwrap());
        let peer = pidfd(pid)?;
        Some(Link::new(map, false, peer))
    })();
    if link.is_some() {
        answer[0] = 1;
        answer[1..5].copy_from_slice(&std::process::id().to_le_bytes());
    }
    (link, answer)
}

/// One peer's shared-memory lane.
pub struct Link {
    map: Map,
    /// Offsets of the direction this rank sends on, and of the one it receives on.
    tx: usize,
    rx: usize,
    sent: u32,
    received: u32,
    peer: OwnedFd,
    /// Messages sent and received, and receives that slept on the futex.
    pub stats: ShmStats,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShmStats {
    pub sent: u64,
    pub received: u64,
    pub slept: u64,
}

fn futex(word: &AtomicU32, op: i32, val: u32, timeout: Option<Duration>) {
    let ts = crate::fast::timespec(timeout);
    let tsp = crate::fast::timespec_ptr(&ts);
    // SAFETY: a futex call on a word of the shared mapping (not FUTEX_PRIVATE: the waker is
    // another process).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const AtomicU32,
            op,
            val,
            tsp,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

impl Link {
    fn new(map: Map, lower: bool, peer: OwnedFd) -> Link {
        let (a, b) = (PAGE, PAGE + DIR);
        let (tx, rx) = if lower { (a, b) } else { (b, a) };
        Link {
            map,
            tx,
            rx,
            sent: 0,
            received: 0,
            peer,
            stats: ShmStats::default(),
        }
    }

    fn gone(&self, peer: usize) -> Option<CollectiveError> {
        exited(&self.peer).then_some(CollectiveError::PeerGone { peer })
    }

    /// Sends `data` (at most [`MAX_BYTES`]); waits only if the peer is [`SLOTS`] messages
    /// behind.
    pub fn send(
        &mut self,
        peer: usize,
        data: &[f32],
        timeout: Duration,
    ) -> Result<(), CollectiveError> {
        let bytes = data.len() * 4;
        assert!(
            bytes <= MAX_BYTES,
            "the caller routes larger messages elsewhere"
        );
        let taken = self.map.atomic(self.tx + TAKEN);
        let t0 = Instant::now();
        let mut polls = 0u32;
        while self.sent.wrapping_sub(taken.load(Ordering::Acquire)) as usize >= SLOTS {
            polls += 1;
            if polls.is_multiple_of(1024) {
                if let Some(e) = self.gone(peer) {
                    return Err(e);
                }
                if t0.elapsed() > timeout {
                    return Err(CollectiveError::Transport {
                        peer,
                        msg: format!("shared-memory ring full for {timeout:?}"),
                    });
                }
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
        let slot = self.tx + 128 + (self.sent as usize % SLOTS) * SLOT;
        // SAFETY: the slot lies inside the mapping, and the receiver has released it (its
        // `taken` is at most SLOTS - 1 behind): nobody reads it until the store below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (bytes as u32).to_le_bytes().as_ptr(),
                self.map.ptr().add(slot),
                4,
            );
            std::ptr::copy_nonoverlapping(
                data.as_ptr() as *const u8,
                self.map.ptr().add(slot + 64),
                bytes,
            );
        }
        self.sent = self.sent.wrapping_add(1);
        let seq = self.map.atomic(self.tx + SEQ);
        seq.store(self.sent, Ordering::Release);
        // Pairs with the receiver's fence between raising SLEEPING and looking at SEQ again:
        // either it sees the new message, or this sees it sleeping and wakes it.
        fence(Ordering::SeqCst);
        if self.map.atomic(self.tx + SLEEPING).load(Ordering::Relaxed) != 0 {
            futex(seq, libc::FUTEX_WAKE, 1, None);
        }
        self.stats.sent += 1;
        Ok(())
    }

    /// Receives the next message into `out` (which must be its length): polls for `spin`,
    /// then sleeps on the futex; fails after `timeout`, at once if the peer's process is gone
    /// or `alive` says its connection is.
    pub fn recv(
        &mut self,
        peer: usize,
        out: &mut [f32],
        spin: Duration,
        timeout: Duration,
        alive: &dyn Fn() -> bool,
    ) -> Result<(), CollectiveError> {
        let seq = self.map.atomic(self.rx + SEQ);
        let want = self.received.wrapping_add(1);
        let ready = |s: u32| s.wrapping_sub(want) as i32 >= 0;
        let mut s = seq.load(Ordering::Acquire);
        if !ready(s) {
            let t0 = Instant::now();
            while !ready(s) {
                let waited = t0.elapsed();
                if waited < spin {
                    std::hint::spin_loop();
                    s = seq.load(Ordering::Acquire);
                    continue;
                }
                if waited < spin + YIELD {
                    std::thread::yield_now();
                    s = seq.load(Ordering::Acquire);
                    continue;
                }
                if let Some(e) = self.gone(peer) {
                    return Err(e);
                }
                if !alive() {
                    return Err(CollectiveError::PeerGone { peer });
                }
                if waited > timeout {
                    return Err(CollectiveError::Transport {
                        peer,
                        msg: format!("no message within {timeout:?}"),
                    });
                }
                let sleeping = self.map.atomic(self.rx + SLEEPING);
                sleeping.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                s = seq.load(Ordering::Acquire);
                if !ready(s) {
                    // Short sleeps: the peer's death is looked for between them.
                    futex(seq, libc::FUTEX_WAIT, s, Some(Duration::from_millis(10)));
                    self.stats.slept += 1;
                    s = seq.load(Ordering::Acquire);
                }
                sleeping.store(0, Ordering::Relaxed);
            }
        }
        let slot = self.rx + 128 + (self.received as usize % SLOTS) * SLOT;
        let mut len = [0u8; 4];
        // SAFETY: the sender published this slot with the release store the acquire load
        // above saw, and does not touch it again until it is released below.
        unsafe { std::ptr::copy_nonoverlapping(self.map.ptr().add(slot), len.as_mut_ptr(), 4) };
        let len = u32::from_le_bytes(len) as usize;
        if len != out.len() * 4 {
            return Err(CollectiveError::Transport {
                peer,
                msg: format!(
                    "expected a message of {} bytes, the peer sent {len}",
                    out.len() * 4
                ),
            });
        }
        // SAFETY: as above; `len` was checked against `out`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.ptr().add(slot + 64),
                out.as_mut_ptr() as *mut u8,
                len,
            )
        };
        self.received = want;
        self.map
            .atomic(self.rx + TAKEN)
            .store(self.received, Ordering::Release);
        self.stats.received += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Link, Link) {
        let (offer, msg) = Offer::create().expect("/dev/shm");
        let (b, answer) = accept(&msg);
        let a = offer.finish(&answer).expect("taken");
        (a, b.expect("accepted"))
    }

    #[test]
    fn messages_cross_in_order_and_the_file_is_gone() {
        let (offer, msg) = Offer::create().unwrap();
        let path = offer.path.clone();
        assert!(path.exists());
        let (b, answer) = accept(&msg);
        let mut a = offer.finish(&answer).unwrap();
        let mut b = b.unwrap();
        assert!(!path.exists(), "unlinked once answered");
        let alive = || true;
        let t = Duration::from_secs(5);
        let h = std::thread::spawn(move || {
            let mut out = vec![0f32; 576];
            for i in 0..200u32 {
                b.recv(0, &mut out, Duration::ZERO, t, &alive).unwrap();
                assert!(
                    out.iter()
                        .enumerate()
                        .all(|(j, &x)| x == (i * 1000 + j as u32) as f32)
                );
                let back: Vec<f32> = out.iter().map(|x| -x).collect();
                b.send(0, &back, t).unwrap();
            }
            b.stats
        });
        let mut back = vec![0f32; 576];
        for i in 0..200u32 {
            let v: Vec<f32> = (0..576).map(|j| (i * 1000 + j) as f32).collect();
            a.send(1, &v, t).unwrap();
            a.recv(1, &mut back, Duration::from_micros(100), t, &alive)
                .unwrap();
            assert_eq!(back[5], -v[5]);
        }
        let s = h.join().unwrap();
        assert_eq!((s.sent, s.received), (200, 200));
    }

    #[test]
    fn a_sender_runs_ahead_up_to_the_ring_and_lengths_are_checked() {
        let (mut a, mut b) = pair();
        let t = Duration::from_millis(200);
        for i in 0..SLOTS {
            a.send(1, &[i as f32; 3], t).unwrap();
        }
        // The ring is full: the next send waits, and gives up after the timeout.
        let e = a.send(1, &[0.0; 3], t).unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        let mut out = [0f32; 3];
        b.recv(0, &mut out, Duration::ZERO, t, &|| true).unwrap();
        assert_eq!(out, [0.0; 3]);
        let mut wrong = [0f32; 4];
        let e = b
            .recv(0, &mut wrong, Duration::ZERO, t, &|| true)
            .unwrap_err();
        assert!(e.to_string().contains("12"), "{e}");
        // Nothing arrives: the receive times out, having slept on the futex.
        let (mut c, mut d) = pair();
        let _ = &mut c;
        let e = d
            .recv(0, &mut out, Duration::ZERO, t, &|| true)
            .unwrap_err();
        assert!(e.to_string().contains("no message"), "{e}");
        assert!(d.stats.slept > 0);
    }

    #[test]
    fn offers_from_elsewhere_or_with_a_wrong_secret_are_refused() {
        let (offer, mut msg) = Offer::create().unwrap();
        msg[20] ^= 1; // the secret
        let (l, answer) = accept(&msg);
        assert!(l.is_none() && answer[0] == 0);
        let path = offer.path.clone();
        assert!(offer.finish(&answer).is_none());
        assert!(!path.exists(), "a refused offer's file is unlinked too");
        let (offer, mut msg) = Offer::create().unwrap();
        msg[57] ^= 1; // another network namespace
        assert!(accept(&msg).0.is_none());
        let path = offer.path.clone();
        drop(offer);
        assert!(
            !path.exists(),
            "an offer dropped unanswered unlinks its file"
        );
        let (_, mut msg) = Offer::create().unwrap();
        msg[1] ^= 1; // a file that is not there
        assert!(accept(&msg).0.is_none());
    }

    #[test]
    fn a_dead_peer_is_seen_while_waiting() {
        // The peer is a child process that exits at once (and is not reaped while we wait).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let (offer, _) = Offer::create().unwrap();
        let mut answer = [1u8, 0, 0, 0, 0];
        answer[1..5].copy_from_slice(&pid.to_le_bytes());
        let mut link = offer.finish(&answer).expect("the child is watched");
        let mut out = [0f32; 2];
        let t0 = Instant::now();
        let e = link
            .recv(
                1,
                &mut out,
                Duration::ZERO,
                Duration::from_secs(30),
                &|| true,
            )
            .unwrap_err();
        assert!(matches!(e, CollectiveError::PeerGone { peer: 1 }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        child.wait().unwrap();
    }
}
