//! The replicated model: domains and backends, the `Command`s that change them, and the pure,
//! deterministic `apply` every node runs on every committed Raft entry.
//!
//! Field formats are the `schema` newtypes: a `Command` cannot hold an invalid id, tag, domain
//! or address, on whichever node it is read. `apply` only checks what depends on the current
//! state (existence, duplicates, the cluster's maxima), so every node reaches the same result
//! from the same log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schema::{BackendId, DomainName, HealthPath, HostPort, Tag, MAX_BACKENDS, MAX_DOMAINS};
pub use crate::schema::{BackendTls, SendProxyProtocol, TlsMode};

/// A certificate chain and its private key, both PEM, plus facts read from the leaf when the
/// command was built (so `apply` never parses certificates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertPair {
    pub chain_pem: String,
    pub key_pem: String,
    /// Leaf certificate expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// DNS names (SANs) of the leaf.
    pub names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub domain: DomainName,
    pub enabled_backends_tag: Tag,
    pub http_to_https: bool,
    pub tls: TlsMode,
    pub cert: Option<CertPair>,
    /// Requests to this domain are written to the access log (`[access_log]`). Absent in
    /// data written before the field existed: on.
    #[serde(default = "on")]
    pub access_log: bool,
    /// Query strings are written to the access log; false drops them (tokens in URLs).
    #[serde(default = "on")]
    pub access_log_query: bool,
}

fn on() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub id: BackendId,
    pub address: HostPort,
    pub tags: Vec<Tag>,
    pub health_check_path: Option<HealthPath>,
    /// Drained backends get no new requests (replicated so every node honours it).
    pub draining: bool,
    /// A PROXY protocol header on every connection to the backend. Absent in states
    /// written before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_proxy_protocol: Option<SendProxyProtocol>,
    /// TLS to the backend (`https://` addresses). Absent: plain TCP, as in states written
    /// before the field existed. Boxed: most backends have none, and a state holds 100,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<BackendTls>>,
}

impl Backend {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// For `Option<Option<T>>` patch fields in JSON (log entries, RPC): an absent field is `None`
/// (keep), `null` is `Some(None)` (clear), a value is `Some(Some(v))`. Plain serde would read
/// `null` as `None` and silently turn "clear" into "keep".
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Partial update of a domain: `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainPatch {
    pub enabled_backends_tag: Option<Tag>,
    pub http_to_https: Option<bool>,
    pub tls: Option<TlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log_query: Option<bool>,
    /// `Some(None)` removes the certificate.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub cert: Option<Option<CertPair>>,
}

/// Partial update of a backend: `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendPatch {
    pub address: Option<HostPort>,
    pub tags: Option<Vec<Tag>>,
    /// `Some(None)` clears the override.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub health_check_path: Option<Option<HealthPath>>,
    /// `Some(None)` stops sending the PROXY protocol header.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub send_proxy_protocol: Option<Option<SendProxyProtocol>>,
    /// `Some(None)` goes back to plain TCP.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub tls: Option<Option<Box<BackendTls>>>,
}

/// Every change to the replicated state. One API call is one command, so a rejected call
/// changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Seeds an empty cluster from the config file. Ignored once the state was seeded, so a
    /// node restarting with a different file never overwrites the cluster.
    Seed {
        domains: Vec<Domain>,
        backends: Vec<Backend>,
    },
    /// One part of a seed too large for one log entry ([`seed_parts`]). Parts are staged in
    /// `State::pending_seed` and applied together with the last one, so nothing of a seed is
    /// visible before all of it is.
    SeedPart {
        /// Chosen by the proposer; a part of another seed id restarts the staging.
        seed_id: u64,
        /// 0-based; parts apply only in order.
        part: u32,
        parts: u32,
        domains: Vec<Domain>,
        backends: Vec<Backend>,
    },
    CreateDomain(Domain),
    UpdateDomain {
        domain: DomainName,
        patch: DomainPatch,
    },
    DeleteDomain(DomainName),
    /// Sets the active tag. Health checks happen before proposing (they are local views, not
    /// replicated facts).
    SwitchTag {
        domain: DomainName,
        tag: Tag,
    },
    CreateBackend(Backend),
    UpdateBackend {
        id: BackendId,
        patch: BackendPatch,
    },
    DeleteBackend(BackendId),
    SetDraining {
        id: BackendId,
        draining: bool,
    },
    // ACME.
    /// The cluster's ACME account (instant-acme credentials, JSON): every leader uses it.
    SetAcmeAccount {
        credentials_json: String,
    },
    /// An HTTP-01 answer every node serves under `/.well-known/acme-challenge/{token}`.
    PutChallenge {
        token: String,
        key_authorization: String,
    },
    RemoveChallenge {
        token: String,
    },
    /// A leader starts an order for `domain`: a lease, so one order per domain is in flight.
    AcmeOrderStarted {
        domain: String,
        node_id: u64,
        at_unix_ms: u64,
    },
    /// An operator asked for a new certificate now (`POST /api/v1/certs/{domain}/renew`).
    RequestAcmeRenewal {
        domain: String,
    },
    /// The order ended: the issued certificate, or why it failed (the old cert stays).
    AcmeOrderFinished {
        domain: String,
        at_unix_ms: u64,
        outcome: Result<CertPair, String>,
    },
    /// The node running the order stopped being leader: the lease is released for the new
    /// leader, and nothing counts against the CA (no failure, no backoff).
    AcmeOrderAbandoned {
        domain: String,
    },
    /// A new TLS session ticket key, made by the leader when the newest one is a rotation
    /// period old: it encrypts the tickets every node issues from now on; the one before it
    /// still decrypts for one more period.
    RotateTicketKey(TicketKey),
}

