//! The XDP program that steers the broker's packets to the AF_XDP sockets, and its RAII
//! attachment (raw `bpf(2)`: one map, one program, one link; no libbpf, no toolchain).
//!
//! The program is assembled here, instruction by instruction, with the broker's address
//! and ports as immediates (so there is nothing to build with a BPF compiler and nothing
//! to keep in sync with a committed object). What it does, in C terms:
//!
//! ```c
//! if (eth->h_proto == htons(ETH_P_IP) && ip->protocol == IPPROTO_TCP
//!     && ip->daddr == BROKER_ADDR && !(ip->frag_off & htons(IP_OFFSET))
//!     && ip->ihl >= 5 && tcp->dest is one of BROKER_PORTS)
//!     return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_DROP);
//! return XDP_PASS;
//! ```
//!
//! Everything else (ARP, ICMP, SSH to the same address, other ports) goes to the kernel.
//! A broker packet arriving on a queue with no socket in the map is dropped (the
//! `XDP_DROP` in the helper's flags), never passed: the kernel would answer it with a
//! reset, since it has no such connection.
//!
//! # Invariants
//! - The program is attached through a BPF *link*, so it is detached when the last
//!   descriptor of the link closes, which the kernel does when the process dies, however
//!   it dies: a killed broker leaves nothing behind on the interface.
#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;

const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
const BPF_PSEUDO_MAP_FD: u8 = 1;

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

/// How the program is attached: in the driver (`drv`, native XDP) or after the kernel has
/// built its socket buffer (`skb`, generic XDP, any device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native if the driver has it, else generic.
    #[default]
    Auto,
    Drv,
    Skb,
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn encode(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.src << 4) | (self.dst & 0x0f);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

// Opcodes used (class | op | source): see the kernel's Documentation/bpf/standardization.
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
const ADD64_K: u8 = 0x07;
const ADD64_X: u8 = 0x0f;
const AND64_K: u8 = 0x57;
const LSH64_K: u8 = 0x67;
const MOV64_K: u8 = 0xb7;
const MOV64_X: u8 = 0xbf;
const JA: u8 = 0x05;
const JGT_X: u8 = 0x2d;
const JNE_K: u8 = 0x55;
const JLT_K: u8 = 0xa5;
/// 32-bit compares (JMP32 class): the immediates are addresses and ports whose top bit
/// may be set, which a 64-bit compare would sign-extend.
const JNE32_K: u8 = 0x56;
const JEQ32_K: u8 = 0x16;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_DW_IMM: u8 = 0x18;

/// A jump target, resolved when the program is finished.
#[derive(Clone, Copy)]
enum Label {
    Pass,
    Redirect,
}

/// A two-pass assembler: jumps name labels, offsets are filled in at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    fixups: Vec<(usize, Label)>,
    pass: Option<usize>,
    redirect: Option<usize>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn { code, dst, src, off, imm });
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }
    fn here(&mut self, label: Label) {
        let at = Some(self.insns.len());
        match label {
            Label::Pass => self.pass = at,
            Label::Redirect => self.redirect = at,
        }
    }
    fn finish(mut self) -> Vec<u8> {
        for (at, label) in std::mem::take(&mut self.fixups) {
            let target = match label {
                Label::Pass => self.pass,
                Label::Redirect => self.redirect,
            }
            .expect("every label used is placed");
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns.iter().flat_map(|i| i.encode()).collect()
    }
}

