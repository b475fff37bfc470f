//! The cluster's certificates: a cluster CA, one certificate per node, admin client
//! certificates, and the admin API's bearer token. `agora certs create` and
//! `agora cluster up` both call [`create`]; nodes read the files through
//! [`crate::transport::tls`].
//!
//! A certificate says who its holder is in a URI subject alternative name, which is the
//! only identity a node believes:
//! - `urn:agora:node:<dc>:<node>` — a node; it also carries `<node>` as a DNS name (what a
//!   connecting node checks the server against) and the node's IP;
//! - `urn:agora:admin:<name>` — an operator or tool: no DNS name, so it can never serve
//!   as a node, and nodes refuse it on the peer port.
//!
//! Layout of a certs directory: `ca.pem` (the CA certificates a node trusts; several may
//! be listed while a CA is rotated), `ca.key` (only where certificates are issued),
//! `<name>.pem` + `<name>.key` per node or admin, `admin.token`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

use crate::config::{ClusterConfig, NodeInfo};

/// What a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Node { dc: String, name: String },
    Admin { name: String },
}

impl Role {
    pub fn uri(&self) -> String {
        match self {
            Role::Node { dc, name } => format!("urn:agora:node:{dc}:{name}"),
            Role::Admin { name } => format!("urn:agora:admin:{name}"),
        }
    }

    /// The role named by a subject alternative name URI, if it is one of ours.
    pub fn from_uri(uri: &str) -> Option<Role> {
        let parts: Vec<&str> = uri.strip_prefix("urn:agora:")?.split(':').collect();
        let label = |s: &str| !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        match parts.as_slice() {
            ["node", dc, name] if label(dc) && label(name) => Some(Role::Node { dc: dc.to_string(), name: name.to_string() }),
            ["admin", name] if label(name) => Some(Role::Admin { name: name.to_string() }),
            _ => None,
        }
    }
}

/// The role in a certificate (DER): its one `urn:agora:` URI name.
pub fn role_of(cert: &[u8]) -> Result<Role, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let san =
        x509.subject_alternative_name().map_err(|e| format!("bad subject alternative names: {e}"))?.ok_or("certificate has no subject alternative names")?;
    let mut roles = san.value.general_names.iter().filter_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("urn:agora:") => Some(Role::from_uri(u)),
        _ => None,
    });
    match (roles.next(), roles.next()) {
        (Some(Some(role)), None) => Ok(role),
        (Some(None), _) => Err("certificate has a malformed agora URI".into()),
        (Some(_), Some(_)) => Err("certificate names more than one agora identity".into()),
        (None, _) => Err("certificate names no agora identity".into()),
    }
}

/// A kept certificate is issued again this long before it expires, so a cluster started
/// again and again by `agora cluster up` never ends up with nodes refusing each other.
const RENEW_BEFORE_DAYS: i64 = 30;

/// The role in the first certificate of a PEM file, if it can be read and stays valid for
/// more than `RENEW_BEFORE_DAYS`.
fn kept_role(path: &Path) -> Option<Role> {
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let renew_at = time::OffsetDateTime::now_utc() + time::Duration::days(RENEW_BEFORE_DAYS);
    if x509.validity().not_after.to_datetime() <= renew_at {
        return None;
    }
    role_of(&cert).ok()
}

/// How long issued certificates are valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Days before now the certificate becomes valid (clock skew between hosts).
    pub not_before_days: i64,
    /// Days from now the certificate stays valid; negative issues an expired one (tests).
    pub days: i64,
}

impl Default for Validity {
    fn default() -> Self {
        Validity { not_before_days: 1, days: 365 }
    }
}

const CA_DAYS: i64 = 3650;
const TOKEN_FILE: &str = "admin.token";

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}
pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}
pub fn token_path(dir: &Path) -> PathBuf {
    dir.join(TOKEN_FILE)
}

/// What [`create`] did.
#[derive(Debug, Default)]
pub struct Created {
    pub ca_created: bool,
    pub issued: Vec<String>,
    pub token_created: bool,
}

/// Makes `dir` hold a CA, a certificate for every node of `config` (and an `admin`
/// client certificate) and an admin token. Existing files are kept unless `reissue`:
/// then node and admin certificates are issued anew from the existing CA (rotation).
pub fn create(dir: &Path, config: &ClusterConfig, reissue: bool, validity: Validity) -> Result<Created> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut created = Created::default();
    let ca = match load_ca(dir)? {
        Some(ca) => ca,
        None => {
            created.ca_created = true;
            new_ca(dir, &config.cluster.name)?
        }
    };
    let mut roles: Vec<(Role, Option<NodeInfo>)> =
        config.nodes().into_iter().map(|n| (Role::Node { dc: n.dc.clone(), name: n.name.clone() }, Some(n))).collect();
    roles.push((Role::Admin { name: "admin".into() }, None));
    for (role, node) in roles {
        let name = match &role {
            Role::Node { name, .. } | Role::Admin { name } => name.clone(),
        };
        // A kept certificate must still say what the cluster file says (a node may have
        // moved to another DC in a new file), and not be about to expire.
        if !reissue && key_path(dir, &name).exists() && kept_role(&cert_path(dir, &name)).as_ref() == Some(&role) {
            continue;
        }
        issue(dir, &ca, &role, node.as_ref(), validity)?;
        created.issued.push(name);
    }
    if !token_path(dir).exists() {
        write_secret(&token_path(dir), format!("{}\n", crate::ids::random_hex()).as_bytes())?;
        created.token_created = true;
    }
    Ok(created)
}

