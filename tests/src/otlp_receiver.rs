//! An OTLP metrics receiver for the tests, on the official protobuf definitions: gRPC
//! (`MetricsService/Export`) and HTTP/protobuf (`POST /v1/metrics`), on one loopback port each.
//! It can behave as production collectors do: TLS with a required client certificate, a message
//! size limit, RESOURCE_EXHAUSTED (gRPC, with RetryInfo) or 429 (HTTP, with Retry-After) for the
//! first requests, and `partial_success` answers.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    common::v1::{KeyValue, any_value},
    metrics::v1::{Metric, ResourceMetrics, metric::Data, number_data_point},
};
use prost::Message;

/// How the receiver answers; the default accepts everything over plain TCP.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// PEM files: the server's certificate and key, and the CA client certificates must chain to.
    pub tls: Option<TlsFiles>,
    /// The first this many requests are refused as retryable: gRPC RESOURCE_EXHAUSTED with a
    /// RetryInfo of `retry_after`, HTTP 429 with `Retry-After` in whole seconds of it.
    pub refuse_first: usize,
    pub retry_after: Duration,
    /// Larger requests are refused: gRPC's `max_decoding_message_size`, HTTP's body limit (413).
    pub max_message_bytes: Option<usize>,
    /// The first this many accepted requests are answered with a `partial_success` rejecting
    /// `rejected_points` points each.
    pub partial_first: usize,
    pub rejected_points: i64,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub certificate: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    /// The encoded request's size, after decompression.
    pub bytes: usize,
    /// The content encoding (`identity` when none was named).
    pub encoding: String,
    /// Refused as retryable (`refuse_first`).
    pub refused: bool,
}

#[derive(Default)]
struct Shared {
    behaviour: Behaviour,
    accepted: Mutex<Vec<ExportMetricsServiceRequest>>,
    arrivals: Mutex<Vec<Arrival>>,
    connections: AtomicUsize,
}

impl Shared {
    /// Records a decoded request; `Err` when it is one of the first ones to refuse.
    fn arrive(
        &self,
        request: ExportMetricsServiceRequest,
        encoding: String,
    ) -> Result<ExportMetricsServiceResponse, ()> {
        let mut arrivals = self.arrivals.lock().unwrap();
        let refused = arrivals.iter().filter(|a| a.refused).count() < self.behaviour.refuse_first;
        arrivals.push(Arrival {
            at: Instant::now(),
            bytes: request.encoded_len(),
            encoding,
            refused,
        });
        if refused {
            return Err(());
        }
        let mut accepted = self.accepted.lock().unwrap();
        accepted.push(request);
        let partial = accepted.len() <= self.behaviour.partial_first;
        Ok(ExportMetricsServiceResponse {
            partial_success: partial.then(|| ExportMetricsPartialSuccess {
                rejected_data_points: self.behaviour.rejected_points,
                error_message: "points refused by the test receiver".to_owned(),
            }),
        })
    }
}

/// A running receiver; it stops with the test process.
pub struct Receiver {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

struct Grpc(Arc<Shared>);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        use tonic_types::{ErrorDetails, StatusExt};
        let encoding = request
            .metadata()
            .get("grpc-encoding")
            .and_then(|e| e.to_str().ok())
            .unwrap_or("identity")
            .to_owned();
        match self.0.arrive(request.into_inner(), encoding) {
            Ok(response) => Ok(tonic::Response::new(response)),
            Err(()) => Err(tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                "the test receiver is full",
                ErrorDetails::with_retry_info(Some(self.0.behaviour.retry_after)),
            )),
        }
    }
}

async fn http_export(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::{http::StatusCode, response::IntoResponse};
    let encoding = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|e| e.to_str().ok())
        .unwrap_or("identity")
        .to_owned();
    let body = match encoding.as_str() {
        "gzip" => {
            use std::io::Read;
            let mut plain = Vec::new();
            if let Err(e) = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut plain) {
                return (StatusCode::BAD_REQUEST, format!("not gzip: {e}")).into_response();
            }
            Bytes::from(plain)
        }
        "identity" => body,
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown Content-Encoding {other}"),
            )
                .into_response();
        }
    };
    let request = match ExportMetricsServiceRequest::decode(body) {
        Ok(request) => request,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match shared.arrive(request, encoding) {
        Ok(response) => response.encode_to_vec().into_response(),
        Err(()) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(
                axum::http::header::RETRY_AFTER,
                shared.behaviour.retry_after.as_secs().to_string(),
            )],
            "the test receiver is full",
        )
            .into_response(),
    }
}

