//! openraft's network over the peer transport. Transport failures become openraft's
//! `Unreachable` (back off) and remote Raft errors its `RemoteError`.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::BasicNode;

use super::{NodeId, TypeConfig};
use crate::error::NodeError;
use crate::transport::{PeerRequest, PeerResponse, Peers};

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

#[derive(Clone)]
pub struct Network {
    pub peers: Peers,
    /// How long openraft waits before trying an `Unreachable` node again.
    pub backoff: Duration,
}

pub struct Connection {
    peers: Peers,
    target: NodeId,
    backoff: Duration,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection { peers: self.peers.clone(), target, backoff: self.backoff }
    }
}

/// openraft stops replicating to an `Unreachable` node for a while (backoff), so only
/// "never sent" (connection refused, or we are backing off from it) is reported so. A
/// slow answer — openraft gives an AppendEntries one heartbeat interval — or a lost
/// connection is a network error, retried at the next heartbeat: a follower busy for a
/// moment (building a snapshot) must not be cut out of commits for half a second.
fn transport_err<E: std::error::Error>(e: NodeError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        NodeError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
        other => RPCError::Network(NetworkError::new(&other)),
    }
}

fn unexpected<E: std::error::Error>(resp: PeerResponse) -> RPCError<NodeId, BasicNode, E> {
    let e = NodeError::Internal(format!("unexpected peer response: {resp:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl Connection {
    async fn call(&self, req: PeerRequest, option: &RPCOption) -> Result<PeerResponse, NodeError> {
        let ttl: Duration = option.hard_ttl();
        self.peers.call(self.target, req, Some(ttl)).await
    }

    fn remote<E: std::error::Error>(&self, e: RaftError<NodeId, E>) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    /// openraft's own default is 500 ms. A restarted node must hear the leader before its
    /// election hold ends (two election timeouts), or it starts an election with a stale
    /// log: rejected, but its higher term then makes the leader step down.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(self.backoff))
    }

    async fn append_entries(&mut self, rpc: AppendEntriesRequest<TypeConfig>, option: RPCOption) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.call(PeerRequest::AppendEntries(rpc), &option).await.map_err(transport_err)? {
            PeerResponse::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.call(PeerRequest::InstallSnapshot(rpc), &option).await.map_err(transport_err)? {
            PeerResponse::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(PeerRequest::Vote(rpc), &option).await.map_err(transport_err)? {
            PeerResponse::Vote(r) => r.map_err(|e| self.remote(e)),
            other => Err(unexpected(other)),
        }
    }
}
