//! What the stack takes from the kernel's view of its interface: index, MAC, MTU, IPv4
//! address and prefix, and the number of receive queues.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;

#[derive(Debug, Clone)]
pub struct NetDev {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: usize,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub rx_queues: u32,
}

impl NetDev {
    pub fn lookup(name: &str) -> io::Result<NetDev> {
        let cname = CString::new(name).map_err(|_| io::Error::other("interface name has a NUL byte"))?;
        // SAFETY: `cname` is a live NUL-terminated string for the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface named {name}")));
        }
        let sys = format!("/sys/class/net/{name}");
        let read = |f: &str| {
            std::fs::read_to_string(format!("{sys}/{f}"))
                .map(|s| s.trim().to_string())
                .map_err(|e| io::Error::new(e.kind(), format!("{sys}/{f}: {e}")))
        };
        let mac = parse_mac(&read("address")?).ok_or_else(|| {
            io::Error::other(format!("{name} has no Ethernet address (an Ethernet device is needed)"))
        })?;
        let mtu = read("mtu")?.parse().map_err(|_| io::Error::other(format!("{name}: unreadable MTU")))?;
        let rx_queues = std::fs::read_dir(format!("{sys}/queues"))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
            .count() as u32;
        let (addr, prefix) = ipv4_of(name)?.ok_or_else(|| {
            io::Error::other(format!(
                "{name} has no IPv4 address: the stack serves the kernel's address of its interface"
            ))
        })?;
        Ok(NetDev { name: name.to_string(), ifindex, mac, mtu, addr, prefix, rx_queues: rx_queues.max(1) })
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The first IPv4 address on `name` and its prefix length (getifaddrs(3)).
fn ipv4_of(name: &str) -> io::Result<Option<(Ipv4Addr, u8)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() && found.is_none() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        if unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in (and so is its netmask).
        let (addr, mask) = unsafe {
            let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let m = if ifa.ifa_netmask.is_null() {
                0
            } else {
                (*(ifa.ifa_netmask as *const libc::sockaddr_in)).sin_addr.s_addr
            };
            (a.sin_addr.s_addr, m)
        };
        found = Some((Ipv4Addr::from(u32::from_be(addr)), u32::from_be(mask).count_ones() as u8));
    }
    // SAFETY: the list from getifaddrs above, freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_with_its_address() {
        let lo = NetDev::lookup("lo").expect("lo");
        assert_eq!(lo.addr, Ipv4Addr::LOCALHOST);
        assert_eq!(lo.prefix, 8);
        assert!(lo.ifindex > 0);
        assert!(NetDev::lookup("no-such-if0").is_err());
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00"), None);
    }
}
