//! The CA's key material in the API server: the signing root in a Secret (Istio's `cacerts`
//! layout), the trust bundle in a ConfigMap the agents watch.
//!
//! - Secret `<secret>` (default `nodemesh-cacerts`): `ca-cert.pem` and `ca-key.pem` sign,
//!   `root-cert.pem` holds every trusted root, `cert-chain.pem` (optional) the intermediates.
//!   Created with a new self-signed root when absent. Two replicas starting together both try to
//!   create it; the API server accepts one, the other gets 409 Conflict and reads the winner's.
//!   A user-provided Secret (for instance Istio's `cacerts`, or a root shared with another mesh)
//!   is used as it is and never written.
//! - ConfigMap `<bundle>` (default `nodemesh-ca-root`), key `root-cert.pem`: every root of the
//!   Secret's `root-cert.pem`, in its order. Rewritten whenever the Secret changes.

use std::{collections::BTreeMap, path::PathBuf};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use rustls::pki_types::CertificateDer;
use tracing::info;

use crate::identity::{
    LocalCa,
    local_ca::{self, CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE},
};

use super::CaError;

/// The ConfigMap key holding the trust bundle (PEM, every root), as Istio's `istio-ca-root-cert`.
pub const BUNDLE_KEY: &str = "root-cert.pem";

/// Where errors and logs say the CA came from.
pub fn label(namespace: &str, secret: &str) -> PathBuf {
    PathBuf::from(format!("secret {namespace}/{secret}"))
}

/// The Secret's data as file name → bytes.
pub fn files_of(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

/// Reads the Secret, creating it with a new root when it does not exist.
pub async fn load_or_create(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<Secret, CaError> {
    let api_err = |action: &'static str| {
        move |source| CaError::Api {
            action,
            resource: "secrets",
            object: format!("secret {namespace}/{name}"),
            source,
        }
    };
    if let Some(secret) = api.get_opt(name).await.map_err(api_err("get"))? {
        return Ok(secret);
    }
    let (cert, key) = local_ca::generate_root(trust_domain).map_err(CaError::Identity)?;
    let data = BTreeMap::from([
        (
            CA_CERT_FILE.to_string(),
            ByteString(cert.clone().into_bytes()),
        ),
        (CA_KEY_FILE.to_string(), ByteString(key.into_bytes())),
        (ROOT_CERT_FILE.to_string(), ByteString(cert.into_bytes())),
    ]);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/component".to_string(),
                "controller".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            info!(
                namespace,
                secret = name,
                trust_domain,
                "created a new root CA in the Secret"
            );
            Ok(created)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            info!(
                namespace,
                secret = name,
                "another replica created the root CA first; using it"
            );
            api.get(name).await.map_err(api_err("get"))
        }
        Err(e) => Err(api_err("create")(e)),
    }
}

/// Opens the CA held in `secret`.
pub fn open(
    secret: &Secret,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<LocalCa, CaError> {
    LocalCa::from_files(&label(namespace, name), &files_of(secret), trust_domain)
        .map_err(CaError::Identity)
}

/// The PEM text of `roots`.
pub fn bundle_pem(roots: &[CertificateDer<'_>]) -> String {
    roots
        .iter()
        .map(|r| pem::encode(&pem::Pem::new("CERTIFICATE", r.as_ref().to_vec())))
        .collect()
}

/// Makes the ConfigMap hold `pem`: created when absent, replaced when different (a conflict
/// with the other replica doing the same is retried by the next call).
pub async fn publish_bundle(
    api: &Api<ConfigMap>,
    namespace: &str,
    name: &str,
    pem: &str,
) -> Result<bool, CaError> {
    let api_err = |action: &'static str| {
        move |source| CaError::Api {
            action,
            resource: "configmaps",
            object: format!("configmap {namespace}/{name}"),
            source,
        }
    };
    let data = BTreeMap::from([(BUNDLE_KEY.to_string(), pem.to_string())]);
    match api.get_opt(name).await.map_err(api_err("get"))? {
        Some(existing) if existing.data.as_ref() == Some(&data) => Ok(false),
        Some(mut existing) => {
            existing.data = Some(data);
            api.replace(name, &PostParams::default(), &existing)
                .await
                .map_err(api_err("update"))?;
            info!(namespace, configmap = name, "trust bundle updated");
            Ok(true)
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => {
                    info!(namespace, configmap = name, "trust bundle published");
                    Ok(true)
                }
                // The other replica created it; the next publish compares again.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(api_err("create")(e)),
            }
        }
    }
}
