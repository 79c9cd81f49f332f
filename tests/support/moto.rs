//! A real moto server (AWS emulator) as a child process of the test, plus a counting TCP
//! pass-through to see how many `GetSecretValue` calls reach it.
//!
//! moto comes from the project's venv (`make venv`, tools/requirements.txt): `$PROXY_TEST_VENV`
//! if set, else `<repo>/.venv`. Each [`Moto`] listens on its own free port on 127.0.0.1 and is
//! killed when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::config::{Credentials, Region};

pub const REGION: &str = "us-east-1";

/// A running moto server; killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// The venv holding moto.
pub fn venv() -> PathBuf {
    std::env::var_os("PROXY_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"))
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

impl Moto {
    /// Starts moto and waits until it answers HTTP (up to 30 s).
    pub fn start() -> Moto {
        let venv = venv();
        let python = venv.join("bin").join("python");
        assert!(
            python.exists(),
            "moto is needed for this test but {} does not exist: run `make venv` (or set PROXY_TEST_VENV to a venv with moto[server])",
            python.display()
        );
        let port = free_port();
        let log = std::env::temp_dir().join(format!("moto-test-{}-{port}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).expect("create moto log file");
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log file"))
            .stderr(log_file)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "could not start moto with {} ({e}): run `make venv`",
                    python.display()
                )
            });
        let mut moto = Moto { child, port, log };
        moto.wait_ready(Duration::from_secs(30));
        moto
    }

    fn wait_ready(&mut self, limit: Duration) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "moto exited at start ({status}); is moto[server] installed in the venv? run `make venv`. Its output:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if http_answers(self.addr()) {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "moto did not answer on port {} within {limit:?}; output:\n{}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn http_answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// A Secrets Manager client of the real SDK, pointed at `endpoint` with dummy credentials.
/// Retries are the SDK's defaults, as in the function.
pub async fn secrets_client(endpoint: &str) -> aws_sdk_secretsmanager::Client {
    let config = openai_lambda_proxy::transport::aws_config()
        .endpoint_url(endpoint)
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "moto-test",
        ))
        .load()
        .await;
    aws_sdk_secretsmanager::Client::new(&config)
}

/// A Secrets Manager client signing with these credentials (e.g. an IAM user's).
pub async fn secrets_client_as(
    endpoint: &str,
    credentials: Credentials,
) -> aws_sdk_secretsmanager::Client {
    let config = openai_lambda_proxy::transport::aws_config()
        .endpoint_url(endpoint)
        .region(Region::new(REGION))
        .credentials_provider(credentials)
        .load()
        .await;
    aws_sdk_secretsmanager::Client::new(&config)
}

/// One IAM query-protocol call to moto, unsigned (moto checks nothing until [`enforce_iam`]).
async fn iam_call(moto: &Moto, params: &[(&str, &str)]) -> String {
    let mut form = String::from("Version=2010-05-08");
    for (k, v) in params {
        form.push_str(&format!("&{k}={v}"));
    }
    let resp = openai_lambda_proxy::transport::client_builder()
        .build()
        .unwrap()
        .post(moto.endpoint())
        .header("content-type", "application/x-www-form-urlencoded")
        // moto routes by the credential scope's service name.
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
        )
        .body(form)
        .send()
        .await
        .expect("IAM call to moto");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "IAM call to moto failed ({status}): {text}"
    );
    text
}

fn xml_field<'a>(xml: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = xml.find(&open).expect("tag in moto's answer") + open.len();
    let end = start + xml[start..].find('<').expect("closing tag");
    &xml[start..end]
}

/// Creates an IAM user with no policy at all and returns its access key (so once IAM is
/// enforced, every call it makes is denied with AWS's own `AccessDenied` text, which names the
/// account and the user's ARN).
pub async fn iam_user_without_policies(moto: &Moto, name: &str) -> Credentials {
    iam_call(moto, &[("Action", "CreateUser"), ("UserName", name)]).await;
    let xml = iam_call(moto, &[("Action", "CreateAccessKey"), ("UserName", name)]).await;
    Credentials::new(
        xml_field(&xml, "AccessKeyId"),
        xml_field(&xml, "SecretAccessKey"),
        None,
        None,
        "moto-iam-user",
    )
}

/// From now on moto checks every request's signature and the caller's IAM policies.
pub async fn enforce_iam(moto: &Moto) {
    let resp = openai_lambda_proxy::transport::client_builder()
        .build()
        .unwrap()
        .post(format!("{}/moto-api/reset-auth", moto.endpoint()))
        .body("0")
        .send()
        .await
        .expect("moto reset-auth");
    assert!(
        resp.status().is_success(),
        "moto reset-auth: {}",
        resp.status()
    );
}

/// Creates a secret with a string value; returns its ARN.
pub async fn create_secret(
    client: &aws_sdk_secretsmanager::Client,
    name: &str,
    value: &str,
) -> String {
    let out = client
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .expect("CreateSecret on moto");
    out.arn().expect("CreateSecret returns an ARN").to_owned()
}

/// Gives the secret a new current value (what a rotation does).
pub async fn put_secret_value(client: &aws_sdk_secretsmanager::Client, id: &str, value: &str) {
    client
        .put_secret_value()
        .secret_id(id)
        .secret_string(value)
        .send()
        .await
        .expect("PutSecretValue on moto");
}

/// A TCP pass-through in front of an upstream (moto) that counts the `GetSecretValue` requests
/// it forwards (the AWS JSON protocol names the operation in `X-Amz-Target`). Runs on the
/// current tokio runtime; it stops with it.
pub struct CountingPassThrough {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
}

const NEEDLE: &[u8] = b"secretsmanager.GetSecretValue";

impl CountingPassThrough {
    pub async fn start(upstream: SocketAddr) -> CountingPassThrough {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        // Bytes kept from the previous read so a needle split across reads counts.
                        let mut carry: Vec<u8> = Vec::new();
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            carry.extend_from_slice(&buf[..n]);
                            let hits = carry.windows(NEEDLE.len()).filter(|w| *w == NEEDLE).count();
                            counter.fetch_add(hits, Ordering::SeqCst);
                            let keep = carry.len().min(NEEDLE.len() - 1);
                            carry.drain(..carry.len() - keep);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        use tokio::io::AsyncWriteExt;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        CountingPassThrough { addr, count }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GetSecretValue` requests forwarded so far.
    pub fn get_secret_value_calls(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// A listener that accepts connections and never answers: an emulator that hangs.
pub async fn black_hole() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}