fn new_ca(dir: &Path, cluster: &str) -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate().context("generate CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("agora {cluster} cluster CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, Validity { not_before_days: 1, days: CA_DAYS });
    let cert = params.self_signed(&key).context("self-sign CA")?;
    write_secret(&key_path(dir, "ca"), key.serialize_pem().as_bytes())?;
    write_public(&ca_cert_path(dir), cert.pem().as_bytes())?;
    Ok(Issuer::new(params, key))
}

/// The CA that issues in `dir`: the first certificate of `ca.pem` with `ca.key`.
fn load_ca(dir: &Path) -> Result<Option<Issuer<'static, KeyPair>>> {
    let (cert, key) = (ca_cert_path(dir), key_path(dir, "ca"));
    if !key.exists() {
        if cert.exists() {
            bail!("{} exists without {}: issue certificates where the CA key is", cert.display(), key.display());
        }
        return Ok(None);
    }
    let key = KeyPair::from_pem(&std::fs::read_to_string(&key).with_context(|| format!("read {}", key.display()))?).context("parse CA key")?;
    let pem = std::fs::read_to_string(&cert).with_context(|| format!("read {}", cert.display()))?;
    Ok(Some(Issuer::from_ca_cert_pem(&pem, key).context("parse CA certificate")?))
}

/// Issues a certificate for `role` (for a node: its name as DNS name and its IP too).
pub fn issue(dir: &Path, ca: &Issuer<'static, KeyPair>, role: &Role, node: Option<&NodeInfo>, validity: Validity) -> Result<()> {
    let key = KeyPair::generate().context("generate key")?;
    let mut params = CertificateParams::default();
    let name = match role {
        Role::Node { name, .. } | Role::Admin { name } => name,
    };
    params.distinguished_name = dn(name);
    params.subject_alt_names.push(SanType::URI(role.uri().try_into().context("certificate URI")?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if let Role::Node { name, .. } = role {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        params.subject_alt_names.push(SanType::DnsName(name.as_str().try_into().context("node name as DNS name")?));
        match node {
            Some(NodeInfo { host: Some(host), .. }) => {
                params.subject_alt_names.push(SanType::DnsName(host.as_str().try_into().context("node host as DNS name")?))
            }
            Some(n) => params.subject_alt_names.push(SanType::IpAddress(n.peer.ip())),
            None => {}
        }
    }
    set_validity(&mut params, validity);
    let cert = params.signed_by(&key, ca).with_context(|| format!("sign certificate for {name}"))?;
    write_secret(&key_path(dir, name), key.serialize_pem().as_bytes())?;
    write_public(&cert_path(dir, name), cert.pem().as_bytes())
}

/// Issues one extra certificate with the CA in `dir` (tests: wrong roles, expired ones).
pub fn issue_extra(dir: &Path, role: &Role, validity: Validity) -> Result<()> {
    let ca = load_ca(dir)?.context("no CA in the certs directory")?;
    issue(dir, &ca, role, None, validity)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "agora");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, v: Validity) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(v.not_before_days);
    params.not_after = now + time::Duration::days(v.days);
}

/// Private keys and the token: owner read/write only.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

/// The admin token in the file at `path`, trimmed.
pub fn read_token(path: &Path) -> Result<String> {
    let token = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?.trim().to_string();
    if token.len() < 16 {
        bail!("{}: the admin token must be at least 16 characters", path.display());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("{}: the admin token must be printable ASCII without spaces", path.display());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `create` keeps what is valid, and issues again a certificate that expired or is about
    /// to, or that names its node in another DC than the cluster file.
    #[test]
    fn create_keeps_valid_certificates_and_renews_expiring_or_wrong_ones() {
        let dir = tempfile::tempdir().unwrap();
        let config = ClusterConfig::from_toml(crate::config::DEFAULT_TOML, "embedded").unwrap();
        let first = create(dir.path(), &config, false, Validity::default()).unwrap();
        assert!(first.ca_created && first.token_created && first.issued.len() == config.nodes().len() + 1);
        assert!(create(dir.path(), &config, false, Validity::default()).unwrap().issued.is_empty(), "all kept");
        issue_extra(dir.path(), &Role::Node { dc: "dc1".into(), name: "dc1-n2".into() }, Validity { not_before_days: 10, days: 5 }).unwrap();
        issue_extra(dir.path(), &Role::Node { dc: "dc2".into(), name: "dc1-n3".into() }, Validity::default()).unwrap();
        let again = create(dir.path(), &config, false, Validity::default()).unwrap();
        assert_eq!(again.issued, vec!["dc1-n2".to_string(), "dc1-n3".to_string()]);
        assert!(!again.ca_created && !again.token_created);
        assert_eq!(kept_role(&cert_path(dir.path(), "dc1-n3")), Some(Role::Node { dc: "dc1".into(), name: "dc1-n3".into() }));
    }

    #[test]
    fn roles_round_trip_through_their_uri() {
        for role in [Role::Node { dc: "dc1".into(), name: "dc1-n1".into() }, Role::Admin { name: "admin".into() }] {
            assert_eq!(Role::from_uri(&role.uri()), Some(role));
        }
        for bad in
            ["urn:agora:node:dc1", "urn:agora:node:DC1:n1", "urn:agora:root:x", "urn:other:node:dc1:n1", "urn:agora:node:dc1:n1:extra", "urn:agora:admin:"]
        {
            assert_eq!(Role::from_uri(bad), None, "{bad}");
        }
    }
}
