//! Write ids and the replicated table of recent write results: the client sessions of the Raft
//! thesis (§6.3). Every proposed entry carries an id chosen where the write entered the cluster
//! (or the client's `Idempotency-Key`); the state machine remembers recent ids with their first
//! result, so a re-proposal, a re-forward or a client's retry with the same id returns that
//! result instead of applying the command again.
//!
//! The table is part of the replicated state (it is in every snapshot) and is changed only by
//! [`Sessions::apply`], which is pure: what it keeps and drops depends only on the log entries
//! (their order and their own timestamps), never on the local clock, so every node agrees.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::state::{self, Applied, ApplyResult, Command, State};

/// At most this many results are remembered (the oldest go first).
pub const MAX_RECORDS: usize = 10_000;
/// A result is forgotten once an entry proposed this long after it is applied.
pub const RECORD_TTL_MS: u64 = 24 * 3600 * 1000;

/// Who a write is: unique per write, the same for every retry of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WriteId {
    /// Chosen by the node where the write entered the cluster: its id, a number drawn at
    /// process start, and a counter.
    Node { node: u64, boot: u64, seq: u64 },
    /// A client's `Idempotency-Key` header (validated by the API).
    Key(String),
}

/// Makes [`WriteId::Node`] ids for one process.
pub struct IdGen {
    node: u64,
    boot: u64,
    seq: AtomicU64,
}

impl IdGen {
    pub fn new(node: u64) -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded randomly per process: a restarted node never reuses an id.
        let boot = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            node,
            boot,
            seq: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> WriteId {
        WriteId::Node {
            node: self.node,
            boot: self.boot,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// The application data of a Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Proposal {
    Write(Write),
    /// An entry written by a version before write ids: a bare command, applied as it is.
    Legacy(Command),
}

impl Proposal {
    /// The command this entry carries, whether or not its id makes it a repeat.
    pub fn command(&self) -> &Command {
        match self {
            Proposal::Write(w) => &w.cmd,
            Proposal::Legacy(cmd) => cmd,
        }
    }
}

/// A command with its id, as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub id: WriteId,
    /// Digest of the client's request when it carried an `Idempotency-Key`: a retry with the
    /// same key must be the same request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The proposing leader's wall clock: ages the table the same way on every node.
    pub at_unix_ms: u64,
    pub cmd: Command,
}

/// What applying one entry did (the Raft response type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The command was applied now.
    Applied(ApplyResult),
    /// This id was applied before: its first result; nothing changed now.
    Replayed(ApplyResult),
    /// The id is an `Idempotency-Key` first used for a different request: nothing changed.
    KeyReused,
}

impl Outcome {
    /// The command's result, whether applied now or before; `None` for a reused key.
    pub fn result(self) -> Option<ApplyResult> {
        match self {
            Outcome::Applied(r) | Outcome::Replayed(r) => Some(r),
            Outcome::KeyReused => None,
        }
    }
}

/// What the table knows about an id, for answering before proposing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Not in the table (never applied, or forgotten).
    No,
    /// Applied with this result, for the same request.
    Same(ApplyResult),
    /// The key was used for another request.
    OtherRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    id: WriteId,
    at_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    result: ApplyResult,
}

/// Recent write ids and their first results, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sessions {
    /// By insertion position (a counter local to this copy; only the order matters).
    records: BTreeMap<u64, Record>,
    by_id: HashMap<WriteId, u64>,
    next: u64,
}

impl Sessions {
    /// Applies one write: the command once per id, the first result for every later copy.
    pub fn apply(&mut self, state: &mut State, w: &Write) -> Outcome {
        self.expire(w.at_unix_ms);
        match self.known(&w.id, w.fingerprint.as_deref()) {
            Known::Same(result) => return Outcome::Replayed(result),
            Known::OtherRequest => return Outcome::KeyReused,
            Known::No => {}
        }
        let result = state::apply(state, &w.cmd);
        self.insert(Record {
            id: w.id.clone(),
            at_unix_ms: w.at_unix_ms,
            fingerprint: w.fingerprint.clone(),
            result: without_key_material(&result),
        });
        Outcome::Applied(result)
    }

