//! UDP datagrams: connectionless traffic (DNS above all) in both directions.
//!
//! UDP has no streams, so a *flow* id groups datagrams between one local
//! socket and the agent's matching socket in the cluster: the client picks
//! the id, the agent keeps one socket per flow and sends replies back under
//! the same id. Datagrams are never retransmitted or flow-controlled — when a
//! queue is full they are dropped, as the network would.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};

use crate::tcp::{get_socket_addr, put_socket_addr};
use crate::wire::{DecodeError, Reader, MAX_PAYLOAD};

pub type FlowId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub flow: FlowId,
    /// Client → agent: where to send it. Agent → client: who sent it.
    pub peer: SocketAddr,
    pub payload: Bytes,
}

impl Datagram {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u32(self.flow);
        put_socket_addr(out, &self.peer);
        out.put_slice(&self.payload);
    }

    pub(crate) fn decode_body(r: &mut Reader) -> Result<Self, DecodeError> {
        let flow = r.u32()?;
        let peer = get_socket_addr(r)?;
        let payload = r.rest();
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::Invalid {
                field: "datagram length",
            });
        }
        Ok(Datagram {
            flow,
            peer,
            payload,
        })
    }
}
