//! Local migration (`ferry migrate --local`, to a `ferry receive` on a
//! unix socket of the same host): guest RAM is not copied but handed over.
//! The source's memory lives in memfds (`ferry run --memfd`); their
//! descriptors cross the socket as `SCM_RIGHTS` ancillary data, the
//! destination maps the same pages and builds its VM around them while the
//! guest still runs at the source; only then does the source pause and
//! send the vCPU and device state. The guest's stop is then the state
//! alone, whatever the memory size (Cloud Hypervisor's local migration and
//! QEMU's cpr-transfer do the same).

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

/// The stream number of the connection that carries the memory descriptors.
pub const FD_STREAM: u32 = 100;

/// Most descriptors one local migration passes (one per RAM range).
pub const MAX_FDS: usize = 8;

/// Sends `files` over the unix socket `sock` with a one-byte payload.
pub(crate) fn send_fds(sock: RawFd, files: &[File]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if files.is_empty() || files.len() > MAX_FDS {
        return Err(std::io::Error::other(format!("{} descriptors to pass (1..={MAX_FDS})", files.len())));
    }
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut byte = [files.len() as u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; zero is a valid start.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer has room for one header and the descriptors.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
    }
    loop {
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives up to `max` descriptors sent by [`send_fds`]; the payload byte
/// must say how many. Waits at most `timeout`.
pub(crate) fn recv_fds(sock: RawFd, max: usize, timeout: Duration) -> std::io::Result<Vec<File>> {
    let mut pfd = libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no memory descriptors within the timeout"));
    }
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps the descriptors from leaking to children.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut files = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // Each received descriptor is ours now: owned, so closed on every error path.
                    files.push(File::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n != 1 {
        return Err(std::io::Error::other("the peer closed the descriptor stream"));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(format!("more than {MAX_FDS} descriptors were sent")));
    }
    if files.len() != byte[0] as usize || files.len() > max {
        return Err(std::io::Error::other(format!(
            "{} descriptors arrived, the sender announced {}, at most {max} expected",
            files.len(),
            byte[0]
        )));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn descriptors_cross_a_socket_pair_and_share_contents() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"guest").unwrap();
        send_fds(a.as_raw_fd(), &[f.try_clone().unwrap()]).unwrap();
        let got = recv_fds(b.as_raw_fd(), 2, Duration::from_secs(5)).unwrap();
        assert_eq!(got.len(), 1);
        let mut g = &got[0];
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "guest");
        // Too many for the receiver: refused, nothing leaks into the caller.
        send_fds(a.as_raw_fd(), &[f.try_clone().unwrap(), f.try_clone().unwrap()]).unwrap();
        assert!(recv_fds(b.as_raw_fd(), 1, Duration::from_secs(5)).is_err());
        // A plain byte without descriptors is refused.
        (&a).write_all(&[1]).unwrap();
        assert!(recv_fds(b.as_raw_fd(), 1, Duration::from_secs(5)).is_err());
    }
}
