//! The Prometheus endpoint: `/metrics` (the metrics of [`crate::export::metrics`] under the usual
//! OpenTelemetry-to-Prometheus translation, in the text format 0.0.4 or OpenMetrics as the scraper
//! asks), `/api/timeline` (the agent's timeline, JSON),
//! `/healthz` (the agent is alive) and `/readyz` (the probes are attached and a first sample was
//! taken).
//!
//! Bounded whatever its clients do: at most [`MAX_CONNECTIONS`] connections are served (the next
//! [`MAX_REFUSED_CONNECTIONS`] are answered 503, more are closed at once), a connection that has
//! not sent a request's headers within [`HEADER_TIMEOUT`] is closed, and so is one whose response
//! is not sent within [`REQUEST_TIMEOUT`] of its request (a client that stops reading included).
//! At most [`MAX_RESPONSES_IN_PROGRESS`] responses of `/metrics` and `/api/timeline` are made or
//! sent at once, more are answered 503; `/healthz` and `/readyz` are answered whatever the load.
//! docs/export.md gives the figures and the memory a request can take.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::Result;
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use serde::Deserialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};
use tower::ServiceExt;

use tokio_rustls::TlsAcceptor;

use crate::{
    export::exposition::{Format, text_format},
    export::histogram::{self, BucketFactor},
    export::metrics::{Family, MetricKind, Value, probes_missing},
    export::web::{Auth, WebConfig},
    sample::timeline::{self, MovedOn, Points, Timeline},
};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections beyond [`MAX_CONNECTIONS`] answered `503` (and `/healthz`, so that a liveness probe
/// still gets through) before they are closed; connections beyond these are closed at once.
pub const MAX_REFUSED_CONNECTIONS: usize = 64;
/// How long a client has to send a request's headers, from when it connects or its previous
/// response was sent: a slow (or idle) client is cut off after that.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take, from its headers to the last byte of its response handed to the
/// kernel: its connection is closed after that.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Responses of `/metrics` and `/api/timeline` being made or sent at once; more are answered 503.
pub const MAX_RESPONSES_IN_PROGRESS: usize = 8;
/// How long a refused connection is kept, to read its request and answer it.
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// The buffers of a connection: its headers (larger ones are answered 431), and what is queued for
/// the kernel before the response body is read further.
const CONNECTION_BUFFER: usize = 64 * 1024;
/// The kernel's send buffer of a connection (it reserves twice that): without a bound it grows
/// to megabytes for a client that does not read, on loopback. Enough for a LAN.
const SEND_BUFFER: usize = 64 * 1024;
/// Between two log lines about failed accepts (a process out of file descriptors fails every one).
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

// A streamed timeline must find its points until its request times out.
const _: () = assert!(REQUEST_TIMEOUT.as_secs() <= timeline::READ_GRACE.as_secs());

/// The latest metrics, shared between the sampling loop and the HTTP server.
pub type Latest = watch::Receiver<Option<Arc<Vec<Family>>>>;

/// The agent's timeline and its sampling interval, shared likewise.
#[derive(Clone)]
pub struct SharedTimeline {
    pub timeline: Arc<Mutex<Timeline>>,
    pub interval: Duration,
}

#[derive(Clone)]
struct AppState {
    latest: Latest,
    timeline: SharedTimeline,
    buckets: BucketFactor,
}

/// Serves on `listener` until the process ends, with `web`'s TLS and authentication, latency
/// histograms with a bound every `buckets` times the one before.
pub async fn serve(
    listener: TcpListener,
    latest: Latest,
    timeline: SharedTimeline,
    web: WebConfig,
    buckets: BucketFactor,
) -> Result<()> {
    let app = router(
        AppState {
            latest,
            timeline,
            buckets,
        },
        Arc::new(web.auth),
    );
    let tls = web.tls.map(Arc::new);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSED_CONNECTIONS));
    let mut last_logged: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: neither
                // ends the endpoint. Waiting a little lets descriptors free up.
                if last_logged.is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                    tracing::warn!("the Prometheus endpoint cannot accept a connection: {e}");
                    last_logged = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Best effort: a socket that keeps the kernel's default still works.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let tls = tls.as_ref().map(|t| t.acceptor());
        if let Ok(slot) = connections.clone().try_acquire_owned() {
            let app = app.clone();
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        if let Some(stream) = handshake(tls, stream, HEADER_TIMEOUT).await {
                            serve_connection(stream, app, slot).await;
                        }
                    }
                    None => serve_connection(stream, app, slot).await,
                }
            });
        } else if let Ok(slot) = refusals.clone().try_acquire_owned() {
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        if let Some(stream) = handshake(tls, stream, REFUSAL_TIME).await {
                            refuse_connection(stream, slot).await;
                        }
                    }
                    None => refuse_connection(stream, slot).await,
                }
            });
        }
        // Else the stream is dropped here: the connection is closed at once.
    }
}

