//! A real Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1, for the tests that need
//! one. Found through the envtest convention: `KUBEBUILDER_ASSETS` names a directory holding
//! `etcd` and `kube-apiserver` (and optionally `kubectl`; else the one on PATH is used). When it
//! is not set, [`ControlPlane::start_or_skip`] prints one loud line and the test skips: these
//! machines cannot always provide an API server, everything else still runs.
//!
//! Each control plane is private to its test: its own data directory, its own throwaway PKI
//! (made with openssl), its own free loopback ports. It can be stopped and started again on the
//! same data and ports (an API server restart). On drop its processes are stopped by PID and its
//! directory is removed, also when the test failed (the log tails are printed then); the
//! processes die with the test thread that started them even when no drop runs.

use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "vpcnet-test-admin-token";

pub struct ControlPlane {
    dir: PathBuf,
    assets: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// etcd client, etcd peer, API server: kept across [`ControlPlane::stop`] and
    /// [`ControlPlane::start_again`], so clients reconnect to the same address.
    ports: (u16, u16, u16),
    pub url: String,
    /// An admin kubeconfig (bearer token, the test CA).
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
}

/// The directory prefix of every control plane's files under the temp dir.
const DIR_PREFIX: &str = "vpcnet-apiserver-";

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A CA, a serving certificate for 127.0.0.1, and a service-account key pair.
fn make_pki(dir: &Path) -> Result<()> {
    let ossl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=vpcnet-test-ca",
    ])?;
    ossl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
    ])?;
    std::fs::write(
        dir.join("apiserver.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
    )?;
    ossl(&[
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "apiserver.crt",
        "-days",
        "2",
        "-extfile",
        "apiserver.ext",
    ])?;
    ossl(&["genrsa", "-out", "sa.key", "2048"])?;
    ossl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
    )?;
    Ok(())
}

