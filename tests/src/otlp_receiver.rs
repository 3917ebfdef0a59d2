//! An OTLP metrics receiver for the tests, on the official protobuf definitions: gRPC
//! (`MetricsService/Export`) and HTTP/protobuf (`POST /v1/metrics`), on one loopback port each.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    common::v1::{KeyValue, any_value},
    metrics::v1::{Metric, metric::Data, number_data_point},
};
use prost::Message;

type Received = Arc<Mutex<Vec<ExportMetricsServiceRequest>>>;
/// The content encoding of each request received (`identity` when none was named).
type Encodings = Arc<Mutex<Vec<String>>>;

/// A running receiver; it stops with the test process.
pub struct Receiver {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    received: Received,
    encodings: Encodings,
    _runtime: tokio::runtime::Runtime,
}

struct Grpc(Received, Encodings);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let encoding = request
            .metadata()
            .get("grpc-encoding")
            .and_then(|e| e.to_str().ok())
            .unwrap_or("identity")
            .to_owned();
        self.1.lock().unwrap().push(encoding);
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn http_export(
    State((received, encodings)): State<(Received, Encodings)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Vec<u8>, (axum::http::StatusCode, String)> {
    let bad = |e: String| (axum::http::StatusCode::BAD_REQUEST, e);
    let encoding = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|e| e.to_str().ok())
        .unwrap_or("identity")
        .to_owned();
    let body = match encoding.as_str() {
        "gzip" => {
            use std::io::Read;
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut plain)
                .map_err(|e| bad(format!("not gzip: {e}")))?;
            Bytes::from(plain)
        }
        "identity" => body,
        other => return Err(bad(format!("unknown Content-Encoding {other}"))),
    };
    let request = ExportMetricsServiceRequest::decode(body).map_err(|e| bad(e.to_string()))?;
    encodings.lock().unwrap().push(encoding);
    received.lock().unwrap().push(request);
    Ok(ExportMetricsServiceResponse::default().encode_to_vec())
}

impl Receiver {
    /// Starts both servers; `grpc_port` 0 picks a free port.
    pub fn start(grpc_port: u16) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let received: Received = Arc::default();
        let encodings: Encodings = Arc::default();
        let (grpc, http) = runtime.block_on(async {
            let grpc_listener = tokio::net::TcpListener::bind(("127.0.0.1", grpc_port))
                .await
                .expect("bind gRPC");
            let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind HTTP");
            let addresses = (
                grpc_listener.local_addr().unwrap(),
                http_listener.local_addr().unwrap(),
            );
            let service = MetricsServiceServer::new(Grpc(received.clone(), encodings.clone()))
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(
                        grpc_listener,
                    )),
            );
            let app = Router::new()
                .route("/v1/metrics", post(http_export))
                .with_state((received.clone(), encodings.clone()));
            tokio::spawn(async move { axum::serve(http_listener, app).await });
            addresses
        });
        Self {
            grpc,
            http,
            received,
            encodings,
            _runtime: runtime,
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.received.lock().unwrap().clone()
    }

    /// The content encoding of every request received so far, in order.
    pub fn encodings(&self) -> Vec<String> {
        self.encodings.lock().unwrap().clone()
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

/// The metric named `name` in a request, if any.
pub fn metric<'a>(request: &'a ExportMetricsServiceRequest, name: &str) -> Option<&'a Metric> {
    request
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == name)
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