    /// What is known about `id`, given the request digest a retry carries.
    pub fn known(&self, id: &WriteId, fingerprint: Option<&str>) -> Known {
        match self.by_id.get(id).and_then(|pos| self.records.get(pos)) {
            None => Known::No,
            Some(r) if r.fingerprint.as_deref() == fingerprint => Known::Same(r.result.clone()),
            Some(_) => Known::OtherRequest,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn insert(&mut self, r: Record) {
        let pos = self.next;
        self.next += 1;
        self.by_id.insert(r.id.clone(), pos);
        self.records.insert(pos, r);
        while self.records.len() > MAX_RECORDS {
            self.pop_oldest();
        }
    }

    /// Drops records older than the TTL, judged by the entry being applied. Leaders' clocks
    /// differ a little, so the order is only nearly by age: a record is dropped once it is the
    /// oldest in line and old enough.
    fn expire(&mut self, now_unix_ms: u64) {
        let cutoff = now_unix_ms.saturating_sub(RECORD_TTL_MS);
        while self
            .records
            .first_key_value()
            .is_some_and(|(_, r)| r.at_unix_ms < cutoff)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, r)) = self.records.pop_first() {
            self.by_id.remove(&r.id);
        }
    }
}

// On disk and in snapshots: the records, oldest first.
impl Serialize for Sessions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.records.values())
    }
}

impl<'de> Deserialize<'de> for Sessions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut sessions = Sessions::default();
        for r in Vec::<Record>::deserialize(d)? {
            sessions.insert(r);
        }
        Ok(sessions)
    }
}

