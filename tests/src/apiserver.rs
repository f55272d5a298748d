//! A real Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1, for the tests that need
//! one. Found through the envtest convention: `KUBEBUILDER_ASSETS` names a directory holding
//! `etcd` and `kube-apiserver` (and optionally `kubectl`; else the one on PATH is used). When it
//! is not set, [`ControlPlane::start_or_skip`] prints one loud line and the test skips: these
//! machines cannot always provide an API server, everything else still runs.
//!
//! Each control plane is private to its test: its own data directory, its own throwaway PKI
//! (made with openssl), its own free loopback ports; stopped by PID on drop.

use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "vpcnet-test-admin-token";

pub struct ControlPlane {
    dir: PathBuf,
    etcd: Child,
    apiserver: Child,
    pub url: String,
    /// An admin kubeconfig (bearer token, the test CA).
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
}

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
        let loud = |line: String| {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "{line}");
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
        let dir = std::env::temp_dir().join(format!(
            "vpcnet-apiserver-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        make_pki(&dir).context("making the test PKI (openssl)")?;
        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let log =
            |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
        let etcd = Command::new(assets.join("etcd"))
            .args([
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
            .stderr(log("etcd.log")?)
            .spawn()
            .context("starting etcd")?;
        let p = |f: &str| dir.join(f).display().to_string();
        let apiserver = Command::new(assets.join("kube-apiserver"))
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
            .stderr(log("kube-apiserver.log")?)
            .spawn()
            .context("starting kube-apiserver")?;
        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
                ca = p("ca.crt")
            ),
        )?;
        let kubectl = if assets.join("kubectl").exists() {
            assets.join("kubectl")
        } else {
            PathBuf::from("kubectl")
        };
        let mut cp = ControlPlane {
            dir,
            etcd,
            apiserver,
            url,
            kubeconfig,
            kubectl,
        };
        cp.wait_ready(Duration::from_secs(90))?;
        Ok(cp)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            for (name, child) in [
                ("etcd", &mut self.etcd),
                ("kube-apiserver", &mut self.apiserver),
            ] {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{name} exited ({status}) during start; its log is in {}",
                        self.dir.display()
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
                    "kube-apiserver not ready after {limit:?}; logs in {}",
                    self.dir.display()
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
        // Our own children, by PID: the API server first (it talks to etcd while stopping).
        for child in [&mut self.apiserver, &mut self.etcd] {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let t0 = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
