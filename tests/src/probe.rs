//! Reachability probes with short timeouts. Servers answer every connection or datagram with the
//! address they saw it come from, so a test can tell whether a source address survived (no SNAT) or
//! was masqueraded.

use crate::netns::Netns;
use anyhow::{Context as _, Result, bail};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// A TCP and UDP "who am I" server on one address and port inside a namespace; stops on drop.
pub struct WhoAmI {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl WhoAmI {
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Result<WhoAmI> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let tcp = {
            let stop = stop.clone();
            let tx = tx.clone();
            ns.spawn(move || serve_tcp(addr, stop, tx))?
        };
        let udp = {
            let stop = stop.clone();
            ns.spawn(move || serve_udp(addr, stop, tx))?
        };
        let server = WhoAmI {
            stop,
            threads: vec![flatten(tcp), flatten(udp)],
        };
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5))
                .context("server did not start")?
                .with_context(|| format!("binding {addr} in {}", ns.name()))?;
        }
        Ok(server)
    }
}

fn flatten(h: JoinHandle<Result<std::io::Result<()>>>) -> JoinHandle<Result<()>> {
    std::thread::spawn(move || match h.join() {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("server thread panicked"),
    })
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) -> std::io::Result<()> {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    listener.set_nonblocking(true)?;
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.write_all(peer.ip().to_string().as_bytes());
            }
            // Sleep until a connection arrives (or a while passes, to look at `stop`): answers
            // at once without waking up every few milliseconds while idle.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(listener.as_raw_fd(), Duration::from_millis(50))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    Ok(())
}

fn serve_udp(
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) -> std::io::Result<()> {
    let sock = match UdpSocket::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(peer.ip().to_string().as_bytes(), peer);
        }
    }
    Ok(())
}

/// Connects over TCP from inside `from` and returns the source address the server saw.
pub fn tcp(from: &Netns, to: SocketAddrV4) -> Result<Ipv4Addr> {
    from.run(move || -> Result<Ipv4Addr> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), PROBE_TIMEOUT)?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text.trim().parse()?)
    })?
    .with_context(|| format!("tcp {} -> {to}", from.name()))
}

/// Sends a UDP datagram from inside `from` and returns the source address the server saw.
pub fn udp(from: &Netns, to: SocketAddrV4) -> Result<Ipv4Addr> {
    from.run(move || -> Result<Ipv4Addr> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        s.connect(to)?;
        let mut buf = [0u8; 64];
        // Retry once: the first datagram can be lost while ARP resolves.
        for attempt in 0..2 {
            s.send(b"who")?;
            match s.recv(&mut buf) {
                Ok(n) => return Ok(std::str::from_utf8(&buf[..n])?.trim().parse()?),
                Err(e) if attempt == 1 => return Err(e.into()),
                Err(_) => {}
            }
        }
        unreachable!("loop returns on its last attempt")
    })?
    .with_context(|| format!("udp {} -> {to}", from.name()))
}

/// Waits up to `timeout` for `fd` to become readable.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}

/// A transport for [`Probe`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One connection attempt (TCP) or request datagram (UDP) to a [`WhoAmI`] server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Probe {
    pub proto: Proto,
    pub to: SocketAddrV4,
}

/// What one probe saw: the source address the server reported, or why there was no answer
/// (a timeout is how a dropped packet shows).
pub type Outcome = std::result::Result<Ipv4Addr, String>;

/// Runs one probe from the calling thread's namespace, giving up after `timeout`. UDP repeats
/// its datagram every `timeout / 4`, so one lost datagram (ARP on the fabric) is not a verdict.
pub fn probe_once(p: Probe, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let answer = |text: &[u8]| -> Outcome {
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| format!("unreadable answer {text:?}"))
    };
    let res: std::io::Result<Outcome> = (|| match p.proto {
        Proto::Tcp => {
            let mut s = TcpStream::connect_timeout(&SocketAddr::V4(p.to), timeout)?;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(50));
            s.set_read_timeout(Some(left))?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            Ok(answer(&buf))
        }
        Proto::Udp => {
            let s = udp_socket()?;
            s.connect(p.to)?;
            let mut buf = [0u8; 64];
            let step = (timeout / 4).max(Duration::from_millis(20));
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                s.send(b"who")?;
                s.set_read_timeout(Some(left.min(step)))?;
                match s.recv(&mut buf) {
                    Ok(n) => return Ok(answer(&buf[..n])),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    })();
    res.unwrap_or_else(|e| Err(e.to_string()))
}

/// A UDP socket on a source port no earlier probe of this process used (until 41,000 probes
/// wrap around): a random ephemeral port can repeat a recent flow's 5-tuple, and a dataplane's
/// connection tracking rightly lets an established flow through after a policy change.
fn udp_socket() -> std::io::Result<UdpSocket> {
    use std::sync::atomic::AtomicU32;
    const FIRST: u32 = 20_000;
    const LAST: u32 = 60_999;
    static NEXT: AtomicU32 = AtomicU32::new(FIRST);
    let mut last_err = None;
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (n - FIRST) % (LAST - FIRST + 1);
        match UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port as u16)) {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

/// Runs every probe of every source at once: one thread per source namespace, and inside it one
/// thread per probe (threads inherit the namespace of the thread that spawns them). Returns the
/// outcomes in the order given. With `timeout` as the time a dropped probe costs, a whole batch
/// takes about `timeout`, however many probes it holds.
pub fn probe_parallel(
    batches: Vec<(&Netns, Vec<Probe>)>,
    timeout: Duration,
) -> Result<Vec<Vec<Outcome>>> {
    let handles = batches
        .into_iter()
        .map(|(ns, probes)| {
            ns.spawn(move || -> Vec<Outcome> {
                std::thread::scope(|scope| {
                    let threads: Vec<_> = probes
                        .iter()
                        .map(|p| {
                            std::thread::Builder::new()
                                .stack_size(128 * 1024)
                                .spawn_scoped(scope, move || probe_once(*p, timeout))
                        })
                        .collect();
                    threads
                        .into_iter()
                        .map(|t| match t {
                            Ok(h) => h
                                .join()
                                .unwrap_or_else(|_| Err("probe thread panicked".into())),
                            Err(e) => Err(format!("spawning a probe thread: {e}")),
                        })
                        .collect()
                })
            })
        })
        .collect::<Result<Vec<_>>>()?;
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
        })
        .collect()
}

/// One ICMP echo with a 1 s deadline, from inside `from`.
pub fn ping(from: &Netns, to: Ipv4Addr) -> Result<()> {
    from.exec("ping", &["-c1", "-W1", "-q", &to.to_string()])
        .map(|_| ())
        .with_context(|| format!("ping {} -> {to}", from.name()))
}

/// Pings at an interval for a while and returns (sent, received), e.g. to count loss across a restart.
pub fn ping_flood(
    from: &Netns,
    to: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<std::process::Child> {
    let child = from
        .command("ping")?
        .args([
            "-c",
            &count.to_string(),
            "-i",
            &format!("{:.3}", interval.as_secs_f64()),
            "-W1",
            "-q",
            &to.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    Ok(child)
}

/// Parses `ping -q` summary output into (transmitted, received).
pub fn ping_summary(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(',')
        .map(|p| p.trim().split(' ').next().and_then(|n| n.parse().ok()));
    Some((nums.next()??, nums.next()??))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ping_summary() {
        let out = "--- 10.0.0.1 ping statistics ---\n100 packets transmitted, 98 received, 2% packet loss, time 990ms\n";
        assert_eq!(super::ping_summary(out), Some((100, 98)));
    }
}
