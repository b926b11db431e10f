//! The embedded store: one SQLite file (WAL) for one control plane, which always
//! leads. Every write is one transaction. Schema changes are numbered migrations recorded in
//! `schema_migrations`; a later feature adds a migration, never edits one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use tokio::sync::watch;

use super::{
    AuditEntry, FinishRollout, Leadership, NewAudit, NewVersion, NodeRecord, RemoteNode,
    ServerState, Store, StoreError, StoreInfo, StoredRollout, TypeRecord, Version, VersionKind,
    now_ms,
};

/// Numbered schema migrations, applied in order, each once.
const MIGRATIONS: &[&str] = &[
    // 1: versions, nodes, audit.
    "CREATE TABLE versions (
        version    INTEGER PRIMARY KEY,
        kind       TEXT NOT NULL,
        map        TEXT NOT NULL,
        fence      TEXT NOT NULL,
        author     TEXT NOT NULL,
        comment    TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL
     );
     CREATE TABLE nodes (
        id              TEXT PRIMARY KEY,
        cluster         TEXT NOT NULL,
        first_seen      INTEGER NOT NULL,
        connected_since INTEGER,
        last_seen       INTEGER NOT NULL,
        transport       TEXT NOT NULL
     );
     CREATE TABLE node_types (
        node_id        TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        type           TEXT NOT NULL,
        acked_version  TEXT,
        acked_at       INTEGER,
        nacked_version TEXT,
        nack_error     TEXT,
        nacked_at      INTEGER,
        PRIMARY KEY (node_id, type)
     );
     CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        version INTEGER,
        detail  TEXT NOT NULL DEFAULT '{}'
     );",
    // 2: rollouts (one JSON record each, rewritten at every step) and, per
    // dtable-server, the map versions it may hold since seashard last restarted it.
    "CREATE TABLE rollouts (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        state           TEXT NOT NULL,
        record          TEXT NOT NULL,
        abort_requested TEXT,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
     );
     CREATE TABLE server_state (
        name            TEXT PRIMARY KEY,
        may_hold        TEXT NOT NULL,
        last_restart_at INTEGER,
        last_rollout    INTEGER
     );",
    // 3: nodes are instances (a node id at one peer address): `id` holds the
    // instance key; rows from before keep their id and no peer.
    "ALTER TABLE nodes ADD COLUMN node_id TEXT;
     ALTER TABLE nodes ADD COLUMN peer TEXT;
     ALTER TABLE nodes ADD COLUMN role TEXT NOT NULL DEFAULT 'edge';",
];

