//! The server API for groups and their members (API key). Groups are owned
//! by the business server: the gateway only keeps who is in which group, to
//! check senders and fan messages out.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiJson, ApiPath, ApiQuery, BodyKind, Route};
use crate::messaging::check_id;
use crate::server::App;
use crate::storage::groups::{Group, GroupResult, Member};

/// Members listed per page when the request names no `limit`.
const MEMBERS_PAGE: usize = 1000;
/// Most members listed per page.
const MEMBERS_PAGE_MAX: usize = 10_000;

/// Most bytes of a group's `name`.
pub const MAX_NAME: usize = 256;
/// Most bytes of a member's `role`.
pub const MAX_ROLE: usize = 64;

pub fn routes() -> Vec<Route> {
    let group = "/v1/groups/{gid}";
    let members_path = "/v1/groups/{gid}/members";
    vec![
        Route::new(Method::POST, "/v1/groups", BodyKind::Json, create),
        Route::new(Method::GET, group, BodyKind::None, get_group),
        Route::new(Method::PATCH, group, BodyKind::Json, update),
        Route::new(Method::DELETE, group, BodyKind::None, delete_group),
        Route::new(Method::GET, members_path, BodyKind::None, members),
        Route::new(Method::POST, members_path, BodyKind::Json, add_members),
        Route::new(Method::DELETE, members_path, BodyKind::Json, remove_members),
        Route::new(
            Method::DELETE,
            "/v1/groups/{gid}/members/{uid}",
            BodyKind::None,
            remove_member,
        ),
    ]
}

/// A group's `name`: at most [`MAX_NAME`] bytes (empty is allowed: no
/// name), no control characters, since it is shown to users and logged.
fn check_name(name: &str) -> Result<(), ApiError> {
    if name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            format!("a group's `name` must be at most {MAX_NAME} bytes without control characters"),
        ));
    }
    Ok(())
}

/// A member's `role`: 1 to [`MAX_ROLE`] bytes, no control characters.
fn check_role(role: &str) -> Result<(), ApiError> {
    if role.is_empty() || role.len() > MAX_ROLE || role.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_role",
            format!("a member's `role` must be 1 to {MAX_ROLE} bytes without control characters"),
        ));
    }
    Ok(())
}

/// A member in a request: a user id, or an object with a role.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MemberInput {
    Id(String),
    WithRole {
        user_id: String,
        #[serde(default)]
        role: Option<String>,
    },
}

fn members_from(inputs: Vec<MemberInput>, default_role: &str) -> Result<Vec<Member>, ApiError> {
    let now = crate::now_ms();
    let mut out: Vec<Member> = Vec::with_capacity(inputs.len());
    let mut seen = std::collections::HashSet::new();
    for input in inputs {
        let (user_id, role) = match input {
            MemberInput::Id(id) => (id, None),
            MemberInput::WithRole { user_id, role } => (user_id, role),
        };
        check_id("members[].user_id", &user_id)?;
        let role = role.unwrap_or_else(|| default_role.to_string());
        check_role(&role)?;
        if seen.insert(user_id.clone()) {
            out.push(Member {
                user_id,
                role,
                joined_at: now,
            });
        }
    }
    Ok(out)
}

fn unknown_group(gid: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_channel",
        format!("no group `{gid}`"),
    )
}

fn too_many(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "too_many_members",
        format!("a group has at most {limit} members (messaging.max_group_members)"),
    )
}

fn result<T>(r: GroupResult<T>, gid: &str) -> Result<T, ApiError> {
    match r {
        GroupResult::Ok(v) => Ok(v),
        GroupResult::UnknownGroup => Err(unknown_group(gid)),
        GroupResult::Exists => Err(ApiError::new(
            StatusCode::CONFLICT,
            "group_exists",
            format!("group `{gid}` already exists"),
        )),
        GroupResult::TooManyMembers { limit } => Err(too_many(limit)),
    }
}

fn storage(e: crate::storage::StorageError) -> ApiError {
    ApiError::storage(&e)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// The group id; generated (`grp_…`) when absent.
    #[serde(default)]
    pub group_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub members: Vec<MemberInput>,
}