/// A TLS handshake, given up after `within` (a client that connects and sends nothing).
async fn handshake(
    tls: TlsAcceptor,
    stream: TcpStream,
    within: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(within, tls.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            None
        }
        Err(_) => None,
    }
}

fn router(state: AppState, auth: Arc<Auth>) -> Router {
    // Authentication runs inside the limit of responses in progress, so that at most that many
    // bcrypt checks run at once.
    let limited = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/timeline", get(timeline_json))
        .route_layer(middleware::from_fn_with_state(auth, authenticated))
        .route_layer(middleware::from_fn_with_state(
            Arc::new(Semaphore::new(MAX_RESPONSES_IN_PROGRESS)),
            one_of_the_responses_in_progress,
        ));
    Router::new()
        .merge(limited)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// 401 unless the request's credentials are admitted.
async fn authenticated(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    if auth.admits(request.headers()) {
        return next.run(request).await;
    }
    let mut response = (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(auth.challenge()),
    );
    response
}

/// Serves one connection with hyper, which closes it when its headers are late; closes it too when
/// a request has been in progress for [`REQUEST_TIMEOUT`].
async fn serve_connection<S>(stream: S, app: Router, _slot: OwnedSemaphorePermit)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // When the request in progress began: set as it comes, cleared once its response is sent.
    let began = Arc::new(watch::Sender::new(None::<Instant>));
    let service = {
        let began = began.clone();
        service_fn(move |request: Request<Incoming>| {
            let (app, began) = (app.clone(), began.clone());
            async move {
                began.send_replace(Some(Instant::now()));
                let sent = RequestEnds(began);
                let response = app.oneshot(request).await?;
                Ok::<_, Infallible>(response.map(|body| Body::new(Holding::new(body, sent))))
            }
        })
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(CONNECTION_BUFFER)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut request_began = began.subscribe();
    loop {
        let deadline = request_began
            .borrow_and_update()
            .map(|at| at + REQUEST_TIMEOUT);
        tokio::select! {
            // Done, or failed: a client gone, late headers, a malformed request.
            _ = connection.as_mut() => return,
            _ = request_began.changed() => {}
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                // Dropping the connection closes it, whatever hyper was waiting for.
                return;
            }
        }
    }
}

/// Marks the end of a request on its connection: held by the response body, so dropped once hyper
/// has handed the body to the kernel (or the connection went).
struct RequestEnds(Arc<watch::Sender<Option<Instant>>>);

impl Drop for RequestEnds {
    fn drop(&mut self) {
        self.0.send_replace(None);
    }
}

/// A connection beyond [`MAX_CONNECTIONS`]: its request is answered 503 (`/healthz` 200), then it
/// is closed, within [`REFUSAL_TIME`] whatever the client does.
async fn refuse_connection<S>(stream: S, _slot: OwnedSemaphorePermit)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(|request: Request<Incoming>| async move {
        Ok::<_, Infallible>(if request.uri().path() == "/healthz" {
            "ok\n".into_response()
        } else {
            busy("too many connections")
        })
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIME)
        .keep_alive(false)
        .max_buf_size(CONNECTION_BUFFER)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_TIME, connection).await;
}

/// 503 with one line saying why, and when to try again.
fn busy(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
        format!("{why}, try again shortly\n"),
    )
        .into_response()
}

