//! A real Kubernetes API server for the `kube_*` tests: etcd and kube-apiserver 1.20.2 on
//! loopback, with a throw-away CA and serving certificate, token authentication (one
//! `system:masters` token), RBAC, service-account keys and the EndpointSlice v1 CRD.
//!
//! The binary comes from `cargo xtask kube-apiserver` (which `cargo xtask test` runs first and
//! exports as `XLB_KUBE_APISERVER`). Without it the tests FAIL saying how to build it: a
//! missing server must never turn into silently skipped coverage.
//!
//! Why a CRD for EndpointSlice: 1.20 serves only `discovery.k8s.io/v1beta1` (v1 is 1.21+).
//! The server is started with that version off and a CRD `endpointslices.discovery.k8s.io`
//! serves v1 with the v1 schema, so typed v1 clients and watches work unchanged (watch,
//! resourceVersion and 410 semantics are the real server's; validation is the schema's).
//!
//! [`KubeServer::shared`] starts one server per test process; [`KubeServer::start`] gives a
//! test its own (for restarts and compaction). Children get `PR_SET_PDEATHSIG`, so they die
//! with the thread that owns them even if the test process is killed.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::agent_support::wait_for;

/// A small multi-threaded runtime for the Kubernetes tests (kube-rs needs one).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
use crate::netns::unique_name;

/// Version the xtask builds; part of the cache path.
pub const VERSION: &str = "1.20.2";
/// The bearer token of the `system:masters` test user.
pub const ADMIN_TOKEN: &str = "xlb-test-admin-token";

/// The kube-apiserver binary: `XLB_KUBE_APISERVER`, else the xtask's cache. Panics with the
/// command to run when neither exists.
pub fn apiserver_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("XLB_KUBE_APISERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "XLB_KUBE_APISERVER={} does not exist; run `cargo xtask kube-apiserver`",
            path.display()
        );
        return path;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or("/root".into())).join(".cargo")
        });
    let cached = cargo_home.join(format!("xlb-setup/kube-apiserver-{VERSION}/kube-apiserver"));
    assert!(
        cached.exists(),
        "the Kubernetes tests need a kube-apiserver: run `cargo xtask kube-apiserver` (builds \
         {VERSION} once, ~5 min, cached at {}) or `cargo xtask test`, which does it first",
        cached.display()
    );
    cached
}

fn require_tool(name: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} missing: `cargo xtask kube-apiserver` installs etcd-server, etcd-client, curl",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// Spawns with a parent-death signal so no etcd/apiserver outlives the test that owns it.
fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("create log file");
    let err = file.try_clone().expect("clone log file");
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// How the server is started.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// `--watch-cache=false`: watches are served from etcd, so an `etcdctl compact` makes
    /// resuming from an old resourceVersion answer 410 Gone.
    pub no_watch_cache: bool,
    /// Run etcd and the API server inside this network namespace (its loopback), so an agent
    /// in the namespace reaches them; [`KubeServer::client`] is then unusable from the test,
    /// use [`KubeServer::kubectl`].
    pub netns: Option<String>,
}

