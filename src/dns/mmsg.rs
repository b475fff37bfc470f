//! Datagrams in batches: `recvmmsg(2)` takes every query waiting on a socket (up to
//! [`BATCH`]) in one system call, and `sendmmsg(2)` sends their answers in one. Under
//! load a worker then sleeps and wakes once per batch instead of once per query, which
//! is where a UDP server on a busy machine spends its time (scheduler and wake-ups, not
//! its own code). Linux only, like the rest of the server's socket handling.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::SockAddr;

/// Datagrams moved per system call at most.
pub const BATCH: usize = 32;
/// The same, as the system calls take it (32 fits any C unsigned int).
const BATCH_C: libc::c_uint = BATCH as libc::c_uint;
/// An address buffer's size, as the kernel takes it (128 bytes fits a socklen_t).
const ADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// Receive buffers for one worker: [`BATCH`] datagrams of `len` bytes each.
pub struct Received {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

impl Received {
    pub fn new(len: usize) -> Self {
        Received {
            bufs: (0..BATCH).map(|_| vec![0u8; len].into_boxed_slice()).collect(),
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            count: 0,
        }
    }

    /// Waits for at least one datagram (within the socket's read timeout), then takes
    /// every one already waiting, up to [`BATCH`]. Returns how many.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.count = 0;
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.bufs[i].len() };
            // SAFETY: all-zero is a valid msghdr; the fields set point at live buffers.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = std::ptr::from_mut(&mut self.addrs[i]).cast();
            hdr.msg_namelen = ADDR_LEN;
            hdr.msg_iov = std::ptr::from_mut(&mut self.iovs[i]);
            hdr.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr { msg_hdr: hdr, msg_len: 0 };
        }
        // SAFETY: `hdrs` holds BATCH initialised headers whose buffers outlive the call.
        let n = unsafe { libc::recvmmsg(socket.as_raw_fd(), self.hdrs.as_mut_ptr(), BATCH_C, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.count = usize::try_from(n).unwrap_or(0).min(BATCH);
        Ok(self.count)
    }

    /// Datagram `i` of the last [`Received::recv`] and its sender (`None`: not an IP
    /// sender, or `i` out of range). A datagram longer than the buffer is cut to it.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.count {
            return None;
        }
        let len = usize::try_from(self.hdrs[i].msg_len).unwrap_or(usize::MAX).min(self.bufs[i].len());
        Some((&self.bufs[i][..len], socket_addr(&self.addrs[i])?))
    }
}

/// The IP address and port in a `sockaddr_storage` the kernel filled.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large enough for.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Sends every `(datagram, destination)` in as few `sendmmsg` calls as the kernel takes
/// them. A datagram the kernel refuses is skipped, as a failed `send_to` would be, and
/// the rest still go; the first such error is returned.
pub fn send_all(socket: &UdpSocket, out: &[(Vec<u8>, SocketAddr)]) -> io::Result<()> {
    let addrs: Vec<SockAddr> = out.iter().map(|(_, to)| SockAddr::from(*to)).collect();
    let mut iovs: Vec<libc::iovec> = out.iter().map(|(d, _)| libc::iovec { iov_base: d.as_ptr().cast_mut().cast(), iov_len: d.len() }).collect();
    let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(out.len());
    for (i, addr) in addrs.iter().enumerate() {
        // SAFETY: all-zero is a valid msghdr; the fields set point at live buffers.
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_name = addr.as_ptr().cast_mut().cast();
        hdr.msg_namelen = addr.len();
        hdr.msg_iov = std::ptr::from_mut(&mut iovs[i]);
        hdr.msg_iovlen = 1;
        hdrs.push(libc::mmsghdr { msg_hdr: hdr, msg_len: 0 });
    }
    let (mut done, mut first_error) = (0, None);
    while done < hdrs.len() {
        let rest = &mut hdrs[done..];
        let len = libc::c_uint::try_from(rest.len()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: `rest` holds initialised headers whose buffers and addresses outlive the
        // call; the kernel only reads them (and writes `msg_len`).
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), rest.as_mut_ptr(), len, 0) };
        match usize::try_from(n) {
            Ok(sent) if sent > 0 => done += sent,
            // The first datagram left failed: skip it, keep the rest going.
            _ => {
                first_error.get_or_insert_with(io::Error::last_os_error);
                done += 1;
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_batch_is_received_and_answered_in_order() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = server.local_addr().unwrap();
        // More than one batch waiting, one longer than the buffer.
        let n = BATCH + 3;
        for i in 0..n {
            client.send_to(&[i as u8; 3], to).unwrap();
        }
        client.send_to(&[7u8; 100], to).unwrap();
        let mut rx = Received::new(16);
        let mut got = Vec::new();
        while got.len() < n + 1 {
            let k = rx.recv(&server).unwrap();
            assert!(k >= 1 && k <= BATCH);
            for i in 0..k {
                let (d, from) = rx.get(i).unwrap();
                assert_eq!(from, client.local_addr().unwrap());
                got.push(d.to_vec());
            }
            assert!(rx.get(k).is_none(), "only what was received");
        }
        assert_eq!(got[..n], (0..n).map(|i| vec![i as u8; 3]).collect::<Vec<_>>()[..]);
        assert_eq!(got[n], vec![7u8; 16], "cut to the buffer");
        let answers: Vec<(Vec<u8>, SocketAddr)> = got.iter().map(|d| (d.iter().map(|b| b + 1).collect(), client.local_addr().unwrap())).collect();
        send_all(&server, &answers).unwrap();
        let mut buf = [0u8; 64];
        for (want, _) in &answers {
            let (len, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..len], from), (&want[..], to));
        }
        assert!(send_all(&server, &[]).is_ok());
    }
}
