//! Counting the entries of a pinned BPF map with raw `bpf(2)` calls (no bpftool on these machines,
//! and no aya in xtask): what a benchmark really made the daemon write.

use anyhow::{Result, bail};
use std::ffi::CString;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The leading fields of `struct bpf_map_info`.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` is 8-byte aligned and larger than any command here uses.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }

    fn put_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn put_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn call(&mut self, cmd: libc::c_long) -> std::io::Result<libc::c_long> {
        // SAFETY: `self` is a zero-padded bpf_attr for `cmd`; every pointer in it refers to a
        // buffer the caller keeps alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                self.0.len() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
}

/// Entries in the map pinned at `pin` (walks the keys; fine for maps of a few 100,000 entries).
pub fn count_entries(pin: &Path) -> Result<usize> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let fd = Attr::new()
        .put_u64(0, path.as_ptr() as u64)
        .call(BPF_OBJ_GET)
        .map_err(|e| anyhow::anyhow!("opening pinned map {}: {e}", pin.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
    let mut info = MapInfo::default();
    Attr::new()
        .put_u32(0, raw)
        .put_u32(4, std::mem::size_of::<MapInfo>() as u32)
        .put_u64(8, &mut info as *mut MapInfo as u64)
        .call(BPF_OBJ_GET_INFO_BY_FD)?;
    if info.key_size == 0 || info.key_size > 4096 {
        bail!("{}: unexpected key size {}", pin.display(), info.key_size);
    }
    let mut key = vec![0u8; info.key_size as usize];
    let mut next = vec![0u8; info.key_size as usize];
    let mut n = 0;
    loop {
        let mut attr = Attr::new();
        attr.put_u32(0, raw)
            .put_u64(8, if n == 0 { 0 } else { key.as_ptr() as u64 })
            .put_u64(16, next.as_mut_ptr() as u64);
        match attr.call(BPF_MAP_GET_NEXT_KEY) {
            Ok(_) => {
                n += 1;
                std::mem::swap(&mut key, &mut next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => bail!("walking {}: {e}", pin.display()),
        }
    }
}