/// Takes one of [`MAX_RESPONSES_IN_PROGRESS`] slots until the response is sent, or answers 503 at
/// once when none is free. (tower's concurrency limit frees its slot once the response's headers
/// are ready, before a streamed body is made and sent.)
async fn one_of_the_responses_in_progress(
    State(slots): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(slot) = slots.try_acquire_owned() else {
        return busy(&format!(
            "busy: {MAX_RESPONSES_IN_PROGRESS} responses in progress"
        ));
    };
    next.run(request)
        .await
        .map(|body| Body::new(Holding::new(body, slot)))
}

/// A response body that holds `guard` for as long as it lives.
struct Holding<G> {
    body: Body,
    _guard: G,
}

impl<G> Holding<G> {
    fn new(body: Body, guard: G) -> Self {
        Self {
            body,
            _guard: guard,
        }
    }
}

impl<G: Unpin> http_body::Body for Holding<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `/api/timeline?tenant=T&prefix=P&limit=N`: all optional; `limit` keeps the newest N points.
#[derive(Debug, Deserialize)]
struct TimelineQuery {
    tenant: Option<String>,
    prefix: Option<String>,
    limit: Option<usize>,
}

/// The timeline as one JSON object, written one tenant at a time: the lock is taken to copy out
/// one tenant's series, never while writing.
async fn timeline_json(
    State(state): State<AppState>,
    Query(query): Query<TimelineQuery>,
) -> Response {
    if query.limit == Some(0) {
        return (StatusCode::BAD_REQUEST, "limit must be at least 1\n").into_response();
    }
    match TimelineBody::new(&state.timeline, query) {
        Some(body) => (
            [(header::CONTENT_TYPE, "application/json")],
            Body::new(body),
        )
            .into_response(),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "timeline unavailable\n").into_response(),
    }
}

/// serde_json's text of a number or a list of numbers (it cannot fail for those).
fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The JSON of a timeline view, made as hyper asks for more: the head with the times, then one
/// tenant's series per frame, then the closing braces. The same text as serde_json gives for the
/// whole view.
struct TimelineBody {
    timeline: Arc<Mutex<Timeline>>,
    prefix: Option<String>,
    points: Points,
    head: Option<String>,
    tenants: std::vec::IntoIter<String>,
    /// Tenants written so far.
    written: usize,
    done: bool,
}

impl TimelineBody {
    /// The view `query` asks for, as of now; `None` if the timeline's lock is poisoned.
    fn new(shared: &SharedTimeline, query: TimelineQuery) -> Option<Self> {
        let (points, timestamps, tenants) = {
            let timeline = shared.timeline.lock().ok()?;
            let (points, timestamps) = timeline.newest(query.limit);
            let tenants = timeline.tenant_names(query.tenant.as_deref());
            (points, timestamps, tenants)
        };
        let head = format!(
            "{{\"interval_secs\":{},\"timestamps\":{},\"tenants\":{{",
            json(&shared.interval.as_secs_f64()),
            json(&timestamps)
        );
        Some(Self {
            timeline: shared.timeline.clone(),
            prefix: query.prefix,
            points,
            head: Some(head),
            tenants: tenants.into_iter(),
            written: 0,
            done: false,
        })
    }

    /// The next piece of text; `None` at the end.
    fn next_chunk(&mut self) -> Option<Result<String, MovedOn>> {
        if let Some(head) = self.head.take() {
            return Some(Ok(head));
        }
        for tenant in self.tenants.by_ref() {
            let series = match self.timeline.lock() {
                Ok(timeline) => timeline.series(&tenant, self.prefix.as_deref(), self.points),
                Err(_) => Err(MovedOn),
            };
            // A tenant that left meanwhile had nothing but zeros over these points.
            let series: BTreeMap<String, Vec<f64>> = match series {
                Ok(Some(series)) => series,
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            };
            let comma = if self.written == 0 { "" } else { "," };
            self.written += 1;
            return Some(Ok(format!("{comma}{}:{}", json(&tenant), json(&series))));
        }
        if self.done {
            return None;
        }
        self.done = true;
        Some(Ok("}}".to_owned()))
    }
}

