//! Signed audit checkpoints: what makes the audit trail hold against someone who can write to
//! the database. The hash chains alone do not: a database writer can delete a tenant's tail or
//! a whole tenant, or rewrite a record and recompute every hash after it, and the chains still
//! verify. So the server signs every chain head with an Ed25519 key kept outside the database
//! (`--audit-key FILE`) and exports the signed heads to a directory outside the store
//! (`--audit-export DIR`); `airlock audit verify --public-key K --checkpoints DIR` then finds
//! any chain that no longer reaches, or no longer passes through, a signed head.
//!
//! A checkpoint is `{"version": 1, "at", "heads": {tenant: {"seq", "hash"}}, "signature"}`,
//! the signature over the RFC 8785 bytes of the object without `signature`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use airlock_store::Store;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde_json::{Map, Value, json};

/// The checkpoint format's version.
const VERSION: u64 = 1;

/// Every tenant's chain head: last sequence number and hash.
pub type Heads = BTreeMap<String, (u64, String)>;

/// The key that signs checkpoints.
pub struct AuditSigner {
    key: Ed25519KeyPair,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

impl AuditSigner {
    /// Reads the PKCS#8 key at `path`, or generates one there (mode 0600) when the file does
    /// not exist; whether it was generated.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), String> {
        let (key, created) = ed25519_key(path, "audit key")?;
        Ok((Self { key }, created))
    }

    /// The public key, hex: what `airlock audit verify --public-key` takes.
    pub fn public_key_hex(&self) -> String {
        hex(self.key.public_key().as_ref())
    }

    /// A signed checkpoint of `heads` taken at `at`.
    pub fn checkpoint(&self, at: i64, heads: &Heads) -> Value {
        let mut body = unsigned(at, heads);
        let signature = self.key.sign(&airlock_policy::jcs::to_vec(&body));
        if let Value::Object(map) = &mut body {
            map.insert("signature".into(), json!(hex(signature.as_ref())));
        }
        body
    }
}

/// Reads the Ed25519 PKCS#8 key at `path` (`what` names it in errors), or generates one there
/// (mode 0600) when the file does not exist; whether it was generated.
pub(crate) fn ed25519_key(path: &Path, what: &str) -> Result<(Ed25519KeyPair, bool), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let created = !path.exists();
    if created {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "cannot generate an Ed25519 key".to_owned())?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot create the {what} `{}`: {e}", path.display()))?;
        file.write_all(document.as_ref())
            .map_err(|e| format!("cannot write the {what} `{}`: {e}", path.display()))?;
    }
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read the {what} `{}`: {e}", path.display()))?;
    let key = Ed25519KeyPair::from_pkcs8(&bytes)
        .map_err(|_| format!("`{}` is not an Ed25519 PKCS#8 key", path.display()))?;
    Ok((key, created))
}

fn unsigned(at: i64, heads: &Heads) -> Value {
    let heads: Map<String, Value> =
        heads.iter().map(|(t, (seq, hash))| (t.clone(), json!({"seq": seq, "hash": hash}))).collect();
    json!({"version": VERSION, "at": at, "heads": heads})
}

/// Checks a checkpoint's signature with `public_key_hex`; its time and heads when it holds.
pub fn verify(public_key_hex: &str, checkpoint: &Value) -> Result<(i64, Heads), String> {
    let key = unhex(public_key_hex).filter(|k| k.len() == 32).ok_or("the public key is not 64 hex digits")?;
    let signature =
        checkpoint["signature"].as_str().and_then(unhex).ok_or("the checkpoint has no hex `signature`")?;
    let at = checkpoint["at"].as_i64().ok_or("the checkpoint has no `at`")?;
    if checkpoint["version"].as_u64() != Some(VERSION) {
        return Err(format!("the checkpoint is not version {VERSION}"));
    }
    let mut heads = Heads::new();
    for (tenant, head) in checkpoint["heads"].as_object().ok_or("the checkpoint has no `heads`")? {
        let (Some(seq), Some(hash)) = (head["seq"].as_u64(), head["hash"].as_str()) else {
            return Err(format!("the head of `{tenant}` is not {{seq, hash}}"));
        };
        heads.insert(tenant.clone(), (seq, hash.to_owned()));
    }
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&airlock_policy::jcs::to_vec(&unsigned(at, &heads)), &signature)
        .map_err(|_| "the signature does not verify with this public key".to_owned())?;
    Ok((at, heads))
}

