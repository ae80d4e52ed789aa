//! ACME (Let's Encrypt) issuance and renewal, HTTP-01, run by the Raft leader only.
//!
//! Everything the CA or another leader needs is replicated: the account credentials, each
//! challenge answer (committed and applied on every live node before `set_ready`, because the
//! CA may validate against any node behind anycast or DNS round-robin), the order lease (one
//! order per domain cluster-wide) and the issued chain + key, so every node serves it.
//! A failed order keeps the valid certificate, is recorded in the state (API, metric) and is
//! retried with backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, LetsEncrypt,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use crate::cluster::ClusterNode;
use crate::config::LetsEncryptConfig;
use crate::observability::Metrics;
use crate::proxy::tls;
use crate::state::{Command, State, TlsMode};

/// An order lease older than this is considered abandoned (its leader died mid-order).
const LEASE: Duration = Duration::from_secs(300);
const FIRST_RETRY: Duration = Duration::from_secs(30);
const MAX_RETRY: Duration = Duration::from_secs(3600);

use crate::clock::unix_ms;

/// Domains with `tls = "acme"` whose certificate is missing or expires within the renewal
/// window (or whose renewal was requested), and that no other live node is ordering right now.
/// A lease whose owner is dead (`alive` says no), or older than [`LEASE`], is taken over.
pub fn due_domains(
    state: &State,
    now_unix_ms: u64,
    renew_before: Duration,
    node_id: u64,
    alive: impl Fn(u64) -> bool,
) -> Vec<String> {
    let renew_at = (now_unix_ms / 1000) as i64 + renew_before.as_secs() as i64;
    state
        .domains
        .values()
        .filter(|d| d.tls == TlsMode::Acme && !d.domain.starts_with("*."))
        .filter(|d| {
            let requested = state
                .acme
                .status
                .get(d.domain.as_str())
                .is_some_and(|s| s.renew_requested);
            requested || d.cert.as_ref().is_none_or(|c| c.not_after <= renew_at)
        })
        .filter(|d| {
            let lease = state
                .acme
                .status
                .get(d.domain.as_str())
                .and_then(|s| s.in_flight);
            match lease {
                Some((owner, since)) => {
                    owner == node_id
                        || !alive(owner)
                        || now_unix_ms.saturating_sub(since) > LEASE.as_millis() as u64
                }
                None => true,
            }
        })
        .map(|d| d.domain.to_string())
        .collect()
}

