//! Reachability probes with short timeouts. Servers answer every connection or datagram with the
//! address they saw it come from, so a test can tell whether a source address survived (no SNAT) or
//! was masqueraded.

use crate::netns::Netns;
use anyhow::{Context as _, Result, bail};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

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
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
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
