//! A client of a node's cluster RPC port as another node would be: mutual TLS with a node
//! certificate, dialing the node by its id (the name its certificate must carry).

use std::time::Duration;

use pingora_vhost::cluster::pki::Issuer;
use pingora_vhost::cluster::tls::{configs, dial_name};
use pingora_vhost::keyring::Keyring;

use super::Node;

pub struct RpcClient {
    pub client: reqwest::Client,
    base: String,
}

/// The automatic CA of a cluster with `secret` (and the default cluster id).
pub fn derived_ca(secret: &str) -> Issuer {
    let keys = Keyring::new(Some(secret), None, "default");
    Issuer::derived(&keys.ca_seeds()[0]).expect("derived CA")
}

impl RpcClient {
    /// To node `to` (its id in the dial name), as node `as_node` with a certificate of the
    /// automatic CA of `secret`; the node must present a certificate of that CA too.
    pub fn to(to: &Node, secret: &str, as_node: u64) -> RpcClient {
        let ca = derived_ca(secret);
        RpcClient::with(to, &ca, &ca, as_node)
    }

    /// As node `as_node` with a certificate `issuer` issues, trusting `trusted`.
    pub fn with(to: &Node, issuer: &Issuer, trusted: &Issuer, as_node: u64) -> RpcClient {
        let cert = issuer
            .issue(as_node, time::OffsetDateTime::now_utc())
            .expect("node certificate");
        let (_, config) =
            configs(vec![trusted.anchor.clone()], cert.chain, cert.key).expect("TLS config");
        let host = dial_name(to.options.node_id.unwrap_or(1), to.rpc_addr.ip());
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*config).clone())
            .resolve(&host, to.rpc_addr)
            .no_proxy()
            .tls_info(true)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("RPC client");
        RpcClient {
            client,
            base: format!("https://{host}:{}", to.rpc_addr.port()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path))
    }
}