/// The copy of a result the table keeps: without the certificate PEMs (a replayed answer shows
/// only the certificate's names and expiry), so the table stays small.
fn without_key_material(result: &ApplyResult) -> ApplyResult {
    let mut r = result.clone();
    if let Ok(Applied::Domain(d) | Applied::DomainSwitched { domain: d, .. }) = &mut r {
        if let Some(c) = &mut d.cert {
            c.chain_pem = String::new();
            c.key_pem = String::new();
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::domain;
    use crate::state::{ApplyError, CertPair, TlsMode};

    fn id(n: u64) -> WriteId {
        WriteId::Node {
            node: 1,
            boot: 7,
            seq: n,
        }
    }

    fn write(id: WriteId, at: u64, cmd: Command) -> Write {
        Write {
            id,
            fingerprint: None,
            at_unix_ms: at,
            cmd,
        }
    }

    fn switch(tag: &str) -> Command {
        Command::SwitchTag {
            domain: "a.test".into(),
            tag: tag.into(),
        }
    }

    /// A state with a.test on tag "a", through the table (id 0).
    fn seeded() -> (Sessions, State) {
        let mut s = Sessions::default();
        let mut st = State::default();
        s.apply(
            &mut st,
            &write(id(0), 1000, Command::CreateDomain(domain("a.test", "a"))),
        );
        (s, st)
    }

    #[test]
    fn a_duplicate_id_returns_the_first_result_and_changes_nothing() {
        let (mut s, mut st) = seeded();
        let first = s.apply(&mut st, &write(id(1), 2000, switch("b")));
        let Outcome::Applied(Ok(Applied::DomainSwitched { previous_tag, .. })) = &first else {
            panic!("first switch: {first:?}");
        };
        assert_eq!(previous_tag, "a");
        let after_first = st.clone();
        // The same write proposed again (a re-forward after a lost answer).
        let again = s.apply(&mut st, &write(id(1), 2500, switch("b")));
        assert_eq!(Some(again.clone().result()), Some(first.clone().result()));
        assert!(matches!(again, Outcome::Replayed(_)));
        assert_eq!(st, after_first);
    }

    #[test]
    fn a_toggle_retried_with_its_id_toggles_once() {
        // A tag-less switch is decided where the write entered (a -> b); a retry that node
        // rebuilds from a state already switched would say b -> a. With the first id, the
        // table answers the first result and the domain stays on b.
        let (mut s, mut st) = seeded();
        let key = WriteId::Key("client-key-1".into());
        let mut w = write(key.clone(), 2000, switch("b"));
        w.fingerprint = Some("digest-1".into());
        s.apply(&mut st, &w);
        let mut retry = write(key, 3000, switch("a"));
        retry.fingerprint = Some("digest-1".into());
        let r = s.apply(&mut st, &retry);
        assert_eq!(
            r,
            Outcome::Replayed(Ok(Applied::DomainSwitched {
                domain: domain("a.test", "b"),
                previous_tag: "a".into()
            }))
        );
        assert_eq!(st.domains["a.test"].enabled_backends_tag, "b");
    }

    #[test]
    fn an_error_result_is_remembered_too() {
        let (mut s, mut st) = seeded();
        let dup = Command::CreateDomain(domain("a.test", "b"));
        let first = s.apply(&mut st, &write(id(5), 2000, dup.clone()));
        assert_eq!(
            first,
            Outcome::Applied(Err(ApplyError::DomainExists("a.test".into())))
        );
        // Deleted meanwhile: a re-proposal must still answer the first result, not create it.
        s.apply(
            &mut st,
            &write(id(6), 2100, Command::DeleteDomain("a.test".into())),
        );
        let again = s.apply(&mut st, &write(id(5), 2200, dup));
        assert_eq!(
            again,
            Outcome::Replayed(Err(ApplyError::DomainExists("a.test".into())))
        );
        assert!(st.domains.is_empty());
    }

    #[test]
    fn a_key_reused_for_another_request_applies_nothing() {
        let (mut s, mut st) = seeded();
        let key = WriteId::Key("k".into());
        let mut w = write(key.clone(), 2000, switch("b"));
        w.fingerprint = Some("one".into());
        s.apply(&mut st, &w);
        let before = st.clone();
        let mut other = write(key.clone(), 2100, switch("c"));
        other.fingerprint = Some("two".into());
        assert_eq!(s.apply(&mut st, &other), Outcome::KeyReused);
        assert_eq!(st, before);
        assert_eq!(s.known(&key, Some("two")), Known::OtherRequest);
        assert!(matches!(s.known(&key, Some("one")), Known::Same(_)));
        assert_eq!(s.known(&WriteId::Key("other".into()), None), Known::No);
    }

    #[test]
    fn records_expire_by_the_entries_own_time() {
        let (mut s, mut st) = seeded();
        s.apply(&mut st, &write(id(1), 2000, switch("b")));
        // Just inside the TTL, judged by the new entry's timestamp: still known.
        s.apply(
            &mut st,
            &write(
                id(2),
                2000 + RECORD_TTL_MS,
                Command::DeleteBackend("x".into()),
            ),
        );
        assert!(matches!(s.known(&id(1), None), Known::Same(_)));
        // An entry proposed past the TTL of ids 0 and 1 drops them: the same id applies again.
        let later = 2001 + RECORD_TTL_MS;
        let again = s.apply(&mut st, &write(id(1), later, switch("c")));
        assert!(matches!(again, Outcome::Applied(Ok(_))), "{again:?}");
        assert_eq!(s.known(&id(0), None), Known::No);
        assert_eq!(s.len(), 2, "ids 2 and 1 (again) remain");
    }

    #[test]
    fn the_table_is_bounded_oldest_first() {
        let (mut s, mut st) = seeded();
        for n in 1..=(MAX_RECORDS as u64 + 5) {
            s.apply(
                &mut st,
                &write(id(n), 2000 + n, Command::DeleteBackend("x".into())),
            );
        }
        assert_eq!(s.len(), MAX_RECORDS);
        for n in 0..=5 {
            assert_eq!(s.known(&id(n), None), Known::No, "id {n} should be evicted");
        }
        assert!(matches!(s.known(&id(6), None), Known::Same(_)));
        assert_eq!(s.by_id.len(), MAX_RECORDS);
    }

    #[test]
    fn same_log_same_table() {
        let log: Vec<Write> = (0..50u64)
            .map(|n| write(id(n % 17), 1000 + n * RECORD_TTL_MS / 20, switch("b")))
            .collect();
        let run = || {
            let (mut s, mut st) = seeded();
            let out: Vec<Outcome> = log.iter().map(|w| s.apply(&mut st, w)).collect();
            (serde_json::to_string(&s).unwrap(), st, out)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn the_table_survives_a_json_round_trip_in_order() {
        let (mut s, mut st) = seeded();
        for n in 1..=20 {
            let mut w = write(id(n), 2000 + n, switch(if n % 2 == 0 { "a" } else { "b" }));
            if n == 3 {
                w.id = WriteId::Key("key-3".into());
                w.fingerprint = Some("f".into());
            }
            s.apply(&mut st, &w);
        }
        let back: Sessions = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&s).unwrap()
        );
        for n in [0, 1, 2, 4, 20] {
            assert_eq!(back.known(&id(n), None), s.known(&id(n), None));
        }
        assert!(matches!(
            back.known(&WriteId::Key("key-3".into()), Some("f")),
            Known::Same(_)
        ));
        // Eviction continues from the same oldest record.
        let mut a = s.clone();
        let mut b = back;
        for n in 100..(100 + MAX_RECORDS as u64) {
            let w = write(id(n), 3000, Command::DeleteBackend("x".into()));
            a.apply(&mut st.clone(), &w);
            b.apply(&mut st.clone(), &w);
        }
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }

    #[test]
    fn certificate_keys_are_not_kept_in_the_table() {
        let mut s = Sessions::default();
        let mut st = State::default();
        let mut d = domain("c.test", "a");
        d.tls = TlsMode::Manual;
        d.cert = Some(CertPair {
            chain_pem: "CHAIN".into(),
            key_pem: "SECRET KEY".into(),
            not_after: 99,
            names: vec!["c.test".into()],
        });
        let first = s.apply(&mut st, &write(id(1), 1, Command::CreateDomain(d.clone())));
        assert_eq!(first, Outcome::Applied(Ok(Applied::Domain(d))));
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("SECRET KEY"), "{text}");
        let Known::Same(Ok(Applied::Domain(kept))) = s.known(&id(1), None) else {
            panic!("not kept");
        };
        let cert = kept.cert.expect("cert facts kept");
        assert_eq!(
            (cert.not_after, cert.names),
            (99, vec!["c.test".to_string()])
        );
    }

    #[test]
    fn entries_of_older_versions_still_read_as_bare_commands() {
        // A log entry payload as written before write ids existed.
        let old = r#"{"SwitchTag":{"domain":"a.test","tag":"b"}}"#;
        assert_eq!(
            serde_json::from_str::<Proposal>(old).unwrap(),
            Proposal::Legacy(switch("b"))
        );
        // "clear" (null) must survive the untagged fallback, not turn into "keep".
        let clear = r#"{"UpdateBackend":{"id":"x","patch":{"address":null,"tags":null,"health_check_path":null}}}"#;
        let Proposal::Legacy(Command::UpdateBackend { patch, .. }) =
            serde_json::from_str::<Proposal>(clear).unwrap()
        else {
            panic!("not read as a legacy UpdateBackend");
        };
        assert_eq!(patch.health_check_path, Some(None));
        let new = Proposal::Write(write(id(3), 5, switch("a")));
        let text = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<Proposal>(&text).unwrap(), new);
    }
}