impl http_body::Body for TimelineBody {
    type Data = Bytes;
    type Error = MovedOn;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MovedOn>>> {
        Poll::Ready(
            self.get_mut()
                .next_chunk()
                .map(|chunk| chunk.map(|text| Frame::data(Bytes::from(text)))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// 200 once a first sample was taken with every probe the host should have attached; 503 before,
/// and while any is missing (degraded), with the probes and why. Liveness (`/healthz`) stays 200: a
/// degraded agent still counts what it can, and restarting it would not attach the probe.
async fn ready(State(AppState { latest, .. }): State<AppState>) -> impl IntoResponse {
    let Some(families) = latest.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "probes not attached yet\n".to_owned(),
        );
    };
    readiness(&families)
}

fn readiness(families: &[Family]) -> (StatusCode, String) {
    let missing = probes_missing(families);
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "degraded: {} probe{} not attached\n{}\n",
                missing.len(),
                if missing.len() == 1 { "" } else { "s" },
                missing.join("\n")
            ),
        )
    }
}

/// The latest sample in the format the scraper asks for (`Accept`): the text format 0.0.4 unless
/// it asks for OpenMetrics.
async fn metrics(
    State(AppState {
        latest, buckets, ..
    }): State<AppState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let Some(families) = latest.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no sample yet\n".to_owned(),
        )
            .into_response();
    };
    let format = Format::negotiate(
        headers
            .get(header::ACCEPT)
            .and_then(|accept| accept.to_str().ok()),
    );
    match encode(&families, buckets) {
        Ok(openmetrics) => {
            let text = match format {
                Format::OpenMetrics => openmetrics,
                Format::Text => text_format(&openmetrics),
            };
            ([(header::CONTENT_TYPE, format.content_type())], text).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding failed: {e}\n"),
        )
            .into_response(),
    }
}

/// The families as OpenMetrics text.
pub fn encode(families: &[Family], buckets: BucketFactor) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families.to_vec(), buckets)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

