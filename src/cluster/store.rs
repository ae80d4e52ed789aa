//! Durable Raft storage in one redb file: the log, the vote, the committed log id and the
//! current snapshot. Entries and snapshots are JSON: self-describing, so a newer binary reads
//! an older data dir (new fields carry `#[serde(default)]`).
//!
//! The state machine lives in memory and is rebuilt at open time from the snapshot plus the
//! committed log entries after it, so the data plane can serve the last known config before
//! any election happens.

// openraft's StorageError and redb's Error are large by design; boxing them here would only
// move the allocation to every storage call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::writes::{Known, Outcome, Proposal, Sessions, WriteId};
use super::{NodeId, TypeConfig};
use crate::state::{self, Applied, Changes, State};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
/// Before snapshots were stored in two parts: meta and data as one JSON object (the data a
/// JSON array of numbers, 3.5 bytes per byte). Still read; replaced at the next snapshot.
const KEY_SNAPSHOT_LEGACY: &str = "snapshot";
/// The current snapshot's meta (JSON) and its data (the bytes as they are).
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}
fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// Runs CPU-heavy storage work (JSON of multi-megabyte entries and snapshots, applying and
/// publishing a big batch) on the blocking pool: on the control plane's two async workers it
/// held up Raft heartbeats long enough to lose the leader after a 24,000-domain seed.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(write_err)?
}

/// Called after every applied batch with the new state and what the batch may have changed;
/// updates and publishes the routing snapshot the proxy reads.
pub type Publisher = Arc<dyn Fn(&State, &Changes) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open raft store {path}: {source}")]
    Db {
        path: String,
        source: Box<redb::Error>,
    },
    #[error(
        "raft store {path} is held by another process (another pingora-vhost with this data_dir?)"
    )]
    Locked { path: String },
    #[error("raft store {path} is corrupt: {message}")]
    Corrupt { path: String, message: String },
}

/// A snapshot: its meta and the JSON-encoded [`SnapshotData`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

/// A snapshot's data: the `State` object with the write-id table as one more field, so a
/// snapshot written before the table existed reads with an empty one, and an older binary
/// reads a newer snapshot (it ignores the field).
#[derive(Deserialize)]
struct SnapshotData {
    #[serde(flatten)]
    state: State,
    #[serde(default)]
    writes: Sessions,
}

#[derive(Serialize)]
struct SnapshotDataRef<'a> {
    #[serde(flatten)]
    state: &'a State,
    writes: &'a Sessions,
}

/// Opens (creating if needed) the store in `data_dir` and rebuilds the state machine.
pub fn open(
    data_dir: &Path,
    publish: Publisher,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let path = data_dir.join("raft.redb");
    let path_s = path.display().to_string();
    let db = Database::create(&path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => OpenError::Locked {
            path: path_s.clone(),
        },
        e => OpenError::Db {
            path: path_s.clone(),
            source: Box::new(e.into()),
        },
    })?;
    set_private(&path);
    let db = Arc::new(db);
    let corrupt = |message: String| OpenError::Corrupt {
        path: path_s.clone(),
        message,
    };
    // Create the tables so read transactions never fail on a fresh file.
    (|| -> Result<(), redb::Error> {
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(())
    })()
    .map_err(|e| OpenError::Db {
        path: path_s.clone(),
        source: Box::new(e),
    })?;

    let log = LogStore { db: db.clone() };
    let snapshot = log.stored_snapshot().map_err(|e| corrupt(e.to_string()))?;
    let committed: Option<LogId<NodeId>> = log
        .meta_get(KEY_COMMITTED)
        .map_err(|e| corrupt(e.to_string()))?;

    let mut sm = SmData::default();
    if let Some(snap) = &snapshot {
        let data: SnapshotData =
            serde_json::from_slice(&snap.data).map_err(|e| corrupt(format!("snapshot: {e}")))?;
        sm.state = data.state;
        sm.writes = data.writes;
        sm.last_applied = snap.meta.last_log_id;
        sm.last_membership = snap.meta.last_membership.clone();
    }
    // Re-apply committed entries after the snapshot: they are final, and doing it here lets the
    // proxy start with the last known table before Raft is even running.
    if let Some(committed) = committed {
        let from = sm.last_applied.map(|l| l.index + 1).unwrap_or(0);
        if committed.index >= from {
            let entries = log
                .read_entries(from..=committed.index)
                .map_err(|e| corrupt(e.to_string()))?;
            for entry in entries {
                // The result was already reported when the entry was first applied.
                let _ = sm.apply_entry(&entry);
            }
        }
    }
    publish(&sm.state, &Changes::everything());
    let (applied_tx, _) = watch::channel(sm.last_applied.map(|l| l.index).unwrap_or(0));
    let sm_store = StateMachineStore {
        inner: Arc::new(SmShared {
            data: Mutex::new(sm),
            db,
            publish,
            applied_tx,
        }),
    };
    Ok((log, sm_store))
}

