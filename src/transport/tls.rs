//! Who is on the other end of a peer connection. With mutual TLS (the default) both ends
//! present a certificate of the cluster CA, and the identity is the certificate's
//! `urn:agora:node:<dc>:<name>` name, checked against the cluster file: a certificate
//! for a node that is not in the file, or that names another DC than the file does, is
//! refused. Nothing a peer writes inside a frame can change who it is.
//!
//! Plaintext exists only behind `--insecure-plaintext-peers`: the connecting node then
//! names itself in a first `Hello` frame, which anyone can forge.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::certs::{self, Role};
use crate::config::ClusterConfig;
use crate::raft::NodeId;

/// A TLS handshake (or a plaintext hello) must finish within this; a silent socket is
/// dropped rather than held.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Any byte stream a peer connection runs over (TCP, or TLS over TCP).
pub trait PeerStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PeerStream for T {}
pub type BoxStream = Box<dyn PeerStream>;

/// The plaintext mode's first frame: the connecting node's claim of who it is.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub node: NodeId,
}

/// How this node secures its peer connections.
#[derive(Clone)]
pub enum Security {
    Tls(Arc<PeerTls>),
    /// No authentication: only behind `--insecure-plaintext-peers`.
    Plaintext {
        me: NodeId,
    },
}

pub struct PeerTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl PeerTls {
    /// Loads `ca.pem` and the certificate and key of `name` from a certs directory.
    pub fn load(dir: &Path, name: &str) -> Result<PeerTls> {
        let ca_path = certs::ca_cert_path(dir);
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_path).with_context(|| format!("read {}", ca_path.display()))? {
            roots.add(cert.with_context(|| format!("parse {}", ca_path.display()))?).context("add CA certificate")?;
        }
        let cert_path = certs::cert_path(dir, name);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .with_context(|| format!("read {}", cert_path.display()))?
            .collect::<Result<_, _>>()
            .context("parse certificate")?;
        let key_path = certs::key_path(dir, name);
        let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| format!("read {}", key_path.display()))?;
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build().context("client certificate verifier")?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("server certificate")?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("client certificate")?;
        Ok(PeerTls { acceptor: TlsAcceptor::from(Arc::new(server)), connector: TlsConnector::from(Arc::new(client)) })
    }
}

/// The nodes of the cluster file by name: what an identity must match.
#[derive(Debug, Clone)]
pub struct Directory {
    by_name: HashMap<String, (NodeId, String)>,
}

impl Directory {
    pub fn new(config: &ClusterConfig) -> Directory {
        Directory { by_name: config.nodes().into_iter().map(|n| (n.name, (n.id, n.dc))).collect() }
    }

    /// A directory of `(name, id, dc)` triples.
    pub fn of<'a>(nodes: impl IntoIterator<Item = (&'a str, NodeId, &'a str)>) -> Directory {
        Directory { by_name: nodes.into_iter().map(|(name, id, dc)| (name.to_string(), (id, dc.to_string()))).collect() }
    }

    /// The node id a certificate's role stands for, if it is a node of the file in the
    /// DC the file puts it in.
    pub fn node_of(&self, role: &Role) -> Result<NodeId, String> {
        match role {
            Role::Node { dc, name } => match self.by_name.get(name) {
                Some((id, file_dc)) if file_dc == dc => Ok(*id),
                Some((_, file_dc)) => Err(format!("certificate puts node {name} in {dc}, the cluster file in {file_dc}")),
                None => Err(format!("certificate names node {name}, which is not in the cluster file")),
            },
            Role::Admin { name } => Err(format!("certificate of admin {name} is not a node's")),
        }
    }

    fn has_id(&self, id: NodeId) -> bool {
        self.by_name.values().any(|(n, _)| *n == id)
    }
}

/// Server side: the handshake, and the identity of the node that connected.
pub async fn accept<S: PeerStream>(tcp: S, security: &Security, directory: &Directory, frame_max: usize) -> Result<(BoxStream, NodeId), String> {
    match security {
        Security::Tls(tls) => {
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp))
                .await
                .map_err(|_| "tls handshake timed out".to_string())?
                .map_err(|e| format!("tls handshake: {e}"))?;
            let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no client certificate")?;
            let id = directory.node_of(&certs::role_of(cert)?)?;
            Ok((Box::new(stream), id))
        }
        Security::Plaintext { .. } => {
            let mut tcp = tcp;
            let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, super::frame::read_frame(&mut tcp, frame_max))
                .await
                .map_err(|_| "hello timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let Hello { node } = crate::codec::decode(&frame).map_err(|e| format!("bad hello: {e}"))?;
            if !directory.has_id(node) {
                return Err(format!("hello names unknown node {node}"));
            }
            Ok((Box::new(tcp), node))
        }
    }
}

/// Client side: the handshake with node `peer_name`, checking its certificate names
/// that node in `peer_dc`.
pub async fn connect(tcp: TcpStream, security: &Security, peer_name: &str, peer_dc: &str) -> Result<BoxStream, String> {
    match security {
        Security::Tls(tls) => {
            let server_name = ServerName::try_from(peer_name.to_string()).map_err(|e| format!("node name as server name: {e}"))?;
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connector.connect(server_name, tcp))
                .await
                .map_err(|_| "tls handshake timed out".to_string())?
                .map_err(|e| format!("tls handshake: {e}"))?;
            let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no server certificate")?;
            let expected = Role::Node { dc: peer_dc.to_string(), name: peer_name.to_string() };
            let role = certs::role_of(cert)?;
            if role != expected {
                return Err(format!("server certificate is {role:?}, expected {expected:?}"));
            }
            Ok(Box::new(stream))
        }
        Security::Plaintext { me } => {
            let mut tcp = tcp;
            let mut w = tokio::io::BufWriter::new(&mut tcp);
            super::frame::write_frame(&mut w, &crate::codec::encode(&Hello { node: *me })).await.map_err(|e| e.to_string())?;
            tokio::io::AsyncWriteExt::flush(&mut w).await.map_err(|e| e.to_string())?;
            drop(w);
            Ok(Box::new(tcp))
        }
    }
}
