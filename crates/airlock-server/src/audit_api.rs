//! The audit trail over HTTP: page through a tenant's chain, and verify it. A platform admin
//! may read or verify any tenant; everyone else their own.

use std::collections::HashMap;

use airlock_core::audit;
use airlock_core::ids::{JobId, TenantId};
use airlock_core::role::Role;
use airlock_store::Store;
use axum::Json;
use axum::extract::{Query as RawQuery, State};
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{self, Query};

/// Records read per page while verifying.
const VERIFY_PAGE: u32 = 5_000;

fn tenant_of(caller: &Caller, q: &Query) -> Result<TenantId, ApiError> {
    match q.get::<TenantId>("tenant")? {
        Some(t) if t != caller.tenant => {
            caller.require_platform_admin()?;
            Ok(t)
        }
        _ => Ok(caller.tenant.clone()),
    }
}

/// `GET /api/v1/audit?after=&limit=&tenant=`, or `?job=&limit=&tenant=` for the records about
/// one job (its submit, gate decisions, votes, transitions, operator actions), without a head.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(params): RawQuery<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_read(Role::Operator)?;
    let q = Query::new(params, &["after", "limit", "tenant", "job"])?;
    let tenant = tenant_of(&caller, &q)?;
    if let Some(job) = q.get::<JobId>("job")? {
        if q.get::<u64>("after")?.is_some() {
            return Err(ApiError::invalid(vec![(
                "after".into(),
                "a job's records come in one page: `after` does not go with `job`".into(),
            )]));
        }
        let records = state.store().job_audit(&tenant, &job, q.limit()?).await?;
        return Ok(Json(json!({
            "tenant": tenant.as_str(),
            "records": records.iter().map(wire::audit_record).collect::<Vec<_>>(),
            "head": null,
        })));
    }
    let page = state.store().audit(&tenant, q.get::<u64>("after")?.unwrap_or(0), q.limit()?).await?;
    Ok(Json(json!({
        "tenant": tenant.as_str(),
        "records": page.records.iter().map(wire::audit_record).collect::<Vec<_>>(),
        "head": page.head.map(|(seq, hash)| json!({"seq": seq, "hash": hash})),
    })))
}

/// Verifies one tenant's chain from the store, page by page.
pub async fn verify_tenant(store: &dyn Store, tenant: &TenantId) -> Result<Value, ApiError> {
    let mut records = Vec::new();
    let mut head = None;
    loop {
        let after = records.last().map_or(0, |r: &audit::Record| r.seq);
        let page = store.audit(tenant, after, VERIFY_PAGE).await?;
        head = page.head.or(head);
        let done = page.records.len() < VERIFY_PAGE as usize;
        records.extend(page.records);
        if done {
            break;
        }
    }
    let result = audit::verify(tenant.as_str(), &records, head.as_ref().map(|(s, h)| (*s, h.as_str())));
    Ok(match result {
        Ok(count) => json!({"tenant": tenant.as_str(), "ok": true, "records": count}),
        Err(broken) => {
            json!({"tenant": tenant.as_str(), "ok": false, "records": records.len(), "error": broken.to_string(), "seq": broken.seq})
        }
    })
}

/// `POST /api/v1/audit/verify?tenant=`: a platform admin without `tenant` verifies every chain.
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(params): RawQuery<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Operator)?;
    let q = Query::new(params, &["tenant"])?;
    let tenants = if caller.is_platform_admin() && q.get::<String>("tenant")?.is_none() {
        state.store().audit_tenants().await?
    } else {
        vec![tenant_of(&caller, &q)?]
    };
    let mut results = Vec::new();
    for tenant in &tenants {
        results.push(verify_tenant(state.store(), tenant).await?);
    }
    let ok = results.iter().all(|r| r["ok"] == true);
    Ok(Json(json!({"ok": ok, "tenants": results})))
}
