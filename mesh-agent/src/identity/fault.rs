//! Fault injection for the fault-injection tests (`mesh-agent local --ca-fault-file`, hidden):
//! a certificate provider that refuses every request while a file exists, as an unreachable
//! CA would, so certificate expiry with a failing renewal can be tested without a network CA.

use std::path::PathBuf;

use super::{CertificateProvider, IdentityError, SpiffeId, TrustBundle, WorkloadCert};

/// Wraps `inner`; `issue` fails while `file` exists. The trust bundle is always `inner`'s.
#[derive(Debug)]
pub struct RefuseWhileFileExists<P> {
    inner: P,
    file: PathBuf,
}

impl<P> RefuseWhileFileExists<P> {
    pub fn new(inner: P, file: PathBuf) -> Self {
        Self { inner, file }
    }
}

impl<P: CertificateProvider> CertificateProvider for RefuseWhileFileExists<P> {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        if self.file.exists() {
            return Err(IdentityError::Provider {
                identity: identity.to_string(),
                reason: format!(
                    "the CA is unreachable (fault injected: {} exists)",
                    self.file.display()
                ),
            });
        }
        self.inner.issue(identity).await
    }

    fn trust_bundle(&self) -> TrustBundle {
        self.inner.trust_bundle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    #[tokio::test]
    async fn refuses_while_the_file_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = LocalCa::open(&dir.path().join("ca"), "cluster.local").expect("ca");
        let file = dir.path().join("down");
        let p = RefuseWhileFileExists::new(ca, file.clone());
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        p.issue(&id).await.expect("issues while the file is absent");
        std::fs::write(&file, "").expect("write");
        let e = p.issue(&id).await.expect_err("refuses while it exists");
        assert!(e.to_string().contains("unreachable"), "{e}");
        std::fs::remove_file(&file).expect("remove");
        p.issue(&id).await.expect("issues again");
    }
}
