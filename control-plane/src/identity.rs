//! Who an Envoy is, by its client certificate: with `[listen.tls]
//! require_node_id_match = true`, an ADS stream may only name a node id its
//! certificate carries, as the subject's common name (CN) or as a DNS name of its
//! subject alternative names. `seactl certs client --node-id ID` writes both.
//!
//! Without the binding, any Envoy holding a certificate of the CA could speak for
//! any node id: ACK in another's name, or make a conflict that blocks rollouts.

use tokio_rustls::rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The names a client certificate proves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The subject's common names (usually one).
    pub common_names: Vec<String>,
    /// The DNS names among its subject alternative names.
    pub dns_names: Vec<String>,
}

impl Identity {
    /// The names of the certificate `der`; an error when it cannot be parsed.
    pub fn of(der: &CertificateDer<'_>) -> Result<Identity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .collect();
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(format!("the client certificate's names: {e}")),
        };
        Ok(Identity {
            common_names,
            dns_names,
        })
    }

    /// True when `node_id` is one of its names, exactly (case included).
    pub fn matches(&self, node_id: &str) -> bool {
        !node_id.is_empty()
            && self
                .common_names
                .iter()
                .chain(&self.dns_names)
                .any(|n| n == node_id)
    }

    /// `CN edge-1, DNS [edge-1]`, for errors and logs.
    pub fn describe(&self) -> String {
        let cn = if self.common_names.is_empty() {
            "no CN".to_owned()
        } else {
            format!("CN {}", self.common_names.join(", "))
        };
        format!("{cn}, DNS names [{}]", self.dns_names.join(", "))
    }
}

/// Checks that `node_id` may be spoken for by the peer whose certificate chain is
/// `peer_certs` (leaf first). The error is the reason, for a `PERMISSION_DENIED`.
pub fn check_node_id(
    peer_certs: Option<&[CertificateDer<'_>]>,
    node_id: &str,
) -> Result<(), String> {
    let Some(leaf) = peer_certs.and_then(|c| c.first()) else {
        return Err(format!(
            "node id `{node_id}` refused: no client certificate on this connection, and \
             [listen.tls] require_node_id_match binds node ids to certificates"
        ));
    };
    let identity = Identity::of(leaf)?;
    if identity.matches(node_id) {
        Ok(())
    } else {
        Err(format!(
            "node id `{node_id}` refused: the client certificate is issued to {} \
             ([listen.tls] require_node_id_match: the node id must be the certificate's CN \
             or one of its DNS names)",
            identity.describe()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, dns: &[&str]) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.subject_alt_names = dns
            .iter()
            .map(|d| SanType::DnsName((*d).try_into().unwrap()))
            .collect();
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_node_id_must_be_the_cn_or_a_dns_name() {
        let c = cert(Some("edge-1"), &["edge-1.example"]);
        let id = Identity::of(&c).unwrap();
        let c = [c];
        assert_eq!(id.describe(), "CN edge-1, DNS names [edge-1.example]");
        assert!(check_node_id(Some(&c), "edge-1").is_ok());
        assert!(check_node_id(Some(&c), "edge-1.example").is_ok());
        let err = check_node_id(Some(&c), "edge-2").unwrap_err();
        assert!(
            err.contains("`edge-2`") && err.contains("CN edge-1"),
            "{err}"
        );
        assert!(check_node_id(Some(&c), "EDGE-1").is_err(), "exact");
        assert!(check_node_id(Some(&c), "").is_err());

        let only_san = cert(None, &["sidecar-1"]);
        assert!(check_node_id(Some(&[only_san]), "sidecar-1").is_ok());

        let err = check_node_id(None, "edge-1").unwrap_err();
        assert!(err.contains("no client certificate"), "{err}");
        let err = check_node_id(Some(&[]), "edge-1").unwrap_err();
        assert!(err.contains("no client certificate"), "{err}");
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(check_node_id(Some(&[junk]), "edge-1").is_err());
    }
}