/// Session ticket keys kept: the newest (encrypts and decrypts) and the one before it
/// (decrypts only).
pub const TICKET_KEYS_KEPT: usize = 2;

/// A TLS session ticket key, shared by every node so that a session resumes on any node.
/// Secret: never in the API or the logs (its `Debug` shows the id only).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketKey {
    /// Names the key inside each ticket.
    pub id: u32,
    /// 32 random bytes, hex.
    pub secret_hex: String,
    pub created_unix_ms: u64,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKey")
            .field("id", &self.id)
            .field("created_unix_ms", &self.created_unix_ms)
            .finish_non_exhaustive()
    }
}

impl TicketKey {
    /// The key's 32 bytes, `None` when the entry is not a valid key.
    pub fn secret(&self) -> Option<[u8; 32]> {
        let hex = self.secret_hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let digit = |b: u8| (b as char).to_digit(16);
            out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Some(out)
    }
}

/// What a command did, returned to the API caller after commit + apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Nothing to report (membership entries, blank entries, seeds).
    Nothing,
    Seeded {
        applied: bool,
    },
    /// A seed part was staged; the seed applies with its last part.
    SeedPartStaged {
        part: u32,
    },
    Domain(Domain),
    DomainSwitched {
        domain: Domain,
        previous_tag: Tag,
    },
    DomainDeleted,
    Backend(Backend),
    BackendDeleted,
    Acme,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("domain {0:?} already exists")]
    DomainExists(String),
    #[error("domain {0:?} not found")]
    DomainNotFound(String),
    #[error("backend {0:?} already exists")]
    BackendExists(String),
    #[error("backend {0:?} not found")]
    BackendNotFound(String),
    #[error("the cluster already holds the maximum of {0} domains")]
    TooManyDomains(usize),
    #[error("the cluster already holds the maximum of {0} backends")]
    TooManyBackends(usize),
}

/// The response type stored in Raft: the outcome of `apply` for one entry.
pub type ApplyResult = Result<Applied, ApplyError>;

/// The replicated state. Ordered maps keep iteration (and so snapshots and listings) ordered,
/// and a key is a cursor for paging. They are persistent (`imbl::OrdMap`, the same JSON as a
/// `BTreeMap`): cloning the state is O(1) and a write copies only the path to what it
/// changes, so API reads and snapshots take a copy and let go of the state machine at once
/// instead of holding it (and every write behind them) for a pass over 100,000 entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub domains: imbl::OrdMap<String, Domain>,
    pub backends: imbl::OrdMap<String, Backend>,
    /// True once the config file's seed (or any write) has been applied.
    pub seeded: bool,
    #[serde(default)]
    pub acme: AcmeState,
    /// Parts of a large seed received so far (not visible in `domains`/`backends` yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_seed: Option<PendingSeed>,
    /// TLS session ticket keys, newest first (at most [`TICKET_KEYS_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ticket_keys: Vec<TicketKey>,
}

impl State {
    /// A copy to publish from (O(1) for the persistent maps): everything but the parts of a
    /// seed still being received, which nothing outside the state machine reads.
    pub fn published_view(&self) -> State {
        State {
            domains: self.domains.clone(),
            backends: self.backends.clone(),
            seeded: self.seeded,
            acme: self.acme.clone(),
            pending_seed: None,
            ticket_keys: self.ticket_keys.clone(),
        }
    }
}

/// A seed being received in parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSeed {
    pub seed_id: u64,
    /// The part expected next.
    pub next_part: u32,
    pub domains: Vec<Domain>,
    pub backends: Vec<Backend>,
}