/// `program`, entered into `netns` if given.
fn command(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// etcd + kube-apiserver on loopback; both killed and the directory removed on drop.
pub struct KubeServer {
    /// Scratch directory: certificates, kubeconfig, etcd data, logs.
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// A kubeconfig for the admin token (for the agent via `KUBECONFIG`, and kubectl).
    pub kubeconfig: PathBuf,
    /// `http://127.0.0.1:PORT` of etcd.
    pub etcd_endpoint: String,
    etcd: Mutex<Child>,
    apiserver: Mutex<Option<Child>>,
    apiserver_args: Vec<String>,
    restarts: Mutex<u32>,
    netns: Option<String>,
}

impl KubeServer {
    /// The server shared by all tests of this process, started on first use.
    pub fn shared() -> &'static KubeServer {
        static SHARED: OnceLock<&'static KubeServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Started from a thread that lives as long as the process: the children's
            // parent-death signal is tied to the thread that forked them.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let server: &'static KubeServer =
                    Box::leak(Box::new(KubeServer::start(KubeOptions::default())));
                register_cleanup(server.dir.clone());
                tx.send(server).expect("send shared server");
                loop {
                    std::thread::park();
                }
            });
            rx.recv()
                .expect("the shared kube-apiserver failed to start (see the panic above)")
        })
    }

    /// A server of the test's own.
    pub fn start(opts: KubeOptions) -> KubeServer {
        // Fails early, with the command to run, when the binary is missing.
        apiserver_binary();
        let etcd_bin = require_tool("etcd");
        require_tool("etcdctl");
        require_tool("curl");
        let dir = std::env::temp_dir().join(unique_name("xlb-kube-"));
        std::fs::create_dir_all(&dir).expect("create kube scratch dir");
        write_pki(&dir);

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_endpoint = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let ns = opts.netns.as_deref();
        let etcd = spawn(
            command(ns, etcd_bin)
                .arg("--name=xlb-test")
                .arg(format!("--data-dir={}", dir.join("etcd").display()))
                .arg(format!("--listen-client-urls={etcd_endpoint}"))
                .arg(format!("--advertise-client-urls={etcd_endpoint}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=xlb-test={peer}"))
                .arg("--log-level=warn"),
            &dir.join("etcd.log"),
        );

        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let p = |name: &str| dir.join(name).display().to_string();
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_endpoint}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("serving.pem")),
            format!("--tls-private-key-file={}", p("serving-key.pem")),
            format!("--client-ca-file={}", p("ca.pem")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", p("sa-pub.pem")),
            format!("--service-account-signing-key-file={}", p("sa-key.pem")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            // 1.20 serves EndpointSlice only as v1beta1; the v1 CRD takes the group over.
            "--runtime-config=discovery.k8s.io/v1beta1=false".into(),
            format!("--watch-cache={}", !opts.no_watch_cache),
            "--enable-priority-and-fairness=false".into(),
            "--v=1".into(),
        ];
        let mut server = KubeServer {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            url,
            etcd_endpoint,
            etcd: Mutex::new(etcd),
            apiserver: Mutex::new(None),
            apiserver_args,
            restarts: Mutex::new(0),
            netns: opts.netns.clone(),
        };
        server.write_kubeconfig();
        server.start_apiserver();
        server.install_endpointslice_crd();
        server
    }

    /// Starts kube-apiserver (again) and waits for `/readyz`.
    pub fn start_apiserver(&self) {
        let mut slot = self.apiserver.lock().expect("apiserver lock");
        assert!(slot.is_none(), "kube-apiserver is already running");
        let n = {
            let mut r = self.restarts.lock().expect("restarts lock");
            *r += 1;
            *r
        };
        let log = self.dir.join(format!("kube-apiserver.{n}.log"));
        *slot = Some(spawn(
            command(self.netns.as_deref(), apiserver_binary()).args(&self.apiserver_args),
            &log,
        ));
        drop(slot);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        loop {
            if self.get("/readyz").as_deref() == Some("ok") {
                break;
            }
            if let Some(status) = self
                .apiserver
                .lock()
                .expect("apiserver lock")
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "kube-apiserver exited with {status}; log {}:\n{}",
                    log.display(),
                    tail(&log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready after 60 s; log {}:\n{}",
                log.display(),
                tail(&log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills kube-apiserver (etcd keeps the data).
    pub fn stop_apiserver(&self) {
        if let Some(mut child) = self.apiserver.lock().expect("apiserver lock").take() {
            kill(&mut child);
        }
    }

    /// `GET path` with the admin token; the body on 2xx.
    pub fn get(&self, path: &str) -> Option<String> {
        let out = command(self.netns.as_deref(), "curl")
            .args(["-sf", "--max-time", "5", "--cacert"])
            .arg(self.dir.join("ca.pem"))
            .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .arg(format!("{}{path}", self.url))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Compacts etcd up to its current revision, so watches from older resourceVersions
    /// get 410 Gone (with `no_watch_cache`).
    pub fn compact_etcd(&self) {
        let status = command(self.netns.as_deref(), "etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.etcd_endpoint,
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .output()
            .expect("run etcdctl endpoint status");
        let text = String::from_utf8_lossy(&status.stdout);
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("etcdctl endpoint status: {e}: {text}"));
        let revision = json[0]["Status"]["header"]["revision"]
            .as_u64()
            .unwrap_or_else(|| panic!("no revision in {text}"));
        let out = command(self.netns.as_deref(), "etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.etcd_endpoint,
                "compact",
                &revision.to_string(),
            ])
            .output()
            .expect("run etcdctl compact");
        assert!(
            out.status.success(),
            "etcdctl compact {revision}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A client with the admin token (needs a tokio runtime).
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("kubeconfig to client config");
        kube::Client::try_from(config).expect("build kube client")
    }

    /// Runs `kubectl ARGS` against this server; (success, stdout+stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = command(self.netns.as_deref(), "kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["--request-timeout=20s"])
            .args(args)
            .output()
            .expect("kubectl is required for this test (installed on this machine kind)");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn write_kubeconfig(&mut self) {
        let ca = std::fs::read(self.dir.join("ca.pem")).expect("read ca.pem");
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "xlb-test", "cluster": {
                "server": self.url,
                "certificate-authority-data": base64(&ca),
            }}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "xlb-test", "context": {"cluster": "xlb-test", "user": "admin"}}],
            "current-context": "xlb-test",
        });
        // JSON is YAML: kubeconfig readers take it as is.
        std::fs::write(&self.kubeconfig, config.to_string()).expect("write kubeconfig");
    }

    fn install_endpointslice_crd(&self) {
        let crd = self.dir.join("endpointslice-crd.json");
        std::fs::write(&crd, endpointslice_crd().to_string()).expect("write CRD");
        let (ok, out) = self.kubectl(&["apply", "-f", &crd.display().to_string()]);
        assert!(ok, "installing the EndpointSlice v1 CRD failed: {out}");
        wait_for(
            "the EndpointSlice v1 CRD to be served",
            Duration::from_secs(30),
            || {
                self.get("/apis/discovery.k8s.io/v1/endpointslices")
                    .map(|_| ())
            },
        );
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Ok(mut etcd) = self.etcd.lock() {
            kill(&mut etcd);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Removes the shared server's directory at process exit (statics are never dropped; the
/// processes themselves die by their parent-death signal).
fn register_cleanup(dir: PathBuf) {
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        if let Ok(dirs) = DIRS.lock() {
            for dir in dirs.iter() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    let mut dirs = DIRS.lock().expect("cleanup lock");
    if dirs.is_empty() {
        // SAFETY: registers a plain function; it only touches a static.
        unsafe { libc::atexit(cleanup) };
    }
    dirs.push(dir);
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// CA, serving certificate for 127.0.0.1, service-account key, token file.
fn write_pki(dir: &Path) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "xlb kube test CA");
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("serving params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let key = rcgen::KeyPair::generate().expect("serving key");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("serving cert");
    let sa_key = rcgen::KeyPair::generate().expect("service-account key");
    let write =
        |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write pki file");
    write("ca.pem", &ca.pem());
    write("serving.pem", &cert.pem());
    write("serving-key.pem", &key.serialize_pem());
    write("sa-key.pem", &sa_key.serialize_pem());
    // The verifying side wants the public key: 1.20 reads no public key out of PKCS#8.
    write("sa-pub.pem", &sa_key.public_key_pem());
    write(
        "tokens.csv",
        &format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
    );
}

/// `endpointslices.discovery.k8s.io` serving v1 with the v1 schema (see the module docs).
fn endpointslice_crd() -> serde_json::Value {
    use serde_json::json;
    let string = json!({"type": "string"});
    let boolean = json!({"type": "boolean"});
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "endpointslices.discovery.k8s.io",
            // *.k8s.io groups are protected; test servers may claim them with this marker.
            "annotations": {"api-approved.kubernetes.io": "unapproved, test server stands in for 1.21's built-in v1"},
        },
        "spec": {
            "group": "discovery.k8s.io",
            "scope": "Namespaced",
            "names": {"plural": "endpointslices", "singular": "endpointslice",
                      "kind": "EndpointSlice", "listKind": "EndpointSliceList"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["addressType", "endpoints"],
                    "properties": {
                        "apiVersion": string, "kind": string, "metadata": {"type": "object"},
                        "addressType": {"type": "string", "enum": ["IPv4", "IPv6", "FQDN"]},
                        "endpoints": {"type": "array", "items": {
                            "type": "object",
                            "required": ["addresses"],
                            "properties": {
                                "addresses": {"type": "array", "items": string, "minItems": 1, "maxItems": 100},
                                "conditions": {"type": "object", "properties": {
                                    "ready": boolean, "serving": boolean, "terminating": boolean}},
                                "hostname": string, "nodeName": string, "zone": string,
                                "targetRef": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                "deprecatedTopology": {"type": "object", "additionalProperties": string},
                                "hints": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                            },
                        }, "maxItems": 1000},
                        "ports": {"type": "array", "items": {
                            "type": "object",
                            "properties": {
                                "name": string, "protocol": string, "appProtocol": string,
                                "port": {"type": "integer", "format": "int32"},
                            },
                        }},
                    },
                }},
            }],
        },
    })
}

