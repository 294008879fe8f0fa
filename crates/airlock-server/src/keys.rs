//! API keys (SPEC 11): admins create and revoke them; the secret is returned once, at
//! creation, and only its hash is stored. A platform admin manages every tenant's keys; a
//! tenant admin only its own tenant's.

use airlock_core::audit::{Draft, Kind};
use airlock_core::defaults::REQUEST_BODY_BYTES_MAX;
use airlock_core::ids::{KeyId, TenantId};
use airlock_core::role::{Role, Roles};
use airlock_store::{KeyRecord, Store, StoreError};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::{Caller, KeyHasher, generate_key};
use crate::error::ApiError;
use crate::state::{AppState, now_ms, random_bytes};
use crate::wire::{self, json_object, only_fields};

fn require_admin_of(caller: &Caller, tenant: &TenantId) -> Result<(), ApiError> {
    caller.require(Role::Admin)?;
    if caller.is_platform_admin() || caller.tenant == *tenant {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("this key administers tenant `{}`, not `{tenant}`", caller.tenant)))
    }
}

/// Whether `text` may be a key name or a principal: it names the submitter of every job the key
/// submits, so it follows the same rules as a job's principal.
fn valid_principal(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 128
        && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        && !text.split('.').any(str::is_empty)
}

const PRINCIPAL_RULE: &str =
    "must be 1 to 128 letters, digits, `-`, `_`, `.` or `@`, without empty dot segments";

/// `POST /api/v1/keys` `{"tenant", "roles", "name", "principal"?}` → 201 `{"id", "key"}`. The
/// principal (default: the name) is the person the key authenticates as.
pub async fn create(State(state): State<AppState>, caller: Caller, body: Body) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let map = json_object(&wire::read_body(body, REQUEST_BODY_BYTES_MAX).await?)?;
    only_fields(&map, &["tenant", "roles", "name", "principal"])?;
    let mut errors = Vec::new();
    let tenant = match map.get("tenant").and_then(Value::as_str).map(str::parse::<TenantId>) {
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            errors.push((
                "tenant".to_owned(),
                format!("{e}: use 1 to 64 lowercase letters, digits, `-` or `_`"),
            ));
            None
        }
        None => {
            errors.push(("tenant".into(), "is required".into()));
            None
        }
    };
    let name = match map.get("name").and_then(Value::as_str) {
        Some(n) if valid_principal(n) => Some(n.to_owned()),
        Some(n) => {
            errors.push(("name".into(), format!("`{n}` {PRINCIPAL_RULE}")));
            None
        }
        None => {
            errors.push(("name".into(), "is required: a name for the key, unique in its tenant".into()));
            None
        }
    };
    let principal = match map.get("principal") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if valid_principal(p) => Some(p.clone()),
        Some(Value::String(p)) => {
            errors.push(("principal".into(), format!("`{p}` {PRINCIPAL_RULE}")));
            None
        }
        Some(_) => {
            errors.push(("principal".into(), "must be a string: the person the key authenticates as".into()));
            None
        }
    };
    let roles = match map.get("roles").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => {
            let parsed: Result<Roles, String> = list
                .iter()
                .map(|r| r.as_str().ok_or_else(|| "roles must be strings".to_owned())?.parse::<Role>())
                .collect();
            parsed.map_err(|e| errors.push(("roles".into(), e))).ok()
        }
        _ => {
            errors.push(("roles".into(), "is required: a non-empty list of roles".into()));
            None
        }
    };
    let (Some(tenant), Some(name), Some(roles), true) = (tenant, name, roles, errors.is_empty()) else {
        return Err(ApiError::invalid(errors));
    };
    require_admin_of(&caller, &tenant)?;
    let named = NewKey { tenant, name, principal, roles };
    let (id, secret) =
        create_key(state.store(), &state.config().key_hasher, named, &caller.principal).await?;
    Ok((StatusCode::CREATED, Json(json!({"id": id.as_str(), "key": secret}))).into_response())
}

/// A key to create.
pub struct NewKey {
    /// The tenant it acts in.
    pub tenant: TenantId,
    /// Its name, unique in the tenant.
    pub name: String,
    /// The person it authenticates as, when not the name.
    pub principal: Option<String>,
    /// What it may do.
    pub roles: Roles,
}

