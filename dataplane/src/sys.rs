//! The few system calls aya 0.14 does not expose: which interface a pinned TCX link is bound to,
//! interface names/addresses of the current thread's netns, and the bpffs check.

use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

fn sys_bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: attr points to a live, zero-initialised buffer of `size` bytes laid out as the
    // kernel's `union bpf_attr` prefix for `cmd`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// What the kernel says about a pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub prog_id: u32,
    /// Interface of a TCX link; 0 once the interface is gone (the link is then defunct).
    pub ifindex: u32,
}

pub const BPF_LINK_TYPE_TCX: u32 = 11;

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; __s32 path_fd; }
    let mut attr = [0u8; 24];
    attr[..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    let fd = sys_bpf(BPF_OBJ_GET, attr.as_mut_ptr(), attr.len())?;
    // SAFETY: BPF_OBJ_GET returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn pinned_link_info(path: &Path) -> io::Result<LinkInfo> {
    link_info(&obj_get(path)?)
}

/// Detaches the pinned link now, then removes the pin. Unlinking alone is not enough: the link is
/// only released after an RCU grace period (bpffs frees inodes through RCU), so the program would
/// keep running for a moment after `remove_endpoint`/`uninstall` returned.
pub fn detach_and_unpin(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    match obj_get(path) {
        Ok(fd) => {
            let mut attr = [0u8; 8];
            attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
            match sys_bpf(BPF_LINK_DETACH, attr.as_mut_ptr(), attr.len()) {
                Ok(_) => {}
                // Already defunct (its interface is gone) or a link type that cannot detach:
                // removing the pin below is all there is left to do.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLINK | libc::EOPNOTSUPP)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // Not a BPF object or unreadable: still try to remove the file.
        Err(_) => {}
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    use std::os::fd::AsRawFd as _;
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union; tcx = { ifindex, attach_type }.
    let mut info = [0u32; 64];
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&((info.len() * 4) as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), attr.len())?;
    Ok(LinkInfo {
        link_type: info[0],
        prog_id: info[2],
        // The union starts at byte 16 (8-byte aligned after three u32s).
        ifindex: info[4],
    })
}

/// True when `path` lives on a bpffs mount (pins elsewhere fail with confusing errors).
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as libc::c_long == BPF_FS_MAGIC)
}

/// Interface index in the calling thread's netns.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Interface name in the calling thread's netns.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname NUL-terminates on success.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Addresses of the calling thread's netns: (MAC of `mac_of`, every IPv4 address on any interface
/// except loopback).
pub fn interface_addresses(mac_of: &str) -> io::Result<(Option<[u8; 6]>, Vec<Ipv4Addr>)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut mac = None;
    let mut addrs = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list returned by getifaddrs, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: as above; ifa_name is a C string.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        // SAFETY: ifa_addr is non-null and at least a sockaddr.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_PACKET && name == mac_of {
            // SAFETY: AF_PACKET entries carry a sockaddr_ll.
            let ll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
            if ll.sll_halen == 6 {
                let mut m = [0u8; 6];
                m.copy_from_slice(&ll.sll_addr[..6]);
                mac = Some(m);
            }
        } else if family == libc::AF_INET {
            // SAFETY: AF_INET entries carry a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() {
                addrs.push(ip);
            }
        }
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    addrs.sort();
    addrs.dedup();
    Ok((mac, addrs))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`, which stamps the
/// programs' expiry times.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Every (key, value) of the map pinned at `path`, as raw bytes of the sizes the kernel reports.
/// aya's typed handles refuse a map whose value size differs from the type's; this reads a map
/// an older release left with another layout, to salvage what its records say.
pub fn dump_pinned_map_raw(
    path: &Path,
    key_size: usize,
    value_size: usize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use std::os::fd::AsRawFd as _;
    let fd = obj_get(path)?;
    let raw = fd.as_raw_fd() as u32;
    let mut out = Vec::new();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    loop {
        // struct { u32 map_fd; u32 pad; u64 key; u64 next_key; }
        let mut attr = [0u8; 24];
        attr[..4].copy_from_slice(&raw.to_ne_bytes());
        let key_ptr = if first { 0 } else { key.as_ptr() as u64 };
        attr[8..16].copy_from_slice(&key_ptr.to_ne_bytes());
        attr[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, attr.as_mut_ptr(), attr.len()) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        let mut value = vec![0u8; value_size];
        // struct { u32 map_fd; u32 pad; u64 key; u64 value; u64 flags; }
        let mut attr = [0u8; 32];
        attr[..4].copy_from_slice(&raw.to_ne_bytes());
        attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, attr.as_mut_ptr(), attr.len()) {
            Ok(_) => out.push((key.clone(), value)),
            // Deleted between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
}
