//! An in-process [`Transport`]: one channel per ordered pair of ranks, for shards that run as
//! threads of one process (and for testing the algorithms without sockets).

use crate::{CollectiveError, Transport};
use std::sync::mpsc::{Receiver, Sender, channel};

pub struct InProcessTransport {
    rank: usize,
    /// `senders[p]` delivers to rank p (None for ourselves).
    senders: Vec<Option<Sender<Vec<f32>>>>,
    /// `receivers[p]` yields what rank p sent us.
    receivers: Vec<Option<Receiver<Vec<f32>>>>,
}

impl InProcessTransport {
    /// Creates the endpoints of a fully connected group of `world` ranks, indexed by rank.
    pub fn group(world: usize) -> Vec<InProcessTransport> {
        let mut eps: Vec<InProcessTransport> = (0..world)
            .map(|rank| InProcessTransport {
                rank,
                senders: (0..world).map(|_| None).collect(),
                receivers: (0..world).map(|_| None).collect(),
            })
            .collect();
        for from in 0..world {
            for to in 0..world {
                if from != to {
                    let (tx, rx) = channel();
                    eps[from].senders[to] = Some(tx);
                    eps[to].receivers[from] = Some(rx);
                }
            }
        }
        eps
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.senders.len()
    }
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<(), CollectiveError> {
        let tx = self.senders[peer]
            .as_ref()
            .ok_or(CollectiveError::PeerGone { peer })?;
        tx.send(data.to_vec())
            .map_err(|_| CollectiveError::PeerGone { peer })
    }
    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<(), CollectiveError> {
        let rx = self.receivers[peer]
            .as_ref()
            .ok_or(CollectiveError::PeerGone { peer })?;
        let v = rx.recv().map_err(|_| CollectiveError::PeerGone { peer })?;
        if v.len() != out.len() {
            return Err(CollectiveError::SizeMismatch {
                peer,
                got: v.len(),
                want: out.len(),
            });
        }
        out.copy_from_slice(&v);
        Ok(())
    }
}