/// Helpers for tests that drive the Kubernetes source in-process.
pub mod source {
    use std::time::{Duration, Instant};

    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, DeleteParams, PostParams};
    use lb_userspace::kubernetes::source::{SourceOptions, Update};
    use lb_userspace::kubernetes::translate::{CLASS_ANNOTATION, TranslateOptions};
    use lb_userspace::model::{BackendState, VipSpec};
    use tokio::sync::mpsc::Receiver;

    /// Source options for a test: its own class (tests share a server and must not see each
    /// other's Services), its own Lease, a 10 s lease, the 192.0.2.0/28 pool.
    pub fn options(class: &str, identity: &str) -> SourceOptions {
        let mut opts = SourceOptions::new(
            TranslateOptions {
                class: class.into(),
                claim_classless: false,
                pools: vec!["192.0.2.0/28".parse().expect("pool")],
            },
            identity.into(),
        );
        opts.lease_name = format!("xlb-{}", class.replace(['/', '.'], "-"));
        opts.lease_duration = Duration::from_secs(10);
        opts
    }

    /// Waits (bounded) for an update whose translation satisfies `check`; returns it.
    pub async fn wait_update(
        rx: &mut Receiver<Update>,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Update) -> bool,
    ) -> Update {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(mut update)) => {
                    // What the agent does once it has applied an update: the source may
                    // write the statuses it decided.
                    update.applied();
                    if check(&update) {
                        return update;
                    }
                    last = Some(update);
                }
                Ok(None) => panic!("the source ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}; last update: {:#?}",
                    last.map(|u| u.translation)
                ),
            }
        }
    }

    /// (address, draining?) of a VIP's backends, sorted.
    pub fn backends(vip: &VipSpec) -> Vec<(String, bool)> {
        let mut out: Vec<_> = vip
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.state == BackendState::Draining))
            .collect();
        out.sort();
        out
    }

    /// The VIP named `name` in the update, if any.
    pub fn vip<'a>(update: &'a Update, name: &str) -> Option<&'a VipSpec> {
        update
            .translation
            .desired
            .vips
            .iter()
            .map(|v| &**v)
            .find(|v| v.name == name)
    }

    /// A LoadBalancer Service of `class` with an `http` TCP port 80; `extra` merges in.
    pub fn service(namespace: &str, name: &str, class: &str, extra: serde_json::Value) -> Service {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": namespace, "name": name,
                         "annotations": {CLASS_ANNOTATION: class}},
            "spec": {"type": "LoadBalancer",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        });
        merge(&mut v, extra);
        serde_json::from_value(v).expect("service json")
    }

    /// An IPv4 EndpointSlice for `service` with an `http` port; endpoints as JSON.
    pub fn slice(
        namespace: &str,
        name: &str,
        service: &str,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": namespace, "name": name,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .expect("slice json")
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        match (base, extra) {
            (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
                for (k, v) in e {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, e) => *b = e,
        }
    }

    /// Creates the object, or replaces it (keeping its resourceVersion) if it exists.
    pub async fn put<K>(api: &Api<K>, object: &K)
    where
        K: kube::Resource
            + Clone
            + k8s_openapi::serde::de::DeserializeOwned
            + k8s_openapi::serde::Serialize
            + std::fmt::Debug,
    {
        let name = object.meta().name.clone().expect("object name");
        let mut object = object.clone();
        match api.get_opt(&name).await.expect("get object") {
            Some(current) => {
                object.meta_mut().resource_version = current.meta().resource_version.clone();
                api.replace(&name, &PostParams::default(), &object)
                    .await
                    .unwrap_or_else(|e| panic!("replace {name}: {e}"));
            }
            None => {
                api.create(&PostParams::default(), &object)
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
            }
        }
    }

    /// Deletes the object (absent is fine).
    pub async fn delete<K>(api: &Api<K>, name: &str)
    where
        K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => panic!("delete {name}: {e}"),
        }
    }
}

