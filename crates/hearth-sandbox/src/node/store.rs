//! The node's state database: one SQLite file (`$HOME/state/node.db`, WAL) holding a row per
//! sandbox, plus a schema version table. Whole records are written at each state change, so a row is
//! always one consistent snapshot. Touches only the database file (and SQLite's `-wal`/`-shm`).

use std::collections::BTreeMap;
use std::path::Path;

use hearth_vm::ProcessIdentity;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::record::Record;
use super::{NodeError, SandboxInfo, State};

/// Bumped with every schema change; `migrate` knows each step.
const SCHEMA_VERSION: i64 = 5;

/// The open database; the table (`table.rs`) owns it, so it is used only under the table lock.
pub(crate) struct Store {
    db: Connection,
}

impl Store {
    /// Opens (creates) the database at `path` in WAL mode and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, NodeError> {
        let db = Connection::open(path).map_err(|e| {
            NodeError::Store(format!(
                "opening {}: {e}; check that the directory is writable",
                path.display()
            ))
        })?;
        // WAL: readers never block the writer; NORMAL sync is durable across process crashes
        // (only an OS crash may lose the last transactions).
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&db)?;
        Ok(Store { db })
    }

    pub fn load_all(&self) -> Result<Vec<Record>, NodeError> {
        let mut statement = self
            .db
            .prepare("SELECT * FROM sandboxes ORDER BY created_at, id")?;
        let rows = statement.query_map([], from_row)?;
        let mut records = Vec::new();
        for row in rows {
            records.push(row??);
        }
        Ok(records)
    }

    #[cfg(test)]
    pub fn get(&self, id: &str) -> Result<Option<Record>, NodeError> {
        let row = self
            .db
            .query_row("SELECT * FROM sandboxes WHERE id = ?1", [id], from_row)
            .optional()?;
        row.transpose()
    }

    /// Inserts or replaces the whole record.
    pub fn save(&self, record: &Record) -> Result<(), NodeError> {
        let info = &record.info;
        self.db.execute(
            "INSERT OR REPLACE INTO sandboxes (id, tenant, image, image_digest, state, reason, \
             vcpus, memory_mib, disk_bytes, labels, created_at, ready_at, finished_at, expires_at, \
             last_active_at, boot_ms, idle_timeout_ms, exec_defaults, image_meta, vmm_pid, \
             vmm_start_time, deleted, network, warm, on_idle) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
             ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
            params![
                info.id,
                info.tenant,
                info.image,
                info.image_digest,
                info.state.as_str(),
                info.reason,
                info.vcpus,
                info.memory_mib,
                info.disk_bytes as i64,
                json(&info.labels),
                info.created_at as i64,
                info.ready_at.map(|v| v as i64),
                info.finished_at.map(|v| v as i64),
                info.expires_at.map(|v| v as i64),
                info.last_active_at as i64,
                info.boot_ms.map(|v| v as i64),
                record.idle_timeout_ms.map(|v| v as i64),
                json(&record.defaults),
                record.image.as_ref().map(json),
                record.vmm.map(|p| p.pid),
                record.vmm.map(|p| p.start_time as i64),
                record.deleted,
                info.network.as_ref().map(json),
                info.warm,
                info.on_idle.as_str(),
            ],
        )?;
        Ok(())
    }

    pub fn set_last_active(&self, id: &str, at: u64) -> Result<(), NodeError> {
        self.db.execute(
            "UPDATE sandboxes SET last_active_at = ?2 WHERE id = ?1",
            params![id, at as i64],
        )?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<(), NodeError> {
        self.db
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        Ok(())
    }
}

