//! A TCP relay from a network namespace's loopback to the root namespace's: daemons that run in
//! node namespaces reach the test's API server (which listens on the root 127.0.0.1) without any
//! route or address outside the run's own namespaces.

use crate::netns::Netns;
use anyhow::{Context as _, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Relay {
    /// The port on 127.0.0.1 inside the namespace.
    pub port: u16,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    ns: Netns,
}

impl Relay {
    /// Listens on 127.0.0.1:<free port> inside `ns` and forwards every connection to `target`
    /// (a root-namespace loopback address).
    pub fn start(ns: &Netns, target: SocketAddr) -> Result<Relay> {
        // The socket belongs to the namespace it was created in, whichever thread accepts.
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))?
            .context("binding the relay in the namespace")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(inbound) = conn else { continue };
                std::thread::spawn(move || {
                    let Ok(outbound) = TcpStream::connect(target) else {
                        return;
                    };
                    let (Ok(mut a), Ok(mut b)) = (inbound.try_clone(), outbound.try_clone()) else {
                        return;
                    };
                    let (mut inbound, mut outbound) = (inbound, outbound);
                    let up = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut outbound);
                        let _ = outbound.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut b, &mut inbound);
                    let _ = inbound.shutdown(std::net::Shutdown::Write);
                    let _ = up.join();
                });
            }
        });
        Ok(Relay {
            port: addr.port(),
            stop,
            addr,
            ns: ns.handle(),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let addr = self.addr;
        let _ = self.ns.run(move || TcpStream::connect(addr));
    }
}