async fn create(
    State(app): State<Arc<App>>,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<impl IntoResponse, ApiError> {
    let gid = body.group_id.unwrap_or_else(|| crate::new_id("grp"));
    check_id("group_id", &gid)?;
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    let members = members_from(body.members, "member")?;
    let now = crate::now_ms();
    let group = Group {
        group_id: gid.clone(),
        name: body.name.unwrap_or_default(),
        data: body.data.unwrap_or(Value::Null),
        member_count: 0,
        created_at: now,
        updated_at: now,
    };
    let max = app.config().messaging.max_group_members;
    let created = app
        .storage
        .groups
        .group_create(group, members, max)
        .await
        .map_err(storage)?;
    let group = result(created, &gid)?;
    tracing::info!(group_id = %gid, members = group.member_count, "group created");
    Ok((StatusCode::CREATED, Json(group_json(&group))))
}

fn group_json(g: &Group) -> Value {
    json!({
        "group_id": g.group_id,
        "name": g.name,
        "data": g.data,
        "member_count": g.member_count,
        "created_at": crate::rfc3339_ms(g.created_at),
        "updated_at": crate::rfc3339_ms(g.updated_at),
    })
}

async fn get_group(
    State(app): State<Arc<App>>,
    ApiPath(gid): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    match app.storage.groups.group_get(&gid).await.map_err(storage)? {
        Some(g) => Ok(Json(group_json(&g))),
        None => Err(unknown_group(&gid)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub data: Option<Value>,
}

async fn update(
    State(app): State<Arc<App>>,
    ApiPath(gid): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateBody>,
) -> Result<Json<Value>, ApiError> {
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    let updated = app
        .storage
        .groups
        .group_update(&gid, body.name, body.data)
        .await
        .map_err(storage)?;
    Ok(Json(group_json(&result(updated, &gid)?)))
}

async fn delete_group(
    State(app): State<Arc<App>>,
    ApiPath(gid): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    if app
        .storage
        .groups
        .group_delete(&gid)
        .await
        .map_err(storage)?
    {
        tracing::info!(group_id = %gid, "group deleted");
        Ok(Json(json!({ "group_id": gid, "deleted": true })))
    } else {
        Err(unknown_group(&gid))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersQuery {
    /// The last user id of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

async fn members(
    State(app): State<Arc<App>>,
    ApiPath(gid): ApiPath<String>,
    ApiQuery(q): ApiQuery<MembersQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(MEMBERS_PAGE).clamp(1, MEMBERS_PAGE_MAX);
    let page = app
        .storage
        .groups
        .group_members(&gid, q.after, limit + 1)
        .await
        .map_err(storage)?;
    let mut page = result(page, &gid)?;
    let more = page.len() > limit;
    page.truncate(limit);
    let next = if more {
        page.last().map(|m| m.user_id.clone())
    } else {
        None
    };
    let members: Vec<Value> = page
        .iter()
        .map(|m| {
            json!({
                "user_id": m.user_id,
                "role": m.role,
                "joined_at": crate::rfc3339_ms(m.joined_at),
            })
        })
        .collect();
    Ok(Json(json!({
        "group_id": gid,
        "members": members,
        "more": more,
        "next_after": next,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBody {
    pub members: Vec<MemberInput>,
    /// Role of members listed by id only.
    #[serde(default)]
    pub role: Option<String>,
}

async fn add_members(
    State(app): State<Arc<App>>,
    ApiPath(gid): ApiPath<String>,
    ApiJson(body): ApiJson<AddBody>,
) -> Result<Json<Value>, ApiError> {
    if let Some(role) = &body.role {
        check_role(role)?;
    }
    let members = members_from(body.members, body.role.as_deref().unwrap_or("member"))?;
    let max = app.config().messaging.max_group_members;
    let added = app
        .storage
        .groups
        .group_add_members(&gid, members, max)
        .await
        .map_err(storage)?;
    let added = result(added, &gid)?;
    Ok(Json(json!({ "group_id": gid, "added": added })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveBody {
    pub members: Vec<String>,
}

async fn remove_members(
    State(app): State<Arc<App>>,
    ApiPath(gid): ApiPath<String>,
    ApiJson(body): ApiJson<RemoveBody>,
) -> Result<Json<Value>, ApiError> {
    for u in &body.members {
        check_id("members[]", u)?;
    }
    let removed = app
        .storage
        .groups
        .group_remove_members(&gid, body.members)
        .await
        .map_err(storage)?;
    let removed = result(removed, &gid)?;
    Ok(Json(json!({ "group_id": gid, "removed": removed })))
}

async fn remove_member(
    State(app): State<Arc<App>>,
    ApiPath((gid, uid)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check_id("uid", &uid)?;
    let removed = app
        .storage
        .groups
        .group_remove_members(&gid, vec![uid.clone()])
        .await
        .map_err(storage)?;
    let removed = result(removed, &gid)?;
    if removed.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_member",
            format!("`{uid}` is not a member of group `{gid}`"),
        ));
    }
    Ok(Json(json!({ "group_id": gid, "removed": removed })))
}
