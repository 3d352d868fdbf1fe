//! Packets that leave a stack through the tunnel instead of the TUN device.

use crate::flow::Remote;

/// Which way a forwarded packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardKind {
    /// A client packet, from the node where it entered to the node that owns the flow.
    ToOwner,
    /// A packet for the client, from the owner to the node where the flow's packets enter.
    ToIngress,
}

/// One packet to send through the tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// Which way.
    pub kind: ForwardKind,
    /// The node, and the flow's id there (what the envelope names).
    pub to: Remote,
    /// The IPv4 packet. Its TCP checksum may be partial: the driver cuts it with
    /// [`crate::segment::segment`], which completes every checksum.
    pub packet: &'a [u8],
    /// The segment size the packet was meant to be cut into (0: none).
    pub gso_size: u16,
}

/// Forwarded packets of one turn, in reused buffers.
#[derive(Debug, Default)]
pub(crate) struct ForwardQueue {
    items: Vec<(ForwardKind, Remote, u16)>,
    bufs: Vec<Vec<u8>>,
}

impl ForwardQueue {
    pub(crate) fn push(&mut self, kind: ForwardKind, to: Remote, packet: &[u8], gso_size: u16) {
        let i = self.items.len();
        if i == self.bufs.len() {
            self.bufs.push(Vec::new());
        }
        let buf = &mut self.bufs[i];
        buf.clear();
        buf.extend_from_slice(packet);
        self.items.push((kind, to, gso_size));
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Hands every queued packet to `f` and empties the queue (keeping the buffers).
    pub(crate) fn drain(&mut self, mut f: impl FnMut(Forwarded<'_>)) {
        for (&(kind, to, gso_size), buf) in self.items.iter().zip(&self.bufs) {
            f(Forwarded {
                kind,
                to,
                packet: buf,
                gso_size,
            });
        }
        self.items.clear();
        // Do not pin 64 KB buffers forever after a burst.
        self.bufs.truncate(64);
    }
}