/// Splits a seed into log entries of about `budget` bytes of JSON each: one `Seed` when it
/// fits, `SeedPart`s otherwise. No entry exceeds the budget unless one domain or backend does.
pub fn seed_parts(
    seed_id: u64,
    domains: Vec<Domain>,
    backends: Vec<Backend>,
    budget: usize,
) -> Vec<Command> {
    let total: usize =
        domains.iter().map(json_len).sum::<usize>() + backends.iter().map(json_len).sum::<usize>();
    if total <= budget {
        return vec![Command::Seed { domains, backends }];
    }
    let mut chunks: Vec<(Vec<Domain>, Vec<Backend>)> = vec![(Vec::new(), Vec::new())];
    let mut used = 0;
    let mut room = |n: usize, chunks: &mut Vec<(Vec<Domain>, Vec<Backend>)>| {
        let last = chunks
            .last()
            .is_none_or(|(d, b)| d.is_empty() && b.is_empty());
        if used + n > budget && !last {
            chunks.push((Vec::new(), Vec::new()));
            used = 0;
        }
        used += n;
    };
    for b in backends {
        room(json_len(&b), &mut chunks);
        if let Some(last) = chunks.last_mut() {
            last.1.push(b);
        }
    }
    for d in domains {
        room(json_len(&d), &mut chunks);
        if let Some(last) = chunks.last_mut() {
            last.0.push(d);
        }
    }
    let parts = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (domains, backends))| Command::SeedPart {
            seed_id,
            part: i as u32,
            parts,
            domains,
            backends,
        })
        .collect()
}

/// JSON size of a value, for splitting seeds.
fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(0, |v| v.len())
}

/// Certificates expiring within this many days are flagged in the API and logged.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Replicated ACME state: the account, the challenge answers, and per-domain order status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AcmeState {
    pub account: Option<String>,
    /// token -> key authorization
    pub challenges: BTreeMap<String, String>,
    /// One per ACME domain (up to every domain): persistent like the state's other maps.
    pub status: imbl::OrdMap<String, AcmeStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AcmeStatus {
    /// Node running an order for this domain, and since when (Unix ms).
    pub in_flight: Option<(u64, u64)>,
    pub last_attempt_unix_ms: Option<u64>,
    pub last_success_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Set by `POST /api/v1/certs/{domain}/renew`; cleared by the next successful order.
    pub renew_requested: bool,
}

impl State {
    /// Backends carrying `tag`, in id order.
    pub fn backends_with_tag<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a Backend> {
        self.backends.values().filter(move |b| b.has_tag(tag))
    }
}

/// What a batch of commands may have changed, for the routing table and certificate map: they
/// rebuild what is named here and reuse everything else, so a write costs what it touches,
/// not the size of the state. Derived from the commands alone (a command that failed names
/// what it would have changed: rebuilding an unchanged entry is harmless).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Everything (a seed, a snapshot, the first publish): compile from scratch.
    pub all: bool,
    pub domains: std::collections::BTreeSet<String>,
    pub backends: std::collections::BTreeSet<String>,
    /// The ACME challenge answers.
    pub challenges: bool,
}

impl Changes {
    pub fn everything() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && !self.challenges && self.domains.is_empty() && self.backends.is_empty()
    }

    /// Adds what `cmd` may change.
    pub fn add(&mut self, cmd: &Command) {
        match cmd {
            Command::Seed { .. } => self.all = true,
            // Staged parts change nothing visible; the last one applies the whole seed.
            Command::SeedPart { part, parts, .. } => {
                if part.saturating_add(1) >= *parts {
                    self.all = true;
                }
            }
            Command::CreateDomain(d) => {
                self.domains.insert(d.domain.to_string());
            }
            Command::UpdateDomain { domain, .. }
            | Command::DeleteDomain(domain)
            | Command::SwitchTag { domain, .. } => {
                self.domains.insert(domain.to_string());
            }
            Command::CreateBackend(b) => {
                self.backends.insert(b.id.to_string());
            }
            Command::UpdateBackend { id, .. }
            | Command::DeleteBackend(id)
            | Command::SetDraining { id, .. } => {
                self.backends.insert(id.to_string());
            }
            Command::PutChallenge { .. } | Command::RemoveChallenge { .. } => {
                self.challenges = true;
            }
            // A certificate lands on its domain.
            Command::AcmeOrderFinished { domain, .. } => {
                self.domains.insert(domain.clone());
            }
            // Ticket keys are read whole on every publish (two at most).
            Command::RotateTicketKey(_)
            | Command::SetAcmeAccount { .. }
            | Command::AcmeOrderStarted { .. }
            | Command::RequestAcmeRenewal { .. }
            | Command::AcmeOrderAbandoned { .. } => {}
        }
    }
}