/// The program's instructions for `addr` and `ports`, redirecting through the map `map_fd`.
fn program(addr: Ipv4Addr, ports: &[u16], map_fd: RawFd) -> Vec<u8> {
    // Registers: r6 = ctx (struct xdp_md), r2 = data, r3 = data_end, r4/r5 scratch.
    // Loads from the packet are little-endian on the host: a network-order field compares
    // with the immediate made from its bytes in wire order.
    let be16 = |v: u16| i32::from(u16::from_le_bytes(v.to_be_bytes()));
    let addr_imm = i32::from_le_bytes(addr.octets());
    let mut a = Asm::default();
    a.op(MOV64_X, 6, 1, 0, 0);
    a.op(LDX_W, 2, 6, 0, 0); // data
    a.op(LDX_W, 3, 6, 4, 0); // data_end
    a.op(MOV64_X, 4, 2, 0, 0);
    a.op(ADD64_K, 4, 0, 0, 14 + 20); // Ethernet header + minimal IPv4 header
    a.jump(JGT_X, 4, 3, 0, Label::Pass);
    a.op(LDX_H, 5, 2, 12, 0); // EtherType
    a.jump(JNE32_K, 5, 0, be16(0x0800), Label::Pass);
    a.op(LDX_B, 5, 2, 14 + 9, 0); // IP protocol
    a.jump(JNE32_K, 5, 0, 6, Label::Pass);
    a.op(LDX_W, 5, 2, 14 + 16, 0); // destination address
    a.jump(JNE32_K, 5, 0, addr_imm, Label::Pass);
    a.op(LDX_H, 5, 2, 14 + 6, 0); // flags and fragment offset
    a.op(AND64_K, 5, 0, 0, be16(0x1fff)); // a later fragment carries no TCP header
    a.jump(JNE_K, 5, 0, 0, Label::Pass);
    a.op(LDX_B, 5, 2, 14, 0); // version and IHL
    a.op(AND64_K, 5, 0, 0, 0x0f);
    a.op(LSH64_K, 5, 0, 0, 2); // header length in bytes, 0..=60
    a.jump(JLT_K, 5, 0, 20, Label::Pass);
    a.op(ADD64_X, 2, 5, 0, 0); // r2 = data + IP header length
    a.op(MOV64_X, 4, 2, 0, 0);
    a.op(ADD64_K, 4, 0, 0, 14 + 4); // through the TCP ports
    a.jump(JGT_X, 4, 3, 0, Label::Pass);
    a.op(LDX_H, 5, 2, 14 + 2, 0); // TCP destination port
    for p in ports {
        a.jump(JEQ32_K, 5, 0, be16(*p), Label::Redirect);
    }
    a.jump(JA, 0, 0, 0, Label::Pass);
    a.here(Label::Redirect);
    a.op(LD_DW_IMM, 1, BPF_PSEUDO_MAP_FD, 0, map_fd);
    a.op(0, 0, 0, 0, 0); // second half of the 64-bit immediate
    a.op(LDX_W, 2, 6, 16, 0); // ctx->rx_queue_index
    a.op(MOV64_K, 3, 0, 0, XDP_DROP); // the verdict when the queue has no socket
    a.op(CALL, 0, 0, 0, BPF_FUNC_REDIRECT_MAP);
    a.op(EXIT, 0, 0, 0, 0);
    a.here(Label::Pass);
    a.op(MOV64_K, 0, 0, 0, XDP_PASS);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf(cmd, attr)`, returning a new descriptor (or 0) or the error.
///
/// # Safety
/// `attr` must be the attribute struct `cmd` expects, and every pointer in it must be
/// valid for what the kernel reads or writes through it during the call.
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`; its size is passed, so the kernel reads
    // nothing beyond it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` is a descriptor the kernel has just created for us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// The XSK map, the program and its link on one interface; dropping it detaches.
pub struct XdpAttachment {
    // Field order is drop order: the link (detach) first.
    _link: OwnedFd,
    _prog: OwnedFd,
    map: OwnedFd,
    /// The mode the kernel accepted.
    pub mode: XdpMode,
}

impl XdpAttachment {
    /// Loads the program for `addr`/`ports` and attaches it to `ifindex`, with a map of
    /// `queues` socket slots.
    pub fn attach(ifindex: u32, addr: Ipv4Addr, ports: &[u16], queues: u32, mode: XdpMode) -> io::Result<Self> {
        let mut name = [0u8; 16];
        name[..8].copy_from_slice(b"sl_xsks\0");
        let mut m = MapCreateAttr {
            map_type: BPF_MAP_TYPE_XSKMAP,
            key_size: 4,
            value_size: 4,
            max_entries: queues.max(1),
            map_name: name,
            ..Default::default()
        };
        // SAFETY: a BPF_MAP_CREATE attribute with no pointers.
        let map = owned(unsafe { bpf(BPF_MAP_CREATE, &mut m) }.map_err(|e| with_context(e, "creating the XSK map"))?);
        let code = program(addr, ports, map.as_raw_fd());
        let prog = load(&code)?;
        let modes: &[(XdpMode, u32)] = match mode {
            XdpMode::Auto => &[(XdpMode::Drv, XDP_FLAGS_DRV_MODE), (XdpMode::Skb, XDP_FLAGS_SKB_MODE)],
            XdpMode::Drv => &[(XdpMode::Drv, XDP_FLAGS_DRV_MODE)],
            XdpMode::Skb => &[(XdpMode::Skb, XDP_FLAGS_SKB_MODE)],
        };
        let mut last = io::Error::other("no XDP mode tried");
        for (mode, flags) in modes {
            // A killed predecessor's link goes away as its process is reaped: retry a
            // moment while the interface is still busy with it.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut l = LinkCreateAttr {
                    prog_fd: prog.as_raw_fd() as u32,
                    target_ifindex: ifindex,
                    attach_type: BPF_XDP,
                    flags: *flags,
                };
                // SAFETY: a BPF_LINK_CREATE attribute with no pointers.
                match unsafe { bpf(BPF_LINK_CREATE, &mut l) } {
                    Ok(fd) => return Ok(XdpAttachment { _link: owned(fd), _prog: prog, map, mode: *mode }),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        log::debug!("XDP attach in {mode:?} mode: {e}");
                        last = with_context(e, &format!("attaching the XDP program ({mode:?} mode)"));
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// Puts the AF_XDP socket `fd` in the slot of receive queue `queue`.
    pub fn insert(&self, queue: u32, fd: RawFd) -> io::Result<()> {
        let key = queue;
        let value = fd as u32;
        let mut a = MapElemAttr {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            ..Default::default()
        };
        // SAFETY: `key` and `value` are live u32s for the call, the sizes the map was made with.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut a) }
            .map(|_| ())
            .map_err(|e| with_context(e, "adding the socket to the XSK map"))
    }

    /// Empties the slot of `queue` (its socket is going away).
    pub fn remove(&self, queue: u32) {
        let key = queue;
        let mut a =
            MapElemAttr { map_fd: self.map.as_raw_fd() as u32, key: &key as *const u32 as u64, ..Default::default() };
        // SAFETY: `key` is a live u32 for the call.
        if let Err(e) = unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut a) } {
            log::debug!("removing queue {queue}'s socket from the XSK map: {e}");
        }
    }
}

fn load(code: &[u8]) -> io::Result<OwnedFd> {
    let license = c"Dual BSD/GPL";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"slipstream");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: (code.len() / 8) as u32,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    // SAFETY: `insns` and `license` point at live memory of the sizes given.
    match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            // Again with the verifier's log, so the error says why.
            let mut log_buf = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log_buf.len() as u32;
            attr.log_buf = log_buf.as_mut_ptr() as u64;
            // SAFETY: as above, plus `log_buf`, live and `log_size` bytes long.
            let _ = unsafe { bpf(BPF_PROG_LOAD, &mut attr) };
            let end = log_buf.iter().position(|b| *b == 0).unwrap_or(log_buf.len());
            let text = String::from_utf8_lossy(&log_buf[..end]);
            Err(with_context(e, &format!("loading the XDP program; verifier: {}", text.trim())))
        }
    }
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => " (needs CAP_BPF and CAP_NET_ADMIN, or root)",
        _ => "",
    };
    io::Error::new(e.kind(), format!("{what}: {e}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_PROG_TEST_RUN: libc::c_int = 10;

    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
    }

    /// The verdict of the program (loaded into this kernel, through its verifier) on `packet`.
    fn verdict(prog: &OwnedFd, packet: &[u8]) -> u32 {
        let mut out = vec![0u8; packet.len() + 256];
        let mut a = TestRunAttr {
            prog_fd: prog.as_raw_fd() as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: data_in/data_out point at live buffers of the sizes given.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut a) }.expect("BPF_PROG_TEST_RUN");
        a.retval
    }

    fn tcp_packet(dst: [u8; 4], port: u16, ihl: u8) -> Vec<u8> {
        let ip_len = usize::from(ihl) * 4;
        let mut p = vec![0u8; 14 + ip_len + 20];
        p[12..14].copy_from_slice(&[0x08, 0x00]);
        p[14] = 0x40 | ihl;
        p[14 + 9] = 6;
        p[14 + 16..14 + 20].copy_from_slice(&dst);
        p[14 + ip_len..14 + ip_len + 2].copy_from_slice(&50000u16.to_be_bytes());
        p[14 + ip_len + 2..14 + ip_len + 4].copy_from_slice(&port.to_be_bytes());
        p
    }

    /// The hand-assembled program through the kernel's verifier and on real packets (needs
    /// CAP_BPF, as the tests run in CI: root). With no socket in the map, a broker packet
    /// is dropped: anything else passes to the kernel.
    #[test]
    fn the_kernel_runs_the_program_as_meant() {
        let mut m = MapCreateAttr {
            map_type: BPF_MAP_TYPE_XSKMAP,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            ..Default::default()
        };
        // SAFETY: a BPF_MAP_CREATE attribute with no pointers.
        let map = owned(unsafe { bpf(BPF_MAP_CREATE, &mut m) }.expect("creating an XSK map (needs CAP_BPF: root)"));
        let addr = [10, 77, 1, 200];
        let prog = load(&program(Ipv4Addr::from(addr), &[9092, 9093], map.as_raw_fd()))
            .expect("the verifier accepts the program");
        let drop = XDP_DROP as u32;
        let pass = XDP_PASS as u32;
        assert_eq!(verdict(&prog, &tcp_packet(addr, 9092, 5)), drop, "broker port");
        assert_eq!(verdict(&prog, &tcp_packet(addr, 9093, 5)), drop, "second listener");
        assert_eq!(verdict(&prog, &tcp_packet(addr, 9092, 15)), drop, "IP options: the port found past them");
        assert_eq!(verdict(&prog, &tcp_packet(addr, 22, 5)), pass, "ssh to the same address");
        assert_eq!(verdict(&prog, &tcp_packet([10, 77, 1, 201], 9092, 5)), pass, "another address");
        let mut udp = tcp_packet(addr, 9092, 5);
        udp[14 + 9] = 17;
        assert_eq!(verdict(&prog, &udp), pass, "UDP");
        let mut frag = tcp_packet(addr, 9092, 5);
        frag[14 + 7] = 1; // fragment offset 8 bytes: no TCP header here
        assert_eq!(verdict(&prog, &frag), pass, "a later fragment");
        let mut arp = tcp_packet(addr, 9092, 5);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(verdict(&prog, &arp), pass, "ARP");
        let whole = tcp_packet(addr, 9092, 5);
        assert_eq!(verdict(&prog, &whole[..14 + 20 + 3]), pass, "truncated before the port");
        assert_eq!(verdict(&prog, &whole[..14 + 10]), pass, "truncated IP header");
    }

    #[test]
    fn jumps_land_on_their_labels() {
        let code = program(Ipv4Addr::new(10, 0, 0, 200), &[9092, 443], 7);
        let insns: Vec<&[u8]> = code.chunks(8).collect();
        // The last two instructions are the pass verdict; every jump to it lands there.
        let pass = insns.len() - 2;
        assert_eq!(insns[pass][0], MOV64_K);
        assert_eq!(i32::from_le_bytes(insns[pass][4..8].try_into().unwrap()), XDP_PASS);
        for (i, insn) in insns.iter().enumerate() {
            let op = insn[0];
            if op & 0x07 == 0x05 || op & 0x07 == 0x06 {
                if op == CALL || op == EXIT {
                    continue;
                }
                let off = i16::from_le_bytes([insn[2], insn[3]]) as i64;
                let target = (i as i64 + 1 + off) as usize;
                assert!(target < insns.len(), "jump {i} out of the program");
            }
        }
        // Ports as wire-order immediates: 9092 = 0x2384 is bytes 23 84 on the wire.
        assert!(insns.iter().any(|i| i[0] == JEQ32_K && i32::from_le_bytes(i[4..8].try_into().unwrap()) == 0x8423));
        // The address whose last octet has the top bit set stays a 32-bit compare.
        assert!(insns.iter().any(|i| i[0] == JNE32_K
            && i32::from_le_bytes(i[4..8].try_into().unwrap()) == i32::from_le_bytes([10, 0, 0, 200])));
    }
}
