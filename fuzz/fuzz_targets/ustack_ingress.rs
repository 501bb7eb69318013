//! Any frames off the wire into the user-space stack as the ustack transport sets it up:
//! the demultiplexer's `classify`, then the IP packet into a `Medium::Ip` smoltcp
//! interface (the vendored, patched crate) holding one connection's socket set, as
//! configured by the transport (Nagle off, delayed ACK, the RTO floor), listening on the
//! broker's port; then whatever it answers. Nothing may panic. Input: frames, each a
//! 2-byte length and its bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slipstream::transport::ustack::classify;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket};

struct Wire<'a> {
    packet: Option<&'a [u8]>,
    sent: usize,
}
struct Rx<'a>(&'a [u8]);
struct Tx<'a>(&'a mut usize);

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}
impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        *self.0 += 1;
        f(&mut vec![0u8; len])
    }
}
impl Device for Wire<'_> {
    type RxToken<'b> = Rx<'b> where Self: 'b;
    type TxToken<'b> = Tx<'b> where Self: 'b;
    fn receive(&mut self, _: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let p = self.packet.take()?;
        Some((Rx(p), Tx(&mut self.sent)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        (self.sent < 64).then(|| Tx(&mut self.sent))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

fn fill_checksums(ip: &mut [u8]) {
    let Ok(mut p) = Ipv4Packet::new_checked(&mut *ip) else { return };
    p.fill_checksum();
    let (src, dst, hl, total) = (p.src_addr(), p.dst_addr(), usize::from(p.header_len()), usize::from(p.total_len()));
    if p.next_header() != IpProtocol::Tcp || total > ip.len() || hl > total {
        return;
    }
    if let Ok(mut t) = TcpPacket::new_checked(&mut ip[hl..total]) {
        t.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
    }
}

const ADDR: Ipv4Address = Ipv4Address::new(10, 77, 1, 2);

fuzz_target!(|data: &[u8]| {
    let mut wire = Wire { packet: None, sent: 0 };
    let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut wire, Instant::from_millis(0));
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ADDR), 24));
    });
    let _ = iface.routes_mut().add_default_ipv4_route(ADDR);
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; 4096]));
    s.set_nagle_enabled(false);
    s.set_ack_delay(Some(Duration::from_millis(1)));
    s.set_min_rto(Duration::from_millis(200));
    if s.listen(IpListenEndpoint { addr: Some(IpAddress::Ipv4(ADDR)), port: 9092 }).is_err() {
        return;
    }
    let mut set = SocketSet::new(Vec::new());
    let h = set.add(s);
    let mut rest = data;
    let mut now = 0;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (frame, tail) = rest[2..].split_at(len);
        rest = tail;
        now += 50;
        // As the transport: whole Ethernet frames are classified; the stack sees IP packets.
        let mut ip = match classify(frame) {
            Some(c) => {
                assert!(c.ip.len() + 14 == frame.len());
                c.ip.to_vec()
            }
            None => frame.to_vec(),
        };
        // Odd lengths: as they came (checksums mostly wrong: the checks are fuzzed). Even:
        // checksums made right, so the TCP state machine behind them is reached.
        if len % 2 == 0 {
            fill_checksums(&mut ip);
        }
        let mut wire = Wire { packet: Some(&ip), sent: 0 };
        iface.poll_ingress_single(Instant::from_millis(now), &mut wire, &mut set);
        let _ = iface.poll_egress(Instant::from_millis(now), &mut wire, &mut set);
        let sock = set.get_mut::<tcp::Socket>(h);
        if sock.can_recv() {
            let _ = sock.recv(|d| (d.len(), ()));
        }
        if sock.can_send() {
            let _ = sock.send_slice(b"answer");
        }
    }
});
