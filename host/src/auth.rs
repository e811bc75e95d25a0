//! Credentials: client tokens (HS256 JWT), server API keys, the admin token,
//! and the development secrets generated when the config names none.
//!
//! A client token's claims: `sub` (user id, required), `exp` (optional; the
//! connection is closed when it passes, plus `auth.token_leeway`), `nbf`, `iat`, and `device` (optional
//! device id, default `default`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Claims of a client token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl Claims {
    pub fn device_id(&self) -> &str {
        self.device.as_deref().unwrap_or("default")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Largest accepted user or device id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Checks an id a request names in `field`; the error says what is wrong.
pub fn check_id(field: &str, id: &str) -> Result<(), String> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(format!(
            "`{field}` must be 1 to {MAX_ID_LEN} bytes without control characters"
        ))
    }
}

/// Whether `id` is acceptable as a user or device id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(|c| c.is_control())
}

/// The credentials of an `Authorization: Bearer <token>` header (the scheme
/// is case-insensitive, as HTTP requires).
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// The leeway in whole seconds, rounded up, as JWT times are in seconds.
/// The handshake and the expiry of an open connection both use this.
pub fn leeway_secs(leeway: Duration) -> u64 {
    leeway.as_secs() + u64::from(leeway.subsec_nanos() > 0)
}

/// Verifies a client token.
pub fn verify_token(token: &str, secret: &[u8], leeway: Duration) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = leeway_secs(leeway);
    validation.required_spec_claims = ["sub".to_string()].into_iter().collect();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })?;
    let claims = data.claims;
    if !valid_id(&claims.sub) {
        return Err(TokenError::Invalid(format!(
            "`sub` must be 1 to {MAX_ID_LEN} bytes without control characters"
        )));
    }
    if !valid_id(claims.device_id()) {
        return Err(TokenError::Invalid(format!(
            "`device` must be 1 to {MAX_ID_LEN} bytes without control characters"
        )));
    }
    Ok(claims)
}

/// Mints a client token for `user` (used by `plugboard token` and tests).
pub fn mint_token(
    user: &str,
    device: Option<&str>,
    ttl: Option<Duration>,
    secret: &[u8],
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub: user.to_string(),
        exp: ttl.map(|t| now + t.as_secs()),
        iat: Some(now),
        nbf: None,
        device: device.map(str::to_string),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 encoding cannot fail")
}

/// The credentials in force: from the config, or generated for development.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    pub jwt_secret: String,
    pub api_keys: Vec<String>,
    pub admin_token: String,
}

/// Secrets generated on first start when the config names none, kept in the data folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevSecrets {
    jwt_secret: String,
    api_key: String,
    admin_token: String,
}

fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", crate::hex(&bytes))
}

/// Path of the generated development secrets.
pub fn dev_secrets_path(data_dir: &Path) -> PathBuf {
    data_dir.join("dev-secrets.toml")
}

impl Secrets {
    /// Resolves the secrets for `config`. Where the config leaves a secret
    /// empty, the development secret from the data folder is used, generated
    /// on first need; `announce` is called once with its text when generated.
    pub fn resolve(config: &Config, announce: impl FnOnce(&str)) -> anyhow::Result<Secrets> {
        let needs_dev = config.auth.jwt_secret.is_empty()
            || config.auth.api_keys.is_empty()
            || config.auth.admin_token.is_empty();
        let dev = if needs_dev {
            Some(load_or_create_dev(&config.data_dir, announce)?)
        } else {
            None
        };
        let pick = |configured: &str, dev_value: fn(&DevSecrets) -> &str| {
            if configured.is_empty() {
                dev.as_ref()
                    .map(|d| dev_value(d).to_string())
                    .unwrap_or_default()
            } else {
                configured.to_string()
            }
        };
        Ok(Secrets {
            jwt_secret: pick(&config.auth.jwt_secret, |d| &d.jwt_secret),
            api_keys: if config.auth.api_keys.is_empty() {
                vec![dev.as_ref().map(|d| d.api_key.clone()).unwrap_or_default()]
            } else {
                config.auth.api_keys.clone()
            },
            admin_token: pick(&config.auth.admin_token, |d| &d.admin_token),
        })
    }

    pub fn api_key_ok(&self, presented: &str) -> bool {
        self.api_keys
            .iter()
            .any(|k| constant_time_eq(k.as_bytes(), presented.as_bytes()))
    }

    pub fn admin_ok(&self, presented: &str) -> bool {
        constant_time_eq(self.admin_token.as_bytes(), presented.as_bytes())
    }
}

fn load_or_create_dev(data_dir: &Path, announce: impl FnOnce(&str)) -> anyhow::Result<DevSecrets> {
    let path = dev_secrets_path(data_dir);
    if let Ok(text) = std::fs::read_to_string(&path) {
        return toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not valid: {e}", path.display()));
    }
    std::fs::create_dir_all(data_dir)?;
    let dev = DevSecrets {
        jwt_secret: random_secret("dev_jwt_"),
        api_key: random_secret("dev_api_"),
        admin_token: random_secret("dev_admin_"),
    };
    let text = toml::to_string(&dev)?;
    write_private(&path, &text)?;
    announce(&format!(
        "generated development secrets in {} (shown only now; set auth.* in the config for production):\n  jwt_secret  = {}\n  api_key     = {}\n  admin_token = {}",
        path.display(),
        dev.jwt_secret,
        dev.api_key,
        dev.admin_token
    ));
    Ok(dev)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || a.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let t = mint_token(
            "alice",
            Some("phone"),
            Some(Duration::from_secs(60)),
            secret,
        );
        let c = verify_token(&t, secret, Duration::ZERO).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.device_id(), "phone");
        assert!(verify_token(&t, b"another-secret-another-secret-xx", Duration::ZERO).is_err());
        assert!(verify_token("not.a.token", secret, Duration::ZERO).is_err());
    }
}
