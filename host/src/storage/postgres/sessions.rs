//! Sessions on PostgreSQL. Opens and closes are writes, so they run under
//! the write lock: presence is counted from every node's rows with no other
//! writer in between, and of two closes of one session (two paths, or two
//! processes) the second finds no row and writes nothing.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::cluster::NOW_MS;
use super::{insert_events, PostgresStorage, Transaction};
use crate::storage::{Presence, Result, SessionEvents, SessionRecord, SessionStore, StorageError};

const SESSION_COLUMNS: &str = "connection_id, user_id, device_id, node_id, opened_at, remote_addr";

fn session_from_row(r: &Row) -> SessionRecord {
    SessionRecord {
        connection_id: r.get(0),
        user_id: r.get(1),
        device_id: r.get(2),
        node_id: r.get(3),
        opened_at: r.get(4),
        remote_addr: r.get(5),
    }
}

async fn presence_of(
    t: &Transaction<'_>,
    user_id: &str,
) -> std::result::Result<Presence, tokio_postgres::Error> {
    let row = t
        .query_one(
            &t.prepare_cached(
                "SELECT COUNT(*), COUNT(DISTINCT device_id) FROM sessions WHERE user_id = $1",
            )
            .await?,
            &[&user_id],
        )
        .await?;
    Ok(Presence {
        connections: row.get::<_, i64>(0) as u32,
        devices: row.get::<_, i64>(1) as u32,
    })
}

async fn close_one(
    t: &Transaction<'_>,
    connection_id: &str,
    events: &SessionEvents,
) -> std::result::Result<Option<Presence>, tokio_postgres::Error> {
    let stmt = t
        .prepare_cached(&format!(
            "DELETE FROM sessions WHERE connection_id = $1 RETURNING {SESSION_COLUMNS}"
        ))
        .await?;
    let Some(row) = t.query_opt(&stmt, &[&connection_id]).await? else {
        return Ok(None);
    };
    let record = session_from_row(&row);
    let presence = presence_of(t, &record.user_id).await?;
    insert_events(t, &events(&record, presence)).await?;
    Ok(Some(presence))
}

/// Closes every session recorded for `node`, oldest first, each with its
/// events. Returns how many it closed.
pub(super) async fn close_node(
    t: &Transaction<'_>,
    node: &str,
    events: &SessionEvents,
) -> std::result::Result<usize, tokio_postgres::Error> {
    let ids: Vec<String> = t
        .query(
            "SELECT connection_id FROM sessions WHERE node_id = $1 ORDER BY opened_at",
            &[&node],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut closed = 0;
    for id in ids {
        if close_one(t, &id, events).await?.is_some() {
            closed += 1;
        }
    }
    Ok(closed)
}

#[async_trait]
impl SessionStore for PostgresStorage {
    async fn open_session(&self, record: SessionRecord, events: SessionEvents) -> Result<Presence> {
        self.write_urgent(move |t| {
            Box::pin(async move {
                // Not while the node's lease is lapsed or reaped (cluster
                // mode; a node without a row is a single node): a reap
                // never misses a session, and a node cut off adds none.
                let stmt = t
                    .prepare_cached(&format!(
                        "INSERT INTO sessions ({SESSION_COLUMNS})
                         SELECT $1, $2, $3, $4, $5, $6
                          WHERE NOT EXISTS (SELECT 1 FROM cluster_nodes
                                             WHERE node_id = $4 AND (reaped OR lease_until < {NOW_MS}))"
                    ))
                    .await?;
                let inserted = t.execute(
                    &stmt,
                    &[
                        &record.connection_id,
                        &record.user_id,
                        &record.device_id,
                        &record.node_id,
                        &record.opened_at,
                        &record.remote_addr,
                    ],
                )
                .await?;
                if inserted == 0 {
                    return Ok(None);
                }
                let presence = presence_of(t, &record.user_id).await?;
                insert_events(t, &events(&record, presence)).await?;
                Ok(Some(presence))
            })
        })
        .await?
        .ok_or_else(|| {
            StorageError::Unavailable(
                "this node's cluster lease has lapsed; connect to another node".into(),
            )
        })
    }

    async fn close_session(
        &self,
        connection_id: &str,
        events: SessionEvents,
    ) -> Result<Option<Presence>> {
        let id = connection_id.to_string();
        self.write_urgent(move |t| Box::pin(async move { close_one(t, &id, &events).await }))
            .await
    }

    async fn close_node_sessions(&self, node_id: &str, events: SessionEvents) -> Result<usize> {
        let node = node_id.to_string();
        self.write(move |t| Box::pin(async move { close_node(t, &node, &events).await }))
            .await
    }

    async fn presence(&self, user_id: &str) -> Result<(Presence, Vec<SessionRecord>)> {
        let user = user_id.to_string();
        self.read(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(&format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1 ORDER BY opened_at"
                    ))
                    .await?;
                let sessions = t
                    .query(&stmt, &[&user])
                    .await?
                    .iter()
                    .map(session_from_row)
                    .collect();
                let presence = presence_of(t, &user).await?;
                Ok((presence, sessions))
            })
        })
        .await
    }
}