/// Applies one command. Pure and deterministic: the same state and command give the same
/// result on every node.
pub fn apply(state: &mut State, cmd: &Command) -> ApplyResult {
    match cmd {
        Command::Seed { domains, backends } => {
            if state.seeded {
                return Ok(Applied::Seeded { applied: false });
            }
            for b in backends {
                state.backends.insert(b.id.to_string(), b.clone());
            }
            for d in domains {
                state.domains.insert(d.domain.to_string(), d.clone());
            }
            state.seeded = true;
            Ok(Applied::Seeded { applied: true })
        }
        Command::SeedPart {
            seed_id,
            part,
            parts,
            domains,
            backends,
        } => {
            if state.seeded {
                state.pending_seed = None;
                return Ok(Applied::Seeded { applied: false });
            }
            if *part == 0 {
                state.pending_seed = Some(PendingSeed {
                    seed_id: *seed_id,
                    ..Default::default()
                });
            }
            let Some(pending) = state
                .pending_seed
                .as_mut()
                .filter(|p| p.seed_id == *seed_id && p.next_part == *part)
            else {
                // A part of an abandoned seed, or out of order: the proposer starts over.
                return Ok(Applied::Seeded { applied: false });
            };
            pending.domains.extend(domains.iter().cloned());
            pending.backends.extend(backends.iter().cloned());
            pending.next_part += 1;
            if pending.next_part < *parts {
                return Ok(Applied::SeedPartStaged { part: *part });
            }
            let done = state.pending_seed.take().unwrap_or_default();
            apply(
                state,
                &Command::Seed {
                    domains: done.domains,
                    backends: done.backends,
                },
            )
        }
        Command::CreateDomain(d) => {
            if state.domains.contains_key(d.domain.as_str()) {
                return Err(ApplyError::DomainExists(d.domain.to_string()));
            }
            if state.domains.len() >= MAX_DOMAINS {
                return Err(ApplyError::TooManyDomains(MAX_DOMAINS));
            }
            state.seeded = true;
            state.domains.insert(d.domain.to_string(), d.clone());
            Ok(Applied::Domain(d.clone()))
        }
        Command::UpdateDomain { domain, patch } => {
            let d = state
                .domains
                .get_mut(domain.as_str())
                .ok_or_else(|| ApplyError::DomainNotFound(domain.to_string()))?;
            if let Some(tag) = &patch.enabled_backends_tag {
                d.enabled_backends_tag = tag.clone();
            }
            if let Some(v) = patch.http_to_https {
                d.http_to_https = v;
            }
            if let Some(tls) = patch.tls {
                d.tls = tls;
            }
            if let Some(v) = patch.access_log {
                d.access_log = v;
            }
            if let Some(v) = patch.access_log_query {
                d.access_log_query = v;
            }
            if let Some(cert) = &patch.cert {
                d.cert = cert.clone();
            }
            Ok(Applied::Domain(d.clone()))
        }
        Command::DeleteDomain(domain) => match state.domains.remove(domain.as_str()) {
            Some(_) => {
                state.acme.status.remove(domain.as_str());
                Ok(Applied::DomainDeleted)
            }
            None => Err(ApplyError::DomainNotFound(domain.to_string())),
        },
        Command::SwitchTag { domain, tag } => {
            let d = state
                .domains
                .get_mut(domain.as_str())
                .ok_or_else(|| ApplyError::DomainNotFound(domain.to_string()))?;
            let previous_tag = std::mem::replace(&mut d.enabled_backends_tag, tag.clone());
            Ok(Applied::DomainSwitched {
                domain: d.clone(),
                previous_tag,
            })
        }
        Command::CreateBackend(b) => {
            if state.backends.contains_key(b.id.as_str()) {
                return Err(ApplyError::BackendExists(b.id.to_string()));
            }
            if state.backends.len() >= MAX_BACKENDS {
                return Err(ApplyError::TooManyBackends(MAX_BACKENDS));
            }
            state.seeded = true;
            state.backends.insert(b.id.to_string(), b.clone());
            Ok(Applied::Backend(b.clone()))
        }
        Command::UpdateBackend { id, patch } => {
            let b = state
                .backends
                .get_mut(id.as_str())
                .ok_or_else(|| ApplyError::BackendNotFound(id.to_string()))?;
            if let Some(a) = &patch.address {
                b.address = a.clone();
            }
            if let Some(t) = &patch.tags {
                b.tags = t.clone();
            }
            if let Some(p) = &patch.health_check_path {
                b.health_check_path = p.clone();
            }
            if let Some(v) = patch.send_proxy_protocol {
                b.send_proxy_protocol = v;
            }
            if let Some(v) = &patch.tls {
                b.tls = v.clone();
            }
            Ok(Applied::Backend(b.clone()))
        }
        Command::DeleteBackend(id) => match state.backends.remove(id.as_str()) {
            Some(_) => Ok(Applied::BackendDeleted),
            None => Err(ApplyError::BackendNotFound(id.to_string())),
        },
        Command::SetDraining { id, draining } => {
            let b = state
                .backends
                .get_mut(id.as_str())
                .ok_or_else(|| ApplyError::BackendNotFound(id.to_string()))?;
            b.draining = *draining;
            Ok(Applied::Backend(b.clone()))
        }
        Command::SetAcmeAccount { credentials_json } => {
            state.acme.account = Some(credentials_json.clone());
            Ok(Applied::Acme)
        }
        Command::PutChallenge {
            token,
            key_authorization,
        } => {
            state
                .acme
                .challenges
                .insert(token.clone(), key_authorization.clone());
            Ok(Applied::Acme)
        }
        Command::RemoveChallenge { token } => {
            state.acme.challenges.remove(token);
            Ok(Applied::Acme)
        }
        Command::AcmeOrderStarted {
            domain,
            node_id,
            at_unix_ms,
        } => {
            if !state.domains.contains_key(domain) {
                return Err(ApplyError::DomainNotFound(domain.clone()));
            }
            let st = state.acme.status.entry(domain.clone()).or_default();
            st.in_flight = Some((*node_id, *at_unix_ms));
            st.last_attempt_unix_ms = Some(*at_unix_ms);
            Ok(Applied::Acme)
        }
        Command::RequestAcmeRenewal { domain } => {
            if !state.domains.contains_key(domain) {
                return Err(ApplyError::DomainNotFound(domain.clone()));
            }
            state
                .acme
                .status
                .entry(domain.clone())
                .or_default()
                .renew_requested = true;
            Ok(Applied::Acme)
        }
        Command::AcmeOrderAbandoned { domain } => {
            if let Some(st) = state.acme.status.get_mut(domain) {
                st.in_flight = None;
            }
            Ok(Applied::Acme)
        }
        Command::AcmeOrderFinished {
            domain,
            at_unix_ms,
            outcome,
        } => {
            let Some(d) = state.domains.get_mut(domain) else {
                return Err(ApplyError::DomainNotFound(domain.clone()));
            };
            let st = state.acme.status.entry(domain.clone()).or_default();
            st.in_flight = None;
            match outcome {
                // Only an ACME domain takes the issued cert: a switch to manual meanwhile wins.
                Ok(cert) if d.tls == TlsMode::Acme => {
                    d.cert = Some(cert.clone());
                    st.renew_requested = false;
                    st.last_success_unix_ms = Some(*at_unix_ms);
                    st.last_error = None;
                    st.consecutive_failures = 0;
                }
                Ok(_) => {}
                Err(e) => {
                    st.last_error = Some(e.clone());
                    st.consecutive_failures += 1;
                }
            }
            Ok(Applied::Acme)
        }
        Command::RotateTicketKey(key) => {
            // A key that is not one, or one already here (a command applied twice), changes
            // nothing: rotation is the leader's job, it tries again.
            if key.secret().is_none() || state.ticket_keys.iter().any(|k| k.id == key.id) {
                return Ok(Applied::Nothing);
            }
            state.ticket_keys.insert(0, key.clone());
            state.ticket_keys.truncate(TICKET_KEYS_KEPT);
            Ok(Applied::Nothing)
        }
    }
}