/// The listener of one server: counts connections, and with TLS completes each handshake
/// (requiring a client certificate) before handing the connection on.
struct CountingListener {
    tcp: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
}

enum Connection {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl CountingListener {
    async fn next(&mut self) -> (Connection, SocketAddr) {
        loop {
            let Ok((stream, peer)) = self.tcp.accept().await else {
                continue;
            };
            self.shared.connections.fetch_add(1, Ordering::Relaxed);
            match &self.tls {
                None => return (Connection::Plain(stream), peer),
                // A client without an acceptable certificate fails here and is dropped.
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => return (Connection::Tls(Box::new(tls)), peer),
                    Err(e) => eprintln!("OTLP receiver: TLS handshake refused: {e}"),
                },
            }
        }
    }
}

impl axum::serve::Listener for CountingListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// A rustls server configuration that requires a client certificate signed by `files.client_ca`.
fn server_tls(files: &TlsFiles, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates: Vec<CertificateDer> = CertificateDer::pem_file_iter(&files.certificate)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.client_ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl Receiver {
    /// Starts both servers, accepting everything; `grpc_port` 0 picks a free port.
    pub fn start(grpc_port: u16) -> Self {
        Self::with(grpc_port, Behaviour::default())
    }

    /// Starts both servers behaving as `behaviour` says.
    pub fn with(grpc_port: u16, behaviour: Behaviour) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let tls = behaviour.tls.clone();
        let max = behaviour.max_message_bytes;
        let shared = Arc::new(Shared {
            behaviour,
            ..Shared::default()
        });
        let (grpc, http) = runtime.block_on(async {
            let listener = |port: u16, alpn: &'static [&'static [u8]]| {
                let (shared, tls) = (shared.clone(), tls.clone());
                async move {
                    let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port))
                        .await
                        .expect("bind the OTLP receiver");
                    CountingListener {
                        tcp,
                        tls: tls.as_ref().map(|files| server_tls(files, alpn)),
                        shared,
                    }
                }
            };
            let grpc_listener = listener(grpc_port, &[b"h2"]).await;
            let http_listener = listener(0, &[b"http/1.1"]).await;
            let addresses = (
                grpc_listener.tcp.local_addr().unwrap(),
                http_listener.tcp.local_addr().unwrap(),
            );
            let mut service = MetricsServiceServer::new(Grpc(shared.clone()))
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
            if let Some(max) = max {
                service = service.max_decoding_message_size(max);
            }
            let incoming = futures_util::stream::unfold(grpc_listener, |mut listener| async {
                let (connection, _) = listener.next().await;
                Some((Ok::<_, std::io::Error>(connection), listener))
            });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
            let app = Router::new()
                .route("/v1/metrics", post(http_export))
                .layer(axum::extract::DefaultBodyLimit::max(
                    max.unwrap_or(64 << 20),
                ))
                .with_state(shared.clone());
            tokio::spawn(async move { axum::serve(http_listener, app).await });
            addresses
        });
        Self {
            grpc,
            http,
            shared,
            _runtime: runtime,
        }
    }

    /// Every request accepted so far.
    pub fn requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.shared.accepted.lock().unwrap().clone()
    }

    /// Every request that arrived (accepted or refused), in order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.arrivals.lock().unwrap().clone()
    }

    /// The content encoding of every request received so far, in order.
    pub fn encodings(&self) -> Vec<String> {
        self.arrivals().into_iter().map(|a| a.encoding).collect()
    }

    /// TCP connections accepted by both servers together.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Waits until `done` holds for the requests received, or panics after `limit`.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[ExportMetricsServiceRequest]) -> bool,
    ) {
        let seen = crate::wait::poll(limit, || done(&self.requests()).then_some(()));
        assert!(
            seen.is_some(),
            "OTLP receiver: {what} not seen within {limit:?}"
        );
    }
}