/// Every tenant's chain head in the store.
pub async fn heads(store: &dyn Store) -> Result<Heads, airlock_store::StoreError> {
    let mut heads = Heads::new();
    for tenant in store.audit_tenants().await? {
        // A page after every record: only the head.
        if let Some(head) = store.audit(&tenant, i64::MAX.unsigned_abs() - 1, 1).await?.head {
            heads.insert(tenant.as_str().to_owned(), head);
        }
    }
    Ok(heads)
}

/// Writes a signed checkpoint of `heads` into `dir` (through a temporary file, so a reader
/// never sees half of one); its path.
pub fn export(signer: &AuditSigner, dir: &Path, at: i64, heads: &Heads) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let path = dir.join(format!("checkpoint-{at:013}.json"));
    let partial = dir.join(format!(".checkpoint-{at:013}.json.partial"));
    let text = format!("{}\n", signer.checkpoint(at, heads));
    std::fs::write(&partial, text).map_err(|e| format!("cannot write `{}`: {e}", partial.display()))?;
    std::fs::rename(&partial, &path).map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
    Ok(path)
}

/// Every `period`, exports a checkpoint when a head moved since the last one.
pub fn spawn_exporter(
    store: std::sync::Arc<dyn Store>,
    signer: std::sync::Arc<AuditSigner>,
    dir: PathBuf,
    period: std::time::Duration,
) {
    tokio::spawn(async move {
        let mut last: Option<Heads> = None;
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match heads(&*store).await {
                Ok(now) if last.as_ref() != Some(&now) => {
                    match export(&signer, &dir, crate::state::now_ms(), &now) {
                        Ok(_) => last = Some(now),
                        Err(e) => tracing::error!(error = %e, "audit checkpoint export failed"),
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "audit checkpoint: cannot read the chain heads"),
            }
        }
    });
}

/// What a store's chains say against one signed checkpoint: every tenant of the checkpoint
/// must still exist, reach the signed sequence number and have the signed hash there.
pub async fn check_against(
    store: &dyn Store,
    heads: &Heads,
) -> Result<Vec<String>, airlock_store::StoreError> {
    let mut problems = Vec::new();
    let present: Vec<String> = store.audit_tenants().await?.iter().map(|t| t.as_str().to_owned()).collect();
    for (tenant, (seq, hash)) in heads {
        let Some(id) = present.iter().find(|t| *t == tenant).and_then(|t| t.parse().ok()) else {
            problems.push(format!("tenant `{tenant}`: its chain is gone (signed head at seq {seq})"));
            continue;
        };
        let page = store.audit(&id, seq.saturating_sub(1), 1).await?;
        match page.records.first() {
            None => problems.push(format!("tenant `{tenant}`: truncated: record {seq}, a signed head, is gone")),
            Some(record) if record.seq != *seq || record.hash != *hash => problems.push(format!(
                "tenant `{tenant}`: rewritten: record {seq} is not the one signed (hash {} instead of {hash})",
                record.hash
            )),
            Some(_) => {}
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_verify_only_with_their_key_and_content() {
        let dir = std::env::temp_dir().join(format!("airlock-checkpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let (signer, created) =
            AuditSigner::load_or_create(&dir.join("audit.key")).unwrap_or_else(|e| panic!("{e}"));
        assert!(created);
        let (again, created) =
            AuditSigner::load_or_create(&dir.join("audit.key")).unwrap_or_else(|e| panic!("{e}"));
        assert!(!created);
        assert_eq!(signer.public_key_hex(), again.public_key_hex());
        let heads: Heads = [("acme".to_owned(), (3, "sha256:abc".to_owned()))].into_iter().collect();
        let checkpoint = signer.checkpoint(7, &heads);
        assert_eq!(verify(&signer.public_key_hex(), &checkpoint), Ok((7, heads.clone())));
        let mut forged = checkpoint.clone();
        forged["heads"]["acme"]["seq"] = json!(2);
        assert!(verify(&signer.public_key_hex(), &forged).is_err());
        let (other, _) =
            AuditSigner::load_or_create(&dir.join("other.key")).unwrap_or_else(|e| panic!("{e}"));
        assert!(verify(&other.public_key_hex(), &checkpoint).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
