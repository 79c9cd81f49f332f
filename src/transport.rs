//! One HTTP/TLS stack for every outbound call: reqwest (hyper 1) over rustls 0.23 with ring,
//! trusting Mozilla's root certificates compiled into the binary (`webpki-roots`).
//!
//! The OpenAI client ([`crate::upstream`]) and the AWS SDK clients (Secrets Manager,
//! CloudWatch, through [`AwsHttpClient`]) share one rustls configuration: a cold start reads
//! no certificate file and parses no PEM (loading the system roots was most of the init time,
//! once per stack), and the binary links a single HTTP and TLS implementation.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::{ReconnectMode, RetryConfig};

/// The rustls client configuration every connection uses (built once, on first use).
static TLS: LazyLock<rustls::ClientConfig> = LazyLock::new(|| {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // reqwest leaves ALPN to a preconfigured config: offer HTTP/2 as reqwest's own would.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
});

/// A reqwest client builder on the shared TLS configuration (clones share the root store).
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().tls_backend_preconfigured(TLS.clone())
}

/// The AWS SDK configuration every client here starts from (region, credentials and
/// `AWS_ENDPOINT_URL` from the environment, as Lambda sets them), sending through
/// [`aws_http_client`]. A connection is kept after a transient error: reqwest cannot close one
/// given connection (the SDK's "connection poisoning"), and a timed-out call drops its own.
pub fn aws_config() -> aws_config::ConfigLoader {
    let retry = RetryConfig::standard().with_reconnect_mode(ReconnectMode::ReuseAllConnections);
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(aws_http_client())
        .retry_config(retry)
}

/// The HTTP client to hand to `aws_config::ConfigLoader::http_client`: the AWS SDK sends its
/// requests through reqwest on the shared TLS configuration.
pub fn aws_http_client() -> SharedHttpClient {
    SharedHttpClient::new(AwsHttpClient::default())
}

/// An AWS SDK [`HttpClient`] over reqwest. One connector (one connection pool) per distinct
/// connect / read timeout pair, as the SDK expects its client to cache them.
#[derive(Debug, Default)]
pub struct AwsHttpClient {
    connectors: Mutex<Vec<(Timeouts, SharedHttpConnector)>>,
}

type Timeouts = (Option<Duration>, Option<Duration>);

impl HttpClient for AwsHttpClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let key = (settings.connect_timeout(), settings.read_timeout());
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = connectors.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let connector = SharedHttpConnector::new(AwsConnector::new(key));
        connectors.push((key, connector.clone()));
        connector
    }
}

/// Sends one SDK request with reqwest; bodies are small API documents, buffered both ways.
#[derive(Debug)]
struct AwsConnector {
    http: Result<reqwest::Client, Arc<reqwest::Error>>,
}

impl AwsConnector {
    fn new((connect, read): Timeouts) -> AwsConnector {
        // AWS answers directly; a redirect is not followed (it would carry the signature).
        let mut builder = client_builder().redirect(reqwest::redirect::Policy::none());
        if let Some(t) = connect {
            builder = builder.connect_timeout(t);
        }
        if let Some(t) = read {
            builder = builder.read_timeout(t);
        }
        AwsConnector {
            http: builder.build().map_err(Arc::new),
        }
    }
}

impl HttpConnector for AwsConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let http = self.http.clone();
        HttpConnectorFuture::new(async move {
            let http = http.map_err(|e| ConnectorError::other(Box::new(e), None))?;
            let (parts, body) = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(Box::new(e)))?
                .into_parts();
            let body = body
                .bytes()
                .map(bytes::Bytes::copy_from_slice)
                .ok_or_else(|| {
                    ConnectorError::user("streaming request bodies are not supported".into())
                })?;
            let response = http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(connector_error)?;
            let mut out = http::Response::builder().status(response.status());
            if let Some(headers) = out.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = response.bytes().await.map_err(connector_error)?;
            let out = out
                .body(SdkBody::from(body))
                .map_err(|e| ConnectorError::other(Box::new(e), None))?;
            HttpResponse::try_from(out).map_err(|e| ConnectorError::other(Box::new(e), None))
        })
    }
}

/// Timeouts and connection failures keep their kind: the SDK's retry policy relies on it.
fn connector_error(e: reqwest::Error) -> ConnectorError {
    if e.is_timeout() {
        ConnectorError::timeout(Box::new(e))
    } else if e.is_connect() || e.is_request() || e.is_body() {
        ConnectorError::io(Box::new(e))
    } else {
        ConnectorError::other(Box::new(e), None)
    }
}
