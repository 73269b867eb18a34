//! Reaching the cluster as the developer: kubectl's flags and kubeconfig,
//! and a first request that turns "cannot connect" into advice.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, ListParams, PostParams};

use ktb_kube::names::{MANAGED_LABEL, MANAGED_VALUE};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::refusal::Refusal;

/// Which cluster and namespace, as kubectl's flags say it; `None` takes
/// kubectl's defaults.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    pub context: Option<String>,
    /// The namespace (default: the context's namespace).
    pub namespace: Option<String>,
}

/// A connected cluster and the namespace commands work in.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
    pub server: String,
}

const FIRST_CONTACT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn connect(args: &KubeOptions) -> anyhow::Result<Cluster> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None => Config::from_kubeconfig(&options)
            .await
            .context("cannot load a kubeconfig (set KUBECONFIG or pass --kubeconfig)")?,
    };
    config.connect_timeout = Some(FIRST_CONTACT_TIMEOUT);
    let server = config.cluster_url.to_string();
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = client_without_nagle(config).context("invalid kubeconfig")?;
    tokio::time::timeout(FIRST_CONTACT_TIMEOUT, client.apiserver_version())
        .await
        .map_err(|_| anyhow::anyhow!("no answer in {FIRST_CONTACT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!("cannot reach the cluster at {server}: check the kubeconfig context, VPN or network")
        })?;
    Ok(Cluster {
        client,
        namespace,
        server,
    })
}

impl Cluster {
    /// The apiserver's addresses, as this machine resolves them: what must
    /// stay out of any route ktb adds, since the tunnel itself rides on it.
    pub async fn apiserver_addresses(&self) -> Vec<std::net::IpAddr> {
        let Ok(uri) = self.server.parse::<http::Uri>() else {
            return Vec::new();
        };
        let Some(host) = uri.host() else {
            return Vec::new();
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        tokio::net::lookup_host((host, port))
            .await
            .map(|addrs| addrs.map(|a| a.ip()).collect())
            .unwrap_or_default()
    }

    /// The user name the apiserver knows this developer by.
    pub async fn whoami(&self) -> anyhow::Result<String> {
        let review = Api::<SelfSubjectReview>::all(self.client.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .context("cannot ask the cluster who we are (SelfSubjectReview)")?;
        Ok(review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_else(|| "unknown".into()))
    }
}

/// A failed API call as a sentence: the apiserver's own message (`pods is
/// forbidden: User "dev-b" cannot list …`), not kube's debug dump of it; a
/// 403 stays a missing permission for the exit code.
pub fn api_error(error: kube::Error) -> anyhow::Error {
    match error {
        kube::Error::Api(status) if status.code == 403 => {
            Refusal::Forbidden(format!("{} ({})", status.message, status.reason)).into()
        }
        kube::Error::Api(status) => anyhow::anyhow!("{} ({})", status.message, status.reason),
        other => other.into(),
    }
}

/// Every object of kind `K` that ktb created (label
/// `app.kubernetes.io/managed-by=ktb`) that `api` reaches.
pub async fn list_managed<K>(api: &Api<K>) -> anyhow::Result<Vec<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let managed = ListParams::default().labels(&format!("{MANAGED_LABEL}={MANAGED_VALUE}"));
    Ok(api.list(&managed).await.map_err(api_error)?.items)
}

/// The name of this machine, for telling other developers who holds what.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// kube's default client, but with TCP_NODELAY on its connections to the
/// apiserver. The tunnel's port-forward rides one of them, and with Nagle's
/// algorithm every small frame (a new stream, a credit update, a short
/// reply) waits for the previous one's delayed ACK: ~40 ms at p99.
fn client_without_nagle(config: Config) -> anyhow::Result<Client> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;

    let mut connector = HttpConnector::new();
    connector.enforce_http(false);
    connector.set_nodelay(true);
    connector.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(connector)?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}