pub async fn run(node: Arc<ClusterNode>, cfg: LetsEncryptConfig, metrics: Arc<Metrics>) {
    let interval = Duration::from_secs(cfg.check_interval_secs);
    let renew_before = Duration::from_secs(cfg.renew_before_days * 86_400);
    let mut warned_at: HashMap<String, Instant> = HashMap::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    loop {
        let expiries: Vec<(String, i64)> = node.sm.with_state(|s| {
            s.domains
                .values()
                .filter_map(|d| d.cert.as_ref().map(|c| (d.domain.to_string(), c.not_after)))
                .collect()
        });
        metrics.set_cert_expiries(&expiries);
        if node.is_leader() {
            warn_expiring(&expiries, &mut warned_at);
            let due = node.sm.with_state(|s| {
                due_domains(s, unix_ms(), renew_before, node.node_id, |id| {
                    node.gossip.is_alive(id)
                })
            });
            for domain in due {
                // Backoff from the replicated failure count, so a new leader keeps it too.
                let retry_at = node
                    .sm
                    .with_state(|s| s.acme.status.get(&domain).and_then(retry_at_unix_ms));
                if retry_at.is_some_and(|at| unix_ms() < at) {
                    continue;
                }
                if !node.is_leader() {
                    break;
                }
                match issue(&node, &cfg, &domain).await {
                    Ok(()) => {
                        metrics.acme_order(true);
                        tracing::info!(domain, "ACME certificate issued");
                    }
                    Err(OrderError::LeadershipMoved) => {
                        tracing::info!(
                            domain,
                            "ACME order given up: this node is no longer leader; the new leader takes it over"
                        );
                        let _ = node
                            .write(Command::AcmeOrderAbandoned {
                                domain: domain.clone(),
                            })
                            .await;
                    }
                    Err(OrderError::Failed(e)) => {
                        metrics.acme_order(false);
                        tracing::warn!(
                            domain,
                            "ACME order failed (the current certificate, if any, stays; retried with backoff): {e}"
                        );
                        let _ = node
                            .write(Command::AcmeOrderFinished {
                                domain: domain.clone(),
                                at_unix_ms: unix_ms(),
                                outcome: Err(e),
                            })
                            .await;
                    }
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// When a domain whose last order failed may be tried again: 30 s after the first failure,
/// doubling up to 1 h.
fn retry_at_unix_ms(status: &crate::state::AcmeStatus) -> Option<u64> {
    if status.consecutive_failures == 0 {
        return None;
    }
    let exp = (status.consecutive_failures - 1).min(16);
    let backoff = FIRST_RETRY.saturating_mul(1 << exp).min(MAX_RETRY);
    Some(status.last_attempt_unix_ms? + backoff.as_millis() as u64)
}

/// Logs, once a day per domain, certificates (manual or ACME) that expire within 30 days.
fn warn_expiring(expiries: &[(String, i64)], warned_at: &mut HashMap<String, Instant>) {
    let now = (unix_ms() / 1000) as i64;
    for (domain, not_after) in expiries {
        let days_left = (not_after - now).div_euclid(86_400);
        if days_left >= crate::state::EXPIRY_WARNING_DAYS {
            continue;
        }
        if warned_at
            .get(domain)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(86_400))
        {
            continue;
        }
        warned_at.insert(domain.clone(), Instant::now());
        tracing::warn!(domain, days_left, "certificate expires within 30 days");
    }
}

fn directory_url(cfg: &LetsEncryptConfig) -> String {
    match &cfg.directory_url {
        Some(u) => u.clone(),
        None if cfg.staging => LetsEncrypt::Staging.url().to_string(),
        None => LetsEncrypt::Production.url().to_string(),
    }
}

/// The cluster's account: from the replicated credentials, or created once and replicated.
async fn account(node: &ClusterNode, cfg: &LetsEncryptConfig) -> Result<Account, OrderError> {
    let builder = || {
        match &cfg.ca_bundle {
            Some(path) => Account::builder_with_root(path),
            None => Account::builder(),
        }
        .map_err(|e| format!("ACME client: {e}"))
    };
    let stored = node.sm.with_state(|s| s.acme.account.clone());
    // The credentials name their CA: a changed `directory_url`/`staging` needs a new account.
    let same_ca = |json: &str| {
        serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v["directory"].as_str().map(|d| d == directory_url(cfg)))
            .unwrap_or(false)
    };
    if let Some(json) = stored.filter(|j| same_ca(j)) {
        let creds: AccountCredentials =
            serde_json::from_str(&json).map_err(|e| format!("stored ACME account: {e}"))?;
        return builder()?
            .from_credentials(creds)
            .await
            .map_err(|e| OrderError::Failed(format!("loading the ACME account: {e}")));
    }
    let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            directory_url(cfg),
            None,
        )
        .await
        .map_err(|e| format!("creating an ACME account at {}: {e}", directory_url(cfg)))?;
    let credentials_json =
        serde_json::to_string(&creds).map_err(|e| format!("encoding the ACME account: {e}"))?;
    write(node, Command::SetAcmeAccount { credentials_json }).await?;
    Ok(account)
}

/// Why an order did not end with a certificate. Only `Failed` counts against the CA (failure
/// count, backoff): an order given up because this node is no longer leader is the new
/// leader's to run, at once.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("this node lost the Raft leadership during the order")]
    LeadershipMoved,
    #[error("{0}")]
    Failed(String),
}

impl From<String> for OrderError {
    fn from(e: String) -> Self {
        OrderError::Failed(e)
    }
}

impl From<&str> for OrderError {
    fn from(e: &str) -> Self {
        OrderError::Failed(e.to_string())
    }
}

fn still_leader(node: &ClusterNode) -> Result<(), OrderError> {
    if node.is_leader() {
        Ok(())
    } else {
        Err(OrderError::LeadershipMoved)
    }
}

async fn write(node: &ClusterNode, cmd: Command) -> Result<(), OrderError> {
    match node.write(cmd).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(OrderError::Failed(e.to_string())),
        // The cluster cannot take writes: leadership is moving or gone, not the CA's doing.
        Err(_) if !node.is_leader() => Err(OrderError::LeadershipMoved),
        Err(e) => Err(OrderError::Failed(e.to_string())),
    }
}

/// One order for `domain`, start to finish. Challenge answers are removed whatever happens.
async fn issue(
    node: &ClusterNode,
    cfg: &LetsEncryptConfig,
    domain: &str,
) -> Result<(), OrderError> {
    write(
        node,
        Command::AcmeOrderStarted {
            domain: domain.to_string(),
            node_id: node.node_id,
            at_unix_ms: unix_ms(),
        },
    )
    .await?;
    let mut tokens = Vec::new();
    let result = order(node, cfg, domain, &mut tokens).await;
    for token in tokens {
        let _ = write(node, Command::RemoveChallenge { token }).await;
    }
    let cert = result?;
    write(
        node,
        Command::AcmeOrderFinished {
            domain: domain.to_string(),
            at_unix_ms: unix_ms(),
            outcome: Ok(cert),
        },
    )
    .await
}

