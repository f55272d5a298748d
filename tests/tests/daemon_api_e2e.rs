//! vpcnetd's socket and metrics: bad input gets an answer, never a crash; requests run concurrently.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vpcnet_tests::{Cluster, ClusterSpec};

fn raw(socket: &std::path::Path, line: &str) -> serde_json::Value {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&s).write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
}

#[test]
fn socket_survives_bad_input_serves_concurrently_and_exports_metrics() {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: false,
    })
    .unwrap();
    c.node_mut(0).start_daemon().unwrap();
    let socket = c.node(0).socket.clone();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "root-only socket");

    let garbage = raw(&socket, "{this is not json\n");
    assert_eq!(garbage["result"], "error");
    assert_eq!(garbage["code"], 6, "{garbage}");
    let future = raw(&socket, "{\"version\":99,\"op\":\"status\"}\n");
    assert_eq!(future["code"], 1, "{future}");
    assert!(future["msg"].as_str().unwrap().contains("99"), "{future}");
    let unknown = raw(&socket, "{\"version\":1,\"op\":\"format_disk\"}\n");
    assert_eq!(unknown["result"], "error", "{unknown}");
    // A client that connects and never sends does not block anybody.
    let _idle = UnixStream::connect(&socket).unwrap();
    let answers: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..32)
            .map(|_| {
                let socket = socket.clone();
                s.spawn(move || {
                    raw(&socket, "{\"version\":1,\"op\":\"status\"}\n")["result"] == "status"
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|ok| *ok));

    c.add_pod(0, "default", "m").unwrap();
    let metrics = c
        .node(0)
        .ns
        .run(|| {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9962").unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
        .unwrap();
    assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
    assert!(
        metrics.contains("vpcnet_ipam_allocations_total 1"),
        "{metrics}"
    );
    assert!(
        c.node_mut(0).daemon_running(),
        "still alive after all of it"
    );
}