/// The metric named `name` in a request, in the first Resource that has it: for the agent's own
/// metrics, or to see whether a request carries a metric at all.
pub fn metric<'a>(request: &'a ExportMetricsServiceRequest, name: &str) -> Option<&'a Metric> {
    request
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == name)
}

/// The Resource of tenant `tenant` (its `vmtrace.tenant` attribute) in a request.
pub fn tenant_resource<'a>(
    request: &'a ExportMetricsServiceRequest,
    tenant: &str,
) -> Option<&'a ResourceMetrics> {
    request.resource_metrics.iter().find(|r| {
        r.resource
            .as_ref()
            .is_some_and(|res| attribute(&res.attributes, "vmtrace.tenant") == Some(tenant))
    })
}

/// The metric named `name` of tenant `tenant` (in any of its Resources: a split request may cut
/// one tenant's metrics over several).
pub fn tenant_metric<'a>(
    request: &'a ExportMetricsServiceRequest,
    tenant: &str,
    name: &str,
) -> Option<&'a Metric> {
    request
        .resource_metrics
        .iter()
        .filter(|r| {
            r.resource
                .as_ref()
                .is_some_and(|res| attribute(&res.attributes, "vmtrace.tenant") == Some(tenant))
        })
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == name)
}

/// The time of a request's data points (every point of one export has the same).
pub fn export_time(request: &ExportMetricsServiceRequest) -> Option<u64> {
    let metric = request
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .next()?;
    match metric.data.as_ref()? {
        Data::Sum(s) => s.data_points.first().map(|p| p.time_unix_nano),
        Data::Gauge(g) => g.data_points.first().map(|p| p.time_unix_nano),
        Data::Histogram(h) => h.data_points.first().map(|p| p.time_unix_nano),
        _ => None,
    }
}

/// The requests grouped into exports (one or more requests, when split, with the same time),
/// each merged into one request, in order.
pub fn exports(
    requests: &[ExportMetricsServiceRequest],
) -> Vec<(usize, ExportMetricsServiceRequest)> {
    let mut exports: Vec<(Option<u64>, usize, ExportMetricsServiceRequest)> = Vec::new();
    for request in requests {
        let time = export_time(request);
        match exports.last_mut() {
            Some((t, parts, merged)) if *t == time => {
                *parts += 1;
                merged
                    .resource_metrics
                    .extend(request.resource_metrics.clone());
            }
            _ => exports.push((time, 1, request.clone())),
        }
    }
    exports
        .into_iter()
        .map(|(_, parts, merged)| (parts, merged))
        .collect()
}

/// The integer value of tenant `tenant`'s data point of `name` with all of `wanted`.
pub fn tenant_int(
    request: &ExportMetricsServiceRequest,
    tenant: &str,
    name: &str,
    wanted: &[(&str, &str)],
) -> Option<i64> {
    int_value(tenant_metric(request, tenant, name)?, wanted)
}

/// A string attribute's value.
pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

/// The integer value of the sum or gauge data point of `metric` whose attributes include all of
/// `wanted`.
pub fn int_value(metric: &Metric, wanted: &[(&str, &str)]) -> Option<i64> {
    let points = match metric.data.as_ref()? {
        Data::Sum(sum) => &sum.data_points,
        Data::Gauge(gauge) => &gauge.data_points,
        _ => return None,
    };
    points
        .iter()
        .find(|p| {
            wanted
                .iter()
                .all(|(k, v)| attribute(&p.attributes, k) == Some(v))
        })
        .and_then(|p| match p.value? {
            number_data_point::Value::AsInt(v) => Some(v),
            number_data_point::Value::AsDouble(v) => Some(v as i64),
        })
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, made by
/// openssl in `dir`: `ca.crt`, `server.crt`/`.key`, `client.crt`/`.key`.
pub fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=vmtrace test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=vmtrace")] {
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ]);
    }
}