async fn order(
    node: &ClusterNode,
    cfg: &LetsEncryptConfig,
    domain: &str,
    tokens: &mut Vec<String>,
) -> Result<crate::state::CertPair, OrderError> {
    let account = account(node, cfg).await?;
    let identifiers = [Identifier::Dns(domain.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("authorization is {other:?}").into()),
        }
        let mut challenge = authz
            .challenge(ChallengeType::Http01)
            .ok_or("the CA offered no http-01 challenge")?;
        let token = challenge.token.clone();
        let key_authorization = challenge.key_authorization().as_str().to_string();
        tokens.push(token.clone());
        write(
            node,
            Command::PutChallenge {
                token,
                key_authorization,
            },
        )
        .await?;
        // Every live node must answer before the CA is told to look.
        node.wait_applied_by_members(node.last_applied(), Duration::from_secs(10))
            .await?;
        // A deposed leader stops here; the new one takes the domain over (its lease ends).
        still_leader(node)?;
        challenge
            .set_ready()
            .await
            .map_err(|e| format!("challenge set_ready: {e}"))?;
    }
    let retry = RetryPolicy::new().timeout(Duration::from_secs(90));
    let status = order
        .poll_ready(&retry)
        .await
        .map_err(|e| format!("waiting for validation: {e}"))?;
    still_leader(node)?;
    if status != OrderStatus::Ready {
        let detail = order
            .state()
            .error
            .as_ref()
            .map(|p| format!(": {p}"))
            .unwrap_or_default();
        return Err(format!("order is {status:?} after validation{detail}").into());
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(|e| format!("finalize: {e}"))?;
    let chain_pem = order
        .poll_certificate(&retry)
        .await
        .map_err(|e| format!("downloading the certificate: {e}"))?;
    tls::cert_pair(&chain_pem, &key_pem)
        .map_err(|e| OrderError::Failed(format!("issued certificate: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AcmeStatus, CertPair, Domain};

    fn acme_domain(name: &str, not_after: Option<i64>) -> Domain {
        Domain {
            domain: name.into(),
            enabled_backends_tag: "a".into(),
            http_to_https: false,
            tls: TlsMode::Acme,
            access_log: true,
            access_log_query: true,
            cert: not_after.map(|n| CertPair {
                chain_pem: String::new(),
                key_pem: String::new(),
                not_after: n,
                names: vec![name.into()],
            }),
        }
    }

    #[test]
    fn retry_backoff_doubles_from_30_s_to_1_h() {
        let st = |failures, at| AcmeStatus {
            consecutive_failures: failures,
            last_attempt_unix_ms: Some(at),
            ..Default::default()
        };
        assert_eq!(retry_at_unix_ms(&st(0, 1_000)), None);
        assert_eq!(retry_at_unix_ms(&st(1, 1_000)), Some(31_000));
        assert_eq!(retry_at_unix_ms(&st(2, 1_000)), Some(61_000));
        assert_eq!(retry_at_unix_ms(&st(40, 1_000)), Some(3_601_000));
    }

    #[test]
    fn due_domains_picks_missing_and_expiring_certs_not_leased_ones() {
        let now_ms = 1_000_000_000_000u64; // seconds: 1e9
        let day = 86_400i64;
        let mut s = State::default();
        for d in [
            acme_domain("none.test", None),
            acme_domain("soon.test", Some(1_000_000_000 + 10 * day)),
            acme_domain("later.test", Some(1_000_000_000 + 60 * day)),
            acme_domain("*.wild.test", None),
        ] {
            s.domains.insert(d.domain.to_string(), d);
        }
        let mut manual = acme_domain("manual.test", None);
        manual.tls = TlsMode::Manual;
        s.domains.insert(manual.domain.to_string(), manual);
        let window = Duration::from_secs(30 * 86_400);
        let all_alive = |_| true;
        assert_eq!(
            due_domains(&s, now_ms, window, 1, all_alive),
            vec!["none.test".to_string(), "soon.test".to_string()]
        );

        // Another node's fresh lease hides the domain; an old one does not; ours does not.
        s.acme.status.insert(
            "none.test".into(),
            AcmeStatus {
                in_flight: Some((2, now_ms - 1_000)),
                ..Default::default()
            },
        );
        assert_eq!(
            due_domains(&s, now_ms, window, 1, all_alive),
            vec!["soon.test".to_string()]
        );
        assert_eq!(due_domains(&s, now_ms, window, 2, all_alive).len(), 2);
        // The owner died: its lease is taken over at once.
        assert_eq!(due_domains(&s, now_ms, window, 1, |id| id != 2).len(), 2);
        let stale = now_ms - LEASE.as_millis() as u64 - 1;
        s.acme.status.get_mut("none.test").unwrap().in_flight = Some((2, stale));
        assert_eq!(due_domains(&s, now_ms, window, 1, all_alive).len(), 2);

        // An explicit renewal request makes a domain with a fresh certificate due.
        s.acme.status.insert(
            "later.test".into(),
            AcmeStatus {
                renew_requested: true,
                ..Default::default()
            },
        );
        assert!(due_domains(&s, now_ms, window, 1, all_alive).contains(&"later.test".to_string()));
    }
}
