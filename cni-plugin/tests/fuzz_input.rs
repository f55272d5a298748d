//! Property test of everything a runtime (or anyone able to exec the plugin) controls: the verb,
//! the CNI_* environment, CNI_ARGS and the configuration on stdin (random JSON shapes, raw bytes,
//! huge strings, prevResult and runtimeConfig variations). The real binary runs per case, inside
//! the test's own namespaces, against the fake daemon.
//!
//! Invariants: the answer is a valid result or spec error JSON (never a panic), every call ends
//! within a few seconds, the output stays small, a failed ADD leaves no link or allocation behind,
//! and after DEL of everything that was added, nothing is left at all. Needs root.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CASES: u32 = 400;
const PER_CALL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum NetnsPick {
    Pod,
    /// The node namespace the plugin runs in, by its bind mount.
    Node,
    SelfNs,
    Fifo,
    PlainFile,
    Missing,
    /// A relative path: resolves in the test's working directory, never to a namespace.
    Relative(String),
    Empty,
    Unset,
}

#[derive(Debug, Clone)]
enum Stdin {
    Conf(Value),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Case {
    command: String,
    container_id: Option<String>,
    ifname: Option<String>,
    netns: NetnsPick,
    args: Option<String>,
    stdin: Stdin,
    /// Point the config at the fake daemon, or at a socket nobody listens on.
    daemon_up: bool,
}

fn huge(max: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!['a', 'é', '"', '\\', '\n', '=', ';', '0']),
        1..max,
    )
        .prop_map(|(c, n)| std::iter::repeat_n(c, n).collect())
}

/// Strings that may show up in environment variables: no NUL (execve cannot carry it).
fn env_string() -> impl Strategy<Value = String> {
    // execve refuses one string over 128 KiB; 'é' is two bytes.
    env_string_of(60_000)
}

fn env_string_of(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_.=;:,/-]{0,24}",
        "\\PC{0,16}".prop_map(|s: String| s.replace('\0', "")),
        huge(max),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..70_000).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "10.77.9.9",
            "10.77.9.9/24",
            "fd00::1",
            "300.1.1.1",
            "02:00:00:00:00:09",
            "01:00:00:00:00:01",
            "eth0",
            "1.0.0",
            "",
        ])
        .prop_map(Value::from),
        huge(1 << 18).prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn a_result() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["0.4.0", "1.0.0", "1.1.0"]),
        prop::sample::select(vec![
            "10.77.0.10/32",
            "10.77.9.9/32",
            "bogus",
            "fd00::1/128",
        ]),
        0u64..4,
        any::<bool>(),
    )
        .prop_map(|(v, addr, index, sandbox)| {
            let mut pod = json!({"name": "eth0", "mac": "02:00:00:00:00:09"});
            if sandbox {
                pod["sandbox"] = json!("/run/netns/x");
            }
            json!({
                "cniVersion": v,
                "interfaces": [{"name": "vpc0", "mac": "ee:ee:ee:ee:ee:ee"}, pod],
                "ips": [{"address": addr, "gateway": "169.254.1.1", "interface": index}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            })
        })
}

