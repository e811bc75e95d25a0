//! [`ApiError`], the one error type at the HTTP edge, and how every domain
//! error becomes one.
//!
//! The domains refuse with their own enums ([`MessagingError`],
//! [`ControlError`], [`StorageError`]) and stable codes; only here are they
//! given an HTTP status. Storage that is unavailable is mapped in one place
//! ([`ApiError::storage`]): `503 storage_unavailable` with `Retry-After`,
//! whatever the route; every other storage failure is `500 internal`, its
//! detail kept for the log.

use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::control::ControlError;
use crate::messaging::MessagingError;
use crate::storage::StorageError;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header, when the client should come back.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, answered with `Retry-After: <secs>`.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// Well-formed JSON with a missing, mistyped or unknown field.
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_request", message)
    }

    pub fn internal(err: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "internal error answering an API request");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the gateway log",
        )
    }

    /// A failed storage operation: `503 storage_unavailable` with
    /// `Retry-After` while the database cannot be reached, `503
    /// storage_busy` while its writer is behind (nothing was done; the same
    /// request may succeed shortly), else `500 internal`.
    pub fn storage(e: &StorageError) -> ApiError {
        if let Some((code, message)) = crate::unavailable::refusal(e) {
            tracing::warn!(error = %e, "storage is unavailable; an API request was refused");
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
                .retry_after(crate::unavailable::RETRY_AFTER_SECS);
        }
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        ApiError::storage(&e)
    }
}

impl From<MessagingError> for ApiError {
    fn from(e: MessagingError) -> ApiError {
        let status = match &e {
            MessagingError::Storage(s) => return ApiError::storage(s),
            MessagingError::BadRequest(_) => StatusCode::BAD_REQUEST,
            MessagingError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            MessagingError::TooDeep(_) => StatusCode::UNPROCESSABLE_ENTITY,
            MessagingError::UnknownGroup(_) | MessagingError::UnknownConversation { .. } => {
                StatusCode::NOT_FOUND
            }
            MessagingError::NotMember { .. } => StatusCode::FORBIDDEN,
            MessagingError::ResetRequired { .. } => StatusCode::GONE,
            MessagingError::FilterFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            MessagingError::Unreadable { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.public_message())
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let (status, code) = match &e {
            ControlError::Storage(s) => return ApiError::storage(s),
            ControlError::Unreadable(..) => return ApiError::internal(e),
            ControlError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ControlError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ControlError::TooDeep(_) => (StatusCode::UNPROCESSABLE_ENTITY, "too_deep"),
            ControlError::TooManyTargets { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_targets")
            }
            ControlError::UnknownGroup(_) => (StatusCode::NOT_FOUND, "unknown_channel"),
            ControlError::Rejected { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            ControlError::HandlerFailed { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "control_handler_failed")
            }
            ControlError::InProgress => (StatusCode::CONFLICT, "in_progress"),
            ControlError::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(e: ApiError, status: u16, code: &str, retry_after: Option<&str>) {
        assert_eq!((e.status.as_u16(), e.code), (status, code), "{}", e.message);
        let resp = e.into_response();
        let header = resp.headers().get(http::header::RETRY_AFTER);
        assert_eq!(header.map(|v| v.to_str().unwrap()), retry_after);
    }

    fn unavailable() -> StorageError {
        StorageError::Unavailable("connection refused".into())
    }

    /// `503 code` with `Retry-After: 1` from a storage, messaging and
    /// control error alike, and the same code on a socket.
    #[track_caller]
    fn check_refusal_on_every_path(make: impl Fn() -> StorageError, code: &str) {
        check(make().into(), 503, code, Some("1"));
        check(MessagingError::Storage(make()).into(), 503, code, Some("1"));
        check(ControlError::Storage(make()).into(), 503, code, Some("1"));
        assert_eq!(MessagingError::Storage(make()).code(), code);
    }

    #[test]
    fn unavailable_storage_is_503_storage_unavailable_with_retry_after_on_every_path() {
        check_refusal_on_every_path(unavailable, "storage_unavailable");
    }

    #[test]
    fn a_full_write_queue_is_503_storage_busy_with_retry_after_on_every_path() {
        let busy = || StorageError::Busy {
            queued: 4096,
            waited: std::time::Duration::from_secs(2),
        };
        check_refusal_on_every_path(busy, "storage_busy");
        let shown = ApiError::from(MessagingError::Storage(busy())).message;
        assert!(
            !shown.contains("4096"),
            "internals stay in the log: {shown}"
        );
    }

    #[test]
    fn other_storage_failures_stay_500_internal() {
        for e in [
            StorageError::Database("disk I/O error".into()),
            StorageError::Commit("disk full".into()),
            StorageError::Closed,
        ] {
            let shown = ApiError::from(MessagingError::Storage(e));
            assert_eq!(shown.message, "internal error; see the gateway log");
            check(shown, 500, "internal", None);
        }
        check(
            ControlError::Storage(StorageError::Database("x".into())).into(),
            500,
            "internal",
            None,
        );
        assert_eq!(
            MessagingError::Storage(StorageError::Closed).code(),
            "internal"
        );
    }

    #[test]
    fn domain_refusals_keep_their_status_and_code() {
        check(
            MessagingError::NotMember {
                user: "u".into(),
                group: "g".into(),
            }
            .into(),
            403,
            "not_member",
            None,
        );
        check(ControlError::InProgress.into(), 409, "in_progress", None);
    }
}
