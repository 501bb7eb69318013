//! Which sidecar address stands for which upstream broker.
//!
//! Every broker the upstream's answers name gets a listener of its own on the sidecar
//! (base port + node id, or a port given per node), and clients are told that address
//! instead of the broker's. The listener is bound before the first answer naming its
//! broker leaves, so a client never learns an address nobody listens on; a node id that
//! cannot have a port refuses the answer (the connection closes with a log line) rather
//! than name a wrong or real address.
//!
//! # Invariants
//! - A node's listener, once bound, stays bound for the life of the process: clients
//!   keep connecting to the port they were told, whatever the upstream does later.
//! - The upstream address a node's listener connects to is the one the latest answer
//!   named (a broker that moved is followed; host names are resolved at each connect).

use kafka_protocol::protocol::StrBytes;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use super::rewrite::{Advertise, RewriteError};

/// Node id → sidecar port, and the host clients are told.
#[derive(Debug, Clone)]
pub struct PortPlan {
    host: StrBytes,
    base: u16,
    explicit: Vec<(i32, u16)>,
}

impl PortPlan {
    /// Brokers get `base + node id` unless `explicit` names their port.
    pub fn new(host: &str, base: u16, explicit: Vec<(i32, u16)>) -> PortPlan {
        PortPlan { host: StrBytes::from_string(host.to_string()), base, explicit }
    }

    /// The port standing for `node_id`, or why there is none.
    pub fn port_of(&self, node_id: i32) -> Result<u16, RewriteError> {
        if let Some(&(_, port)) = self.explicit.iter().find(|(id, _)| *id == node_id) {
            return Ok(port);
        }
        let refuse = |reason: String| RewriteError::Refused { node_id, reason };
        if node_id < 0 {
            return Err(refuse("a negative node id has no port".into()));
        }
        let port = i64::from(self.base) + i64::from(node_id);
        u16::try_from(port).map_err(|_| {
            refuse(format!(
                "base port {} + node id {node_id} is past 65535: give it a port with --broker-port {node_id}=PORT",
                self.base
            ))
        })
    }

    pub fn host(&self) -> &StrBytes {
        &self.host
    }
}

/// Maps without opening anything (unit tests and the fuzz target).
impl Advertise for PortPlan {
    fn endpoint(&mut self, node_id: i32, _: &str, _: i32) -> Result<(StrBytes, i32), RewriteError> {
        Ok((self.host.clone(), i32::from(self.port_of(node_id)?)))
    }
}

struct Node {
    /// Where the upstream says the broker is.
    upstream: (String, u16),
    port: u16,
}

/// A listener just bound for a node, for the accept loop to take.
pub struct Opened {
    pub node_id: i32,
    pub listener: TcpListener,
}

/// The brokers seen so far, shared by every connection.
pub struct Cluster {
    plan: PortPlan,
    listen_ip: IpAddr,
    /// Ports the sidecar holds for other purposes (the bootstrap listener).
    reserved: Vec<u16>,
    nodes: Mutex<HashMap<i32, Node>>,
    opened: tokio::sync::mpsc::UnboundedSender<Opened>,
}