impl ControlPlane {
    /// The assets directory, or `None` after one loud line saying the test is skipped.
    pub fn assets_or_skip(test: &str) -> Option<PathBuf> {
        // Straight to the stderr stream: the test harness captures `eprintln!` of passing tests,
        // and a skip must be seen in every run.
        // Once per name and process: the tests of one suite skip with one line.
        static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let loud = |line: String| {
            use std::io::Write as _;
            let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
            if !said.iter().any(|t| t == test) {
                said.push(test.to_string());
                let _ = writeln!(std::io::stderr(), "{line}");
            }
        };
        let dir = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from);
        match dir {
            Some(d) if d.join("kube-apiserver").exists() && d.join("etcd").exists() => Some(d),
            Some(d) => {
                loud(format!(
                    "!!! SKIPPED {test}: KUBEBUILDER_ASSETS={} has no kube-apiserver and etcd — no real API server on this machine !!!",
                    d.display()
                ));
                None
            }
            None => {
                loud(format!(
                    "!!! SKIPPED {test}: no real API server (set KUBEBUILDER_ASSETS to a directory with kube-apiserver and etcd) !!!"
                ));
                None
            }
        }
    }

    /// Starts a control plane, or returns `None` (skip) when no API server is available.
    /// Panics when one is available but does not start: that is a failure, not a skip.
    pub fn start_or_skip(test: &str) -> Option<ControlPlane> {
        let assets = Self::assets_or_skip(test)?;
        Some(Self::start(&assets).expect("starting etcd + kube-apiserver"))
    }

    pub fn start(assets: &Path) -> Result<ControlPlane> {
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let ports = (free_port()?, free_port()?, free_port()?);
        let url = format!("https://127.0.0.1:{}", ports.2);
        let kubectl = if assets.join("kubectl").exists() {
            assets.join("kubectl")
        } else {
            PathBuf::from("kubectl")
        };
        // Owned from here on: whatever fails below, drop stops what started and removes `dir`.
        let mut cp = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            assets: assets.to_path_buf(),
            etcd: None,
            apiserver: None,
            ports,
            url,
            kubectl,
        };
        make_pki(&cp.dir).context("making the test PKI (openssl)")?;
        std::fs::write(
            &cp.kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
                url = cp.url,
                ca = cp.dir.join("ca.crt").display()
            ),
        )?;
        cp.start_again()?;
        Ok(cp)
    }

    /// Starts etcd (on the data directory it had, if any) and kube-apiserver on this control
    /// plane's ports, and waits until the API server is ready. After [`ControlPlane::stop`] this
    /// is an API server restart: same address, same certificates, same stored objects.
    pub fn start_again(&mut self) -> Result<()> {
        if self.etcd.is_some() || self.apiserver.is_some() {
            bail!("the control plane in {} already runs", self.dir.display());
        }
        let dir = self.dir.clone();
        let (etcd_port, peer_port, api_port) = self.ports;
        let log = |name: &str| -> Result<Stdio> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))?;
            Ok(f.into())
        };
        let mut etcd = Command::new(self.assets.join("etcd"));
        etcd.args([
            "--name=test".to_string(),
            format!("--data-dir={}", dir.join("etcd-data").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=test=http://127.0.0.1:{peer_port}"),
        ])
        .stdin(Stdio::null())
        .stdout(log("etcd.log")?)
        .stderr(log("etcd.log")?);
        self.etcd = Some(spawn_tied(&mut etcd).context("starting etcd")?);
        let p = |f: &str| dir.join(f).display().to_string();
        let mut apiserver = Command::new(self.assets.join("kube-apiserver"));
        apiserver
            .args([
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                // No controller-manager creates the default ServiceAccount (as envtest does).
                "--disable-admission-plugins=ServiceAccount".into(),
                format!("--cert-dir={}", p("certs")),
            ])
            .stdin(Stdio::null())
            .stdout(log("kube-apiserver.log")?)
            .stderr(log("kube-apiserver.log")?);
        self.apiserver = Some(spawn_tied(&mut apiserver).context("starting kube-apiserver")?);
        self.wait_ready(Duration::from_secs(90))
    }

    /// Stops kube-apiserver and etcd (SIGTERM by PID, SIGKILL after 15 s) and waits until both
    /// are gone, so that [`ControlPlane::start_again`] can bind the same ports. The data
    /// directory stays.
    pub fn stop(&mut self) {
        // The API server first: it talks to etcd while stopping.
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            stop_child(child);
        }
    }

    /// Whether kube-apiserver and etcd run (not stopped, not exited).
    pub fn running(&mut self) -> bool {
        [&mut self.apiserver, &mut self.etcd]
            .into_iter()
            .all(|c| c.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            for (name, child) in [
                ("etcd", &mut self.etcd),
                ("kube-apiserver", &mut self.apiserver),
            ] {
                let Some(child) = child.as_mut() else {
                    bail!("{name} is not running");
                };
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{name} exited ({status}) during start; its log:\n{}",
                        log_tail(&self.dir.join(format!("{name}.log")), 30)
                    );
                }
            }
            let ok = Command::new(&self.kubectl)
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(["get", "--raw", "/readyz"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if t0.elapsed() > limit {
                bail!(
                    "kube-apiserver not ready after {limit:?}; its log:\n{}",
                    log_tail(&self.dir.join("kube-apiserver.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs kubectl against this control plane; `stdin` is fed to it (e.g. a manifest for
    /// `apply -f -`). Returns stdout, or the error with stderr.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use std::io::Write as _;
        let mut child = Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(text.as_bytes())?;
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        // A failing test shows why the API server misbehaved here, since its files go: a
        // control plane's directory (PKI, etcd data, logs) is never left behind.
        if std::thread::panicking() {
            for log in ["kube-apiserver.log", "etcd.log"] {
                let tail = log_tail(&self.dir.join(log), 20);
                if !tail.is_empty() {
                    eprintln!("--- last lines of {log} ---\n{tail}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawns `cmd` so that the kernel kills it when the thread that spawned it ends: a test
/// process that dies without unwinding (SIGKILL, abort, a harness timeout) leaves no etcd or
/// kube-apiserver behind. Call from the test's own thread.
fn spawn_tied(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn stop_child(mut child: Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the directories of control planes whose test process is gone (killed before its
/// drop ran): they hold nothing anyone can use.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // kill(pid, 0) fails with ESRCH when no such process exists.
        // SAFETY: signal 0 only checks for existence.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