#[derive(Debug)]
struct Families(Vec<Family>, BucketFactor);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Self(families, factor) = self;
        for family in families {
            let def = family.def;
            let (name, unit) = prometheus_name(def.name, def.unit);
            let metric_type = match def.kind {
                MetricKind::Counter => MetricType::Counter,
                MetricKind::Gauge => MetricType::Gauge,
                MetricKind::Histogram => MetricType::Histogram,
            };
            let mut metric =
                encoder.encode_descriptor(&name, def.description, unit.as_ref(), metric_type)?;
            for point in &family.points {
                let labels: Vec<(String, String)> = point
                    .attributes
                    .iter()
                    .map(|(key, value)| (key.replace('.', "_"), value.clone()))
                    .collect();
                let point_encoder = metric.encode_family(&labels)?;
                match (&point.value, def.kind) {
                    (Value::Int(v), MetricKind::Counter) => {
                        ConstCounter::new(*v).encode(point_encoder)?;
                    }
                    (Value::Float(v), MetricKind::Counter) => {
                        ConstCounter::new(*v).encode(point_encoder)?;
                    }
                    (Value::Int(v), _) => ConstGauge::new(*v as i64).encode(point_encoder)?,
                    (Value::Float(v), _) => ConstGauge::new(*v).encode(point_encoder)?,
                    (Value::Histogram(h), _) => {
                        let explicit = histogram::explicit(h, *factor);
                        let buckets: Vec<(f64, u64)> = explicit
                            .bounds_secs
                            .into_iter()
                            .chain([f64::INFINITY])
                            .zip(explicit.counts)
                            .collect();
                        let mut point_encoder = point_encoder;
                        point_encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            h.sum_ns as f64 / 1e9,
                            h.count,
                            &buckets,
                            None,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The Prometheus name and unit of an OpenTelemetry metric: dots become underscores, a unit in
/// braces (an annotation, like `{exit}`) is dropped, `s` and `By` become `seconds` and `bytes`.
/// The encoder appends the unit and, for counters, `_total`.
pub fn prometheus_name(name: &str, unit: &str) -> (String, Option<Unit>) {
    let unit = match unit {
        "s" => Some(Unit::Seconds),
        "By" => Some(Unit::Bytes),
        _ => None,
    };
    (name.replace('.', "_"), unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::metrics::{Point, VM_EXITS, VMM_SERVICE_DURATION};
    use vmtrace_common::LatencyHistogram;

    #[test]
    fn ready_only_while_every_probe_that_should_be_is_attached() {
        let probe = |name: &str, reason: Option<&str>| Point {
            attributes: std::iter::once(("probe", name.to_owned()))
                .chain(reason.map(|r| ("reason", r.to_owned())))
                .collect(),
            value: Value::Int(u64::from(reason.is_none())),
        };
        let attached = vec![Family {
            def: crate::export::metrics::AGENT_PROBE_ATTACHED,
            points: vec![probe("kvm:kvm_mmio", None)],
        }];
        assert_eq!(readiness(&attached).0, StatusCode::OK);
        let mut degraded = attached;
        degraded[0]
            .points
            .push(probe("cgroup:cgroup_rmdir", Some("tracefs not found")));
        let (status, body) = readiness(&degraded);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "degraded: 1 probe not attached\ncgroup:cgroup_rmdir: tracefs not found\n"
        );
    }

    fn timeline_of(points: u32, tenants: &[&str]) -> SharedTimeline {
        let mut timeline = Timeline::new(Duration::from_secs(3), Duration::from_secs(1));
        for t in 1..=points {
            let tenants: Vec<serde_json::Value> = tenants
                .iter()
                .map(|name| {
                    serde_json::json!({
                        "tenant": name, "identity": null, "cgroups": [], "counts": {},
                        "rates": {"exit.io": f64::from(t), "tlb.flush.task_switch": 0.5},
                        "gauges": {"memory.usage_bytes": 4096.0},
                    })
                })
                .collect();
            let sample = serde_json::from_value(serde_json::json!({
                "timestamp": f64::from(t), "elapsed_secs": f64::from(t), "interval_secs": 1.0,
                "kvm": "pvm", "exit_source": "derived", "tenants": tenants, "drops": {},
            }))
            .unwrap();
            timeline.push(&sample);
        }
        SharedTimeline {
            timeline: Arc::new(Mutex::new(timeline)),
            interval: Duration::from_millis(250),
        }
    }

    fn streamed(shared: &SharedTimeline, query: &str) -> (String, usize) {
        let query: TimelineQuery = serde_json::from_str(query).unwrap();
        let mut body = TimelineBody::new(shared, query).unwrap();
        let (mut text, mut chunks) = (String::new(), 0);
        while let Some(chunk) = body.next_chunk() {
            text.push_str(&chunk.unwrap());
            chunks += 1;
        }
        (text, chunks)
    }

    #[test]
    fn the_streamed_timeline_is_the_views_json_one_tenant_at_a_time() {
        let shared = timeline_of(5, &["/a", "/b\"quoted\"", "/c"]);
        let view = shared
            .timeline
            .lock()
            .unwrap()
            .view(shared.interval, None, None);
        let (text, chunks) = streamed(&shared, "{}");
        assert_eq!(text, serde_json::to_string(&view).unwrap());
        // The head, one per tenant, the end.
        assert_eq!(chunks, 1 + 3 + 1);

        let (text, _) = streamed(
            &shared,
            r#"{"tenant": "/b\"quoted\"", "prefix": "exit.", "limit": 2}"#,
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["timestamps"], serde_json::json!([4.0, 5.0]));
        assert_eq!(value["interval_secs"], 0.25);
        assert_eq!(
            value["tenants"],
            serde_json::json!({"/b\"quoted\"": {"exit.io": [4.0, 5.0]}})
        );
        let (text, _) = streamed(&shared, r#"{"tenant": "/none"}"#);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["tenants"], serde_json::json!({}));
    }

    #[test]
    fn a_streamed_timeline_keeps_its_points_while_the_timeline_moves_on() {
        let shared = timeline_of(3, &["/a", "/b"]);
        let query: TimelineQuery = serde_json::from_str("{}").unwrap();
        let mut body = TimelineBody::new(&shared, query).unwrap();
        let head = body.next_chunk().unwrap().unwrap();
        let first = body.next_chunk().unwrap().unwrap();
        // A sample arrives while the response is written.
        let newer = timeline_of(4, &["/a", "/b"]);
        *shared.timeline.lock().unwrap() = newer.timeline.lock().unwrap().clone();
        let rest: String = std::iter::from_fn(|| body.next_chunk())
            .map(Result::unwrap)
            .collect();
        let value: serde_json::Value =
            serde_json::from_str(&format!("{head}{first}{rest}")).unwrap();
        assert_eq!(value["timestamps"], serde_json::json!([1.0, 2.0, 3.0]));
        assert_eq!(
            value["tenants"]["/b"]["exit.io"],
            serde_json::json!([1.0, 2.0, 3.0])
        );
    }

    #[test]
    fn counters_and_histograms_follow_the_prometheus_translation() {
        let families = vec![
            Family {
                def: VM_EXITS,
                points: vec![Point {
                    attributes: vec![
                        ("tenant", "/a".to_owned()),
                        ("exit.source", "derived".to_owned()),
                        ("exit.reason", "io".to_owned()),
                    ],
                    value: Value::Int(42),
                }],
            },
            Family {
                def: VMM_SERVICE_DURATION,
                points: vec![Point {
                    attributes: vec![("tenant", "/a".to_owned())],
                    value: Value::Histogram(Box::new({
                        let mut h = LatencyHistogram::EMPTY;
                        for ns in [100, 300, 500] {
                            h.record(ns);
                        }
                        h
                    })),
                }],
            },
        ];
        let text = encode(&families, BucketFactor::KERNEL).unwrap();
        assert!(text.contains("# TYPE vmtrace_vm_exits counter"), "{text}");
        assert!(
            text.contains(
                "vmtrace_vm_exits_total{tenant=\"/a\",exit_source=\"derived\",exit_reason=\"io\"} 42"
            ),
            "{text}"
        );
        // The `le` of the bucket whose bound is `ns`, as the encoder writes it.
        let bucket = |text: &str, ns: u64| -> Option<u64> {
            text.lines().find_map(|line| {
                let rest =
                    line.strip_prefix("vmtrace_vmm_service_duration_seconds_bucket{le=\"")?;
                let (le, rest) = rest.split_once('"')?;
                let count = rest.strip_prefix(",tenant=\"/a\"} ")?;
                (le.parse::<f64>().ok()? == ns as f64 / 1e9).then(|| count.parse().ok())?
            })
        };
        // 100 ns below 128 ns, 300 and 500 ns below 512 ns; cumulative, as Prometheus wants.
        assert_eq!(bucket(&text, 64), Some(0), "{text}");
        assert_eq!(bucket(&text, 128), Some(1), "{text}");
        assert_eq!(bucket(&text, 256), Some(1), "{text}");
        assert_eq!(bucket(&text, 512), Some(3), "{text}");
        assert!(
            text.contains(
                "vmtrace_vmm_service_duration_seconds_bucket{le=\"+Inf\",tenant=\"/a\"} 3"
            ),
            "{text}"
        );
        assert_eq!(
            text.matches("vmtrace_vmm_service_duration_seconds_bucket")
                .count(),
            40
        );
        assert!(
            text.contains("vmtrace_vmm_service_duration_seconds_count{tenant=\"/a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("vmtrace_vmm_service_duration_seconds_sum{tenant=\"/a\"} 9e-7")
                || text
                    .contains("vmtrace_vmm_service_duration_seconds_sum{tenant=\"/a\"} 0.0000009"),
            "{text}"
        );
        // Every fourth bound: 16 ns, 256 ns, 4096 ns, ...; the same counts where a bound is kept.
        let coarse = encode(&families, BucketFactor::parse("16", "test").unwrap()).unwrap();
        assert_eq!(
            coarse
                .matches("vmtrace_vmm_service_duration_seconds_bucket")
                .count(),
            10
        );
        assert_eq!(bucket(&coarse, 16), Some(0), "{coarse}");
        assert_eq!(bucket(&coarse, 256), Some(1), "{coarse}");
        assert_eq!(bucket(&coarse, 4096), Some(3), "{coarse}");
        assert_eq!(bucket(&coarse, 128), None, "{coarse}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