#[cfg(unix)]
fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The store holds private keys of manual/ACME certificates.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
#[cfg(not(unix))]
fn set_private(_: &Path) {}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn meta_get<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, anyhow::Error> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        match t.get(key)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    /// The current snapshot, from its two keys (or the older single key).
    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, anyhow::Error> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        if let (Some(meta), Some(data)) = (t.get(KEY_SNAPSHOT_META)?, t.get(KEY_SNAPSHOT_DATA)?) {
            return Ok(Some(StoredSnapshot {
                meta: serde_json::from_slice(meta.value())?,
                data: data.value().to_vec(),
            }));
        }
        match t.get(KEY_SNAPSHOT_LEGACY)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    fn read_entries<RB: RangeBounds<u64>>(
        &self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, anyhow::Error> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOG)?;
        let mut out = Vec::new();
        for row in t.range(range)? {
            let (_, v) = row?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// Runs a write transaction on the blocking pool: redb fsyncs on commit.
    async fn write<F>(&self, f: F) -> Result<(), redb::Error>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write()?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(redb::Error::Io(std::io::Error::other(e.to_string()))))
    }

    async fn meta_put<T: Serialize>(&self, key: &'static str, value: &T) -> StorageResult<()> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        self.write(move |tx| {
            tx.open_table(META)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
        .await
        .map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        // redb's page cache makes the read cheap, but decoding entries of up to 4 MiB is not.
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        let this = self.clone();
        blocking(move || {
            this.read_entries((start, end)).map_err(|e| {
                StorageIOError::read_logs(&std::io::Error::other(e.to_string())).into()
            })
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self
            .meta_get(KEY_PURGED)
            .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
        let last = (|| -> Result<Option<LogId<NodeId>>, anyhow::Error> {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(LOG)?;
            let last = match t.last()? {
                Some((_, v)) => {
                    let e: Entry<TypeConfig> = serde_json::from_slice(v.value())?;
                    Some(e.log_id)
                }
                None => None,
            };
            Ok(last)
        })()
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.meta_put(KEY_VOTE, vote).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta_get(KEY_VOTE)
            .map_err(|e| read_err(std::io::Error::other(e.to_string())))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.meta_put(KEY_COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let v: Option<Option<LogId<NodeId>>> = self
            .meta_get(KEY_COMMITTED)
            .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
        Ok(v.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // One write transaction per batch; the callback fires only after the fsynced commit.
        // Encoding happens inside it, on the blocking pool (entries are up to 4 MiB).
        let res = self
            .write(move |tx| {
                let mut t = tx.open_table(LOG)?;
                for e in &entries {
                    let bytes = serde_json::to_vec(e)
                        .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
                    t.insert(e.log_id.index, bytes.as_slice())?;
                }
                Ok(())
            })
            .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg.clone())));
                Err(write_err(std::io::Error::other(msg)))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let from = log_id.index;
        self.write(move |tx| {
            let mut t = tx.open_table(LOG)?;
            t.retain_in(from.., |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let upto = log_id.index;
        let purged = serde_json::to_vec(&log_id).map_err(write_err)?;
        self.write(move |tx| {
            tx.open_table(META)?.insert(KEY_PURGED, purged.as_slice())?;
            tx.open_table(LOG)?.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(write_err)
    }
}

#[derive(Default)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, openraft::BasicNode>,
    state: State,
    /// Recent write ids and their results (replicated: part of every snapshot).
    writes: Sessions,
}

impl SmData {
    fn apply_entry(&mut self, entry: &Entry<TypeConfig>) -> Outcome {
        self.last_applied = Some(entry.log_id);
        match &entry.payload {
            EntryPayload::Blank => Outcome::Applied(Ok(Applied::Nothing)),
            EntryPayload::Normal(Proposal::Write(w)) => self.writes.apply(&mut self.state, w),
            EntryPayload::Normal(Proposal::Legacy(cmd)) => {
                Outcome::Applied(state::apply(&mut self.state, cmd))
            }
            EntryPayload::Membership(m) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                Outcome::Applied(Ok(Applied::Nothing))
            }
        }
    }
}

struct SmShared {
    data: Mutex<SmData>,
    db: Arc<Database>,
    publish: Publisher,
    /// Index of the last applied entry, for read-your-writes waits.
    applied_tx: watch::Sender<u64>,
}

/// The in-memory state machine. Cloned handles share the same state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<SmShared>,
}

impl StateMachineStore {
    /// A copy of the current replicated state (for API reads).
    pub fn state(&self) -> State {
        self.lock().state.clone()
    }

    /// Runs `f` on the current state without copying it.
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().state)
    }

    /// What the replicated write table knows about `id` (and the index it was read at).
    pub fn known(&self, id: &WriteId, fingerprint: Option<&str>) -> (Known, u64) {
        let sm = self.lock();
        (
            sm.writes.known(id, fingerprint),
            sm.last_applied.map(|l| l.index).unwrap_or(0),
        )
    }

    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.inner.applied_tx.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SmData> {
        // A panic while holding the lock would already have aborted the apply; the data is
        // still consistent at entry granularity, so keep going.
        self.inner.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot_of(&self) -> StorageResult<StoredSnapshot> {
        // Copy (O(1) for the state's persistent maps) and let go of the lock: serializing
        // 100,000 domains takes long enough to hold up the writes applied meanwhile.
        let (state, writes, last, last_membership) = {
            let sm = self.lock();
            (
                sm.state.clone(),
                sm.writes.clone(),
                sm.last_applied,
                sm.last_membership.clone(),
            )
        };
        let data = serde_json::to_vec(&SnapshotDataRef {
            state: &state,
            writes: &writes,
        })
        .map_err(read_err)?;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
            None => format!("0-{}", data.len()),
        };
        Ok(StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: last,
                last_membership,
                snapshot_id,
            },
            data,
        })
    }

    /// Blocking: stores the snapshot (called on the blocking pool): its meta as JSON, its
    /// data as it is, in one transaction.
    fn persist_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        let meta = serde_json::to_vec(&snap.meta).map_err(write_err)?;
        (|| -> Result<(), redb::Error> {
            let tx = self.inner.db.begin_write()?;
            {
                let mut t = tx.open_table(META)?;
                t.insert(KEY_SNAPSHOT_META, meta.as_slice())?;
                t.insert(KEY_SNAPSHOT_DATA, snap.data.as_slice())?;
                t.remove(KEY_SNAPSHOT_LEGACY)?;
            }
            tx.commit()?;
            Ok(())
        })()
        .map_err(write_err)
    }

    /// Blocking: applies a batch of committed entries and publishes the result once.
    fn apply_batch(&self, entries: Vec<Entry<TypeConfig>>) -> Vec<Outcome> {
        let mut changes = Changes::default();
        let (results, state, last) = {
            let mut sm = self.lock();
            let results: Vec<Outcome> = entries
                .iter()
                .map(|e| {
                    if let EntryPayload::Normal(p) = &e.payload {
                        changes.add(p.command());
                    }
                    sm.apply_entry(e)
                })
                .collect();
            let last = sm.last_applied.map(|l| l.index).unwrap_or(0);
            (results, sm.state.published_view(), last)
        };
        // Publish once per batch, outside the lock (a compile takes seconds at 100,000
        // domains in a debug build, and the API and the RPC handlers read the state under
        // it from the async runtime), and before the caller gets its answer: a write is live
        // in the proxy when the API call returns. Batches apply one after another, so the
        // publishes keep their order.
        (self.inner.publish)(&state, &changes);
        self.inner.applied_tx.send_replace(last);
        results
    }

    /// Blocking: decodes, stores and adopts a snapshot received from the leader.
    fn install(
        &self,
        meta: SnapshotMeta<NodeId, openraft::BasicNode>,
        data: Vec<u8>,
    ) -> StorageResult<u64> {
        let new: SnapshotData = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let snap = StoredSnapshot { meta, data };
        // Stored (tens of MB at 100,000 domains, and an fsync) while the new state is adopted
        // and compiled; both are done before openraft hears the snapshot is installed.
        let stored = std::thread::scope(|s| {
            let storing = s.spawn(|| self.persist_snapshot(&snap));
            self.adopt(new, &snap.meta);
            storing.join()
        });
        match stored {
            Ok(result) => result?,
            Err(_) => {
                return Err(write_err(std::io::Error::other(
                    "storing the snapshot panicked",
                )))
            }
        }
        Ok(snap.meta.last_log_id.map(|l| l.index).unwrap_or(0))
    }

    /// Takes a received snapshot's state as the state machine's and publishes it.
    fn adopt(&self, new: SnapshotData, meta: &SnapshotMeta<NodeId, openraft::BasicNode>) {
        let meta = meta.clone();
        let (state, last) = {
            let mut sm = self.lock();
            sm.state = new.state;
            sm.writes = new.writes;
            sm.last_applied = meta.last_log_id;
            sm.last_membership = meta.last_membership;
            let last = sm.last_applied.map(|l| l.index).unwrap_or(0);
            (sm.state.published_view(), last)
        };
        (self.inner.publish)(&state, &Changes::everything());
        self.inner.applied_tx.send_replace(last);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let this = self.clone();
        let snap = blocking(move || {
            let snap = this.snapshot_of()?;
            this.persist_snapshot(&snap)?;
            Ok(snap)
        })
        .await?;
        Ok(Snapshot {
            meta: snap.meta,
            snapshot: Box::new(Cursor::new(snap.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        let sm = self.lock();
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let this = self.clone();
        blocking(move || Ok(this.apply_batch(entries))).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let (this, meta, data) = (self.clone(), meta.clone(), snapshot.into_inner());
        let last = blocking(move || this.install(meta, data)).await?;
        tracing::info!(
            last_log_index = last,
            "installed a snapshot received from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let log = LogStore {
            db: self.inner.db.clone(),
        };
        let snap: Option<StoredSnapshot> = blocking(move || {
            log.stored_snapshot()
                .map_err(|e| read_err(std::io::Error::other(e.to_string())))
        })
        .await?;
        Ok(snap.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::writes::{Write, WriteId};
    use crate::state::{Command, Domain, TlsMode};

    fn no_publish() -> Publisher {
        Arc::new(|_: &State, _: &Changes| {})
    }

    fn domain(name: &str) -> Domain {
        Domain {
            domain: name.into(),
            enabled_backends_tag: "a".into(),
            http_to_https: false,
            tls: TlsMode::None,
            access_log: true,
            access_log_query: true,
            cert: None,
        }
    }

    fn entry(index: u64, payload: Proposal) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(payload),
        }
    }

    fn put_raw(db: &Database, index: u64, json: &str) {
        let tx = db.begin_write().unwrap();
        tx.open_table(LOG)
            .unwrap()
            .insert(index, json.as_bytes())
            .unwrap();
        tx.commit().unwrap();
    }

    #[test]
    fn a_data_dir_written_before_write_ids_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = open(dir.path(), no_publish()).unwrap();
            // Log entries exactly as the previous version wrote them: bare commands.
            put_raw(
                &log.db,
                1,
                r#"{"log_id":{"leader_id":{"term":1,"node_id":1},"index":1},"payload":{"Normal":{"CreateDomain":{"domain":"old.test","enabled_backends_tag":"a","http_to_https":false,"tls":"none","cert":null}}}}"#,
            );
            put_raw(
                &log.db,
                2,
                r#"{"log_id":{"leader_id":{"term":1,"node_id":1},"index":2},"payload":{"Normal":{"SwitchTag":{"domain":"old.test","tag":"b"}}}}"#,
            );
            let committed =
                serde_json::to_vec(&Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 2)))
                    .unwrap();
            let tx = log.db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(KEY_COMMITTED, committed.as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let (_, sm) = open(dir.path(), no_publish()).unwrap();
        assert_eq!(sm.state().domains["old.test"].enabled_backends_tag, "b");
    }

    #[test]
    fn a_snapshot_written_before_the_write_table_still_loads() {
        let old = r#"{"domains":{"a.test":{"domain":"a.test","enabled_backends_tag":"a","http_to_https":false,"tls":"none","cert":null}},"backends":{},"seeded":true}"#;
        let data: SnapshotData = serde_json::from_str(old).unwrap();
        assert!(data.state.domains.contains_key("a.test"));
        // Fields added since read as their defaults: access logs on, with query strings.
        let d = &data.state.domains["a.test"];
        assert!(d.access_log && d.access_log_query);
        assert!(data.writes.is_empty());
        // And an older binary (which reads a bare State) reads a new snapshot.
        let mut writes = Sessions::default();
        let mut st = data.state.clone();
        writes.apply(
            &mut st,
            &Write {
                id: WriteId::Key("k".into()),
                fingerprint: None,
                at_unix_ms: 1,
                cmd: Command::DeleteDomain("a.test".into()),
            },
        );
        let text = serde_json::to_string(&SnapshotDataRef {
            state: &st,
            writes: &writes,
        })
        .unwrap();
        let as_old: State = serde_json::from_str(&text).unwrap();
        assert_eq!(as_old, st);
    }

    #[tokio::test]
    async fn the_write_table_travels_in_snapshots_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let id = WriteId::Node {
            node: 1,
            boot: 2,
            seq: 3,
        };
        let (_, mut sm) = open(dir.path(), no_publish()).unwrap();
        let write = Proposal::Write(Write {
            id: id.clone(),
            fingerprint: None,
            at_unix_ms: 10,
            cmd: Command::CreateDomain(domain("snap.test")),
        });
        let out = sm.apply(vec![entry(1, write.clone())]).await.unwrap();
        assert!(matches!(out[0], Outcome::Applied(Ok(_))));
        let snap = sm.build_snapshot().await.unwrap();

        // A follower installs it: it knows the id, and a re-proposal is not applied again.
        let dir2 = tempfile::tempdir().unwrap();
        let (_, mut other) = open(dir2.path(), no_publish()).unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert!(matches!(other.known(&id, None).0, Known::Same(Ok(_))));
        let again = other.apply(vec![entry(2, write)]).await.unwrap();
        assert!(matches!(again[0], Outcome::Replayed(Ok(_))), "{again:?}");
        drop(other);

        // The node restarts from its persisted snapshot with the table.
        drop(sm);
        let (_, reopened) = open(dir.path(), no_publish()).unwrap();
        assert!(matches!(reopened.known(&id, None).0, Known::Same(Ok(_))));
        assert!(reopened.state().domains.contains_key("snap.test"));
    }

    #[tokio::test]
    async fn a_snapshot_under_the_old_key_loads_and_the_next_one_is_stored_as_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sm) = open(dir.path(), no_publish()).unwrap();
        let create = Proposal::Write(Write {
            id: WriteId::Key("a".into()),
            fingerprint: None,
            at_unix_ms: 1,
            cmd: Command::CreateDomain(domain("old-key.test")),
        });
        sm.apply(vec![entry(1, create)]).await.unwrap();
        let snap = sm.build_snapshot().await.unwrap();
        let data = snap.snapshot.into_inner();
        // Rewrite it as the previous version stored it: one JSON object, data as numbers.
        let db = sm.inner.db.clone();
        let old = serde_json::to_vec(&StoredSnapshot {
            meta: snap.meta.clone(),
            data: data.clone(),
        })
        .unwrap();
        assert!(
            old.len() > 2 * data.len(),
            "the old form spells bytes as numbers"
        );
        {
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(META).unwrap();
                t.remove(KEY_SNAPSHOT_META).unwrap();
                t.remove(KEY_SNAPSHOT_DATA).unwrap();
                t.insert(KEY_SNAPSHOT_LEGACY, old.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        drop((sm, db));
        let (_, mut sm) = open(dir.path(), no_publish()).unwrap();
        assert!(sm.state().domains.contains_key("old-key.test"));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.snapshot.into_inner(), data);

        // The next snapshot replaces the old key with meta + bytes as they are.
        sm.build_snapshot().await.unwrap();
        let tx = sm.inner.db.begin_read().unwrap();
        let t = tx.open_table(META).unwrap();
        assert!(t.get(KEY_SNAPSHOT_LEGACY).unwrap().is_none());
        let stored = t.get(KEY_SNAPSHOT_DATA).unwrap().unwrap();
        assert_eq!(stored.value(), data.as_slice());
        assert!(t.get(KEY_SNAPSHOT_META).unwrap().is_some());
    }
}