/// The SQLite store. Calls are short and synchronous; one connection, one lock.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
    active: watch::Sender<u64>,
    leadership: watch::Sender<Leadership>,
    nodes: watch::Sender<Arc<Vec<RemoteNode>>>,
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`, in WAL mode, migrated to the latest schema.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        SqliteStore::init(conn, Some(path.to_owned()))
    }

    /// A store in memory (tests, benchmarks).
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        SqliteStore::init(Connection::open_in_memory()?, None)
    }

    fn init(mut conn: Connection, path: Option<PathBuf>) -> Result<SqliteStore, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )?;
        let applied: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?;
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let n = i as i64 + 1;
            if n > applied {
                tx.execute_batch(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                    params![n, now_ms()],
                )?;
            }
        }
        let active: i64 =
            tx.query_row("SELECT COALESCE(MAX(version), 0) FROM versions", [], |r| {
                r.get(0)
            })?;
        tx.commit()?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path,
            active: watch::channel(active as u64).0,
            leadership: watch::channel(Leadership::Leader { term: 0 }).0,
            nodes: watch::channel(Arc::new(Vec::new())).0,
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn()?.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }
}

impl Store for SqliteStore {
    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "sqlite",
            location: self
                .path
                .as_ref()
                .map_or_else(|| ":memory:".to_owned(), |p| p.display().to_string()),
            replica: None,
        }
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn watch_active(&self) -> watch::Receiver<u64> {
        self.active.subscribe()
    }

    fn watch_nodes(&self) -> watch::Receiver<Arc<Vec<RemoteNode>>> {
        self.nodes.subscribe()
    }

    fn active(&self) -> Result<Option<Version>, StoreError> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT version, kind, map, fence, author, comment, created_at
             FROM versions ORDER BY version DESC LIMIT 1",
            [],
            row_to_raw,
        )
        .optional()?
        .map(RawVersion::parse)
        .transpose()
    }

    fn version(&self, version: u64) -> Result<Option<Version>, StoreError> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT version, kind, map, fence, author, comment, created_at
             FROM versions WHERE version = ?1",
            params![version as i64],
            row_to_raw,
        )
        .optional()?
        .map(RawVersion::parse)
        .transpose()
    }

    fn history(&self, limit: u32) -> Result<Vec<Version>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT version, kind, map, fence, author, comment, created_at
             FROM versions ORDER BY version DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], row_to_raw)?;
        rows.map(|r| r.map_err(StoreError::from).and_then(RawVersion::parse))
            .collect()
    }

    fn append_version(&self, expected: u64, new: &NewVersion<'_>) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let active: i64 =
            tx.query_row("SELECT COALESCE(MAX(version), 0) FROM versions", [], |r| {
                r.get(0)
            })?;
        if active as u64 != expected {
            return Err(StoreError::Conflict {
                expected,
                active: active as u64,
            });
        }
        let version = active + 1;
        let now = now_ms();
        tx.execute(
            "INSERT INTO versions (version, kind, map, fence, author, comment, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                version,
                new.kind.as_str(),
                to_json(new.map),
                to_json(new.fence),
                new.author,
                new.comment,
                now
            ],
        )?;
        tx.execute(
            "INSERT INTO audit (at, actor, action, version, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                now,
                new.author,
                format!("push.{}", new.kind.as_str()),
                version,
                serde_json::json!({ "comment": new.comment }).to_string()
            ],
        )?;
        tx.commit()?;
        self.active.send_replace(version as u64);
        Ok(version as u64)
    }

    fn audit(&self, entry: &NewAudit<'_>) -> Result<(), StoreError> {
        self.conn()?.execute(
            "INSERT INTO audit (at, actor, action, version, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                now_ms(),
                entry.actor,
                entry.action,
                entry.version.map(|v| v as i64),
                entry.detail.to_string()
            ],
        )?;
        Ok(())
    }

    fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, at, actor, action, version, detail FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                version: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                detail: serde_json::from_str(&r.get::<_, String>(5)?)
                    .unwrap_or(serde_json::Value::Null),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn save_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        {
            let mut node = tx.prepare_cached(
                "INSERT INTO nodes (id, cluster, first_seen, connected_since, last_seen, transport,
                                    node_id, peer, role)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(id) DO UPDATE SET cluster = ?2, connected_since = ?4,
                    last_seen = ?5, transport = ?6, node_id = ?7, peer = ?8, role = ?9",
            )?;
            let mut ty = tx.prepare_cached(
                "INSERT OR REPLACE INTO node_types
                   (node_id, type, acked_version, acked_at, nacked_version, nack_error, nacked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for n in nodes {
                node.execute(params![
                    n.id,
                    n.cluster,
                    n.first_seen,
                    n.connected_since,
                    n.last_seen,
                    n.transport,
                    n.node_id,
                    n.peer,
                    n.role
                ])?;
                for (t, r) in &n.types {
                    ty.execute(params![
                        n.id,
                        t,
                        r.acked_version,
                        r.acked_at,
                        r.nacked_version,
                        r.nack_error,
                        r.nacked_at
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, cluster, first_seen, connected_since, last_seen, transport,
                    COALESCE(node_id, id), peer, role
             FROM nodes ORDER BY id",
        )?;
        let mut nodes: Vec<NodeRecord> = stmt
            .query_map([], |r| {
                Ok(NodeRecord {
                    id: r.get(0)?,
                    cluster: r.get(1)?,
                    first_seen: r.get(2)?,
                    connected_since: r.get(3)?,
                    last_seen: r.get(4)?,
                    transport: r.get(5)?,
                    node_id: r.get(6)?,
                    peer: r.get(7)?,
                    role: r.get(8)?,
                    types: Vec::new(),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT node_id, type, acked_version, acked_at, nacked_version, nack_error, nacked_at
             FROM node_types ORDER BY node_id, type",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                TypeRecord {
                    acked_version: r.get(2)?,
                    acked_at: r.get(3)?,
                    nacked_version: r.get(4)?,
                    nack_error: r.get(5)?,
                    nacked_at: r.get(6)?,
                },
            ))
        })?;
        for row in rows {
            let (id, t, rec) = row?;
            if let Some(n) = nodes.iter_mut().find(|n| n.id == id) {
                n.types.push((t, rec));
            }
        }
        Ok(nodes)
    }

    fn insert_rollout(&self, state: &str, record: &serde_json::Value) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO rollouts (state, record, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
            params![state, record.to_string(), now],
        )?;
        let id = tx.last_insert_rowid();
        let mut record = record.clone();
        if let Some(obj) = record.as_object_mut() {
            obj.insert("id".into(), serde_json::json!(id));
        }
        tx.execute(
            "UPDATE rollouts SET record = ?2 WHERE id = ?1",
            params![id, record.to_string()],
        )?;
        tx.commit()?;
        Ok(id as u64)
    }

    fn save_rollout(
        &self,
        id: u64,
        state: &str,
        record: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let n = self.conn()?.execute(
            "UPDATE rollouts SET state = ?2, record = ?3, updated_at = ?4 WHERE id = ?1",
            params![id as i64, state, record.to_string(), now_ms()],
        )?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!("rollout {id} vanished")))
        }
    }

    fn rollout(&self, id: u64) -> Result<Option<StoredRollout>, StoreError> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT id, state, record, abort_requested FROM rollouts WHERE id = ?1",
            params![id as i64],
            row_to_rollout,
        )
        .optional()?
        .transpose()
    }

    fn rollouts(&self, limit: u32) -> Result<Vec<StoredRollout>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, state, record, abort_requested FROM rollouts ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], row_to_rollout)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    fn unfinished_rollout(&self) -> Result<Option<StoredRollout>, StoreError> {
        let conn = self.conn()?;
        conn.query_row(
            "SELECT id, state, record, abort_requested FROM rollouts
             WHERE state NOT IN ('done', 'rolled_back') ORDER BY id DESC LIMIT 1",
            [],
            row_to_rollout,
        )
        .optional()?
        .transpose()
    }

    fn request_abort(&self, id: u64, reason: &str) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE rollouts SET abort_requested = ?2 WHERE id = ?1",
            params![id as i64, reason],
        )?;
        Ok(())
    }

    fn may_hold(&self, server: &str) -> Result<Option<Vec<u64>>, StoreError> {
        let conn = self.conn()?;
        let text: Option<String> = conn
            .query_row(
                "SELECT may_hold FROM server_state WHERE name = ?1",
                params![server],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| StoreError::Corrupt(format!("may_hold of {server}: {e}")))
        })
        .transpose()
    }

    fn server_states(&self) -> Result<Vec<ServerState>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT name, may_hold, last_restart_at, last_rollout FROM server_state ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, may_hold, last_restart_at, last_rollout) = row?;
            out.push(ServerState {
                may_hold: serde_json::from_str(&may_hold)
                    .map_err(|e| StoreError::Corrupt(format!("may_hold of {name}: {e}")))?,
                name,
                last_restart_at,
                last_rollout: last_rollout.map(|v| v as u64),
            });
        }
        Ok(out)
    }

    fn finish_rollout(&self, finish: &FinishRollout<'_>) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        tx.execute(
            "UPDATE rollouts SET state = ?2, record = ?3, updated_at = ?4 WHERE id = ?1",
            params![
                finish.id as i64,
                finish.state,
                finish.record.to_string(),
                now
            ],
        )?;
        for (name, versions, restarted_at) in finish.may_hold {
            let json = serde_json::to_string(versions).unwrap_or_else(|_| "[]".into());
            match restarted_at {
                Some(at) => tx.execute(
                    "INSERT INTO server_state (name, may_hold, last_restart_at, last_rollout)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(name) DO UPDATE SET may_hold = ?2, last_restart_at = ?3,
                        last_rollout = ?4",
                    params![name, json, at, finish.id as i64],
                )?,
                None => tx.execute(
                    "UPDATE server_state SET may_hold = ?2 WHERE name = ?1",
                    params![name, json],
                )?,
            };
        }
        tx.execute(
            "INSERT INTO audit (at, actor, action, version, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                now,
                finish.actor,
                format!("rollout.{}", finish.state),
                finish.version.map(|v| v as i64),
                finish.detail.to_string()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn delete_nodes(&self, keys: &[String]) -> Result<usize, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let mut n = 0;
        for k in keys {
            n += tx.execute("DELETE FROM nodes WHERE id = ?1", params![k])?;
        }
        tx.commit()?;
        Ok(n)
    }
}

fn row_to_rollout(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredRollout, StoreError>> {
    let id: i64 = r.get(0)?;
    let state: String = r.get(1)?;
    let record: String = r.get(2)?;
    let abort_requested: Option<String> = r.get(3)?;
    Ok(serde_json::from_str(&record)
        .map_err(|e| StoreError::Corrupt(format!("rollout {id}: {e}")))
        .map(|record| StoredRollout {
            id: id as u64,
            state,
            record,
            abort_requested,
        }))
}

/// JSON of a column value (maps and fences always serialize).
fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

struct RawVersion {
    version: i64,
    kind: String,
    map: String,
    fence: String,
    author: String,
    comment: String,
    created_at: i64,
}

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawVersion> {
    Ok(RawVersion {
        version: r.get(0)?,
        kind: r.get(1)?,
        map: r.get(2)?,
        fence: r.get(3)?,
        author: r.get(4)?,
        comment: r.get(5)?,
        created_at: r.get(6)?,
    })
}

impl RawVersion {
    fn parse(self) -> Result<Version, StoreError> {
        let corrupt = |what: &str, e: String| {
            StoreError::Corrupt(format!("version {}: {what}: {e}", self.version))
        };
        Ok(Version {
            version: self.version as u64,
            kind: VersionKind::parse(&self.kind)
                .ok_or_else(|| corrupt("kind", self.kind.clone()))?,
            map: serde_json::from_str(&self.map).map_err(|e| corrupt("map", e.to_string()))?,
            fence: serde_json::from_str(&self.fence)
                .map_err(|e| corrupt("fence", e.to_string()))?,
            author: self.author,
            comment: self.comment,
            created_at: self.created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmap::ShardMap;

    fn map(default: &str) -> ShardMap {
        ShardMap {
            default: default.into(),
            ..ShardMap::default()
        }
    }

    fn push(store: &SqliteStore, expected: u64, m: &ShardMap) -> Result<u64, StoreError> {
        store.append_version(
            expected,
            &NewVersion::unfenced(VersionKind::Map, m, "alice", "test"),
        )
    }

    #[test]
    fn versions_survive_reopening_and_conflicts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            assert_eq!(s.active().unwrap(), None);
            assert_eq!(push(&s, 0, &map("a")).unwrap(), 1);
            assert_eq!(push(&s, 1, &map("b")).unwrap(), 2);
            assert!(matches!(
                push(&s, 1, &map("c")),
                Err(StoreError::Conflict {
                    expected: 1,
                    active: 2
                })
            ));
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(*s.watch_active().borrow(), 2);
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let active = s.active().unwrap().unwrap();
        assert_eq!((active.version, active.map.default.as_str()), (2, "b"));
        assert_eq!(s.history(10).unwrap().len(), 2);
        assert_eq!(s.version(1).unwrap().unwrap().author, "alice");
        let audit = s.audit_log(10).unwrap();
        assert_eq!(audit.len(), 2);
        assert_eq!(audit[0].action, "push.map");
        let mode: String = s
            .conn()
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