/// Creates a key and returns its id and secret.
pub async fn create_key(
    store: &dyn Store,
    hasher: &KeyHasher,
    key: NewKey,
    actor: &str,
) -> Result<(KeyId, String), ApiError> {
    create_key_with_secret(store, hasher, key, actor, generate_key()?).await
}

/// Creates a key with a given secret (the bootstrap admin key from `AIRLOCK_ADMIN_KEY`).
pub async fn create_key_with_secret(
    store: &dyn Store,
    hasher: &KeyHasher,
    key: NewKey,
    actor: &str,
    secret: String,
) -> Result<(KeyId, String), ApiError> {
    mint(store, hasher, key, actor, secret, Kind::KeyCreated).await
}

/// `airlock admin recover`: a new platform admin key, minted offline by someone with access to
/// the data directory, and audited as a recovery in the platform tenant's chain.
pub async fn recover_admin(
    store: &dyn Store,
    hasher: &KeyHasher,
    at: airlock_core::Millis,
) -> Result<(KeyId, String), ApiError> {
    let tenant: TenantId = TenantId::PLATFORM.parse().map_err(ApiError::internal)?;
    let roles = [Role::Admin].into_iter().collect();
    let key = NewKey { tenant, name: format!("recovered-admin-{at}"), principal: None, roles };
    mint(store, hasher, key, "airlock admin recover", generate_key()?, Kind::KeyRecovered).await
}

async fn mint(
    store: &dyn Store,
    hasher: &KeyHasher,
    key: NewKey,
    actor: &str,
    secret: String,
    kind: Kind,
) -> Result<(KeyId, String), ApiError> {
    let now = now_ms();
    let id = KeyId::generate(now, random_bytes()?);
    let principal = key.principal.filter(|p| *p != key.name);
    let record = KeyRecord {
        id: id.clone(),
        tenant: key.tenant,
        name: key.name,
        roles: key.roles,
        secret_hash: hasher.hash(&secret),
        created_at: now,
        revoked_at: None,
        principal,
    };
    let draft = Draft {
        at: now,
        kind,
        subject: id.to_string(),
        actor: actor.to_owned(),
        data: json!({"name": record.name, "principal": record.principal(), "roles": record.roles.to_string()}),
    };
    match store.create_key(record, draft).await {
        Ok(()) => Ok((id, secret)),
        Err(StoreError::Conflict(m)) if m.contains("already exists") => {
            Err(ApiError::new(StatusCode::CONFLICT, "key_name_taken", m))
        }
        Err(e) => Err(e.into()),
    }
}

/// `GET /api/v1/keys`: a platform admin sees every key; a tenant admin its tenant's.
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let tenant = (!caller.is_platform_admin()).then_some(&caller.tenant);
    let keys = state.store().keys(tenant).await?;
    Ok(Json(json!({"keys": keys.iter().map(wire::key).collect::<Vec<_>>()})))
}

/// `DELETE /api/v1/keys/{id}`: revokes a key.
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let id: KeyId = id.parse().map_err(|_| ApiError::not_found("key"))?;
    let key = state.store().key(&id).await?.ok_or_else(|| ApiError::not_found("key"))?;
    if !(caller.is_platform_admin() || caller.tenant == key.tenant) {
        return Err(ApiError::not_found("key"));
    }
    if key.revoked_at.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_revoked",
            format!("key `{id}` is already revoked"),
        ));
    }
    let now = now_ms();
    let draft = Draft {
        at: now,
        kind: Kind::KeyRevoked,
        subject: id.to_string(),
        actor: caller.principal.clone(),
        data: json!({"name": key.name}),
    };
    let revoked = match state.store().revoke_key(&id, now, draft).await {
        Err(StoreError::Conflict(m)) if m == airlock_store::LAST_PLATFORM_ADMIN => {
            return Err(ApiError::new(StatusCode::CONFLICT, "last_platform_admin", m));
        }
        other => other?,
    };
    state.keys().clear();
    Ok(Json(wire::key(&revoked)))
}