fn migrate(db: &Connection) -> Result<(), NodeError> {
    db.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let version: Option<i64> = db
        .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .optional()?
        .flatten();
    match version {
        None | Some(0) => {
            db.execute_batch(
                "BEGIN;
                 CREATE TABLE sandboxes (
                     id TEXT PRIMARY KEY,
                     tenant TEXT NOT NULL,
                     image TEXT NOT NULL,
                     image_digest TEXT,
                     state TEXT NOT NULL,
                     reason TEXT,
                     vcpus INTEGER NOT NULL,
                     memory_mib INTEGER NOT NULL,
                     disk_bytes INTEGER NOT NULL,
                     labels TEXT NOT NULL,
                     created_at INTEGER NOT NULL,
                     ready_at INTEGER,
                     finished_at INTEGER,
                     expires_at INTEGER,
                     last_active_at INTEGER NOT NULL,
                     boot_ms INTEGER,
                     idle_timeout_ms INTEGER,
                     exec_defaults TEXT NOT NULL,
                     image_meta TEXT,
                     vmm_pid INTEGER,
                     vmm_start_time INTEGER,
                     deleted INTEGER NOT NULL DEFAULT 0
                 );
                 CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant);
                 INSERT INTO schema_version (version) VALUES (1);
                 COMMIT;",
            )?;
            migrate(db)
        }
        Some(1) => {
            // 2: each sandbox's egress policy (JSON), absent for sandboxes without a network.
            db.execute_batch(
                "BEGIN;
                 ALTER TABLE sandboxes ADD COLUMN network TEXT;
                 INSERT INTO schema_version (version) VALUES (2);
                 COMMIT;",
            )?;
            migrate(db)
        }
        Some(2) => {
            // 3: `state` may be `paused` (the sandbox's snapshot is in `$HOME/node/paused/<id>/`
            // and no VMM runs). No column changes; the version keeps an older hearth, which
            // cannot read that state, from opening the database.
            db.execute_batch(
                "BEGIN;
                 INSERT INTO schema_version (version) VALUES (3);
                 COMMIT;",
            )?;
            migrate(db)
        }
        Some(3) => {
            // 4: whether the sandbox came from a warm pool (`pool.rs`).
            db.execute_batch(
                "BEGIN;
                 ALTER TABLE sandboxes ADD COLUMN warm INTEGER NOT NULL DEFAULT 0;
                 INSERT INTO schema_version (version) VALUES (4);
                 COMMIT;",
            )?;
            migrate(db)
        }
        Some(4) => {
            // 5: what the idle timeout does (`stop` or `pause`).
            db.execute_batch(
                "BEGIN;
                 ALTER TABLE sandboxes ADD COLUMN on_idle TEXT NOT NULL DEFAULT 'stop';
                 INSERT INTO schema_version (version) VALUES (5);
                 COMMIT;",
            )?;
            Ok(())
        }
        Some(SCHEMA_VERSION) => Ok(()),
        Some(newer) => Err(NodeError::Store(format!(
            "the state database has schema version {newer}, newer than this hearth's \
             {SCHEMA_VERSION}: run the newer hearth, or move $HEARTH_HOME/state aside"
        ))),
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

fn parse_json<T: for<'a> Deserialize<'a>>(
    id: &str,
    column: &str,
    text: &str,
) -> Result<T, NodeError> {
    serde_json::from_str(text)
        .map_err(|e| NodeError::Store(format!("sandbox {id}: column {column}: {e}")))
}

/// A row as a record. The outer error is SQLite's; the inner one a row this hearth cannot read.
fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<Record, NodeError>> {
    let id: String = row.get("id")?;
    let state: String = row.get("state")?;
    let labels: String = row.get("labels")?;
    let defaults: String = row.get("exec_defaults")?;
    let image: Option<String> = row.get("image_meta")?;
    let network: Option<String> = row.get("network")?;
    let pid: Option<u32> = row.get("vmm_pid")?;
    let start_time: Option<i64> = row.get("vmm_start_time")?;
    let opt = |name: &str| -> rusqlite::Result<Option<u64>> {
        Ok(row.get::<_, Option<i64>>(name)?.map(|v| v as u64))
    };
    let info = SandboxInfo {
        id: id.clone(),
        tenant: row.get("tenant")?,
        image: row.get("image")?,
        image_digest: row.get("image_digest")?,
        state: State::Failed, // replaced below
        reason: row.get("reason")?,
        vcpus: row.get("vcpus")?,
        memory_mib: row.get("memory_mib")?,
        disk_bytes: row.get::<_, i64>("disk_bytes")? as u64,
        labels: BTreeMap::new(),
        created_at: row.get::<_, i64>("created_at")? as u64,
        ready_at: opt("ready_at")?,
        finished_at: opt("finished_at")?,
        expires_at: opt("expires_at")?,
        last_active_at: row.get::<_, i64>("last_active_at")? as u64,
        boot_ms: opt("boot_ms")?,
        network: None,
        warm: row.get("warm")?,
        on_idle: super::OnIdle::Stop, // replaced below
        stopping: false,
    };
    let on_idle: String = row.get("on_idle")?;
    let idle_timeout_ms = opt("idle_timeout_ms")?;
    let deleted: bool = row.get("deleted")?;
    Ok((|| {
        let Some(state) = State::parse(&state) else {
            return Err(NodeError::Store(format!(
                "sandbox {id}: unknown state {state:?}"
            )));
        };
        let Some(on_idle) = super::OnIdle::parse(&on_idle) else {
            return Err(NodeError::Store(format!(
                "sandbox {id}: unknown on_idle {on_idle:?}"
            )));
        };
        Ok(Record {
            info: SandboxInfo {
                state,
                on_idle,
                labels: parse_json(&id, "labels", &labels)?,
                network: network
                    .map(|text| parse_json(&id, "network", &text))
                    .transpose()?,
                ..info
            },
            idle_timeout_ms,
            defaults: parse_json(&id, "exec_defaults", &defaults)?,
            image: image
                .map(|text| parse_json(&id, "image_meta", &text))
                .transpose()?,
            vmm: pid.zip(start_time).map(|(pid, start)| ProcessIdentity {
                pid,
                start_time: start as u64,
            }),
            deleted,
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::super::record::{ExecDefaults, ImageMeta};
    use super::*;

    pub(crate) fn record(id: &str, state: State) -> Record {
        Record {
            info: SandboxInfo {
                id: id.into(),
                tenant: "acme".into(),
                image: "busybox".into(),
                image_digest: Some("sha256:ab".into()),
                state,
                reason: None,
                vcpus: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
                labels: BTreeMap::from([("k8s.uid".to_string(), "u-1".to_string())]),
                created_at: 1,
                ready_at: Some(2),
                finished_at: None,
                expires_at: Some(99),
                last_active_at: 3,
                boot_ms: Some(1),
                network: Some(hearth_net::policy::NetworkPolicy::none()),
                warm: false,
                on_idle: super::super::OnIdle::Pause,
                stopping: false,
            },
            idle_timeout_ms: Some(5000),
            defaults: ExecDefaults {
                env: vec![("A".into(), "1".into())],
                workdir: Some("/app".into()),
                user: None,
            },
            image: Some(ImageMeta {
                reference: "reg/busybox:latest".into(),
                rootfs: "/h/rootfs/x.ext4".into(),
                config: hearth_image::ImageConfig::default(),
            }),
            vmm: Some(ProcessIdentity {
                pid: 42,
                start_time: 4242,
            }),
            deleted: false,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_updates_replace_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut a = record("a", State::Running);
        {
            let store = Store::open(&path).unwrap();
            store.save(&a).unwrap();
            store.save(&record("b", State::Creating)).unwrap();
            a.info.state = State::Stopped;
            a.info.reason = Some("ttl expired".into());
            store.save(&a).unwrap();
            store.set_last_active("a", 77).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 2);
        a.info.last_active_at = 77;
        assert_eq!(all[0], a);
        assert_eq!(store.get("b").unwrap().unwrap().info.state, State::Creating);
        store.delete("b").unwrap();
        assert_eq!(store.get("b").unwrap(), None);
        let mode: String = store
            .db
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_version_2_database_is_migrated_and_keeps_paused_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        drop(Store::open(&path).unwrap());
        // What a version-2 hearth left.
        let db = Connection::open(&path).unwrap();
        db.execute_batch(
            "ALTER TABLE sandboxes DROP COLUMN warm;
             ALTER TABLE sandboxes DROP COLUMN on_idle;
             DELETE FROM schema_version WHERE version >= 3;",
        )
        .unwrap();
        drop(db);
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .db
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mut paused = record("p", State::Paused);
        paused.vmm = None;
        store.save(&paused).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get("p").unwrap().unwrap(), paused);
    }

    #[test]
    fn a_version_3_database_gains_the_warm_and_on_idle_columns_and_keeps_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let store = Store::open(&path).unwrap();
        let mut running = record("r", State::Running);
        store.save(&running).unwrap();
        drop(store);
        // What a version-3 hearth left: no `warm` or `on_idle` column.
        let db = Connection::open(&path).unwrap();
        db.execute_batch(
            "ALTER TABLE sandboxes DROP COLUMN warm;
             ALTER TABLE sandboxes DROP COLUMN on_idle;
             DELETE FROM schema_version WHERE version >= 4;",
        )
        .unwrap();
        drop(db);
        let store = Store::open(&path).unwrap();
        // Sandboxes from before `on_idle` were stopped when idle, and still are.
        running.info.on_idle = super::super::OnIdle::Stop;
        assert_eq!(store.get("r").unwrap().unwrap(), running);
        let mut warm = record("w", State::Running);
        warm.info.warm = true;
        store.save(&warm).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(store.get("w").unwrap().unwrap().info.warm);
    }

    #[test]
    fn a_newer_schema_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        drop(Store::open(&path).unwrap());
        let db = Connection::open(&path).unwrap();
        db.execute("INSERT INTO schema_version (version) VALUES (9)", [])
            .unwrap();
        drop(db);
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("schema version 9"), "{err}");
    }
}