/// `xlb proxy --kubernetes` as a real process, for the `kube_proxy` tests.
pub mod proxy {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};

    use super::{KubeServer, kill, spawn};
    use crate::agent_support::xlb_binary;
    use crate::netns::unique_name;

    /// A running `xlb proxy --kubernetes`; killed and its directory removed on drop.
    pub struct ProxyProcess {
        child: Child,
        dir: PathBuf,
        /// Its stderr (logs).
        pub log: PathBuf,
        /// The plain-HTTP listener.
        pub http: SocketAddr,
        /// The TLS listener.
        pub https: SocketAddr,
    }

    impl ProxyProcess {
        /// Starts `xlb proxy --kubernetes ARGS` against `server` with loopback listeners on
        /// ephemeral ports and waits (bounded) until it serves its first translation.
        pub fn start(server: &KubeServer, args: &[&str]) -> Self {
            let dir = std::env::temp_dir().join(unique_name("xlb-kproxy-"));
            std::fs::create_dir_all(&dir).expect("create proxy scratch dir");
            let config = dir.join("proxy.toml");
            std::fs::write(
                &config,
                "access_log = true\n[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n\
                 metrics = \"127.0.0.1:0\"\nworkers = 2\n",
            )
            .expect("write proxy config");
            let log = dir.join("xlb-proxy.log");
            let mut cmd = Command::new(xlb_binary());
            cmd.arg("proxy")
                .arg("--kubernetes")
                .arg("--config")
                .arg(&config)
                .arg("--kubeconfig")
                .arg(&server.kubeconfig)
                .args(args)
                .env("XLB_LOG", "info")
                .env("NO_COLOR", "1");
            let child = spawn(&mut cmd, &log);
            let mut p = ProxyProcess {
                child,
                dir,
                log,
                http: "0.0.0.0:0".parse().expect("addr"),
                https: "0.0.0.0:0".parse().expect("addr"),
            };
            let line = p.wait_log("xlb proxy running", Duration::from_secs(30));
            p.http = listener(&line, "http=Some(");
            p.https = listener(&line, "https=Some(");
            p
        }

        /// Its config file (node settings: listeners, limits, …), re-read when it changes.
        pub fn config_path(&self) -> PathBuf {
            self.dir.join("proxy.toml")
        }

        /// The log so far.
        pub fn log_text(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// Waits until a log line contains `needle`; returns that line.
        pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
            let deadline = Instant::now() + timeout;
            loop {
                let text = self.log_text();
                if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                    return line.to_owned();
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("xlb proxy exited ({status}) before logging {needle:?}:\n{text}");
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {needle:?} in the xlb proxy log:\n{text}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn listener(line: &str, key: &str) -> SocketAddr {
        line.split(key)
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {key}ADDR) in {line:?}"))
    }

    impl Drop for ProxyProcess {
        fn drop(&mut self) {
            kill(&mut self.child);
            if std::thread::panicking() {
                // Without the access log (one line per request), which would push the
                // source's and the reloader's lines out of any readable tail.
                let text = self.log_text();
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("xlb::access"))
                    .collect();
                let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                eprintln!("xlb proxy log without the access log (tail):\n{tail}");
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Creates the namespace if it does not exist.
    pub async fn namespace(client: &kube::Client, name: &str) {
        let api: Api<Namespace> = Api::all(client.clone());
        if api.get_opt(name).await.expect("get namespace").is_none() {
            let ns: Namespace = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
            }))
            .expect("namespace json");
            api.create(&PostParams::default(), &ns)
                .await
                .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        }
    }
}
