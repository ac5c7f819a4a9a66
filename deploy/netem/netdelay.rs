//! `netdelay TUN DELAY_US`: holds every IP packet routed into the TUN device `TUN` for
//! `DELAY_US` microseconds, then hands it back to the kernel through the same device, which
//! routes it on to its destination. This kernel has no `netem`, and `fq` (which could delay
//! packets by their departure time) is not built either; this is the delay half of
//! deploy/netem/netem.sh's emulated links (the rate half is `htb`).
//!
//! One thread, no allocation per packet beyond a recycled buffer: `ppoll` with a nanosecond
//! timeout until the oldest held packet is due, timer slack set to 1 us, real-time priority
//! (SCHED_FIFO) where allowed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_tun(name: &str) -> std::io::Result<libc::c_int> {
    let path = c"/dev/net/tun";
    // SAFETY: plain libc calls on a path and a struct of the layout the kernel expects.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        let n = name.len().min(15);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        if libc::ioctl(fd, TUNSETIFF as _, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: netdelay TUN DELAY_US");
        std::process::exit(2);
    }
    let delay = Duration::from_micros(args[2].parse().expect("DELAY_US is a number"));
    let fd = open_tun(&args[1]).unwrap_or_else(|e| {
        eprintln!("netdelay: opening {}: {e}", args[1]);
        std::process::exit(1);
    });
    // SAFETY: prctl with an integer argument; sched_setscheduler with a param on the stack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1);
        // Real-time priority: on a machine whose cores the emulated hosts keep busy, a packet
        // that is due must not wait for a time slice (that would add to every link's latency).
        let param = libc::sched_param { sched_priority: 50 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
            eprintln!(
                "netdelay: no real-time priority ({}); delays may stretch under load",
                std::io::Error::last_os_error()
            );
        }
    }
    let mut held: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    loop {
        let now = Instant::now();
        while let Some((due, _)) = held.front() {
            if *due > now {
                break;
            }
            let (_, p) = held.pop_front().expect("front exists");
            // SAFETY: writing a buffer we own to our descriptor.
            unsafe { libc::write(fd, p.as_ptr().cast(), p.len()) };
            spare.push(p);
        }
        let wait = held
            .front()
            .map(|(due, _)| due.saturating_duration_since(now));
        let ts = wait.map(|w| libc::timespec {
            tv_sec: w.as_secs() as libc::time_t,
            tv_nsec: w.subsec_nanos() as libc::c_long,
        });
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, an optional timespec on the stack.
        unsafe {
            libc::ppoll(
                &mut pfd,
                1,
                ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
                std::ptr::null(),
            )
        };
        loop {
            let mut buf = spare.pop().unwrap_or_default();
            buf.resize(65536, 0);
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                spare.push(buf);
                break;
            }
            buf.truncate(n as usize);
            held.push_back((Instant::now() + delay, buf));
        }
    }
}
