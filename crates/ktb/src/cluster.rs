//! Reaching the cluster as the developer: kubectl's flags and kubeconfig,
//! and a first request that turns "cannot connect" into advice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::api::{Api, ListParams, PostParams};

use ktb_kube::names::{MANAGED_LABEL, MANAGED_VALUE};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::refusal::{missing_permission, namespace_terminating, Refusal};

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

/// How long the first request to the apiserver may take.
pub const FIRST_CONTACT_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster the flags and the kubeconfig select, read but not yet
/// contacted.
pub struct Target {
    /// The kubeconfig file(s) read: `--kubeconfig`, else every file of
    /// `$KUBECONFIG` (merged, the first one's settings winning), else
    /// `~/.kube/config`.
    pub files: Vec<PathBuf>,
    /// The context in use: `--context`, else the kubeconfig's current-context.
    pub context: String,
    /// The namespace commands work in: `-n`, else the context's, else `default`.
    pub namespace: String,
    /// The apiserver's URL.
    pub server: String,
    /// How to reach it, as kube builds it from the context.
    config: Config,
}

/// The files kubectl reads for `--kubeconfig` (`flag`), `$KUBECONFIG`
/// (`env`, a path list) and the home directory, in that order of precedence.
pub fn kubeconfig_files(
    flag: Option<&Path>,
    env: Option<&std::ffi::OsStr>,
    home: Option<&Path>,
) -> Vec<PathBuf> {
    if let Some(path) = flag {
        return vec![path.to_owned()];
    }
    let listed: Vec<PathBuf> = env
        .map(|paths| {
            std::env::split_paths(paths)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if !listed.is_empty() {
        return listed;
    }
    home.map(|h| vec![h.join(".kube").join("config")])
        .unwrap_or_default()
}

/// Reads the kubeconfig the flags select, as kubectl would; nothing is
/// sent to the cluster.
pub async fn target(args: &KubeOptions) -> anyhow::Result<Target> {
    let files = kubeconfig_files(
        args.kubeconfig.as_deref(),
        std::env::var_os("KUBECONFIG").as_deref(),
        std::env::home_dir().as_deref(),
    );
    let kubeconfig = match &args.kubeconfig {
        Some(path) => Kubeconfig::read_from(path)
            .with_context(|| format!("cannot read kubeconfig {}", path.display()))?,
        None => Kubeconfig::read()
            .context("cannot load a kubeconfig (set KUBECONFIG or pass --kubeconfig)")?,
    };
    let context = args
        .context
        .clone()
        .or_else(|| kubeconfig.current_context.clone())
        .context("the kubeconfig names no current context: pass --context or run `kubectl config use-context NAME`")?;
    let options = KubeConfigOptions {
        context: Some(context.clone()),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| format!("cannot use context {context} of the kubeconfig"))?;
    Ok(Target {
        files,
        context,
        namespace: args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone()),
        server: config.cluster_url.to_string(),
        config,
    })
}

impl Target {
    /// First contact: asks the apiserver its version, within `timeout`.
    /// Fails with advice when it does not answer.
    pub async fn reach(self, timeout: Duration) -> anyhow::Result<(Cluster, Info)> {
        let Target {
            namespace,
            server,
            mut config,
            ..
        } = self;
        config.connect_timeout = Some(timeout);
        let client = client_without_nagle(config).context("invalid kubeconfig")?;
        let version = tokio::time::timeout(timeout, client.apiserver_version())
            .await
            .map_err(|_| anyhow::anyhow!("no answer in {timeout:?}"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(|| {
                format!("cannot reach the cluster at {server}: check the kubeconfig context, VPN or network")
            })?;
        let cluster = Cluster {
            client,
            namespace,
            server,
        };
        Ok((cluster, version))
    }
}

/// Reads the kubeconfig and makes first contact (see [`target`], [`Target::reach`]).
pub async fn connect(args: &KubeOptions) -> anyhow::Result<Cluster> {
    let (cluster, _) = target(args).await?.reach(FIRST_CONTACT_TIMEOUT).await?;
    Ok(cluster)
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
/// 403 stays a missing permission for the exit code, unless it is the
/// namespace being deleted, which no Role would fix.
pub fn api_error(error: kube::Error) -> anyhow::Error {
    match error {
        kube::Error::Api(status) if missing_permission(&status) => {
            Refusal::Forbidden(status_sentence(&status)).into()
        }
        kube::Error::Api(status) => anyhow::anyhow!("{}", status_sentence(&status)),
        other => other.into(),
    }
}

/// An apiserver's answer as a person reads it: its message and reason, and
/// what to do when the namespace is being deleted.
fn status_sentence(status: &kube::core::Status) -> String {
    if namespace_terminating(status) {
        format!(
            "{}: the namespace is being deleted and takes no new objects; \
             wait until it is gone (kubectl get namespace) or use another (-n)",
            status.message
        )
    } else {
        format!("{} ({})", status.message, status.reason)
    }
}

/// `error` in one line, its causes joined by `: ` as `{:#}` joins them, but
/// an apiserver's answer said as [`api_error`] says it, wherever in the
/// chain a caller wrapped it with context (kube's own Display appends a
/// debug dump of the whole Status).
pub fn one_line(error: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in error.chain() {
        if let Some(kube::Error::Api(status)) = cause.downcast_ref::<kube::Error>() {
            // The rest of the chain is the Status itself.
            parts.push(status_sentence(status));
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
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
    #[cfg(unix)]
    let name = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok());
    #[cfg(windows)]
    let name = std::env::var("COMPUTERNAME").ok();
    name.map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// kube's default client, but with TCP_NODELAY on its connections to the
/// apiserver. The tunnel's port-forward rides one of them, and with Nagle's
/// algorithm every small frame (a new stream, a credit update, a short
/// reply) waits for the previous one's delayed ACK: ~40 ms at p99. For the
/// same frames' sake the connections keep little unsent data in the kernel
/// ([`ktb_proto::socket`]).
fn client_without_nagle(config: Config) -> anyhow::Result<Client> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;
    use kube::client::ConfigExt;
    use tokio::net::TcpStream;
    use tower::ServiceBuilder;

    let mut connector = HttpConnector::new();
    connector.enforce_http(false);
    connector.set_nodelay(true);
    connector.set_connect_timeout(config.connect_timeout);
    let connector = ServiceBuilder::new()
        .map_response(|io: TokioIo<TcpStream>| {
            let _ = ktb_proto::socket::limit_unsent(io.inner());
            io
        })
        .service(connector);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_flag_wins_then_every_file_of_the_variable_then_home() {
        let home = Path::new("/home/dev");
        let env = std::env::join_paths(["/a/config", "", "/b/config"]).unwrap();
        assert_eq!(
            kubeconfig_files(Some(Path::new("/x.yaml")), Some(&env), Some(home)),
            [PathBuf::from("/x.yaml")]
        );
        assert_eq!(
            kubeconfig_files(None, Some(&env), Some(home)),
            [PathBuf::from("/a/config"), PathBuf::from("/b/config")]
        );
        let empty = std::ffi::OsString::new();
        assert_eq!(
            kubeconfig_files(None, Some(&empty), Some(home)),
            [PathBuf::from("/home/dev/.kube/config")]
        );
        assert!(kubeconfig_files(None, None, None).is_empty());
    }

    /// What the apiserver answers a create in a namespace being deleted
    /// (Kubernetes 1.3x, trimmed), and a plain 403.
    #[test]
    fn a_namespace_being_deleted_is_said_so_and_is_no_missing_permission() {
        let terminating: kube::core::Status = serde_json::from_str(
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure",
            "message":"pods \"ktb-x\" is forbidden: unable to create new content in namespace team-z because it is being terminated",
            "reason":"Forbidden","code":403,
            "details":{"name":"ktb-x","kind":"pods","causes":[{"reason":"NamespaceTerminating",
            "message":"namespace team-z is being terminated","field":"metadata.namespace"}]}}"#,
        )
        .unwrap();
        let error = api_error(kube::Error::Api(Box::new(terminating.clone())));
        assert!(error.downcast_ref::<Refusal>().is_none());
        let said = format!("{error:#}");
        assert!(
            said.contains("team-z because it is being terminated"),
            "{said}"
        );
        assert!(said.contains("wait until it is gone"), "{said}");
        // Wrapped as it comes, with a caller's context: the same sentence,
        // no debug dump, and no missing permission.
        let wrapped = anyhow::Error::from(kube::Error::Api(Box::new(terminating)))
            .context("cannot create Lease ktb-exchange-x");
        let said = one_line(&wrapped);
        assert!(
            said.starts_with("cannot create Lease ktb-exchange-x: pods \"ktb-x\" is forbidden")
                && said.ends_with("or use another (-n)")
                && !said.contains("Status {"),
            "{said}"
        );
        assert_eq!(
            crate::refusal::kind_of(&wrapped),
            crate::refusal::Kind::Failed
        );

        let forbidden: kube::core::Status = serde_json::from_str(
            r#"{"message":"pods is forbidden: User \"dev-b\" cannot list resource \"pods\"",
            "reason":"Forbidden","code":403}"#,
        )
        .unwrap();
        let error = api_error(kube::Error::Api(Box::new(forbidden)));
        assert!(matches!(
            error.downcast_ref::<Refusal>(),
            Some(Refusal::Forbidden(_))
        ));
    }
}
