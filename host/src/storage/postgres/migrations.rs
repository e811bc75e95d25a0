//! Versioned schema migrations.
//!
//! Each migration is one SQL file under `migrations/`, applied once, in
//! order, in its own transaction, and recorded in `plugboard_schema`
//! (version, name, time). Start-up applies the missing ones under a session
//! advisory lock, so gateways starting together against one database do not
//! race; a database that records a version this binary does not know is
//! refused (a newer gateway migrated it: run that version, or restore).
//!
//! A migration never changes once released: a schema change is a new file.

use deadpool_postgres::Object;

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x706c_7567_6d69_6772; // "plugmigr"

/// Every migration this binary knows, in order. Versions are 1, 2, 3…
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "core", include_str!("migrations/0001_core.sql")),
    (2, "messages", include_str!("migrations/0002_messages.sql")),
    (3, "controls", include_str!("migrations/0003_controls.sql")),
    (4, "cluster", include_str!("migrations/0004_cluster.sql")),
    (
        5,
        "plugin_versions",
        include_str!("migrations/0005_plugin_versions.sql"),
    ),
    (
        6,
        "endpoint_leases",
        include_str!("migrations/0006_endpoint_leases.sql"),
    ),
];

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub(super) enum MigrationError {
    #[error("the database schema is at version {found}, newer than this gateway knows ({known}); run a gateway of that version or newer")]
    TooNew { found: i32, known: i32 },
    #[error("migration {version} ({name}) failed: {message}")]
    Failed {
        version: i32,
        name: &'static str,
        message: String,
    },
    #[error("{0}")]
    Database(String),
}

fn db(e: tokio_postgres::Error) -> MigrationError {
    MigrationError::Database(super::map_err(e).to_string())
}

/// Longest wait for another gateway to finish migrating.
const MIGRATION_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Applies the missing migrations. Returns the versions applied.
pub(super) async fn apply(conn: &mut Object) -> Result<Vec<i32>, MigrationError> {
    // Polled rather than waited for in one statement: a wait longer than
    // `storage.statement_timeout` (several nodes starting together on a
    // slow disk) is not an error, and the wait stays bounded.
    let deadline = std::time::Instant::now() + MIGRATION_WAIT;
    let mut told = false;
    loop {
        let row = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        if row.get::<_, bool>(0) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(MigrationError::Database(format!(
                "another gateway has been migrating this database for more than {} s; is one stuck?",
                MIGRATION_WAIT.as_secs()
            )));
        }
        if !told {
            tracing::info!("waiting for another gateway to finish migrating the database");
            told = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let result = apply_locked(conn).await;
    let _ = conn
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply_locked(conn: &mut Object) -> Result<Vec<i32>, MigrationError> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS plugboard_schema (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at BIGINT NOT NULL
         )",
    )
    .await
    .map_err(db)?;
    let found: i32 = conn
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM plugboard_schema",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if found > known {
        return Err(MigrationError::TooNew { found, known });
    }
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        let failed = |e: tokio_postgres::Error| MigrationError::Failed {
            version,
            name,
            message: super::map_err(e).to_string(),
        };
        let t = conn.transaction().await.map_err(failed)?;
        t.batch_execute(sql).await.map_err(failed)?;
        t.execute(
            "INSERT INTO plugboard_schema (version, name, applied_at) VALUES ($1, $2, $3)",
            &[&version, &name, &crate::now_ms()],
        )
        .await
        .map_err(failed)?;
        t.commit().await.map_err(failed)?;
        tracing::info!(version, name, "applied a storage schema migration");
        applied.push(version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    #[test]
    fn versions_count_up_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.0 as usize, i + 1, "migration {} is out of order", m.1);
        }
    }
}