/// Domains and backends for unit tests of the modules that apply or compile the state.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn domain(name: &str, tag: &str) -> Domain {
        Domain {
            domain: name.into(),
            enabled_backends_tag: tag.into(),
            http_to_https: false,
            tls: TlsMode::None,
            access_log: true,
            access_log_query: true,
            cert: None,
        }
    }

    pub fn backend(id: &str, tags: &[&str]) -> Backend {
        Backend {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            tags: tags.iter().map(|t| (*t).into()).collect(),
            health_check_path: None,
            draining: false,
            send_proxy_protocol: None,
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{backend, domain};
    use super::*;

    #[test]
    fn ticket_keys_rotate_keeping_the_one_before() {
        let key = |id: u32, fill: char| TicketKey {
            id,
            secret_hex: fill.to_string().repeat(64),
            created_unix_ms: u64::from(id),
        };
        let mut s = State::default();
        for (id, fill) in [(1, 'a'), (2, 'b'), (3, 'c')] {
            assert_eq!(
                apply(&mut s, &Command::RotateTicketKey(key(id, fill))),
                Ok(Applied::Nothing)
            );
        }
        let ids: Vec<u32> = s.ticket_keys.iter().map(|k| k.id).collect();
        assert_eq!(ids, [3, 2], "newest first, two kept");
        assert_eq!(s.ticket_keys[0].secret(), Some([0xcc; 32]));
        // The same key again (a retried command), or a malformed one: nothing changes.
        let before = s.clone();
        assert_eq!(
            apply(&mut s, &Command::RotateTicketKey(key(3, 'd'))),
            Ok(Applied::Nothing)
        );
        let mut bad = key(9, 'e');
        bad.secret_hex.pop();
        assert_eq!(
            apply(&mut s, &Command::RotateTicketKey(bad)),
            Ok(Applied::Nothing)
        );
        let mut not_hex = key(10, 'x');
        not_hex.secret_hex = "zz".repeat(32);
        assert_eq!(
            apply(&mut s, &Command::RotateTicketKey(not_hex)),
            Ok(Applied::Nothing)
        );
        assert_eq!(s, before);
        // Never printed.
        let printed = format!("{:?}", s);
        assert!(!printed.contains("cccc"), "{printed}");
        // A state from before ticket keys existed loads.
        let old: State = serde_json::from_str(r#"{"domains":{},"backends":{},"seeded":true}"#)
            .expect("an old snapshot loads");
        assert!(old.ticket_keys.is_empty());
    }

    #[test]
    fn seed_applies_once() {
        let mut s = State::default();
        let seed = Command::Seed {
            domains: vec![domain("a.test", "a")],
            backends: vec![backend("x", &["a"])],
        };
        assert_eq!(apply(&mut s, &seed), Ok(Applied::Seeded { applied: true }));
        let other = Command::Seed {
            domains: vec![domain("b.test", "a")],
            backends: vec![],
        };
        assert_eq!(
            apply(&mut s, &other),
            Ok(Applied::Seeded { applied: false })
        );
        assert!(s.domains.contains_key("a.test"));
        assert!(!s.domains.contains_key("b.test"));
    }

    #[test]
    fn api_write_before_seed_blocks_seed() {
        // A cluster that was written through the API is never overwritten by a file seed.
        let mut s = State::default();
        apply(&mut s, &Command::CreateDomain(domain("api.test", "a"))).unwrap();
        let seed = Command::Seed {
            domains: vec![domain("file.test", "a")],
            backends: vec![],
        };
        assert_eq!(apply(&mut s, &seed), Ok(Applied::Seeded { applied: false }));
        assert_eq!(s.domains.len(), 1);
    }

    #[test]
    fn duplicates_and_missing_are_errors_that_change_nothing() {
        let mut s = State::default();
        apply(&mut s, &Command::CreateDomain(domain("a.test", "a"))).unwrap();
        apply(&mut s, &Command::CreateBackend(backend("x", &["a"]))).unwrap();
        let before = s.clone();
        let mut dup = domain("a.test", "b");
        dup.http_to_https = true;
        assert_eq!(
            apply(&mut s, &Command::CreateDomain(dup)),
            Err(ApplyError::DomainExists("a.test".into()))
        );
        assert_eq!(
            apply(&mut s, &Command::CreateBackend(backend("x", &["b"]))),
            Err(ApplyError::BackendExists("x".into()))
        );
        assert_eq!(
            apply(&mut s, &Command::DeleteDomain("nope".into())),
            Err(ApplyError::DomainNotFound("nope".into()))
        );
        assert_eq!(
            apply(&mut s, &Command::DeleteBackend("nope".into())),
            Err(ApplyError::BackendNotFound("nope".into()))
        );
        assert_eq!(
            apply(
                &mut s,
                &Command::UpdateDomain {
                    domain: "nope".into(),
                    patch: DomainPatch::default()
                }
            ),
            Err(ApplyError::DomainNotFound("nope".into()))
        );
        assert_eq!(
            apply(
                &mut s,
                &Command::SwitchTag {
                    domain: "nope".into(),
                    tag: "b".into()
                }
            ),
            Err(ApplyError::DomainNotFound("nope".into()))
        );
        assert_eq!(
            apply(
                &mut s,
                &Command::SetDraining {
                    id: "nope".into(),
                    draining: true
                }
            ),
            Err(ApplyError::BackendNotFound("nope".into()))
        );
        assert_eq!(s, before);
    }

    #[test]
    fn switch_returns_previous_tag() {
        let mut s = State::default();
        apply(&mut s, &Command::CreateDomain(domain("a.test", "a"))).unwrap();
        let r = apply(
            &mut s,
            &Command::SwitchTag {
                domain: "a.test".into(),
                tag: "b".into(),
            },
        )
        .unwrap();
        match r {
            Applied::DomainSwitched {
                domain,
                previous_tag,
            } => {
                assert_eq!(previous_tag, "a");
                assert_eq!(domain.enabled_backends_tag, "b");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(s.domains["a.test"].enabled_backends_tag, "b");
    }

    #[test]
    fn patches_only_touch_given_fields() {
        let mut s = State::default();
        apply(&mut s, &Command::CreateDomain(domain("a.test", "a"))).unwrap();
        apply(&mut s, &Command::CreateBackend(backend("x", &["a"]))).unwrap();
        apply(
            &mut s,
            &Command::UpdateDomain {
                domain: "a.test".into(),
                patch: DomainPatch {
                    http_to_https: Some(true),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        let d = &s.domains["a.test"];
        assert!(d.http_to_https);
        assert_eq!(d.enabled_backends_tag, "a");
        apply(
            &mut s,
            &Command::UpdateBackend {
                id: "x".into(),
                patch: BackendPatch {
                    tags: Some(vec!["b".into()]),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        let b = &s.backends["x"];
        assert_eq!(b.tags, vec!["b".to_string()]);
        assert_eq!(b.address, "127.0.0.1:1");
        assert_eq!(s.backends_with_tag("a").count(), 0);
        assert_eq!(s.backends_with_tag("b").count(), 1);
    }

    #[test]
    fn drain_and_undrain() {
        let mut s = State::default();
        apply(&mut s, &Command::CreateBackend(backend("x", &["a"]))).unwrap();
        apply(
            &mut s,
            &Command::SetDraining {
                id: "x".into(),
                draining: true,
            },
        )
        .unwrap();
        assert!(s.backends["x"].draining);
        apply(
            &mut s,
            &Command::SetDraining {
                id: "x".into(),
                draining: false,
            },
        )
        .unwrap();
        assert!(!s.backends["x"].draining);
    }

    #[test]
    fn same_log_same_state() {
        // Determinism: replaying the same commands yields identical states and results.
        let cmds = [
            Command::CreateBackend(backend("x", &["a"])),
            Command::CreateDomain(domain("a.test", "a")),
            Command::CreateDomain(domain("a.test", "b")),
            Command::SwitchTag {
                domain: "a.test".into(),
                tag: "b".into(),
            },
            Command::DeleteBackend("x".into()),
            Command::DeleteBackend("x".into()),
        ];
        let run = || {
            let mut s = State::default();
            let results: Vec<_> = cmds.iter().map(|c| apply(&mut s, c)).collect();
            (s, results)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn commands_roundtrip_json() {
        // Log entries and Raft RPC are JSON: "clear" (Some(None)) must not become "keep".
        for cert in [None, Some(None), Some(Some(cert(7)))] {
            let c = Command::UpdateDomain {
                domain: "a.test".into(),
                patch: DomainPatch {
                    cert,
                    tls: Some(TlsMode::Manual),
                    ..Default::default()
                },
            };
            let back: Command = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
            assert_eq!(c, back);
        }
        for path in [None, Some(None), Some(Some("/hc".into()))] {
            let c = Command::UpdateBackend {
                id: "b".into(),
                patch: BackendPatch {
                    health_check_path: path,
                    ..Default::default()
                },
            };
            let back: Command = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
            assert_eq!(c, back);
        }
    }

    #[test]
    fn state_written_before_acme_existed_still_loads() {
        // A snapshot from before the `acme` field (and before `renew_requested`).
        let old = r#"{"domains":{},"backends":{},"seeded":true}"#;
        let s: State = serde_json::from_str(old).expect("old snapshot");
        assert!(s.seeded);
        assert_eq!(s.acme, AcmeState::default());
        let status: AcmeStatus =
            serde_json::from_str(r#"{"in_flight":null,"last_attempt_unix_ms":null,"last_success_unix_ms":null,"last_error":null,"consecutive_failures":0}"#)
                .expect("old status");
        assert!(!status.renew_requested);
    }

    fn cert(not_after: i64) -> CertPair {
        CertPair {
            chain_pem: format!("chain-{not_after}"),
            key_pem: "key".into(),
            not_after,
            names: vec!["a.test".into()],
        }
    }

    #[test]
    fn acme_order_lifecycle() {
        let mut s = State::default();
        let mut d = domain("a.test", "a");
        d.tls = TlsMode::Acme;
        apply(&mut s, &Command::CreateDomain(d)).unwrap();
        let started = Command::AcmeOrderStarted {
            domain: "a.test".into(),
            node_id: 2,
            at_unix_ms: 1000,
        };
        apply(&mut s, &started).unwrap();
        assert_eq!(s.acme.status["a.test"].in_flight, Some((2, 1000)));

        apply(
            &mut s,
            &Command::PutChallenge {
                token: "tok".into(),
                key_authorization: "tok.thumb".into(),
            },
        )
        .unwrap();
        assert_eq!(s.acme.challenges["tok"], "tok.thumb");

        // A failure keeps no cert, records the error and frees the lease.
        let failed = Command::AcmeOrderFinished {
            domain: "a.test".into(),
            at_unix_ms: 2000,
            outcome: Err("challenge invalid".into()),
        };
        apply(&mut s, &failed).unwrap();
        let st = &s.acme.status["a.test"];
        assert_eq!(
            (
                st.in_flight,
                st.consecutive_failures,
                st.last_error.as_deref()
            ),
            (None, 1, Some("challenge invalid"))
        );
        assert!(s.domains["a.test"].cert.is_none());

        // Abandoned because leadership moved: the lease is freed, nothing counts.
        apply(&mut s, &started).unwrap();
        apply(
            &mut s,
            &Command::AcmeOrderAbandoned {
                domain: "a.test".into(),
            },
        )
        .unwrap();
        let st = &s.acme.status["a.test"];
        assert_eq!(
            (st.in_flight, st.consecutive_failures),
            (None, 1),
            "an abandoned order is not a CA failure"
        );

        apply(&mut s, &started).unwrap();
        let ok = Command::AcmeOrderFinished {
            domain: "a.test".into(),
            at_unix_ms: 3000,
            outcome: Ok(cert(99)),
        };
        apply(&mut s, &ok).unwrap();
        assert_eq!(s.domains["a.test"].cert, Some(cert(99)));
        let st = &s.acme.status["a.test"];
        assert_eq!(
            (
                st.consecutive_failures,
                st.last_error.clone(),
                st.last_success_unix_ms
            ),
            (0, None, Some(3000))
        );

        // A later failure keeps the valid certificate.
        apply(&mut s, &failed).unwrap();
        assert_eq!(s.domains["a.test"].cert, Some(cert(99)));

        apply(
            &mut s,
            &Command::RemoveChallenge {
                token: "tok".into(),
            },
        )
        .unwrap();
        assert!(s.acme.challenges.is_empty());
        apply(&mut s, &Command::DeleteDomain("a.test".into())).unwrap();
        assert!(s.acme.status.is_empty(), "status goes with the domain");
        assert_eq!(
            apply(&mut s, &started),
            Err(ApplyError::DomainNotFound("a.test".into()))
        );
    }

    #[test]
    fn issued_cert_is_not_applied_to_a_domain_switched_to_manual() {
        let mut s = State::default();
        let mut d = domain("m.test", "a");
        d.tls = TlsMode::Manual;
        d.cert = Some(cert(5));
        apply(&mut s, &Command::CreateDomain(d)).unwrap();
        apply(
            &mut s,
            &Command::AcmeOrderFinished {
                domain: "m.test".into(),
                at_unix_ms: 1,
                outcome: Ok(cert(99)),
            },
        )
        .unwrap();
        assert_eq!(s.domains["m.test"].cert, Some(cert(5)));
    }

    #[test]
    fn changes_name_what_a_command_touches() {
        let parts = seed_parts(1, vec![domain("a.test", "a")], vec![], 0);
        let cases: Vec<(Command, Changes)> = vec![
            (
                Command::CreateDomain(domain("a.test", "a")),
                Changes {
                    domains: ["a.test".to_string()].into(),
                    ..Default::default()
                },
            ),
            (
                Command::SetDraining {
                    id: "x".into(),
                    draining: true,
                },
                Changes {
                    backends: ["x".to_string()].into(),
                    ..Default::default()
                },
            ),
            (
                Command::RemoveChallenge { token: "t".into() },
                Changes {
                    challenges: true,
                    ..Default::default()
                },
            ),
            (
                Command::AcmeOrderFinished {
                    domain: "a.test".into(),
                    at_unix_ms: 1,
                    outcome: Err("x".into()),
                },
                Changes {
                    domains: ["a.test".to_string()].into(),
                    ..Default::default()
                },
            ),
            (
                Command::RequestAcmeRenewal {
                    domain: "a.test".into(),
                },
                Changes::default(),
            ),
            (
                Command::Seed {
                    domains: vec![],
                    backends: vec![],
                },
                Changes::everything(),
            ),
            (parts[0].clone(), Changes::everything()),
        ];
        for (cmd, want) in cases {
            let mut got = Changes::default();
            got.add(&cmd);
            assert_eq!(got, want, "{cmd:?}");
        }
        // A staged seed part changes nothing visible; the last one changes everything.
        let big: Vec<Backend> = (0..50).map(|i| backend(&format!("b{i}"), &["a"])).collect();
        let parts = seed_parts(2, vec![], big, 512);
        assert!(parts.len() > 2);
        for (i, p) in parts.iter().enumerate() {
            let mut got = Changes::default();
            got.add(p);
            assert_eq!(got.all, i + 1 == parts.len(), "part {i}");
        }
    }

    #[test]
    fn a_large_seed_applies_in_parts_all_at_once() {
        let backends: Vec<Backend> = (0..300)
            .map(|i| backend(&format!("b{i}"), &["a"]))
            .collect();
        let domains: Vec<Domain> = (0..300)
            .map(|i| domain(&format!("d{i}.test"), "a"))
            .collect();
        let parts = seed_parts(7, domains.clone(), backends.clone(), 4096);
        assert!(parts.len() > 5, "{} parts", parts.len());
        for p in &parts {
            assert!(serde_json::to_vec(p).unwrap().len() <= 4096 + 512);
        }
        let mut s = State::default();
        let (last, staged) = parts.split_last().unwrap();
        for (i, p) in staged.iter().enumerate() {
            assert_eq!(
                apply(&mut s, p),
                Ok(Applied::SeedPartStaged { part: i as u32 })
            );
            // Nothing is visible before the last part.
            assert!(s.domains.is_empty() && s.backends.is_empty() && !s.seeded);
        }
        assert_eq!(apply(&mut s, last), Ok(Applied::Seeded { applied: true }));
        assert_eq!((s.domains.len(), s.backends.len()), (300, 300));
        assert!(s.pending_seed.is_none());
        // A part applied again after the seed changes nothing.
        assert_eq!(
            apply(&mut s, &parts[0]),
            Ok(Applied::Seeded { applied: false })
        );
        // A small seed is one plain entry.
        assert!(matches!(
            seed_parts(1, domains[..1].to_vec(), vec![], 4096).as_slice(),
            [Command::Seed { .. }]
        ));
    }

    #[test]
    fn an_abandoned_or_out_of_order_seed_part_is_ignored() {
        let backends: Vec<Backend> = (0..100)
            .map(|i| backend(&format!("b{i}"), &["a"]))
            .collect();
        let first = seed_parts(1, vec![], backends.clone(), 2048);
        let second = seed_parts(2, vec![], backends, 2048);
        let mut s = State::default();
        apply(&mut s, &first[0]).unwrap();
        // A new leader starts its own seed: the first one's staging is replaced.
        apply(&mut s, &second[0]).unwrap();
        assert_eq!(
            apply(&mut s, &first[1]),
            Ok(Applied::Seeded { applied: false })
        );
        // Out of order.
        assert_eq!(
            apply(&mut s, &second[2]),
            Ok(Applied::Seeded { applied: false })
        );
        for p in &second[1..] {
            apply(&mut s, p).unwrap();
        }
        assert!(s.seeded && s.backends.len() == 100);
    }
}