fn conf() -> impl Strategy<Value = Value> {
    let version = prop_oneof![
        10 => prop::sample::select(vec!["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
            .prop_map(Value::from),
        1 => prop::sample::select(vec!["0.2.0", "2.0.0", "", "1.0"]).prop_map(Value::from),
        1 => json_value(),
    ];
    let maybe = |s: BoxedStrategy<Value>| prop::option::weighted(0.25, s);
    (
        version,
        maybe(prop_oneof![3 => (0u32..70_000).prop_map(Value::from), 1 => json_value()].boxed()),
        maybe(prop_oneof![3 => "[a-z-]{0,10}".prop_map(Value::from), 1 => json_value()].boxed()),
        maybe(
            prop_oneof![
                3 => (
                    prop::collection::vec(json_leaf(), 0..3),
                    prop::option::of(json_leaf())
                )
                    .prop_map(|(ips, mac)| {
                        let mut rc = json!({ "ips": ips });
                        if let Some(mac) = mac {
                            rc["mac"] = mac;
                        }
                        rc
                    }),
                1 => json_value(),
            ]
            .boxed(),
        ),
        maybe(prop_oneof![3 => a_result(), 1 => json_value()].boxed()),
        maybe(
            prop_oneof![
                3 => prop::collection::vec(
                    ("[a-z0-9]{1,8}", "eth[0-2]")
                        .prop_map(|(c, i)| json!({"containerID": c, "ifname": i})),
                    0..3
                )
                .prop_map(Value::from),
                1 => json_value(),
            ]
            .boxed(),
        ),
        prop::collection::btree_map("[a-zA-Z]{1,10}", json_value(), 0..3),
    )
        .prop_map(|(v, mtu, network, rc, prev, valid, extra)| {
            let mut m = Map::new();
            for (k, val) in extra {
                m.insert(k, val);
            }
            m.insert("cniVersion".into(), v);
            m.insert("name".into(), json!("fuzz"));
            m.insert("type".into(), json!("vpcnet"));
            for (k, val) in [
                ("mtu", mtu),
                ("network", network),
                ("runtimeConfig", rc),
                ("prevResult", prev),
                ("cni.dev/valid-attachments", valid),
            ] {
                if let Some(val) = val {
                    m.insert(k.into(), val);
                }
            }
            Value::Object(m)
        })
}

fn case() -> impl Strategy<Value = Case> {
    let command = prop_oneof![
        8 => prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"])
            .prop_map(String::from),
        1 => env_string(),
    ];
    let container_id = prop_oneof![
        6 => prop::sample::select(vec!["fz01", "fz02", "fz03", "fz04"]).prop_map(|s| Some(s.into())),
        1 => env_string().prop_map(Some),
        1 => Just(None),
    ];
    let ifname = prop_oneof![
        6 => prop::sample::select(vec!["eth0", "eth1", "eth2", "eth3", "net1", "net2"]).prop_map(|s| Some(s.into())),
        1 => env_string().prop_map(Some),
        1 => Just(None),
    ];
    let netns = prop_oneof![
        20 => Just(NetnsPick::Pod),
        1 => Just(NetnsPick::Node),
        1 => Just(NetnsPick::SelfNs),
        1 => Just(NetnsPick::Fifo),
        1 => Just(NetnsPick::PlainFile),
        1 => Just(NetnsPick::Missing),
        1 => "[a-z.]{0,12}".prop_map(NetnsPick::Relative),
        1 => Just(NetnsPick::Empty),
        1 => Just(NetnsPick::Unset),
    ];
    let args = prop_oneof![
        10 => Just(Some(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=fuzz".to_string()
        )),
        2 => prop::collection::vec(
            (
                prop::sample::select(vec![
                    "IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_UID", "IP",
                    "MAC", "FOO",
                ]),
                env_string_of(15_000)
            )
                .prop_map(|(k, v)| format!("{k}={v}")),
            0..4
        )
        .prop_map(|kv| Some(kv.join(";"))),
        1 => env_string().prop_map(Some),
        1 => Just(None),
    ];
    let stdin = prop_oneof![
        12 => conf().prop_map(Stdin::Conf),
        // Close to what a runtime sends, so many cases get past the input checks to the kernel
        // and the daemon.
        12 => (
            prop::sample::select(vec!["0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
            prop::option::weighted(0.3, prop::sample::select(vec![
                "10.77.9.9", "10.77.9.10/24", "10.77.0.10",
            ])),
            prop::option::weighted(0.3, prop::sample::select(vec![
                "02:00:00:00:00:09", "02:42:ac:11:00:02",
            ])),
            prop::option::weighted(0.3, 1280u32..9000),
        )
            .prop_map(|(v, ip, mac, mtu)| {
                let mut c = json!({"cniVersion": v, "name": "fuzz", "type": "vpcnet"});
                if let Some(ip) = ip {
                    c["runtimeConfig"]["ips"] = json!([ip]);
                }
                if let Some(mac) = mac {
                    c["runtimeConfig"]["mac"] = json!(mac);
                }
                if let Some(mtu) = mtu {
                    c["mtu"] = json!(mtu);
                }
                Stdin::Conf(c)
            }),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Stdin::Bytes),
        1 => conf().prop_map(|c| {
            let text = c.to_string();
            let cut = text.len() / 2;
            Stdin::Bytes(text.into_bytes()[..cut].to_vec())
        }),
    ];
    (
        command,
        container_id,
        ifname,
        netns,
        args,
        stdin,
        prop::bool::weighted(0.9),
    )
        .prop_map(
            |(command, container_id, ifname, netns, args, stdin, daemon_up)| Case {
                command,
                container_id,
                ifname,
                netns,
                args,
                stdin,
                daemon_up,
            },
        )
}

fn vpc_links(ns: &Netns) -> usize {
    ns.ip(&["-o", "link", "show"])
        .unwrap()
        .lines()
        .filter(|l| l.contains(": vpc"))
        .count()
}

struct World {
    f: Fixture,
    fifo: String,
    plain: String,
    added: Mutex<BTreeSet<(String, String)>>,
    /// Per verb: (succeeded, failed), to show the cases reach past the input checks.
    outcomes: Mutex<BTreeMap<String, (u32, u32)>>,
}

impl World {
    fn stdin_of(&self, case: &Case) -> Vec<u8> {
        match &case.stdin {
            Stdin::Bytes(b) => b.clone(),
            Stdin::Conf(v) => {
                let mut v = v.clone();
                // Whatever else is random, the plugin only ever talks to our daemon and writes
                // only into our directory.
                let socket = if case.daemon_up {
                    self.f.daemon.socket.clone()
                } else {
                    self.f.dir.0.join("nobody.sock")
                };
                v["socket"] = json!(socket);
                v["releaseQueue"] = json!(self.f.queue_dir());
                if let Some(m) = v.as_object_mut() {
                    m.remove("logFile");
                }
                v.to_string().into_bytes()
            }
        }
    }

    fn vars(&self, case: &Case) -> Vec<(&'static str, String)> {
        let mut vars = vec![("CNI_COMMAND", case.command.clone())];
        if let Some(c) = &case.container_id {
            vars.push(("CNI_CONTAINERID", c.clone()));
        }
        if let Some(i) = &case.ifname {
            vars.push(("CNI_IFNAME", i.clone()));
        }
        if let Some(a) = &case.args {
            vars.push(("CNI_ARGS", a.clone()));
        }
        let netns = match &case.netns {
            NetnsPick::Pod => Some(self.f.pod.path_string()),
            NetnsPick::Node => Some(self.f.node.path_string()),
            NetnsPick::SelfNs => Some("/proc/self/ns/net".into()),
            NetnsPick::Fifo => Some(self.fifo.clone()),
            NetnsPick::PlainFile => Some(self.plain.clone()),
            NetnsPick::Missing => Some(self.f.dir.0.join("missing").display().to_string()),
            NetnsPick::Relative(r) => Some(r.clone()),
            NetnsPick::Empty => Some(String::new()),
            NetnsPick::Unset => None,
        };
        if let Some(n) = netns {
            vars.push(("CNI_NETNS", n));
        }
        vars
    }

    fn run_case(&self, case: &Case) -> Result<(), TestCaseError> {
        let stdin = self.stdin_of(case);
        let vars = self.vars(case);
        let links_before = vpc_links(&self.f.node);
        let allocs_before = self.f.daemon.allocations();
        let (out, took) = run_timed(&self.f, &vars, &stdin, PER_CALL);
        prop_assert!(took < PER_CALL, "took {took:?}");
        {
            let mut o = self.outcomes.lock().unwrap();
            let verb = if case.command.len() <= 8 {
                case.command.clone()
            } else {
                "other".into()
            };
            let e = o.entry(verb).or_default();
            if out.success {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        prop_assert!(!out.stderr.contains("panicked"), "{out:?}");
        // A success may echo prevResult back; nothing else may grow with the input.
        prop_assert!(
            out.stdout.len() < 2 * vpcnet_api::MAX_MESSAGE + 256 + stdin.len(),
            "{} bytes of output",
            out.stdout.len()
        );
        if out.success {
            let text = out.stdout.trim();
            match case.command.as_str() {
                "ADD" => {
                    let r: Value = serde_json::from_str(text)
                        .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                    prop_assert!(r["cniVersion"].is_string(), "{r}");
                    prop_assert!(r["ips"].as_array().is_some_and(|a| !a.is_empty()), "{r}");
                    prop_assert!(r["interfaces"].is_array(), "{r}");
                    let key = (
                        case.container_id.clone().unwrap(),
                        case.ifname.clone().unwrap(),
                    );
                    self.added.lock().unwrap().insert(key);
                }
                "VERSION" => {
                    let v: Value = serde_json::from_str(text)
                        .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                    prop_assert!(v["supportedVersions"].is_array(), "{v}");
                }
                _ => prop_assert!(text.is_empty(), "{} printed {text:?}", case.command),
            }
        } else {
            let v: Value = serde_json::from_str(out.stdout.trim())
                .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {out:?}")))?;
            prop_assert!(v["cniVersion"].is_string(), "{v}");
            prop_assert!(v["code"].is_u64(), "{v}");
            prop_assert!(v["msg"].is_string(), "{v}");
            let msg = v["msg"].as_str().unwrap();
            if case.command == "ADD" && std::env::var_os("FUZZ_DEBUG").is_some() {
                eprintln!("ADD error: {}", msg.chars().take(90).collect::<String>());
            }
            prop_assert!(!msg.starts_with("vpcnet bug"), "{msg}");
            if case.command == "ADD" {
                // A failed ADD undoes what it did (a refused repeat leaves the live one).
                prop_assert!(vpc_links(&self.f.node) <= links_before, "{v}");
                prop_assert!(self.f.daemon.allocations() <= allocs_before, "{v}");
            }
        }
        Ok(())
    }
}

#[test]
fn random_input_gets_spec_answers_in_bounded_time_and_leaks_nothing() {
    let f = Fixture::new();
    let fifo = f.dir.0.join("fifo");
    common::mkfifo(&fifo);
    let plain = f.dir.0.join("plain");
    std::fs::write(&plain, "x").unwrap();
    let world = World {
        fifo: fifo.display().to_string(),
        plain: plain.display().to_string(),
        f,
        added: Mutex::new(BTreeSet::new()),
        outcomes: Mutex::new(BTreeMap::new()),
    };

    let started = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| world.run_case(&case));
    eprintln!(
        "fuzz_input: {CASES} cases in {:.1} s; (ok, error) per verb: {:?}",
        started.elapsed().as_secs_f64(),
        world.outcomes.lock().unwrap()
    );
    if let Err(e) = result {
        panic!("{e}");
    }

    // DEL of everything ADD ever answered for leaves nothing: no link, no allocation.
    let f = &world.f;
    let conf = f.conf("1.0.0", Value::Null);
    for (cid, ifname) in world.added.lock().unwrap().iter() {
        let mut vars = f.env("DEL", cid);
        set_var(&mut vars, "CNI_IFNAME", ifname);
        run_timed(f, &vars, &conf, PER_CALL).0.expect_ok();
    }
    assert_eq!(
        vpc_links(&f.node),
        0,
        "{}",
        f.node.ip(&["-o", "link", "show"]).unwrap()
    );
    let pod_links = f.pod.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(pod_links.lines().count(), 1, "only lo is left: {pod_links}");
    assert_eq!(f.daemon.allocations(), 0, "allocations left at the daemon");
}
