//! gRPC echo (`ktb.test/grpc-echo:dev`, port 9090; the binary also ships in
//! every echo image as `/grpc-echo`, beside `/probe`):
//!
//! - `grpc-echo serve`: answers the unary method `/ktb.test.Echo/Who` with
//!   the name of the pod that served it, so tests can see where an HTTP/2
//!   call landed the way http-echo shows it for HTTP/1.1.
//! - `grpc-echo call HOST:PORT [--metadata KEY=VALUE]...`: the client a
//!   test execs in a pod or runs on a laptop. One call over plaintext
//!   HTTP/2 (prior knowledge, as gRPC without TLS speaks it), the answer
//!   printed on one line, the whole call bounded by a timeout; on failure a
//!   non-zero exit with the reason.
//!
//! The build machine has no protoc, so the messages are prost derives
//! written by hand and the one method is routed by hand on hyper's HTTP/2
//! server. The wire format is that of:
//!
//! ```proto
//! package ktb.test;
//! service Echo { rpc Who(WhoRequest) returns (WhoReply); }
//! message WhoRequest {}
//! message WhoReply { string pod = 1; }
//! ```

use std::convert::Infallible;
use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::metadata::{AsciiMetadataValue, MetadataKey};
use tonic::server::UnaryService;
use tonic::Status;
use tonic_prost::ProstCodec;

/// The one method, as it appears in the HTTP/2 request's path.
const WHO_PATH: &str = "/ktb.test.Echo/Who";
/// The longest `call` may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const USAGE: &str = "usage: grpc-echo serve | call HOST:PORT [--metadata KEY=VALUE]...";

#[derive(Clone, PartialEq, prost::Message)]
struct WhoRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct WhoReply {
    /// The name of the pod that answered (`ktb_workloads::pod_name`).
    #[prost(string, tag = "1")]
    pod: String,
}

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match args.split_first() {
        Some((command, [])) if command == "serve" => runtime.block_on(serve()),
        Some((command, [target, options @ ..])) if command == "call" => parse_metadata(options)
            .and_then(|metadata| runtime.block_on(call(target, metadata)))
            .map(|pod| println!("{pod}")),
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc-echo: {}", with_causes(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<()> {
    let pod: Arc<str> = ktb_workloads::pod_name().into();
    let listener = TcpListener::bind(ktb_workloads::listen_addr(9090)).await?;
    eprintln!("grpc-echo on {} in pod {pod}", listener.local_addr()?);
    let accept = async {
        loop {
            let (conn, _) = listener.accept().await?;
            let pod = pod.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| answer(request, pod.clone()));
                // Errors only mean the peer went away or spoke nonsense.
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    };
    tokio::select! {
        r = accept => r,
        _ = ktb_workloads::shutdown_signal() => Ok(()),
    }
}

/// Routes one HTTP/2 request: `Who`, or the gRPC status for an unknown method.
async fn answer(
    request: http::Request<Incoming>,
    pod: Arc<str>,
) -> std::result::Result<http::Response<tonic::body::Body>, Infallible> {
    if request.uri().path() != WHO_PATH {
        let status = Status::unimplemented(format!(
            "{} is not a method of this server (only {WHO_PATH})",
            request.uri().path()
        ));
        return Ok(status.into_http());
    }
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<WhoReply, WhoRequest>::default());
    Ok(grpc.unary(Who(pod), request).await)
}

/// The `Who` method: the pod's name, whatever the request carries.
struct Who(Arc<str>);

impl UnaryService<WhoRequest> for Who {
    type Response = WhoReply;
    type Future = std::future::Ready<std::result::Result<tonic::Response<WhoReply>, Status>>;

    fn call(&mut self, _request: tonic::Request<WhoRequest>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(WhoReply {
            pod: self.0.to_string(),
        })))
    }
}

/// `--metadata KEY=VALUE` options, in order (a key may repeat).
fn parse_metadata(
    options: &[String],
) -> Result<Vec<(MetadataKey<tonic::metadata::Ascii>, AsciiMetadataValue)>> {
    let mut metadata = Vec::new();
    let mut options = options.iter();
    while let Some(option) = options.next() {
        if option != "--metadata" {
            return Err(format!("unknown option {option:?}; {USAGE}").into());
        }
        let pair = options.next().ok_or(USAGE)?;
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--metadata {pair:?}: not KEY=VALUE"))?;
        let key = MetadataKey::from_bytes(key.as_bytes())
            .map_err(|e| format!("--metadata key {key:?}: {e}"))?;
        let value = AsciiMetadataValue::try_from(value)
            .map_err(|e| format!("--metadata value {value:?}: {e}"))?;
        metadata.push((key, value));
    }
    Ok(metadata)
}

/// One `Who` call to `target` (HOST:PORT) carrying `metadata`; the pod
/// that answered.
async fn call(
    target: &str,
    metadata: Vec<(MetadataKey<tonic::metadata::Ascii>, AsciiMetadataValue)>,
) -> Result<String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| format!("{target:?} is not HOST:PORT: {e}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let mut request = tonic::Request::new(WhoRequest {});
    for (key, value) in metadata {
        request.metadata_mut().append(key, value);
    }
    let exchange = async {
        let channel = endpoint.connect().await?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await?;
        let path = http::uri::PathAndQuery::from_static(WHO_PATH);
        let reply = grpc
            .unary(request, path, ProstCodec::<WhoRequest, WhoReply>::default())
            .await?;
        Ok::<_, Box<dyn Error + Send + Sync>>(reply.into_inner().pod)
    };
    match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
        Ok(reply) => reply
            .map_err(|e| format!("calling {target}{WHO_PATH}: {}", with_causes(e.as_ref())).into()),
        Err(_) => {
            Err(format!("calling {target}{WHO_PATH}: no answer within {CALL_TIMEOUT:?}").into())
        }
    }
}

/// An error and its sources on one line: tonic's transport errors say
/// only "transport error" at the top.
fn with_causes(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