impl Cluster {
    pub fn new(
        plan: PortPlan,
        listen_ip: IpAddr,
        reserved: Vec<u16>,
        opened: tokio::sync::mpsc::UnboundedSender<Opened>,
    ) -> Cluster {
        Cluster { plan, listen_ip, reserved, nodes: Mutex::new(HashMap::new()), opened }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Node>> {
        // The map stays consistent at every step, so a panic elsewhere leaves it usable.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the upstream last said broker `node_id` is.
    pub fn upstream_of(&self, node_id: i32) -> Option<(String, u16)> {
        self.nodes().get(&node_id).map(|n| n.upstream.clone())
    }

    /// Records that the upstream names broker `node_id` at `host:port`, binding its
    /// listener if it has none yet; returns the sidecar port that stands for it.
    pub fn learn(&self, node_id: i32, host: &str, port: i32) -> Result<u16, RewriteError> {
        let refuse = |reason: String| RewriteError::Refused { node_id, reason };
        let upstream_port = u16::try_from(port).map_err(|_| refuse(format!("the upstream names it at port {port}")))?;
        let mut nodes = self.nodes();
        if let Some(n) = nodes.get_mut(&node_id) {
            if n.upstream.0 != host || n.upstream.1 != upstream_port {
                log::info!(
                    "sidecar: broker {node_id} moved from {}:{} to {host}:{upstream_port}",
                    n.upstream.0,
                    n.upstream.1
                );
                n.upstream = (host.to_string(), upstream_port);
            }
            return Ok(n.port);
        }
        let ours = self.plan.port_of(node_id)?;
        if self.reserved.contains(&ours) || nodes.values().any(|n| n.port == ours) {
            return Err(refuse(format!("port {ours} is already the sidecar's for something else")));
        }
        let at = SocketAddr::new(self.listen_ip, ours);
        let listener = TcpListener::bind(at).map_err(|e| refuse(format!("cannot listen on {at}: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| refuse(format!("{at}: {e}")))?;
        log::info!(
            "sidecar: broker {node_id} ({host}:{upstream_port}) is {}:{ours} (listening on {at})",
            self.plan.host()
        );
        // The accept loop is spawned by whoever owns the receiver; the socket already
        // queues connections, so an answer naming this port can leave now.
        self.opened.send(Opened { node_id, listener }).map_err(|_| refuse("the sidecar is stopping".into()))?;
        nodes.insert(node_id, Node { upstream: (host.to_string(), upstream_port), port: ours });
        Ok(ours)
    }
}

/// A connection's way of advertising: through the shared cluster.
pub struct Learn(pub Arc<Cluster>);

impl Advertise for Learn {
    fn endpoint(&mut self, node_id: i32, host: &str, port: i32) -> Result<(StrBytes, i32), RewriteError> {
        let ours = self.0.learn(node_id, host, port)?;
        Ok((self.0.plan.host().clone(), i32::from(ours)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_the_plan_and_refuse_what_does_not_fit() {
        let plan = PortPlan::new("side", 30000, vec![(111, 40111), (70000, 40000)]);
        assert_eq!(plan.port_of(0).ok(), Some(30000));
        assert_eq!(plan.port_of(3).ok(), Some(30003));
        assert_eq!(plan.port_of(111).ok(), Some(40111));
        assert_eq!(plan.port_of(70000).ok(), Some(40000));
        assert!(matches!(plan.port_of(-1), Err(RewriteError::Refused { node_id: -1, .. })));
        assert!(matches!(plan.port_of(35536), Err(RewriteError::Refused { .. })));
        assert_eq!(plan.port_of(35535).ok(), Some(65535));
    }

    #[test]
    fn a_learned_broker_is_listened_for_before_its_port_is_returned_and_followed_when_it_moves() {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = probe.local_addr().expect("addr").port();
        drop(probe);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let c = Arc::new(Cluster::new(PortPlan::new("side", base, Vec::new()), [127, 0, 0, 1].into(), vec![], tx));
        let port = c.learn(0, "10.0.0.1", 9092).expect("learn");
        assert_eq!(port, base);
        let opened = rx.try_recv().expect("a listener was opened");
        assert_eq!((opened.node_id, opened.listener.local_addr().expect("addr").port()), (0, base));
        std::net::TcpStream::connect(("127.0.0.1", base)).expect("the port accepts before any accept loop runs");
        // Learned again: same port, no second listener; a move is followed.
        assert_eq!(c.learn(0, "10.0.0.9", 9093).expect("again"), base);
        assert!(rx.try_recv().is_err());
        assert_eq!(c.upstream_of(0), Some(("10.0.0.9".into(), 9093)));
        // A port that is taken, and one reserved, refuse the answer.
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let c = Cluster::new(PortPlan::new("side", base, Vec::new()), [127, 0, 0, 1].into(), vec![base + 1], tx);
        assert!(c.learn(0, "h", 1).is_err(), "port held by the listener opened above");
        assert!(c.learn(1, "h", 1).is_err(), "reserved port");
        assert!(c.learn(2, "h", 70000).is_err(), "an impossible upstream port");
        let mut view = Learn(Arc::new(c));
        assert!(view.endpoint(-5, "h", 1).is_err());
    }
}
